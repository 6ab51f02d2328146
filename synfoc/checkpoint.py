"""What a run folder holds and how it is written and read back: ``checkpoint.pt`` (atomic, loaded
with the safe loader), the students' weight files (``unet.safetensors``, ``foundation.safetensors``),
the resume checks, and :func:`load_run`, which rebuilds a finished run's students for ``evaluate``,
``predict`` and ``report``.

A write goes to a temporary file that is renamed into place, so a crash or a full disk never
destroys the last good file."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from synfoc.config import TrainConfig
from synfoc.data.split import SPLIT_FILES, read_split, split_key
from synfoc.errors import TrainingError, os_error_message, torch_load_reason
from synfoc.runtime import unwrap

CHECKPOINT = "checkpoint.pt"
DOMAIN_STATISTICS = "unet_domains.safetensors"


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a crash mid-write never destroys the last good file.

    A failed write (disk full, quota, permissions) removes the partial temporary file and raises
    :class:`TrainingError` naming the folder; the previous ``path`` is left as it was.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        kept = f"; the previous {path.name} is kept" if path.is_file() else ""
        raise TrainingError(f"{write_failure(exc, tmp)}{kept}") from None


def write_failure(exc: BaseException, path: Path) -> str:
    """What went wrong writing ``path``. PyTorch's zip writer reports a full disk as a RuntimeError
    ("enforce fail at inline_container.cc ... unexpected pos"), without errno: then the free space
    of the folder decides."""
    import errno
    import shutil
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return f"no space left on {path.parent} (writing {path.name})"
        return os_error_message(exc if exc.filename else OSError(exc.errno, exc.strerror, str(path)))
    with contextlib.suppress(OSError):
        if shutil.disk_usage(path.parent).free < 64 * 2**20:
            return f"no space left on {path.parent} (writing {path.name})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot write {path}: {first}"


def trainable_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers: all a student or teacher adds to its frozen base."""
    m = unwrap(m)
    state = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    state.update({n: b for n, b in m.named_buffers()})
    return state


def teacher_state(student: nn.Module, teacher: nn.Module) -> dict[str, torch.Tensor]:
    names = set(trainable_state(student))
    return {n: t for n, t in unwrap(teacher).state_dict().items() if n in names}


def save_student_weights(students: dict[str, nn.Module], out: Path, cfg: TrainConfig) -> None:
    from safetensors.torch import save_file
    from synfoc.models.weights import save_trainable
    for name, m in students.items():
        m = unwrap(m)
        if name == "unet":
            state = {k: v.contiguous() for k, v in m.state_dict().items()}
            write_safetensors(out / f"{name}.safetensors", lambda tmp: save_file(
                state, str(tmp), metadata={"model": "unet", "width": str(cfg.unet_width)}))
        else:
            write_safetensors(out / f"{name}.safetensors", lambda tmp: save_trainable(m, tmp))


def save_domain_statistics(stats: dict[str, dict[str, torch.Tensor]], out: Path) -> None:
    """``unet_domains.safetensors``: the U-Net's BatchNorm statistics per training domain
    (:func:`synfoc.views.domain_batchnorm_statistics`), keys ``DOMAIN/BUFFER``."""
    from safetensors.torch import save_file
    flat = {f"{domain}/{name}": v.contiguous() for domain, state in stats.items() for name, v in state.items()}
    write_safetensors(out / DOMAIN_STATISTICS, lambda tmp: save_file(flat, str(tmp)))


def load_domain_statistics(weights_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """What :func:`save_domain_statistics` wrote, or nothing for a run without the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(weights_dir) / DOMAIN_STATISTICS
    if not path.is_file():
        return {}
    try:
        flat = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        domain, _, name = key.rpartition("/")   # buffer names hold dots, never slashes
        out.setdefault(domain, {})[name] = value
    return out


def write_safetensors(target: Path, write) -> None:
    """``write(tmp)`` then rename to ``target``: a failed write keeps the previous file and says why."""
    from safetensors import SafetensorError
    tmp = target.with_name(target.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    except (OSError, RuntimeError, SafetensorError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TrainingError(f"{write_failure(exc, tmp)}; {CHECKPOINT} is kept: "
                            f"free some space and run `synfoc train --resume {target.parent}`") from None
    ordinary_file_mode(target)


def ordinary_file_mode(path: Path) -> None:
    """The mode every other file of a run gets (0666 less the umask, usually 0644): safetensors
    creates its files 0600, which other users of a shared run folder then cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_checkpoint(path: Path, device, run: Path) -> dict:
    """The state saved by training, loaded with the safe loader; a missing, truncated, foreign
    or unsafe file stops with a message (nothing in the run folder is changed)."""
    if not path.is_file():
        raise TrainingError(f"nothing to resume in {run}: {CHECKPOINT} not found")
    fresh = (f"The run cannot continue from it; start it again with "
             f"`synfoc train --config {run / 'config.yaml'} --out NEW_FOLDER`.")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read it means it cannot be used
        reason = torch_load_reason(str(exc)) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingError(f"cannot resume from {path}: {reason}. {fresh}") from None
    if not isinstance(state, dict) or not {"step", "students", "teachers", "optimizers"} <= set(state):
        raise TrainingError(f"cannot resume from {path}: not a synfoc training checkpoint. {fresh}")
    return state


def trim_history(path: Path, step: int, elapsed: float | None) -> float:
    """Drop the rows of ``history.jsonl`` after ``step`` (iterations after the checkpoint are done
    again) and return the training time at ``step``: ``elapsed`` when the checkpoint has it, else
    the time column of the row at ``step``."""
    if not path.is_file():
        return float(elapsed or 0.0)
    kept, at_step = [], None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row cut by a kill mid-write
        if row.get("step", 0) <= step:
            kept.append(line)
            if row.get("step") == step:
                at_step = row.get("time")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return float(elapsed if elapsed is not None else (at_step or 0.0))


def check_same_split(run: Path, dataset: str, labeled, unlabeled) -> None:
    """A resumed run must see the training cases it started with (``labeled.txt``,
    ``unlabeled.txt``), by name: moved data is fine, other data is refused."""
    for name, before, cases in zip(SPLIT_FILES, read_split(run), (labeled, unlabeled)):
        if before is None:
            continue
        path = run / name
        now = [split_key(c) for c in cases]
        if before != now:
            now_set, before_set = set(now), set(before)
            missing = [n for n in before if n not in now_set]
            extra = [n for n in now if n not in before_set]
            detail = ", ".join(filter(None, [
                f"{len(missing)} of its cases missing (e.g. {', '.join(missing[:3])})" if missing else "",
                f"{len(extra)} other cases (e.g. {', '.join(extra[:3])})" if extra else "",
                "the same cases in another order" if not missing and not extra else ""]))
            raise TrainingError(f"the dataset {dataset} does not hold the training cases of {path}: {detail}. "
                                "Point --dataset at the data this run was trained on.")


def load_run(run: Path, dataset: str | None = None, weights_dir: Path | None = None, device: str = "auto"):
    """(config, dataset index, students on the device in eval mode, runtime) of a finished run folder.

    Changes nothing process-wide: the allocator setting of training is not made here."""
    from safetensors.torch import load_file

    from synfoc.build import build_student
    from synfoc.config import run_config
    from synfoc.data.source import open_index
    from synfoc.models.weights import load_trainable
    from synfoc.runtime import make_runtime

    run = Path(run)
    cfg = run_config(run)
    cfg = cfg.update({"device": device} | ({"dataset": dataset} if dataset else {}), "command line")
    if cfg.dataset != "synthetic" and not Path(cfg.dataset).exists():
        where = "" if dataset else f" (as stored in {run / 'config.yaml'})"
        raise ValueError(f"the run's dataset {cfg.dataset} is not found{where}; pass --dataset PATH to say "
                         "where it is now")
    rt = make_runtime(cfg)
    index = open_index(cfg)
    if dataset:
        check_run_cases(run, index, dataset)
    weights_dir = Path(weights_dir or run)
    students = {}
    if (weights_dir / "unet.safetensors").is_file():
        unet = build_student("unet", cfg, index)
        try:
            unet.load_state_dict(load_file(str(weights_dir / "unet.safetensors")))
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"{weights_dir / 'unet.safetensors'} does not fit a U-Net for this dataset's "
                             f"{index.num_classes} class(es) and {index.channels} channel(s) "
                             f"({str(exc).strip().splitlines()[0]})") from None
        students["unet"] = unet
    if (weights_dir / "foundation.safetensors").is_file():
        fm = build_student("foundation", cfg, index)
        load_trainable(fm, weights_dir / "foundation.safetensors")
        students["foundation"] = fm
    if not students:
        raise ValueError(f"no student weights (unet.safetensors, foundation.safetensors) in {weights_dir}")
    return cfg, index, {k: m.to(rt.device).eval() for k, m in students.items()}, rt


def check_run_cases(run: Path, index, dataset: str) -> None:
    """Data given with ``--dataset`` for a run must hold the run's training cases (by domain and
    name, from ``labeled.txt`` / ``unlabeled.txt``): moved data passes, other data is refused."""
    names = {split_key(c) for c in index.cases_of(split="train")}
    wanted = [line for part in read_split(run) if part for line in part]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise ValueError(f"--dataset {dataset} is not the data of {run}: {len(missing)} of its {len(wanted)} "
                         f"training cases are missing there (e.g. {', '.join(missing[:3])})")

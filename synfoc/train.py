"""The training loop: devices, precision, data sampling, checkpoints and resume, logging, DDP.

The method itself lives in :mod:`synfoc.method`; this file only feeds it and keeps the run safe.
Launch on several GPUs or processes with ``torchrun --nproc_per_node N -m synfoc train ...``: each
process then draws its own batches (seed offset by rank), only the students are wrapped in
DistributedDataParallel, teachers stay local, and rank 0 alone writes logs and checkpoints.
Batch sizes are per process: the effective batch is N times larger.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from synfoc.augment import AugmentConfig, box_mask, draw_boxes, draw_strong, strong, warp, weak_grid
from synfoc.config import TrainConfig, validate
from synfoc.cpu import cpu_has_bf16
from synfoc.data.base import DataError, DatasetIndex, Problem
from synfoc.errors import Interrupted, TrainingError, os_error_message, torch_load_reason
from synfoc.method.baselines import SingleModel, models_of
from synfoc.method.ema import ema_update, make_teacher
from synfoc.method.synfoc import INSTANCES, SynFoC, Views

CHECKPOINT = "checkpoint.pt"
# A checkpoint is also written when this much wall time passed since the last one, so that a kill
# never loses more than about ten minutes of work, whatever the interval in iterations.
CHECKPOINT_SECONDS = 600.0


# ----------------------------------------------------------------------------- devices and precision
@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    rank: int = 0
    world: int = 1
    keeps_freed_memory: bool = False  # glibc keeps freed blocks for reuse (CPU, keep_freed_memory)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (``mallopt``, ``malloc_trim``), else None."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of giving it back to the OS (CPU training).

    By default glibc serves every block above a (dynamic, at most 32 MB) threshold with its own
    ``mmap`` and unmaps it on ``free``, and trims the heap's free top. Most activations of a training
    step are such blocks, so every iteration faulted in and zeroed fresh pages for them, several
    times slower than writing into reused memory. Without ``mmap`` for large blocks and without
    trimming, the step reuses its own freed memory (faster, at a somewhat higher peak resident
    memory; ``benchmarks/step_time.py --with-system-malloc`` measures it). Process-wide; only on glibc; ``SYNFOC_SYSTEM_MALLOC=1`` leaves the
    allocator as it is. Returns whether it was set.
    """
    libc = _glibc()
    if os.environ.get("SYNFOC_SYSTEM_MALLOC") or libc is None:
        return False
    # mallopt returns 1 on success; a trim threshold of -1 disables trimming (mallopt(3)).
    return bool(libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)


def release_freed_memory() -> None:
    """Give the free memory kept by :func:`keep_freed_memory` back to the OS (glibc ``malloc_trim``).

    Called at every checkpoint: with freed blocks kept, heap fragmentation lets the resident memory
    creep up over many iterations; trimming now and then bounds that, at the cost of faulting pages in again once."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def make_runtime(cfg: TrainConfig) -> Runtime:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but no CUDA device is available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    # bf16 on the CPU only where the CPU has bf16 arithmetic: elsewhere PyTorch runs bf16 on
    # emulating or reference kernels, slower than fp32, so asking for it there is refused.
    if cfg.precision == "fp32":
        dtype = None
    elif use_cuda or cpu_has_bf16():
        dtype = torch.bfloat16
    elif cfg.precision == "bf16":
        raise TrainingError("--precision bf16: this CPU has no bf16 support (needs AVX512-BF16 or AMX); "
                            "use --precision auto or fp32")
    else:
        dtype = None
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(device, dtype, rank, world, keeps_freed_memory=not use_cuda and keep_freed_memory())


def environment(rt: Runtime) -> dict:
    """Where a run ran: CPU model and the flags that decide synfoc's kernels, GPU, torch, commit."""
    import subprocess
    from synfoc.cpu import cpu_flags, cpu_model
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        src = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    return {"cpu": cpu_model(), "cpu_flags": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16",
                                                     "amx_bf16", "avx_ne_convert"}),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(), "synfoc_commit": commit,
            "device": str(rt.device), "precision": "bf16" if rt.dtype else "fp32", "processes": rt.world}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data
@dataclass
class Arrays:
    """Cases held in memory as uint8, once per model input size."""

    images: dict[int, torch.Tensor]   # size -> (N, C, S, S)
    labels: dict[int, torch.Tensor]   # size -> (N, S, S)

    def __len__(self) -> int:
        return next(iter(self.labels.values())).shape[0]

    def take(self, idx: torch.Tensor, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[size][idx].to(device, non_blocking=True).float().div_(255)
        return img, self.labels[size][idx].to(device, non_blocking=True).long()


def load_arrays(index: DatasetIndex, cases, sizes: list[int], progress: bool) -> Arrays:
    from synfoc.data import load_cases
    loaded = load_cases(index, cases, sorted(set(sizes)), progress=progress)
    return Arrays({s: a[0] for s, a in loaded.arrays.items()}, {s: a[1] for s, a in loaded.arrays.items()})


def open_index(cfg: TrainConfig) -> DatasetIndex:
    if cfg.dataset == "synthetic":
        from synfoc.data.synthetic import SyntheticDataset
        return SyntheticDataset(seed=0, train_per_domain=cfg.synthetic_train, test_per_domain=cfg.synthetic_test,
                                num_classes=cfg.synthetic_classes)
    from synfoc.data import open_dataset
    return open_dataset(cfg.dataset, cfg.format)


def epoch_order(n: int, batch: int, t: int, seed: int) -> torch.Tensor:
    """Indices of iteration t's batch: shuffled epochs, each permutation a function of (seed, epoch),
    so the data order is reproducible and a resumed run picks up exactly where it stopped."""
    out = []
    for k in range(t * batch, (t + 1) * batch):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(perm[pos])
    return torch.stack(out)


def make_views(cfg: TrainConfig, aug: AugmentConfig, labeled: Arrays, unlabeled: Arrays, t: int,
               sizes: dict[str, int], rt: Runtime, seed: int) -> Views:
    """Weak views of a labeled and an unlabeled batch, the strong view of the unlabeled one, and the
    intermediate-sample boxes, at every model input size, drawn on the CPU generator of iteration t."""
    g = torch.Generator().manual_seed(seed * 7_919 + t)
    li = epoch_order(len(labeled), cfg.batch_labeled, t, seed)
    ui = epoch_order(len(unlabeled), cfg.batch_unlabeled, t, seed + 1)
    su, sf = sizes.get("unet"), sizes.get("foundation")
    base = su or sf
    grid_l = weak_grid(len(li), base, aug, g)
    grid_u = weak_grid(len(ui), base, aug, g)
    strong_params = draw_strong(len(ui), aug, g)
    boxes = draw_boxes(min(len(li), len(ui)), aug, g)
    v = {}
    for key, size in (("u", su), ("f", sf)):
        if size is None:
            continue
        x, y = warp(*labeled.take(li, size, rt.device), grid_l)
        uw, uy = warp(*unlabeled.take(ui, size, rt.device), grid_u)
        v[f"x_{key}"], v[f"y_{key}"] = x, y
        v[f"uw_{key}"], v[f"us_{key}"] = uw, strong(uw, strong_params, aug)
        v[f"box_{key}"] = box_mask(boxes, size, rt.device)
        if size == base:
            v["unlabeled_truth"] = uy
    if su is None:  # foundation-only methods read the *_f fields; unet-only the *_u fields
        v["x_u"], v["y_u"] = v["x_f"], v["y_f"]
    return Views(**v)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, sources: list[Arrays], size: int, aug: AugmentConfig, rt: Runtime,
                          seed: int, batch: int = 16, max_images: int = 512) -> int:
    """Re-estimate BatchNorm's running statistics on weak views of the training images.

    During training the U-Net's running statistics follow batches that are half labeled weak views
    and half intermediate samples, whose strong views scale brightness and contrast by up to 20x;
    test images are neither, so the running statistics used at evaluation match neither half.
    Here they are reset and set to the plain average over weak views of (at most ``max_images``)
    training images, labeled and unlabeled, as "precise BatchNorm" does. Returns the image count.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    g = torch.Generator().manual_seed(seed * 7_919 - 1)
    total = sum(len(a) for a in sources)
    keep = torch.randperm(total, generator=g)[:max_images].sort().values
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    offset, count = 0, 0
    for arrays in sources:
        idx = keep[(keep >= offset) & (keep < offset + len(arrays))] - offset
        offset += len(arrays)
        for chunk in idx.split(batch):
            if len(chunk) < 2:  # a batch of one has no batch variance
                continue
            x, _ = warp(*arrays.take(chunk, size, rt.device), weak_grid(len(chunk), size, aug, g))
            with rt.autocast():
                model(x)
            count += len(chunk)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return count


# ----------------------------------------------------------------------------- models
def build_models(cfg: TrainConfig, index: DatasetIndex, rt: Runtime) -> dict[str, nn.Module]:
    from synfoc.models import build_foundation_model, build_unet
    models = {}
    kinds = models_of(cfg.method)
    if "unet" in kinds:
        models["unet"] = build_unet(index.channels, index.num_classes, cfg.unet_width)
    if "foundation" in kinds:
        models["foundation"] = build_foundation_model(
            cfg.foundation, index.num_classes, lora_rank=cfg.lora_rank, image_size=cfg.image_size,
            checkpoint=cfg.checkpoint, grad_checkpointing=cfg.grad_checkpointing)
    return fast_layout({k: m.to(rt.device) for k, m in models.items()}, rt)


def fast_layout(models: dict[str, nn.Module], rt: Runtime) -> dict[str, nn.Module]:
    """channels_last weights under bf16 autocast, where oneDNN/cuDNN convolutions prefer it
    (CPU fast step, LiteMedSAM-256 + U-Net-256: 12.8 s -> 9.3 s per iteration)."""
    if rt.dtype is not None:
        for m in models.values():
            m.to(memory_format=torch.channels_last)
    return models


def parameter_summary(models: dict[str, nn.Module]) -> str:
    lines = []
    for name, m in models.items():
        total = sum(p.numel() for p in m.parameters())
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        lines.append(f"  {name:<11} {total / 1e6:9.2f} M parameters, {trainable / 1e6:8.3f} M trainable")
    return "\n".join(lines)


def make_optimizers(cfg: TrainConfig, students: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
    """SGD for the U-Net and AdamW for the foundation model, as PyTorch's fused single-kernel
    implementations (CPU and CUDA, the devices synfoc runs on): the same updates up to float
    rounding, one pass over the parameters (U-Net width 64 on the 2-core Xeon: 65 ms -> 20 ms per
    step, ``benchmarks/kernels.py``)."""
    opts = {}
    if "unet" in students:
        opts["unet"] = torch.optim.SGD(students["unet"].parameters(), lr=cfg.lr_unet, momentum=cfg.momentum_unet,
                                       weight_decay=cfg.weight_decay_unet, fused=True)
    if "foundation" in students:
        params = [p for p in students["foundation"].parameters() if p.requires_grad]
        opts["foundation"] = torch.optim.AdamW(params, lr=cfg.lr_foundation, betas=(0.9, 0.999),
                                               weight_decay=cfg.weight_decay_foundation, fused=True)
    return opts


def unwrap(m: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DistributedDataParallel wrappers."""
    m = getattr(m, "_orig_mod", m)
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def quantiles(spread: dict[str, torch.Tensor]) -> dict[str, float]:
    """``NAME_p10``, ``NAME_p50``, ``NAME_p90`` of each per-instance log over a log window."""
    out = {}
    for k, v in spread.items():
        q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9]))
        out.update({f"{k}_p10": q[0].item(), f"{k}_p50": q[1].item(), f"{k}_p90": q[2].item()})
    return out


# ----------------------------------------------------------------------------- checkpoints
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
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    from synfoc.models.weights import save_trainable
    for name, m in students.items():
        m = unwrap(m)
        target = out / f"{name}.safetensors"
        tmp = out / f"{name}.safetensors.tmp"
        try:
            if name == "unet":
                save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp),
                          metadata={"model": "unet", "width": str(cfg.unet_width)})
            else:
                save_trainable(m, tmp)
            os.replace(tmp, target)
        except (OSError, RuntimeError, SafetensorError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise TrainingError(f"{write_failure(exc, tmp)}; {CHECKPOINT} is kept: "
                                f"free some space and run `synfoc train --resume {out}`") from None
        ordinary_file_mode(target)


def ordinary_file_mode(path: Path) -> None:
    """The mode every other file of a run gets (0666 less the umask, usually 0644): safetensors
    creates its files 0600, which other users of a shared run folder then cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def checkpoint_interval(cfg: TrainConfig) -> int:
    """Iterations between checkpoints: ``checkpoint_every``, else about 20 per run (at most 1000
    iterations apart); :data:`CHECKPOINT_SECONDS` of wall time also triggers one."""
    if cfg.checkpoint_every:
        return cfg.checkpoint_every
    return max(1, min(1000, math.ceil(cfg.iters / 20)))


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
    for name, cases in (("labeled.txt", labeled), ("unlabeled.txt", unlabeled)):
        path = run / name
        if not path.is_file():
            continue
        before = [line for line in path.read_text().splitlines() if line]
        now = [f"{c.domain}/{c.name}" for c in cases]
        if before != now:
            missing = [n for n in before if n not in set(now)]
            extra = [n for n in now if n not in set(before)]
            detail = ", ".join(filter(None, [
                f"{len(missing)} of its cases missing (e.g. {', '.join(missing[:3])})" if missing else "",
                f"{len(extra)} other cases (e.g. {', '.join(extra[:3])})" if extra else "",
                "the same cases in another order" if not missing and not extra else ""]))
            raise TrainingError(f"the dataset {dataset} does not hold the training cases of {path}: {detail}. "
                                "Point --dataset at the data this run was trained on.")


def problem_listing(head: str, problems) -> str:
    listing = "\n".join(f"  {p.file}: {p.problem}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{head}:\n{listing}{more}\nFix them, or pass --skip-bad to train without the affected cases."


def check_test_split(index: DatasetIndex, progress: bool) -> None:
    """Decode every test case now, so that a bad test file stops the run before the first
    iteration instead of at the final evaluation, hours later."""
    from tqdm import tqdm

    from synfoc.data.io import FileDataError
    problems = []
    for case in tqdm(index.cases_of(split="test"), desc="checking test split", unit="case", disable=not progress):
        try:
            index.read(case)
        except DataError as exc:
            problems.append(exc.as_problem() if isinstance(exc, FileDataError) else Problem(str(case.image), str(exc)))
    if problems:
        raise DataError(problem_listing(f"the test split has {len(problems)} problem(s)", problems))


class StopRequest:
    """Ctrl-C during training: finish the current iteration, write a checkpoint, then stop.
    A second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def on_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\nsynfoc: Ctrl-C: finishing this iteration and writing a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def interrupted_message(t: int, saved_step: int | None, out: Path) -> str:
    if saved_step is None:
        return (f"interrupted at iteration {t + 1}, before any checkpoint was written: "
                "there is nothing to resume")
    return (f"interrupted at iteration {t + 1}; the checkpoint of iteration {saved_step} is in "
            f"{out / CHECKPOINT}: continue with `synfoc train --resume {out}`")


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg.method`` and write the run folder ``out``; returns the summary."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from synfoc.data import check_domains, split_labeled, write_split
    from synfoc.evaluate import evaluate_students, write_evaluation
    from synfoc.report import write_progress_png

    validate(cfg)
    rt = make_runtime(cfg)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed = cfg.seed + 1000 * rt.rank
    seed_everything(cfg.seed)  # identical model initialisation on every rank
    say = (lambda *a: print(*a, flush=True)) if rt.master else (lambda *a: None)

    index = open_index(cfg)
    problems = list(index.problems)
    if cfg.dataset != "synthetic" and cfg.skip_bad:
        from synfoc.data import check_dataset, drop_bad
        problems = check_dataset(index)
        index, dropped = drop_bad(index, problems)
        say(f"--skip-bad: skipping {dropped} case(s) with problems ({len(problems)} problem(s) listed by `synfoc data check`)")
    elif problems:
        raise DataError(problem_listing(f"the dataset has {len(problems)} problem(s)", problems))
    domain = cfg.labeled_domain or index.domains[0]
    labeled_cases, unlabeled_cases = split_labeled(index, domain, cfg.labeled_num, cfg.labeled_ratio,
                                                   cfg.unlabeled_domains)
    check_domains(index, cfg.test_domains, "--test-domains")
    if resume:
        check_same_split(out, cfg.dataset, labeled_cases, unlabeled_cases)

    kinds = models_of(cfg.method)
    models = build_models(cfg, index, rt)
    sizes = {"unet": cfg.unet_size} if "unet" in kinds else {}
    if "foundation" in kinds:
        sizes["foundation"] = models["foundation"].image_size
    say(f"synfoc {cfg.method}: {len(labeled_cases)} labeled ({domain}), {len(unlabeled_cases)} unlabeled, "
        f"{cfg.iters} iterations on {rt.device} ({'bf16 autocast' if rt.dtype else 'fp32'}"
        f"{', freed memory kept for reuse' if rt.keeps_freed_memory else ''}"
        f"{', ' + str(rt.world) + ' processes' if rt.world > 1 else ''})")
    say(parameter_summary(models))

    labeled = load_arrays(index, labeled_cases, list(sizes.values()), progress and rt.master)
    unlabeled = load_arrays(index, unlabeled_cases, list(sizes.values()), progress and rt.master)
    if cfg.dataset != "synthetic" and not cfg.skip_bad:  # --skip-bad already decoded every file
        check_test_split(index, progress and rt.master)
    labeled_num = len(labeled_cases)
    if labeled_num < cfg.batch_labeled:
        say(f"note: {labeled_num} labeled cases < labeled batch {cfg.batch_labeled}; batches repeat cases")

    teachers = {k: make_teacher(m) for k, m in models.items()}
    for t_model in teachers.values():
        t_model.train(cfg.teacher_mode == "train")
    students = dict(models)
    if rt.world > 1:
        students = {k: nn.parallel.DistributedDataParallel(
            m, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=k == "foundation") for k, m in models.items()}
    if cfg.compile:  # compile after DDP wrapping, as torch.distributed recommends
        students = {k: torch.compile(m) for k, m in students.items()}
    optimizers = make_optimizers(cfg, {k: unwrap(m) for k, m in students.items()})
    parts = [values for _, values in index.report_parts]
    if cfg.method == "synfoc":
        method = SynFoC(students["unet"], students["foundation"], teachers["unet"], teachers["foundation"],
                        parts, cfg.threshold, cfg.alpha, cfg.consistency)
    else:
        k = kinds[0]
        method = SingleModel(cfg.method, students[k], teachers[k], cfg.threshold)
    aug = AugmentConfig(brightness=tuple(cfg.brightness), contrast=tuple(cfg.contrast))

    start, elapsed = 0, 0.0
    ckpt_path = out / CHECKPOINT
    if resume:
        state = load_checkpoint(ckpt_path, rt.device, out)
        try:
            for k in models:
                unwrap(models[k]).load_state_dict(state["students"][k], strict=False)
                unwrap(teachers[k]).load_state_dict(state["teachers"][k], strict=False)
                optimizers[k].load_state_dict(state["optimizers"][k])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise TrainingError(f"{ckpt_path} does not fit this run's models ({str(exc).splitlines()[0]}); "
                                f"was {out / 'config.yaml'} edited?") from None
        start = int(state["step"])
        say(f"resuming {out} at iteration {start}")

    # Setup is done: only now does the run folder get written, so a failed start leaves nothing.
    if rt.master:
        out.mkdir(parents=True, exist_ok=True)
        write_split(out, labeled_cases, unlabeled_cases)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        with (out / "environment.jsonl").open("a") as fh:  # one line per start or resume
            fh.write(json.dumps({"resumed": resume, **environment(rt)}) + "\n")
        if resume:
            elapsed = trim_history(out / "history.jsonl", start, state.get("elapsed"))
    saved_step = start if resume else None
    t0 = time.time() - elapsed

    def save_checkpoint(step: int) -> None:
        nonlocal saved_step
        if not rt.master:
            return
        atomic_save({"step": step, "config": cfg.to_dict(), "elapsed": time.time() - t0,
                     "students": {k: trainable_state(m) for k, m in models.items()},
                     "teachers": {k: teacher_state(models[k], teachers[k]) for k in models},
                     "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}, ckpt_path)
        saved_step = step

    # purge_step drops TensorBoard events written after the checkpoint resumed from (they are redone)
    writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if resume else None) if rt.master else None
    history = (out / "history.jsonl").open("a") if rt.master else None
    for m in students.values():
        m.train()
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not (progress and rt.master),
               dynamic_ncols=True, desc="train")
    sums: dict[str, torch.Tensor] = {}
    instances: dict[str, list[torch.Tensor]] = {}
    count = 0
    every = checkpoint_interval(cfg)
    last_save = time.time()
    # fault injection for the resume and interruption tests
    fault_at = int(os.environ.get("SYNFOC_FAULT_AT_STEP", -1))
    interrupt_at = int(os.environ.get("SYNFOC_INTERRUPT_AT_STEP", -1))
    stop = StopRequest()
    t = start
    with contextlib.ExitStack() as guard:
        if rt.world == 1:  # under DDP every rank would stop at a different iteration
            guard.enter_context(stop.on_sigint())
        try:
            for t in bar:
                if t == fault_at:
                    os.kill(os.getpid(), 9)
                if t == interrupt_at:
                    os.kill(os.getpid(), signal.SIGINT)
                views = make_views(cfg, aug, labeled, unlabeled, t, sizes, rt, seed)
                with rt.autocast():
                    loss, logs = method.step(views, t, cfg.iters)
                for o in optimizers.values():
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in optimizers.values():
                    o.step()
                for k in models:
                    ema_update(teachers[k], unwrap(students[k]), t, cfg.ema_decay)
                for k, val in logs.items():   # accumulate on the device; read back only at log time
                    if k.endswith(INSTANCES):
                        instances.setdefault(k[:-len(INSTANCES)], []).append(val.detach().float())
                    else:
                        sums[k] = sums.get(k, 0) + val.detach().float()
                count += 1
                last = t + 1 == cfg.iters
                due = ((t + 1) % every == 0 or last or stop.requested
                       or time.time() - last_save >= CHECKPOINT_SECONDS)
                if (t + 1) % cfg.log_every == 0 or due:
                    means = {k: (v / count).item() for k, v in sums.items()}
                    spread = {k: torch.cat(v).cpu() for k, v in instances.items()}
                    sums, instances, count = {}, {}, 0
                    if not all(math.isfinite(v) for v in means.values()):
                        bad = ", ".join(k for k, v in means.items() if not math.isfinite(v))
                        kept = (f"The checkpoint of iteration {saved_step} is kept in {ckpt_path}"
                                if saved_step is not None else "No checkpoint was written before it")
                        raise TrainingError(f"non-finite loss at iteration {t + 1} ({bad}); stopping. {kept}. "
                                            "Try a lower learning rate or --precision fp32.")
                    if rt.master:
                        bar.set_postfix({k: f"{means[k]:.3f}" for k in ("loss", "loss_x", "loss_u", "alpha")
                                         if k in means})
                        for k, v in means.items():
                            writer.add_scalar(f"train/{k}", v, t + 1)
                        for k, v in spread.items():
                            writer.add_histogram(f"train/{k}", v, t + 1)
                        history.write(json.dumps({"step": t + 1, "time": round(time.time() - t0, 2), **means,
                                                  **quantiles(spread)}) + "\n")
                        history.flush()
                    if due:
                        save_checkpoint(t + 1)
                        last_save = time.time()
                        if rt.keeps_freed_memory:
                            release_freed_memory()
                        if rt.master:
                            write_progress_png(out)
                if cfg.eval_every and (t + 1) % cfg.eval_every == 0 and rt.master:
                    _track_best_on_test(cfg, index, {k: unwrap(m) for k, m in students.items()}, out, t + 1, rt,
                                        writer)
                if stop.requested and not last:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if writer:
                writer.close()
            raise Interrupted(interrupted_message(t, saved_step, out)) from None
        finally:
            if history:
                history.close()
    bar.close()

    summary = None
    if rt.master:
        if cfg.recalibrate_bn and "unet" in models:
            n = recalibrate_batchnorm(unwrap(models["unet"]), [labeled, unlabeled], sizes["unet"], aug, rt, seed)
            say(f"U-Net BatchNorm statistics re-estimated on weak views of {n} training images")
        save_student_weights(students, out, cfg)
        results = evaluate_students({k: unwrap(m) for k, m in students.items()}, index, cfg, rt.device,
                                    rt.autocast, progress=progress)
        summary = write_evaluation(results, out, cfg, index)
        for kind, res in summary["students"].items():
            for metric, v in res["mean"].items():
                writer.add_scalar(f"test/{kind}/{metric}", v, cfg.iters)
        writer.close()
    if rt.world > 1:
        dist.barrier()
    return summary


def _track_best_on_test(cfg, index, students, out: Path, step: int, rt: Runtime, writer) -> None:
    """The authors' protocol (optimistic, off by default): keep the students with the best mean
    test Dice seen every ``eval_every`` iterations, in ``RUN/best_on_test/``."""
    from synfoc.evaluate import evaluate_students, summarise
    results = evaluate_students(students, index, cfg, rt.device, rt.autocast, progress=False)
    summary = summarise(results, cfg, index)
    best_file = out / "best_on_test" / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else {}
    for kind, res in summary["students"].items():
        dice = res["mean"]["dice"]
        writer.add_scalar(f"test/{kind}/dice", dice, step)
        if dice > best.get(kind, {}).get("dice", -1):
            best[kind] = {"dice": dice, "step": step}
            best_file.parent.mkdir(exist_ok=True)
            save_student_weights({kind: students[kind]}, best_file.parent, cfg)
    best_file.write_text(json.dumps(best, indent=2))

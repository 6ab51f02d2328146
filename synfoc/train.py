"""The training loop: set up a run from its configuration, then iterate, log and checkpoint.

nanoGPT's shape: everything it calls lives elsewhere. The method (one iteration's loss) is in
:mod:`synfoc.method`, the batches and their views in :mod:`synfoc.views`, devices and precision
in :mod:`synfoc.runtime`, students and optimizers in :mod:`synfoc.build`, run-folder files in
:mod:`synfoc.checkpoint`, the final evaluation in :mod:`synfoc.evaluate`.

Launch on several GPUs or processes with ``torchrun --nproc_per_node N -m synfoc train ...``: each
process then draws its own batches (seed offset by rank), only the students are wrapped in
DistributedDataParallel, teachers stay local, and rank 0 alone writes logs and checkpoints.
Batch sizes are per process: the effective batch is N times larger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from synfoc.accel import CompiledSamViTBlock, accelerate
from synfoc.augment import AugmentConfig
from synfoc.build import build_method, build_students, make_optimizers, parameter_summary, with_image_size
from synfoc.checkpoint import (CHECKPOINT, atomic_save, check_same_split, load_checkpoint, save_domain_statistics,
                               save_student_weights, teacher_state, trainable_state, trim_history)
from synfoc.config import TrainConfig, validate
from synfoc.data.base import DataError, DatasetIndex, Problem
from synfoc.data.source import open_index
from synfoc.errors import Interrupted, TrainingError
from synfoc.memory import needs_grad_checkpointing
from synfoc.method.ema import ema_update, make_teacher
from synfoc.method.registry import models_of
from synfoc.method.synfoc import INSTANCES
from synfoc.runtime import (Runtime, environment, fast_layout, make_runtime, release_freed_memory, seed_everything,
                            unwrap)
from synfoc.views import domain_batchnorm_statistics, load_arrays, make_views, recalibrate_batchnorm

# A checkpoint is also written when this much wall time passed since the last one, so that a kill
# never loses more than about ten minutes of work, whatever the interval in iterations.
CHECKPOINT_SECONDS = 600.0


# ----------------------------------------------------------------------------- helpers of the loop
def quantiles(spread: dict[str, torch.Tensor]) -> dict[str, float]:
    """``NAME_p10``, ``NAME_p50``, ``NAME_p90`` of each per-instance log over a log window."""
    out = {}
    for k, v in spread.items():
        q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9]))
        out.update({f"{k}_p10": q[0].item(), f"{k}_p50": q[1].item(), f"{k}_p90": q[2].item()})
    return out


def domain_means(spread: dict[str, torch.Tensor], domains: torch.Tensor, names: list[str]) -> dict[str, float]:
    """``NAME/DOMAIN``: the mean of each per-instance log over the instances from each unlabeled
    domain in a log window. ``domains[i]`` is the position in ``names`` of instance i's domain, in
    the order the instances were logged; a log of another length (not one value per unlabeled
    image) is left out."""
    out = {}
    for k, v in spread.items():
        if len(v) != len(domains):
            continue
        for i, name in enumerate(names):
            of_domain = domains == i
            if of_domain.any():
                out[f"{k}/{name}"] = v[of_domain].mean().item()
    return out


def checkpoint_interval(cfg: TrainConfig) -> int:
    """Iterations between checkpoints: ``checkpoint_every``, else about 20 per run (at most 1000
    iterations apart); :data:`CHECKPOINT_SECONDS` of wall time also triggers one."""
    if cfg.checkpoint_every:
        return cfg.checkpoint_every
    return max(1, min(1000, math.ceil(cfg.iters / 20)))


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
    cfg = with_image_size(cfg)   # config.yaml names the foundation input size trained at
    models = fast_layout({k: m.to(rt.device) for k, m in build_students(cfg, index).items()}, rt)
    models = {k: accelerate(m, rt.device) for k, m in models.items()}  # synfoc.accel's kernels for this CPU
    sizes = {"unet": cfg.unet_size} if "unet" in kinds else {}
    if "foundation" in kinds:
        sizes["foundation"] = models["foundation"].image_size
    # Recompute the encoder's activations in backward where the step would not fit in free memory.
    switched, why = needs_grad_checkpointing(
        models, {k: (1, index.channels, s, s) for k, s in sizes.items()}, cfg.batch_labeled + cfg.batch_unlabeled,
        {"unet": 1, "foundation": 2}, rt.device, rt.autocast)   # SGD momentum; AdamW's two moments
    if switched:
        cfg = dataclasses.replace(cfg, grad_checkpointing=True)   # config.yaml says so; a resume rebuilds it
        say(why)
    say(f"synfoc {cfg.method}: {len(labeled_cases)} labeled ({domain}), {len(unlabeled_cases)} unlabeled, "
        f"{cfg.iters} iterations on {rt.device} ({'bf16 autocast' if rt.dtype else 'fp32'}"
        f"{', freed memory kept for reuse' if rt.keeps_freed_memory else ''}"
        f"{', ' + str(rt.world) + ' processes' if rt.world > 1 else ''})")
    say(parameter_summary(models))
    if any(isinstance(m, CompiledSamViTBlock) for model in models.values() for m in model.modules()):
        say("the SAM ViT encoder blocks train compiled (torch.compile, on this AMX CPU): "
            "the first iteration compiles them (up to about a minute)")

    labeled = load_arrays(index, labeled_cases, list(sizes.values()), progress and rt.master)
    unlabeled = load_arrays(index, unlabeled_cases, list(sizes.values()), progress and rt.master)
    if cfg.dataset != "synthetic" and not cfg.skip_bad:  # --skip-bad already decoded every file
        check_test_split(index, progress and rt.master)
    labeled_num = len(labeled_cases)
    # Per-instance logs are also averaged per unlabeled domain (alpha on one site can be 0 while
    # the batch mean looks ordinary), when the unlabeled images come from more than one.
    unlabeled_domains = sorted({c.domain for c in unlabeled_cases})
    domain_of = torch.tensor([unlabeled_domains.index(c.domain) for c in unlabeled_cases])
    per_domain = len(unlabeled_domains) > 1
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
    method = build_method(cfg, students, teachers, [values for _, values in index.report_parts])
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
    instance_domains: list[torch.Tensor] = []
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
                if per_domain:
                    instance_domains.append(domain_of[views.unlabeled_index])
                count += 1
                last = t + 1 == cfg.iters
                due = ((t + 1) % every == 0 or last or stop.requested
                       or time.time() - last_save >= CHECKPOINT_SECONDS)
                if (t + 1) % cfg.log_every == 0 or due:
                    means = {k: (v / count).item() for k, v in sums.items()}
                    spread = {k: torch.cat(v).cpu() for k, v in instances.items()}
                    if instance_domains:
                        means.update(domain_means(spread, torch.cat(instance_domains), unlabeled_domains))
                    sums, instances, instance_domains, count = {}, {}, [], 0
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
        domain_stats = {}
        if cfg.recalibrate_bn and "unet" in models:
            unet, sources = unwrap(models["unet"]), [labeled, unlabeled]
            domain_stats = domain_batchnorm_statistics(
                unet, sources, [[c.domain for c in labeled_cases], [c.domain for c in unlabeled_cases]],
                sizes["unet"], aug, rt, seed)
            n = recalibrate_batchnorm(unet, sources, sizes["unet"], aug, rt, seed)
            say(f"U-Net BatchNorm statistics re-estimated on weak views of {n} training images, and per "
                f"training domain ({', '.join(domain_stats)}) for evaluating each domain")
        save_student_weights(students, out, cfg)
        if domain_stats:
            save_domain_statistics(domain_stats, out)
        results = evaluate_students({k: unwrap(m) for k, m in students.items()}, index, cfg, rt.device,
                                    rt.autocast, progress=progress, domain_stats=domain_stats)
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

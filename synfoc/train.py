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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from synfoc.augment import AugmentConfig, box_mask, draw_boxes, draw_strong, strong, warp, weak_grid
from synfoc.config import TrainConfig
from synfoc.data.base import DataError, DatasetIndex
from synfoc.method.baselines import SingleModel, models_of
from synfoc.method.ema import ema_update, make_teacher
from synfoc.method.synfoc import INSTANCES, SynFoC, Views

CHECKPOINT = "checkpoint.pt"


class TrainingError(Exception):
    """A problem that stops training with a message for the user (no traceback)."""


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


def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16: the CPUs on which bf16 autocast is much faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


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
    step are such blocks, so every iteration faulted in and zeroed fresh pages for them: writing a
    freshly allocated 42 MB tensor took 23 ms against 4 ms for a reused one on the 2-core Xeon.
    Without ``mmap`` for large blocks and without trimming, the step reuses its own freed memory
    (measured in RESULTS.md: the benchmark step 4-15% faster on the shared 2-core machine, its peak
    resident memory 9% higher). Process-wide; only on glibc; ``SYNFOC_SYSTEM_MALLOC=1`` leaves the
    allocator as it is. Returns whether it was set.
    """
    libc = _glibc()
    if os.environ.get("SYNFOC_SYSTEM_MALLOC") or libc is None:
        return False
    # mallopt returns 1 on success; a trim threshold of -1 disables trimming (mallopt(3)).
    return bool(libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)


def release_freed_memory() -> None:
    """Give the free memory kept by :func:`keep_freed_memory` back to the OS (glibc ``malloc_trim``).

    Called at every checkpoint: with freed blocks kept, heap fragmentation let the resident memory
    of the 256-pixel benchmark step creep from 4641 to 4980 MiB over 40 iterations (RESULTS.md);
    trimming now and then bounds that, at the cost of faulting pages in again once."""
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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if cfg.precision == "fp32":
        dtype = None
    elif cfg.precision == "bf16" or use_cuda or cpu_has_bf16():
        dtype = torch.bfloat16
    else:
        dtype = None
    return Runtime(device, dtype, rank, world, keeps_freed_memory=not use_cuda and keep_freed_memory())


def environment(rt: Runtime) -> dict:
    """Where a run ran: CPU model and the flags that decide synfoc's kernels, GPU, torch, commit."""
    import subprocess
    cpu, flags = platform.processor(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        src = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    return {"cpu": cpu, "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16",
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
    """Write to a temporary file, then rename: a crash mid-write never destroys the last good file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
            tmp = out / "unet.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp),
                      metadata={"model": "unet", "width": str(cfg.unet_width)})
            os.replace(tmp, out / "unet.safetensors")
        else:
            save_trainable(m, out / "foundation.safetensors")


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg.method`` and write the run folder ``out``; returns the summary."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from synfoc.data import split_labeled, write_split
    from synfoc.evaluate import evaluate_students, write_evaluation
    from synfoc.report import write_progress_png

    rt = make_runtime(cfg)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed = cfg.seed + 1000 * rt.rank
    seed_everything(cfg.seed)  # identical model initialisation on every rank
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print(*a, flush=True)) if rt.master else (lambda *a: None)

    index = open_index(cfg)
    problems = list(index.problems)
    if cfg.dataset != "synthetic" and cfg.skip_bad:
        from synfoc.data import check_dataset, drop_bad
        problems = check_dataset(index)
        index, dropped = drop_bad(index, problems)
        say(f"--skip-bad: skipping {dropped} case(s) with problems ({len(problems)} problem(s) listed by `synfoc data check`)")
    elif problems:
        listing = "\n".join(f"  {p.file}: {p.problem}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"the dataset has {len(problems)} problem(s):\n{listing}{more}\n"
                        "Fix them, or pass --skip-bad to train without the affected cases.")
    domain = cfg.labeled_domain or index.domains[0]
    labeled_cases, unlabeled_cases = split_labeled(index, domain, cfg.labeled_num, cfg.labeled_ratio)
    if rt.master:
        write_split(out, labeled_cases, unlabeled_cases)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        with (out / "environment.jsonl").open("a") as fh:  # one line per start or resume
            fh.write(json.dumps({"resumed": resume, **environment(rt)}) + "\n")

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

    start = 0
    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise TrainingError(f"nothing to resume in {out}: {CHECKPOINT} not found")
        state = torch.load(ckpt_path, map_location=rt.device, weights_only=True)
        for k in models:
            unwrap(models[k]).load_state_dict(state["students"][k], strict=False)
            unwrap(teachers[k]).load_state_dict(state["teachers"][k], strict=False)
            optimizers[k].load_state_dict(state["optimizers"][k])
        start = int(state["step"])
        say(f"resuming {out} at iteration {start}")

    def save_checkpoint(step: int) -> None:
        if not rt.master:
            return
        atomic_save({"step": step, "config": cfg.to_dict(),
                     "students": {k: trainable_state(m) for k, m in models.items()},
                     "teachers": {k: teacher_state(models[k], teachers[k]) for k in models},
                     "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}, ckpt_path)

    writer = SummaryWriter(str(out / "tensorboard")) if rt.master else None
    history = (out / "history.jsonl").open("a") if rt.master else None
    for m in students.values():
        m.train()
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not (progress and rt.master),
               dynamic_ncols=True, desc="train")
    sums: dict[str, torch.Tensor] = {}
    instances: dict[str, list[torch.Tensor]] = {}
    count = 0
    t0 = time.time()
    fault_at = int(os.environ.get("SYNFOC_FAULT_AT_STEP", -1))  # fault injection for the resume tests
    for t in bar:
        if t == fault_at:
            os.kill(os.getpid(), 9)
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
        if (t + 1) % cfg.log_every == 0 or last or (t + 1) % cfg.checkpoint_every == 0:
            means = {k: (v / count).item() for k, v in sums.items()}
            spread = {k: torch.cat(v).cpu() for k, v in instances.items()}
            sums, instances, count = {}, {}, 0
            if not all(math.isfinite(v) for v in means.values()):
                bad = ", ".join(k for k, v in means.items() if not math.isfinite(v))
                raise TrainingError(f"non-finite loss at iteration {t + 1} ({bad}); stopping. The last good "
                                    f"checkpoint is kept in {ckpt_path}. Try a lower learning rate or --precision fp32.")
            if rt.master:
                bar.set_postfix({k: f"{means[k]:.3f}" for k in ("loss", "loss_x", "loss_u", "alpha") if k in means})
                for k, v in means.items():
                    writer.add_scalar(f"train/{k}", v, t + 1)
                for k, v in spread.items():
                    writer.add_histogram(f"train/{k}", v, t + 1)
                history.write(json.dumps({"step": t + 1, "time": round(time.time() - t0, 2), **means,
                                          **quantiles(spread)}) + "\n")
                history.flush()
            if (t + 1) % cfg.checkpoint_every == 0 or last:
                save_checkpoint(t + 1)
                if rt.keeps_freed_memory:
                    release_freed_memory()
                if rt.master:
                    write_progress_png(out)
        if cfg.eval_every and (t + 1) % cfg.eval_every == 0 and rt.master:
            _track_best_on_test(cfg, index, {k: unwrap(m) for k, m in students.items()}, out, t + 1, rt, writer)
    bar.close()
    if history:
        history.close()

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

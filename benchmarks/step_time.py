"""Time of one SynFoC training iteration, its FLOPs, and its share of the machine's matmul peak.

``fast``      the iteration exactly as :func:`synfoc.train.train` runs it: ``make_views`` (batched
              augmentation on the device), ``SynFoC.step`` under the runtime's autocast (bf16 on
              CUDA and on CPUs with AMX / AVX512-BF16), backward, both optimiser steps, EMA.
``against``   (with ``--against REV``) the same fast iteration, driven by this script, but with the
              synfoc package of a ``git worktree`` of commit REV: an A/B of two commits of this
              project on the same machine, in alternation.
``fast-no-accel`` (with ``--with-no-accel``) the fast iteration with the plain models, without
              :func:`synfoc.accel.accelerate`, which ``synfoc train`` applies: what the kernels it
              swaps in are worth to a whole step (``--accel-kernels`` limits the fast mode to some).
``fast-kernel-off`` (with ``--with-kernel-off NAME``) the fast iteration with every kernel of
              :mod:`synfoc.accel` this device gets except NAME: what that one kernel is worth.
``fast-system-malloc`` (with ``--with-system-malloc``) the fast iteration with glibc's default
              allocator (``SYNFOC_SYSTEM_MALLOC=1``): what :func:`synfoc.runtime.keep_freed_memory`,
              which ``synfoc train`` applies on the CPU, is worth on its own.

Each mode runs in its own child process, so its peak memory is its own: CUDA
``max_memory_allocated``, or on the CPU the peak resident set size (``getrusage``, whole process:
interpreter, models and activations). With ``--one-process`` the fast mode and the
``--with-no-accel`` / ``--with-kernel-off`` modes (same code, same process settings) share one
child instead: one step's activations are alive at a time, so a configuration that fits in memory
once can be compared (the paper configuration's two children do not fit in 24 GB), and the peak
memory is the pair's. All children are built first, then asked for one iteration
at a time in alternation (fast, against, fast, ...), so a machine whose speed drifts (a shared
host) slows every mode alike. The time is the median of ``--iters`` iterations after ``--warmup``
ones, with their min..max and interquartile range.

After the timed iterations each child counts the FLOPs of one more iteration (FlopCounterMode,
forward + backward) and times a large square matmul in the dtype its step computes in (bf16 under
autocast, else fp32) on the same device and threads: the model-FLOP utilisation (MFU) is the
step's achieved TFLOP/s over that matmul's. One CSV row per mode is appended to ``--csv``.
``--profile N`` profiles one more iteration: its N costliest operators, and its time and FLOPs
per kind of operator (matmul, convolution, other), each kind's share of the matmul peak.

    python benchmarks/step_time.py --config reduced --iters 5
    python benchmarks/step_time.py --config reduced --against 7a99b5b --iters 10
    python benchmarks/step_time.py --config reduced --with-no-accel --iters 10
    python benchmarks/step_time.py --config paper --grad-checkpointing --iters 2 --warmup 1 --json
    python benchmarks/step_time.py --config paper --with-kernel-off compiled_sam_vit_blocks --one-process --iters 8

``--config`` picks a standard configuration (:data:`CONFIGS`); explicit options override its
values. ViT models without ``--checkpoint`` get random weights (same shapes and cost as MedSAM's).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The checkout whose synfoc a child times. It goes first on sys.path: Python's path finder is
# consulted before the finder of an editable install, so the child gets this checkout's package
# whichever one the environment has installed (checked below, and reported).
CODE_ROOT = Path(os.environ.get("SYNFOC_BENCH_CODE", ROOT)).resolve()
sys.path.insert(0, str(CODE_ROOT))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads, as the synfoc CLI does
import synfoc  # noqa: E402
import torch  # noqa: E402

if not Path(synfoc.__file__).resolve().is_relative_to(CODE_ROOT):
    raise SystemExit(f"synfoc was imported from {synfoc.__file__}, not from {CODE_ROOT}")

sys.path.insert(1, str(Path(__file__).resolve().parent))
from machine import append_csv, device_description, git_describe, matmul_peak  # noqa: E402

MODES = ("fast", "against", "fast-system-malloc", "fast-no-accel", "fast-kernel-off")

# The standard configurations: the demo preset (synfoc/presets/demo.yaml), the reduced BUSI
# protocol, and the paper's BUSI configuration (MedSAM ViT-B at 512, U-Net width 64 at 256, 4+4).
CONFIGS = {
    "demo": {"foundation": "litemedsam", "image_size": 64, "unet_size": 128, "unet_width": 16,
             "batch_labeled": 2, "batch_unlabeled": 2},
    "reduced": {"foundation": "litemedsam", "image_size": 128, "unet_size": 128, "unet_width": 16,
                "batch_labeled": 2, "batch_unlabeled": 2},
    "paper": {"foundation": "medsam_vit_b", "image_size": 512, "unet_size": 256, "unet_width": 64,
              "batch_labeled": 4, "batch_unlabeled": 4},
}


# ----------------------------------------------------------------------------- setup
def synfoc_name(module: str, name: str, optional: bool = False):
    """``synfoc.<module>.<name>``, or for a commit from before train.py was split (``--against``)
    the same name in ``synfoc.train``; ``optional``: a no-op where neither has it."""
    import importlib

    import synfoc
    package = Path(synfoc.__file__).resolve().parent
    for where in (f"synfoc.{module}", "synfoc.train"):
        try:
            found = importlib.import_module(where)
        except ImportError:
            continue
        # The editable install's import hook resolves a module the older checkout lacks to the
        # current tree's file: only the checkout's own modules count.
        if package in Path(found.__file__).resolve().parents and hasattr(found, name):
            return getattr(found, name)
    if optional:   # older commits set the process up inside make_runtime
        return lambda *a, **k: None
    raise ImportError(f"synfoc.{module}.{name}")


def synthetic_arrays(n: int, size: int, domain: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` cases of the embedded synthetic set at ``size``: uint8 images (n, S, S), labels (n, S, S)."""
    from synfoc.data.synthetic import make_case
    cases = [make_case(0, domain, "train", i, size, num_classes) for i in range(n)]
    return np.stack([c[0][..., 0] for c in cases]), np.stack([c[1] for c in cases])


def parts_of(num_classes: int) -> list[tuple[int, ...]]:
    """SMC parts of the synthetic set: the lesion, and with two classes also its core."""
    return [(1,)] if num_classes == 1 else [(1, 2), (2,)]


def build_students(args, device: torch.device):
    """The U-Net and the foundation model with identical weights for any device (built on the CPU
    after seeding, then moved)."""
    from synfoc.models import build_foundation_model, build_unet
    seed_everything = synfoc_name("runtime", "seed_everything")
    seed_everything(args.seed)
    unet = build_unet(1, args.num_classes, args.unet_width)
    pretrained = args.checkpoint is not None or args.foundation == "litemedsam"
    foundation = build_foundation_model(args.foundation, args.num_classes, lora_rank=args.lora_rank,
                                        image_size=args.image_size, checkpoint=args.checkpoint,
                                        grad_checkpointing=args.grad_checkpointing, pretrained=pretrained)
    return unet.to(device), foundation.to(device)


def accelerate_students(students: dict, device: torch.device, args) -> list[str]:
    """synfoc.accel's kernels swapped into the students, as ``synfoc train`` does (``--no-accel``:
    the plain models; ``--accel-kernels``: only those; the fast-kernel-off mode: all but
    ``--with-kernel-off``). A commit from before synfoc.accel
    (``--against``) has its kernels built into the models."""
    if not args.accel:
        return []
    try:
        from synfoc.accel import accelerate, available_kernels
    except ImportError:
        return ["(built into the models)"]
    kernels = args.accel_kernels.split(",") if args.accel_kernels else available_kernels(device)
    if getattr(args, "drop_kernel", None):  # the fast-kernel-off mode: all the others
        kernels = [k for k in kernels if k != args.drop_kernel]
    for m in students.values():
        accelerate(m, device, kernels)
    return kernels


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the fast iteration
class FastStep:
    """The training loop's iteration (synfoc/train.py), on synthetic in-memory data."""

    def __init__(self, args, trace: bool) -> None:
        from synfoc.augment import AugmentConfig
        from synfoc.config import TrainConfig
        from synfoc.method.ema import make_teacher
        from synfoc.method.synfoc import SynFoC
        Arrays = synfoc_name("views", "Arrays")
        fast_layout, make_runtime = synfoc_name("runtime", "fast_layout"), synfoc_name("runtime", "make_runtime")
        make_optimizers = synfoc_name("build", "make_optimizers")
        # what `synfoc train` sets up for the process on the CPU (not with SYNFOC_SYSTEM_MALLOC=1)
        synfoc_name("runtime", "prepare_process", optional=True)(TrainConfig(device=args.device))

        self.cfg = TrainConfig(device=args.device, precision=args.precision, batch_labeled=args.batch_labeled,
                               batch_unlabeled=args.batch_unlabeled, unet_size=args.unet_size,
                               unet_width=args.unet_width, seed=args.seed)
        self.rt = make_runtime(self.cfg)
        unet, foundation = build_students(args, self.rt.device)
        # the training loop's layout: channels_last under bf16 autocast
        self.students = fast_layout({"unet": unet, "foundation": foundation}, self.rt)
        self.kernels = accelerate_students(self.students, self.rt.device, args)  # before the teachers copy them
        self.teachers = {k: make_teacher(m) for k, m in self.students.items()}
        for m in self.students.values():
            m.train()
        if args.compile:
            for m in list(self.students.values()) + list(self.teachers.values()):
                m.compile()
        self.optimizers = make_optimizers(self.cfg, self.students)
        self.method = SynFoC(unet, foundation, self.teachers["unet"], self.teachers["foundation"],
                             parts_of(args.num_classes))
        self.aug = AugmentConfig()
        self.sizes = {"unet": args.unet_size, "foundation": foundation.image_size}
        n = 2 * max(args.batch_labeled, args.batch_unlabeled)
        arrays = {}
        for key, domain in (("labeled", "siteA"), ("unlabeled", "siteB")):
            imgs, labs = {}, {}
            for size in set(self.sizes.values()):
                im, lb = synthetic_arrays(n, size, domain, args.num_classes)
                imgs[size], labs[size] = torch.from_numpy(im)[:, None], torch.from_numpy(lb)
            arrays[key] = Arrays(imgs, labs)
        self.labeled, self.unlabeled = arrays["labeled"], arrays["unlabeled"]
        self.trace = [] if trace else None

    @property
    def device(self) -> torch.device:
        return self.rt.device

    def step(self, t: int, total: int) -> None:
        from synfoc.method.ema import ema_update
        make_views = synfoc_name("views", "make_views")
        views = make_views(self.cfg, self.aug, self.labeled, self.unlabeled, t, self.sizes, self.rt, self.cfg.seed)
        with self.rt.autocast():
            loss, logs = self.method.step(views, t, total)
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.optimizers.values():
            o.step()
        for k in self.students:
            ema_update(self.teachers[k], self.students[k], t, self.cfg.ema_decay)
        if self.trace is not None:  # a host read per iteration: only when a loss trace is asked for
            self.trace.append({k: float(v) for k, v in logs.items() if v.numel() == 1})  # not per-instance logs


def count_cpu_kernel_flops() -> None:
    """Teach FlopCounterMode the CPU kernels a step runs that it does not know: the fused attention
    (``_scaled_dot_product_flash_attention_for_cpu``; it knows CUDA's and explicit matmuls) and
    oneDNN's convolution with a post-op (``mkldnn._convolution_pointwise``, which
    ``synfoc.accel``'s ``tinyvit_fused_convs`` runs for LiteMedSAM's frozen first stage). Without
    this, swapping a plain operation for one of them would count fewer FLOPs for the same
    arithmetic, and the utilisation would read low."""
    from torch.utils.flop_counter import conv_flop_count, flop_registry, register_flop_formula, sdpa_flop_count
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:  # shapes, not tensors
        return sdpa_flop_count(query, key, value)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        # the model's backward: four matmuls, twice the forward (the fused kernel also recomputes
        # the scores, which model FLOPs do not count, as they do not count checkpointing's)
        return 2 * sdpa_flop_count(query, key, value)

    pointwise = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if pointwise is None:  # a build without oneDNN never runs it
        return

    @register_flop_formula(pointwise)
    def _fused_convolution(x, *args, out_shape=None, **kwargs) -> int:
        # (X, W, bias, ...) or, for the .binary overload with a residual, (X, other, W, bias, ...);
        # the post-op (GELU, add) is element-wise work, which FlopCounterMode counts nowhere
        binary = args[1] is not None and len(args[1]) == len(x)
        weight = args[1] if binary else args[0]
        return conv_flop_count(x, weight, out_shape)


MATMUL_OPS = {"addmm", "addmm_", "mm", "bmm", "baddbmm", "_linear_pointwise",
              "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
CONVOLUTION_OPS = {"convolution", "_convolution", "mkldnn_convolution", "convolution_backward",
                   "_convolution_pointwise", "_slow_conv2d_forward", "_slow_conv2d_backward"}


def op_kind(name: str) -> str:
    """``matmul`` (attention included: its explicit and fused forms do the same arithmetic),
    ``convolution`` or ``other`` for an operator as the profiler (``aten::mm``) or FlopCounterMode
    (``aten.mm``) names it. Every FLOP FlopCounterMode counts falls in the first two."""
    op = name.replace("::", ".").split(".")[-1]
    return "matmul" if op in MATMUL_OPS else "convolution" if op in CONVOLUTION_OPS else "other"


def sum_by_kind(pairs) -> dict:
    """Sum (operator name, amount) pairs per :func:`op_kind`."""
    kinds: dict = {}
    for name, amount in pairs:
        kinds[op_kind(name)] = kinds.get(op_kind(name), 0) + amount
    return kinds


def count_flops(runner, t: int, total: int) -> tuple[int, dict[str, int]]:
    """FLOPs of one iteration (forward + backward), as counted by FlopCounterMode: the model's
    FLOPs, without gradient checkpointing's recomputation (the usual convention for utilisation),
    in all and per kind of operator (:func:`op_kind`)."""
    from torch.utils.flop_counter import FlopCounterMode
    foundation, rt = runner.students["foundation"], runner.rt
    checkpointing, foundation.grad_checkpointing = foundation.grad_checkpointing, False
    # Counted in fp32 (the same operations and FLOPs): FlopCounterMode fails on SAM's
    # relative-position einsum under bf16 autocast.
    runner.rt = dataclasses.replace(rt, dtype=None)
    count_cpu_kernel_flops()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            runner.step(t, total)
    finally:
        foundation.grad_checkpointing, runner.rt = checkpointing, rt
    sync(runner.device)
    flops = counter.get_flop_counts()["Global"].items()
    return counter.get_total_flops(), sum_by_kind((str(op), n) for op, n in flops)


def profile_step(runner, t: int, total: int, rows: int) -> dict:
    """One more iteration under ``torch.profiler``: the ``rows`` operators with the most self time
    (milliseconds, share of the iteration's self time, calls), and the self time per kind of
    operator (:func:`op_kind`), to see where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.step(t, total)
        sync(runner.device)
    events = prof.key_averages()
    device = runner.device.type == "cuda"
    def self_us(e):
        return e.self_device_time_total if device else e.self_cpu_time_total
    whole = sum(self_us(e) for e in events) or 1
    top = sorted(events, key=self_us, reverse=True)[:rows]
    return {"ops": [{"op": e.key, "self_ms": self_us(e) / 1000, "share": self_us(e) / whole, "calls": e.count}
                    for e in top],
            "kinds_ms": sum_by_kind((e.key, self_us(e) / 1000) for e in events)}


def spread(times: list[float]) -> dict:
    """Median, min, max and interquartile range of the timed iterations."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {"s_per_iter": statistics.median(times), "s_min": min(times), "s_max": max(times), "s_iqr": q3 - q1}


def serve(args, modes: list[str]) -> None:
    """A child process: build its modes (one, or several with ``--one-process``), then run
    iterations when the parent asks, one per line on stdin ("step MODE T TOTAL TIMED" -> the seconds
    it took; "finish MODE TOTAL" -> that mode's JSON result). Answers start with ``@@`` so that
    anything else a library prints is ignored."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if "fast-system-malloc" in modes:  # the fast step with glibc's default allocator (no keep_freed_memory)
        os.environ["SYNFOC_SYSTEM_MALLOC"] = "1"
    runners, times, warmup = {}, {}, {}
    for mode in modes:
        margs = copy.copy(args)
        margs.accel = args.accel and mode != "fast-no-accel"
        margs.drop_kernel = args.with_kernel_off if mode == "fast-kernel-off" else None
        runners[mode], times[mode], warmup[mode] = FastStep(margs, args.trace), [], []
    device = next(iter(runners.values())).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print("@@ready", flush=True)
    peak, peak_mb = None, None
    for line in sys.stdin:
        command, mode, *values = line.split()
        runner = runners[mode]
        if command == "step":
            t, total, timed = (int(v) for v in values)
            start = time.perf_counter()
            runner.step(t, total)
            sync(device)
            elapsed = time.perf_counter() - start
            (times[mode] if timed else warmup[mode]).append(elapsed)
            print(f"@@{elapsed}", flush=True)
        elif command == "finish":
            total = int(values[0])
            bf16 = runner.rt.dtype is not None
            # the timed steps' peak, read before any mode's FLOP count or profile adds its own
            peak_mb = peak_mb or peak_memory_mb(device)
            # before the FLOP count and the matmul, which add nothing the training loop would hold
            result = {"mode": mode, "device": device_name(device), "device_model": device_description(device),
                      **spread(times[mode]), "times": times[mode], "warmup_times": warmup[mode],
                      "peak_mb": peak_mb,
                      "peak_memory_kind": ("cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS")
                      + (f" of one process running {', '.join(modes)}" if len(modes) > 1 else ""),
                      "precision": "bf16" if bf16 else "fp32", "threads": torch.get_num_threads(),
                      "accel_kernels": runner.kernels,
                      "torch": torch.__version__, "synfoc_file": str(Path(synfoc.__file__).resolve())}
            if runner.trace is not None:
                result["trace"] = list(runner.trace)  # not the FLOP-counting iteration's
            if args.profile:
                result["profile"] = profile_step(runner, total, total + 1, args.profile)
            if args.flops:
                result["flops"], result["flops_by_kind"] = count_flops(runner, total, total + 1)
                result["tflops_per_s"] = result["flops"] / result["s_per_iter"] / 1e12
            if args.peak_tflops:
                result["peak_tflops"], result["peak_source"] = args.peak_tflops, "--peak-tflops"
            else:
                peak = peak or matmul_peak(device, torch.bfloat16 if bf16 else torch.float32, args.matmul_size)
                result["peak_tflops"] = peak["tflops"]
                result["peak_source"] = f"matmul {peak['n']}^3 {peak['dtype']}, median of {peak['repeats']}"
            if "tflops_per_s" in result:
                result["mfu"] = result["tflops_per_s"] / result["peak_tflops"]
            print("@@" + json.dumps(result), flush=True)
            runners.pop(mode)
            if not runners:
                return


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", choices=sorted(CONFIGS))
    config = pre.parse_known_args(argv)[0].config
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS),
                   help="a standard configuration; the options below override its values")
    p.add_argument("--foundation", default="litemedsam", help="litemedsam, medsam_vit_b, sam_vit_b, ...")
    p.add_argument("--checkpoint", help="base weights; ViT models get random weights without one")
    p.add_argument("--image-size", type=int, default=256, help="foundation input size")
    p.add_argument("--unet-size", type=int, default=256)
    p.add_argument("--unet-width", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1, choices=[1, 2])
    p.add_argument("--batch-labeled", type=int, default=2)
    p.add_argument("--batch-unlabeled", type=int, default=2)
    p.add_argument("--mode", default="fast",
                   help=argparse.SUPPRESS)  # a child's, comma-separated; --against and the --with-* options add the others
    p.add_argument("--against", metavar="REV",
                   help="also time the fast iteration of commit REV of this repository (a git worktree), in alternation")
    p.add_argument("--with-system-malloc", action="store_true",
                   help="also time the fast step with glibc's default allocator (SYNFOC_SYSTEM_MALLOC=1)")
    p.add_argument("--accel", action=argparse.BooleanOptionalAction, default=True,
                   help="swap synfoc.accel's kernels into the models, as synfoc train does (default: on)")
    p.add_argument("--accel-kernels", metavar="NAMES",
                   help="only these kernels of synfoc.accel.KERNELS (comma-separated), whatever the device")
    p.add_argument("--with-no-accel", action="store_true",
                   help="also time the fast step with the plain models (no synfoc.accel), in alternation")
    p.add_argument("--with-kernel-off", metavar="NAME",
                   help="also time the fast step without synfoc.accel kernel NAME (the others as this "
                        "device gets them), in alternation")
    p.add_argument("--one-process", action="store_true",
                   help="run fast and the --with-no-accel / --with-kernel-off modes in one child (one "
                        "step's memory at a time; peak memory is then theirs together)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast (auto: bf16 where the device computes it natively)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute encoder blocks in backward")
    p.add_argument("--compile", action="store_true", help="fast mode: torch.compile students and teachers")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--trace", action="store_true", help="record every iteration's losses (adds host reads)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed iterations, profile one more: its N costliest operators and its "
                        "time and FLOPs per kind of operator")
    p.add_argument("--flops", action="store_true", default=True, help="count the FLOPs of one iteration (the default)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count (and the MFU)")
    p.add_argument("--peak-tflops", type=float,
                   help="the peak to compute the MFU against, instead of timing a matmul")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n^3 matmul that measures the peak")
    p.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "step_time.csv",
                   help="append one row per mode to this file (default: %(default)s)")
    p.add_argument("--no-csv", action="store_true", help="append no CSV row")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # a child: one mode, JSON out
    if config:
        p.set_defaults(**CONFIGS[config])
    args = p.parse_args(argv)
    if args.batch_labeled != args.batch_unlabeled:
        p.error("labeled sample i pairs with unlabeled sample i: use equal batch sizes")
    if args.iters < 1:
        p.error("--iters must be >= 1")
    if any(m not in MODES for m in args.mode.split(",")):
        p.error(f"--mode: one of {', '.join(MODES)}")
    if args.mode != "fast" and not args.in_process:
        p.error("use --against REV or the --with-* options")
    if args.with_kernel_off:
        from synfoc.accel import KERNELS
        if args.with_kernel_off not in KERNELS:
            p.error(f"--with-kernel-off {args.with_kernel_off}: not a kernel of synfoc.accel ({', '.join(KERNELS)})")
    if args.one_process and (args.against or args.with_system_malloc):
        p.error("--one-process runs modes of this checkout with the same allocator: not with --against "
                "or --with-system-malloc")
    return args


class Child:
    """The child process (:func:`serve`) of one mode, or of several with ``--one-process``, driven
    line by line; ``code`` is the checkout whose synfoc it imports."""

    def __init__(self, argv: list[str], modes: tuple[str, ...], code: Path = ROOT) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--mode", ",".join(modes), "--in-process"]
        self.modes, self.code = modes, code
        self.mode = " + ".join(modes)  # for messages
        env = {**os.environ, "SYNFOC_BENCH_CODE": str(code)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def answer(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return line[2:].strip()
        code = self.proc.wait()
        if code == -signal.SIGKILL:  # what the kernel's out-of-memory killer sends
            raise SystemExit(f"{self.mode} mode was killed (SIGKILL), most likely out of memory: the modes' "
                             "children run side by side, each with its own models and activations; compare "
                             "fewer modes at once, in one process (--one-process), or a configuration that "
                             "fits twice (--grad-checkpointing)")
        raise SystemExit(f"{self.mode} mode failed (exit {code}); its error is above")

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()


@contextmanager
def worktree(rev: str):
    """A detached ``git worktree`` of ``rev`` of this repository in a temporary folder, removed after."""
    tmp = Path(tempfile.mkdtemp(prefix="synfoc-ab-"))
    path = tmp / "code"
    added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
                           capture_output=True, text=True)
    if added.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"git worktree add {rev} failed: {added.stderr.strip()}")
    try:
        yield path
    finally:
        removed = subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                                 capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if removed.returncode != 0:  # git's record of a folder that is gone (other worktrees' are kept)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)


def run_alternating(argv: list[str], modes: tuple[str, ...], args, codes: dict[str, Path] | None = None) -> dict[str, dict]:
    """Build every mode's child, then time them one iteration at a time in alternation."""
    codes = codes or {}
    shared = ("fast", "fast-no-accel", "fast-kernel-off")
    if args.one_process:
        groups = [tuple(m for m in modes if m in shared)] + [(m,) for m in modes if m not in shared]
    else:
        groups = [(m,) for m in modes]
    children = [Child(argv, group, codes.get(group[0], ROOT)) for group in groups]
    where = {mode: c for c in children for mode in c.modes}
    results = {}
    try:
        for c in children:
            c.answer()  # built
        total = args.warmup + args.iters
        for t in range(total):
            # the order turns every iteration, so that no mode always runs after the same one
            for mode in (modes if t % 2 == 0 else modes[::-1]):
                where[mode].ask(f"step {mode} {t} {total} {int(t >= args.warmup)}")
        for mode in modes:
            results[mode] = json.loads(where[mode].ask(f"finish {mode} {total}"))
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
    for mode, c in where.items():  # the package each child really imported, and that checkout's commit
        if not Path(results[mode]["synfoc_file"]).is_relative_to(c.code.resolve()):
            raise SystemExit(f"{mode}: synfoc came from {results[mode]['synfoc_file']}, not {c.code}")
        results[mode]["commit"] = git_describe(c.code)
    return results


PER_MODE = ("s_per_iter", "s_min", "s_max", "s_iqr", "times", "warmup_times", "peak_mb", "precision", "flops",
            "accel_kernels",
            "tflops_per_s",
            "flops_by_kind", "peak_tflops", "peak_source", "mfu", "commit", "synfoc_file", "trace", "profile")


def summarise(results: dict[str, dict], args) -> dict:
    first = next(iter(results.values()))
    out: dict = {"device": first["device"], "device_model": first["device_model"], "torch": first["torch"],
                 "config": args.config or "custom", "foundation": args.foundation,
                 "image_size": args.image_size, "unet_size": args.unet_size, "unet_width": args.unet_width,
                 "batch": [args.batch_labeled, args.batch_unlabeled], "iters": args.iters, "warmup": args.warmup,
                 "grad_checkpointing": args.grad_checkpointing, "compile": args.compile,
                 "threads": first["threads"], "peak_memory_kind": first["peak_memory_kind"],
                 "load_average": list(os.getloadavg())}
    for mode, r in results.items():
        for key in PER_MODE:
            if key in r:
                out[f"{mode}_{'s' if key == 's_per_iter' else key}"] = r[key]
    if args.against:
        out["against_rev"] = args.against
    if "fast_s" in out and "against_s" in out:
        # this code / REV (< 1: this code is faster); iterations i of both ran back to back, so the
        # median of their ratios also cancels slow drift
        out["against_ratio"] = out["fast_s"] / out["against_s"]
        out["against_speedup"] = out["against_s"] / out["fast_s"]
        out["against_paired_speedup"] = statistics.median(a / f for a, f in zip(out["against_times"], out["fast_times"]))
    if "fast_s" in out and "fast-kernel-off_s" in out:
        # what one kernel saves: the step without it over the step with every kernel
        out["kernel_off"] = args.with_kernel_off
        out["kernel_speedup"] = out["fast-kernel-off_s"] / out["fast_s"]
        out["kernel_paired_speedup"] = statistics.median(
            n / f for n, f in zip(out["fast-kernel-off_times"], out["fast_times"]))
    if "fast_s" in out and "fast-no-accel_s" in out:
        # what synfoc.accel's kernels save: the plain models' time over the accelerated ones'
        out["accel_kernels"] = args.accel_kernels or "auto"
        out["accel_speedup"] = out["fast-no-accel_s"] / out["fast_s"]
        out["accel_paired_speedup"] = statistics.median(
            n / f for n, f in zip(out["fast-no-accel_times"], out["fast_times"]))
    return out


CSV_COLUMNS = ("date", "mode", "synfoc_commit", "torch", "device", "threads", "config", "foundation",
               "image_size", "unet_size", "unet_width", "batch_labeled", "batch_unlabeled", "lora_rank",
               "num_classes", "grad_checkpointing", "compile", "dtype", "warmup", "iters", "s_per_iter_median",
               "s_per_iter_min", "s_per_iter_max", "s_per_iter_iqr", "flops_per_iter", "tflops_per_s",
               "matmul_peak_tflops", "peak_source", "mfu", "peak_memory_mb", "peak_memory_kind",
               "time_ratio_to_fast", "load_average")


def csv_rows(summary: dict, args) -> list[dict]:
    """One row per timed mode, every column of :data:`CSV_COLUMNS` (empty where not measured)."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for mode in MODES:
        if f"{mode}_s" not in summary:
            continue
        get = lambda key: summary.get(f"{mode}_{key}", "")  # noqa: E731
        rows.append({
            "date": date, "mode": mode_label(mode, summary, args),
            "synfoc_commit": get("commit"), "torch": summary["torch"],
            "device": f"{summary['device'].split(' ')[0]}: {summary['device_model']}", "threads": summary["threads"],
            "config": summary["config"], "foundation": summary["foundation"], "image_size": summary["image_size"],
            "unet_size": summary["unet_size"], "unet_width": summary["unet_width"],
            "batch_labeled": summary["batch"][0], "batch_unlabeled": summary["batch"][1],
            "lora_rank": args.lora_rank, "num_classes": args.num_classes,
            "grad_checkpointing": summary["grad_checkpointing"], "compile": summary["compile"],
            "dtype": get("precision"), "warmup": summary["warmup"], "iters": summary["iters"],
            "s_per_iter_median": get("s"), "s_per_iter_min": get("s_min"), "s_per_iter_max": get("s_max"),
            "s_per_iter_iqr": get("s_iqr"), "flops_per_iter": get("flops"), "tflops_per_s": get("tflops_per_s"),
            "matmul_peak_tflops": get("peak_tflops"), "peak_source": get("peak_source"), "mfu": get("mfu"),
            "peak_memory_mb": get("peak_mb"), "peak_memory_kind": summary["peak_memory_kind"],
            "time_ratio_to_fast": "" if mode == "fast" or "fast_s" not in summary else get("s") / summary["fast_s"],
            "load_average": " ".join(f"{x:.2f}" for x in summary["load_average"]),
        })
    return rows


def mode_label(mode: str, summary: dict, args) -> str:
    """The mode as the table and the CSV name it: the commit of ``against``, the kernels of ``fast``."""
    if mode == "against":
        return f"against {summary.get('against_rev', '')}"
    if mode == "fast-kernel-off":
        return f"fast without {args.with_kernel_off}"
    if mode == "fast" and not args.accel:
        return "fast no-accel"
    if mode == "fast" and args.accel_kernels:
        return f"fast accel={args.accel_kernels}"
    return mode


def table(summary: dict, args) -> str:
    peak_label = "peak GPU MiB" if summary["device"].startswith("cuda") else "peak RSS MiB"
    lines = [f"| mode | commit | precision | s/iter (median) | min..max | IQR | GFLOP/iter | TFLOP/s "
             f"| matmul peak TFLOP/s | MFU | {peak_label} | time / fast |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def num(value, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    for mode in MODES:
        if f"{mode}_s" not in summary:
            continue
        get = lambda key: summary.get(f"{mode}_{key}")  # noqa: E731
        ratio = get("s") / summary["fast_s"] if "fast_s" in summary and mode != "fast" else None
        name = mode_label(mode, summary, args)
        lines.append(f"| {name} | {get('commit') or ''} | {get('precision')} | {get('s'):.3f} "
                     f"| {num(get('s_min'), '.3f')}..{num(get('s_max'), '.3f')} | {num(get('s_iqr'), '.3f')} "
                     f"| {num(get('flops') and get('flops') / 1e9, '.1f')} | {num(get('tflops_per_s'), '.4f')} "
                     f"| {num(get('peak_tflops'), '.4f')} | {num(get('mfu') and 100 * get('mfu'), '.1f')}"
                     f"{'%' if get('mfu') is not None else ''} | {get('peak_mb'):.0f} | {num(ratio, '.3f')} |")
    load = ", ".join(f"{x:.2f}" for x in summary["load_average"])
    lines.append(f"\n{summary.get('config', 'custom')}: {summary['foundation']} at {summary['image_size']}, "
                 f"U-Net {summary['unet_size']} width {summary['unet_width']}, batch {summary['batch'][0]}+"
                 f"{summary['batch'][1]}, {summary['iters']} timed iterations, {summary['threads']} threads, "
                 f"{summary.get('device_model', summary['device'])}, torch {summary.get('torch', '?')}, "
                 f"load average {load}")
    for mode in MODES:  # torch.compile's cost (--compile, synfoc.accel's compiled blocks) is paid here
        warm = summary.get(f"{mode}_warmup_times")
        if warm:
            lines.append(f"{mode_label(mode, summary, args)}: {len(warm)} warm-up iteration(s) took "
                         f"{sum(warm):.1f} s ({', '.join(f'{w:.1f}' for w in warm)}), compilation (where any) included")
    if "accel_speedup" in summary:
        lines.append(f"speed-up of synfoc.accel ({summary['accel_kernels']}) over the plain models: "
                     f"{summary['accel_speedup']:.2f}x (ratio of medians); {summary['accel_paired_speedup']:.2f}x "
                     "(median of the ratios of back-to-back iterations)")
    if "kernel_speedup" in summary:
        lines.append(f"speed-up of synfoc.accel's {summary['kernel_off']} over the same step without it: "
                     f"{summary['kernel_speedup']:.3f}x (ratio of medians); {summary['kernel_paired_speedup']:.3f}x "
                     "(median of the ratios of back-to-back iterations)")
    if "against_speedup" in summary:
        lines.append(f"speed-up of this code over {summary['against_rev']}: {summary['against_speedup']:.2f}x "
                     f"(ratio of medians); {summary['against_paired_speedup']:.2f}x (median of the ratios of "
                     f"back-to-back iterations)")
    return "\n".join(lines)


def profile_tables(mode: str, summary: dict, rows: int) -> str:
    """The profiled iteration of ``mode`` in Markdown: its costliest operators, then its time and
    FLOPs per kind of operator, each kind's TFLOP/s and its share of the matmul peak (the FLOPs come
    from the counted iteration, the time from the profiled one, which is a little slower)."""
    profile = summary.get(f"{mode}_profile") or {"ops": [], "kinds_ms": {}}
    lines = [f"\n{mode}: the {rows} operators with the most self time in one iteration\n",
             "| operator | self ms | share | calls |", "|---|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['self_ms']:.0f} | {100 * r['share']:.1f}% | {r['calls']} |" for r in profile["ops"]]
    flops, peak = summary.get(f"{mode}_flops_by_kind") or {}, summary.get(f"{mode}_peak_tflops")
    whole = sum(profile["kinds_ms"].values()) or 1
    lines += [f"\n{mode}: time and FLOPs per kind of operator\n",
              "| kind | self ms | share | GFLOP | TFLOP/s | of the matmul peak |", "|---|---:|---:|---:|---:|---:|"]
    for kind in ("matmul", "convolution", "other"):
        ms, gflop = profile["kinds_ms"].get(kind, 0.0), flops.get(kind, 0) / 1e9
        rate = gflop / ms if ms and gflop else None   # GFLOP/ms = TFLOP/s
        lines.append(f"| {kind} | {ms:.0f} | {100 * ms / whole:.1f}% | {gflop:.1f} | "
                     f"{'-' if rate is None else f'{rate:.3f}'} | "
                     f"{'-' if rate is None or not peak else f'{100 * rate / peak:.0f}%'} |")
    return "\n".join(lines)


def child_argv(argv: list[str]) -> list[str]:
    """The parent's options less those only the parent acts on (children get their own --mode)."""
    with_value, flags = {"--mode", "--against", "--csv"}, {"--json", "--no-csv"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in with_value:
            skip = True
        elif a not in flags and not any(a.startswith(o + "=") for o in with_value):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.in_process:
        serve(args, args.mode.split(","))
        return 0
    modes = (args.mode,)
    if args.with_system_malloc and "fast-system-malloc" not in modes:
        modes += ("fast-system-malloc",)
    if args.with_no_accel and "fast-no-accel" not in modes:
        modes += ("fast-no-accel",)
    if args.with_kernel_off:
        modes += ("fast-kernel-off",)
    with worktree(args.against) if args.against else _nothing() as other:
        if other is not None:
            if "fast" not in modes:
                modes = ("fast",) + modes
            modes += ("against",)
        results = run_alternating(child_argv(argv), modes, args, {"against": other} if other else None)
    summary = summarise(results, args)
    if not args.no_csv:
        append_csv(args.csv, CSV_COLUMNS, csv_rows(summary, args))
    print(json.dumps(summary) if args.json else table(summary, args))
    if args.profile and not args.json:
        for mode in modes:
            print(profile_tables(mode, summary, args.profile))
    return 0


@contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    raise SystemExit(main())

"""Time of one SynFoC training iteration: the fast path of ``synfoc train`` against a reference.

``fast``      the iteration exactly as :func:`synfoc.train.train` runs it: ``make_views`` (batched
              augmentation on the device), ``SynFoC.step`` under the runtime's autocast (bf16 on
              CUDA and on CPUs with AMX / AVX512-BF16), backward, both optimiser steps, EMA.
``reference`` a straightforward fp32 iteration in the authors' style (``reference_step.py``):
              the models' modules as their libraries ship them, per-sample CPU
              augmentation, separate forwards, host synchronisations, no autocast, and the C
              library's default allocator, as in the authors' script.
``fast-system-malloc`` (with ``--with-system-malloc``) the fast iteration with glibc's default
              allocator (``SYNFOC_SYSTEM_MALLOC=1``): what :func:`synfoc.train.keep_freed_memory`,
              which ``synfoc train`` applies on the CPU, is worth on its own.

Each mode runs in its own child process, so its peak memory is its own: CUDA
``max_memory_allocated``, or on the CPU the peak resident set size (``getrusage``, whole process:
interpreter, models and activations). Both children are built first, then asked for one iteration
at a time in alternation (fast, reference, fast, ...), so a machine whose speed drifts (a shared
host) slows both modes alike. The time is the median of ``--iters`` iterations after ``--warmup``
ones.

    python benchmarks/step_time.py --foundation litemedsam --image-size 256 --unet-size 256 \
        --batch-labeled 2 --batch-unlabeled 2 --iters 5
    python benchmarks/step_time.py --foundation medsam_vit_b --image-size 512 --unet-size 384 \
        --batch-labeled 4 --batch-unlabeled 4 --mode fast --grad-checkpointing --iters 1 --warmup 1 --json

ViT models without ``--checkpoint`` get random weights (same shapes and cost as MedSAM's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import synfoc  # noqa: F401  (sets OpenMP's passive waiting before torch starts, as in training)
import torch

MODES = ("fast", "reference", "fast-system-malloc")


# ----------------------------------------------------------------------------- setup
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
    from synfoc.train import seed_everything
    seed_everything(args.seed)
    unet = build_unet(1, args.num_classes, args.unet_width)
    pretrained = args.checkpoint is not None or args.foundation == "litemedsam"
    foundation = build_foundation_model(args.foundation, args.num_classes, lora_rank=args.lora_rank,
                                        image_size=args.image_size, checkpoint=args.checkpoint,
                                        grad_checkpointing=args.grad_checkpointing, pretrained=pretrained)
    return unet.to(device), foundation.to(device)


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
        from synfoc.train import Arrays, fast_layout, make_optimizers, make_runtime

        self.cfg = TrainConfig(device=args.device, precision=args.precision, batch_labeled=args.batch_labeled,
                               batch_unlabeled=args.batch_unlabeled, unet_size=args.unet_size,
                               unet_width=args.unet_width, seed=args.seed)
        self.rt = make_runtime(self.cfg)
        unet, foundation = build_students(args, self.rt.device)
        # the training loop's layout: channels_last under bf16 autocast
        self.students = fast_layout({"unet": unet, "foundation": foundation}, self.rt)
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
        from synfoc.train import make_views
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


class ReferenceRunner:
    """Adapter giving :class:`reference_step.ReferenceSynFoC` the same interface as :class:`FastStep`."""

    def __init__(self, args, trace: bool) -> None:
        from reference_step import ReferenceSynFoC, as_shipped
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda") if use_cuda else torch.device("cpu")
        unet, foundation = build_students(args, self.device)
        n = 2 * max(args.batch_labeled, args.batch_unlabeled)
        size = foundation.image_size  # the authors augment at the largest input size
        self.ref = ReferenceSynFoC(as_shipped(unet), as_shipped(foundation),
                                   synthetic_arrays(n, size, "siteA", args.num_classes),
                                   synthetic_arrays(n, size, "siteB", args.num_classes), args.unet_size,
                                   parts_of(args.num_classes), (args.batch_labeled, args.batch_unlabeled),
                                   self.device, args.seed)
        self.trace = self.ref.logged if trace else None

    def step(self, t: int, total: int) -> None:
        self.ref.step(t, total)


def count_flops(runner: FastStep, t: int, total: int) -> int:
    """FLOPs of one fast iteration (forward + backward), as counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        runner.step(t, total)
    sync(runner.device)
    return counter.get_total_flops()


def serve(args, mode: str) -> None:
    """A child process: build one mode, then run iterations when the parent asks, one per line on
    stdin ("step T TOTAL TIMED" -> the seconds it took; "finish TOTAL" -> the JSON result).
    Answers start with ``@@`` so that anything else a library prints is ignored."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if mode == "fast-system-malloc":  # the fast step with glibc's default allocator (no keep_freed_memory)
        os.environ["SYNFOC_SYSTEM_MALLOC"] = "1"
    runner = FastStep(args, args.trace) if mode.startswith("fast") else ReferenceRunner(args, args.trace)
    device = runner.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print("@@ready", flush=True)
    times = []
    for line in sys.stdin:
        command, *values = line.split()
        if command == "step":
            t, total, timed = (int(v) for v in values)
            start = time.perf_counter()
            runner.step(t, total)
            sync(device)
            elapsed = time.perf_counter() - start
            if timed:
                times.append(elapsed)
            print(f"@@{elapsed}", flush=True)
        elif command == "finish":
            total = int(values[0])
            result = {"mode": mode, "device": device_name(device), "s_per_iter": statistics.median(times),
                      "times": times, "peak_mb": peak_memory_mb(device),
                      "precision": "fp32" if mode == "reference" or runner.rt.dtype is None else "bf16",
                      "threads": torch.get_num_threads()}
            if runner.trace is not None:
                result["trace"] = runner.trace
            if args.flops and mode == "fast":
                result["flops"] = count_flops(runner, total, total + 1)
            print("@@" + json.dumps(result), flush=True)
            return


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--foundation", default="litemedsam", help="litemedsam, medsam_vit_b, sam_vit_b, ...")
    p.add_argument("--checkpoint", help="base weights; ViT models get random weights without one")
    p.add_argument("--image-size", type=int, default=256, help="foundation input size")
    p.add_argument("--unet-size", type=int, default=256)
    p.add_argument("--unet-width", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1, choices=[1, 2])
    p.add_argument("--batch-labeled", type=int, default=2)
    p.add_argument("--batch-unlabeled", type=int, default=2)
    p.add_argument("--mode", choices=["fast", "reference", "both", "fast-system-malloc"], default="both")
    p.add_argument("--with-system-malloc", action="store_true",
                   help="also time the fast step with glibc's default allocator (SYNFOC_SYSTEM_MALLOC=1)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="fast mode's autocast (the reference is always fp32)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute encoder blocks in backward")
    p.add_argument("--compile", action="store_true", help="fast mode: torch.compile students and teachers")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--trace", action="store_true", help="record every iteration's losses (adds host reads)")
    p.add_argument("--flops", action="store_true", help="count the FLOPs of one fast iteration")
    p.add_argument("--peak-tflops", type=float, help="with --flops: the device's peak, for model FLOP utilisation")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # a child: one mode, JSON out
    args = p.parse_args(argv)
    if args.batch_labeled != args.batch_unlabeled:
        p.error("labeled sample i pairs with unlabeled sample i: use equal batch sizes")
    if args.iters < 1:
        p.error("--iters must be >= 1")
    return args


class Child:
    """One mode's child process (:func:`serve`), driven line by line."""

    def __init__(self, argv: list[str], mode: str) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--mode", mode, "--in-process"]
        self.mode = mode
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def answer(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return line[2:].strip()
        code = self.proc.wait()
        raise SystemExit(f"{self.mode} mode failed (exit {code}); its error is above")

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()


def run_alternating(argv: list[str], modes: tuple[str, ...], args) -> dict[str, dict]:
    """Build every mode's child, then time them one iteration at a time in alternation."""
    children = [Child(argv, mode) for mode in modes]
    try:
        for c in children:
            c.answer()  # built
        total = args.warmup + args.iters
        for t in range(total):
            for c in children:
                c.ask(f"step {t} {total} {int(t >= args.warmup)}")
        results = {c.mode: json.loads(c.ask(f"finish {total}")) for c in children}
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
    return results


def summarise(results: dict[str, dict], args) -> dict:
    out: dict = {"device": next(iter(results.values()))["device"], "foundation": args.foundation,
                 "image_size": args.image_size, "unet_size": args.unet_size, "unet_width": args.unet_width,
                 "batch": [args.batch_labeled, args.batch_unlabeled], "iters": args.iters,
                 "grad_checkpointing": args.grad_checkpointing,
                 "load_average": list(os.getloadavg())}
    for mode, r in results.items():
        out[f"{mode}_s"] = r["s_per_iter"]
        out[f"{mode}_peak_mb"] = r["peak_mb"]
        out[f"{mode}_times"] = r["times"]
        out[f"{mode}_precision"] = r["precision"]
        out["threads"] = r["threads"]
        if "trace" in r:
            out[f"{mode}_trace"] = r["trace"]
        if "flops" in r:
            out["fast_flops"] = r["flops"]
            out["fast_tflops_per_s"] = r["flops"] / r["s_per_iter"] / 1e12
            if args.peak_tflops:
                out["fast_mfu"] = out["fast_tflops_per_s"] / args.peak_tflops
    if "fast_s" in out and "reference_s" in out:
        out["ratio"] = out["fast_s"] / out["reference_s"]       # fast / reference (< 1 is faster)
        out["speedup"] = out["reference_s"] / out["fast_s"]
        # iterations i of both modes ran back to back: the median of their ratios cancels slow drift
        out["paired_speedup"] = statistics.median(r / f for r, f in zip(out["reference_times"], out["fast_times"]))
    return out


def table(summary: dict) -> str:
    peak_label = "peak GPU MiB" if summary["device"].startswith("cuda") else "peak RSS MiB"
    lines = [f"| mode | device | precision | s/iter (median) | {peak_label} | fast/reference |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for mode in MODES:
        if f"{mode}_s" not in summary:
            continue
        ratio = summary[f"{mode}_s"] / summary["reference_s"] if "reference_s" in summary else None
        lines.append(f"| {mode} | {summary['device']} | {summary[f'{mode}_precision']} | {summary[f'{mode}_s']:.3f} "
                     f"| {summary[f'{mode}_peak_mb']:.0f} | {'' if ratio is None else f'{ratio:.3f}'} |")
    load = ", ".join(f"{x:.2f}" for x in summary["load_average"])
    lines.append(f"\n{summary['foundation']} at {summary['image_size']}, U-Net {summary['unet_size']} width "
                 f"{summary['unet_width']}, batch {summary['batch'][0]}+{summary['batch'][1]}, {summary['iters']} "
                 f"timed iterations, {summary['threads']} threads, load average {load}")
    if "speedup" in summary:
        lines.append(f"speed-up of fast over reference: {summary['speedup']:.2f}x (ratio of medians); "
                     f"{summary['paired_speedup']:.2f}x (median of the ratios of back-to-back iterations)")
    if "fast_flops" in summary:
        lines.append(f"fast iteration: {summary['fast_flops'] / 1e12:.2f} TFLOP, {summary['fast_tflops_per_s']:.1f} TFLOP/s"
                     + (f", MFU {100 * summary['fast_mfu']:.1f}%" if "fast_mfu" in summary else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.in_process:
        serve(args, args.mode)
        return 0
    passthrough, skip = [], False
    for a in argv:  # the children get their own --mode and print no table
        if skip:
            skip = False
        elif a == "--mode":
            skip = True
        elif not a.startswith("--mode=") and a != "--json":
            passthrough.append(a)
    modes = ("fast", "reference") if args.mode == "both" else (args.mode,)
    if args.with_system_malloc and "fast-system-malloc" not in modes:
        modes += ("fast-system-malloc",)
    results = run_alternating(passthrough, modes, args)
    summary = summarise(results, args)
    print(json.dumps(summary) if args.json else table(summary))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())

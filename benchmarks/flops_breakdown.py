"""Where a student's arithmetic goes: forward GFLOP per image of each stage of a foundation model
(and of the U-Net) at the given input sizes, and which stages a training backward must pass
through (those at or after the first trainable parameter; autograd skips the rest, and the
frozen weights get no weight gradients).

    python benchmarks/flops_breakdown.py --foundation litemedsam --sizes 64,96,128,256

Counts with torch.utils.flop_counter (matmuls and convolutions; element-wise work is not counted).
Prints a table and appends one CSV row per (model, size, stage) to
``benchmarks/results/flops_breakdown.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_csv, git_describe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CSV_COLUMNS = ("commit", "torch", "model", "size", "stage", "gflop_forward", "share", "in_backward")


def stages(model: torch.nn.Module) -> list[str]:
    """The stage names reported: a foundation model's encoder children (its ``layers`` one by one)
    and its prompt encoder and mask decoder; a U-Net's children."""
    names = []
    for name, child in model.named_children():
        if name == "image_encoder":
            for sub, grand in child.named_children():
                if isinstance(grand, torch.nn.ModuleList):
                    names += [f"{name}.{sub}.{i}" for i in range(len(grand))]
                else:
                    names.append(f"{name}.{sub}")
        else:
            names.append(name)
    return names


def forward_counts(model: torch.nn.Module, channels: int, size: int) -> dict[str, int]:
    """FLOPs of one forward of one image, per module name (and "Global": all of them)."""
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        model(torch.rand(1, channels, size, size))
    return {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}


def forward_gflop(model: torch.nn.Module, channels: int, size: int) -> float:
    return forward_counts(model, channels, size)["Global"] / 1e9


def breakdown(model: torch.nn.Module, channels: int, size: int) -> list[tuple[str, float, bool]]:
    """(stage, forward GFLOP per image, whether a backward passes through it)."""
    counts = forward_counts(model, channels, size)
    prefix = type(model).__name__
    names = stages(model)
    first_trainable = next((i for i, name in enumerate(names)
                            if any(p.requires_grad for n, p in model.named_parameters() if n.startswith(name + "."))),
                           len(names))
    rows = []
    for i, name in enumerate(names):
        # a stage whose blocks are called one by one (synfoc's encoder loops) is no module call of
        # its own: sum its outermost counted submodules instead
        key = f"{prefix}.{name}"
        inside = sorted((k for k in counts if k == key or k.startswith(key + ".")), key=lambda k: k.count("."))
        outermost = []
        for k in inside:
            if not any(k.startswith(o + ".") for o in outermost):
                outermost.append(k)
        rows.append((name, sum(counts[k] for k in outermost) / 1e9, i >= first_trainable))
    total = counts.get(prefix, 0) / 1e9
    if total - sum(r[1] for r in rows) > 0.01 * total:
        rows.append(("(outside the stages)", total - sum(r[1] for r in rows), True))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--foundation", default="litemedsam")
    ap.add_argument("--sizes", default="64,96,128,256")
    ap.add_argument("--unet-width", type=int, default=16)
    ap.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "flops_breakdown.csv")
    args = ap.parse_args()
    from synfoc.models import build_foundation_model, build_unet

    commit = git_describe(ROOT)
    for size in [int(s) for s in args.sizes.split(",")]:
        models = {args.foundation: (build_foundation_model(args.foundation, 1, lora_rank=4, image_size=size,
                                                           checkpoint=None), 3),
                  f"unet{args.unet_width}": (build_unet(1, 1, args.unet_width), 1)}
        for label, (model, channels) in models.items():
            rows = breakdown(model.eval(), channels, size)
            total = sum(r[1] for r in rows)
            print(f"\n{label} at {size}: {total:.2f} GFLOP per image forward")
            print("| stage | GFLOP | share | backward passes through |\n|---|---:|---:|---|")
            for name, gflop, back in rows:
                if gflop > 0:
                    print(f"| {name} | {gflop:.2f} | {100 * gflop / total:.1f}% | {'yes' if back else 'no'} |")
            append_csv(args.csv, CSV_COLUMNS, [
                {"commit": commit, "torch": torch.__version__, "model": label, "size": size, "stage": name,
                 "gflop_forward": round(gflop, 3), "share": round(gflop / total, 4), "in_backward": int(back)}
                for name, gflop, back in rows])


if __name__ == "__main__":
    main()

"""Where does the mean teacher's U-Net lose to SupOnly on BUSI? Swap the pseudo-labels for the truth.

At 4,000 iterations both mean-teacher U-Nets end under the U-Net trained on the labels alone, and
their confident pseudo-labels hold about 1% lesion where the images hold about 9%
(benchmarks/results/busi/README.md). This trains Base (U-Net), the library's own
:class:`synfoc.method.baselines.MeanTeacher` step, with the pseudo-label Q and its confidence mask W
replaced per variant, everything else (intermediate samples, strong views, ramp, BatchNorm per
part, optimiser) unchanged:

- ``teacher``: Q and W of the EMA teacher at the threshold (Base (U-Net) itself);
- ``truth``: Q = the unlabeled images' hidden labels, W everywhere (the pathway's upper bound:
  supervised training on every image through intermediate samples);
- ``truth-masked``: Q = the hidden labels, W = the teacher's confidence mask (what the mask alone
  costs when the labels under it are right);
- ``unmasked``: Q = the teacher's labels, W everywhere (what the mask saves from the teacher's errors).

``--teacher-mode eval`` runs the teacher with BatchNorm's running statistics (copied from the
student) instead of the published script's train mode, whose statistics come from the batch of
unlabeled weak views alone (two images in the protocol). ``--photometric LO,HI`` draws the strong
view's brightness and contrast factors from U(LO, HI) instead of the protocol's U(0.1, 2.0)
(``1,1``: the strong view is the weak view, blurred).

The hidden labels are read from the dataset (BUSI has them for every training image); nothing is
chosen from these runs, they diagnose. The validation split is the one of
``threshold_validation.py`` (training images of the labeled domain, never the test set)::

    python benchmarks/busi/pseudo_label_oracle.py --variants truth,truth-masked,unmasked --iters 4000 \\
        --seed 1339 --keep benchmarks/results/busi/oracle_4k/seed1339

Rows go to ``benchmarks/results/busi/pseudo_label_oracle.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from machine import append_csv, run_metadata  # noqa: E402
from synfoc.config import TrainConfig  # noqa: E402
from threshold_validation import PROTOCOL, add_split_arguments, keep_run, protocol_run, validation_scores  # noqa: E402

CSV = HERE.parent / "results" / "busi" / "pseudo_label_oracle.csv"
CSV_COLUMNS = ("commit", "torch", "device", "threads", "variant", "teacher_mode", "photometric", "threshold", "domain", "labeled", "validation",
               "validation_other", "seed", "iters", "unet_width", "val_dice", "val_hd95", "val_dice_other", "train_s")
VARIANTS = ("teacher", "truth", "truth-masked", "unmasked")
# The strong view's default brightness and contrast ranges (the config's, which are equal): runs
# that keep them keep the plain variant name.
DEFAULT_PHOTOMETRIC = TrainConfig().brightness
assert DEFAULT_PHOTOMETRIC == TrainConfig().contrast


def oracle_pseudo_label(variant: str, truth: torch.Tensor | None, pseudo_label):
    """A stand-in for ``pseudo_label(p, threshold) -> (Q, W)`` that swaps in the hidden labels
    ``truth`` (B, H, W) and/or a mask of ones, per ``variant``."""
    def swapped(p: torch.Tensor, threshold: float):
        q, w = pseudo_label(p, threshold)
        if variant == "teacher":
            return q, w
        if variant != "unmasked":
            if truth is None or truth.shape != q.shape:
                raise ValueError(f"variant {variant!r} needs the unlabeled images' labels at the teacher's "
                                 f"output size {tuple(q.shape)}, got {None if truth is None else tuple(truth.shape)}")
            q = truth.to(q.dtype)
        if variant != "truth-masked":
            w = torch.ones_like(w)
        return q, w
    return swapped


@contextlib.contextmanager
def pseudo_labels_from(variant: str):
    """Within the block, MeanTeacher's step takes its pseudo-labels from ``variant``."""
    from synfoc.method import baselines
    step, pseudo_label = baselines.MeanTeacher.step, baselines.pseudo_label

    def oracle_step(self, v, t, total):
        with mock.patch.object(baselines, "pseudo_label", oracle_pseudo_label(variant, v.unlabeled_truth, pseudo_label)):
            return step(self, v, t, total)

    with mock.patch.object(baselines.MeanTeacher, "step", oracle_step):
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_split_arguments(ap)
    ap.add_argument("--variants", default="truth,truth-masked,unmasked", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--teacher-mode", default="train", choices=("train", "eval"))
    ap.add_argument("--photometric", default=",".join(map(str, DEFAULT_PHOTOMETRIC)), help="LO,HI of the strong view's brightness and contrast factors")
    ap.add_argument("--iters", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--out", default="runs/pseudo_label_oracle")
    ap.add_argument("--csv", default=str(CSV))
    ap.add_argument("--keep", default=None, help="copy each finished run's small files to KEEP/<variant>[-teacher-eval][-photometric-LO-HI]/")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    photometric = [float(x) for x in args.photometric.split(",")]
    rows = []
    for variant in variants:
        name = variant + ("" if args.teacher_mode == "train" else f"-teacher-{args.teacher_mode}") \
            + ("" if photometric == DEFAULT_PHOTOMETRIC else f"-photometric-{args.photometric.replace(',', '-')}")
        out = Path(args.out) / name
        start = time.time()
        with pseudo_labels_from(variant):
            summary, trained = protocol_run(args, out, method="base-unet", threshold=args.threshold,
                                            teacher_mode=args.teacher_mode, brightness=photometric,
                                            contrast=photometric)
        seconds = time.time() - start
        if args.keep:
            keep_run(out, Path(args.keep) / name)
        rows.append({**run_metadata(HERE.parent.parent), "name": name, "variant": variant, "teacher_mode": args.teacher_mode,
                     "photometric": args.photometric.replace(",", "-"), "threshold": args.threshold,
                     "domain": args.labeled_domain, "labeled": args.labeled_num, "validation": args.val_num,
                     "validation_other": args.val_other, "seed": args.seed, "iters": args.iters,
                     "unet_width": PROTOCOL["unet_width"], **validation_scores(summary["students"]["unet"], args.labeled_domain),
                     "train_s": round(seconds, 1)})
        other = f", other domains {rows[-1]['val_dice_other']:.2f}" if args.val_other else ""
        print(f"{name}: validation Dice {rows[-1]['val_dice']:.2f}{other}", flush=True)
        if trained:
            append_csv(Path(args.csv), CSV_COLUMNS, [{c: rows[-1][c] for c in CSV_COLUMNS}])
    print("\n| pseudo-labels | validation Dice | HD95 | other domains' Dice | train s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['val_dice']:.2f} | {r['val_hd95']:.2f} | {r['val_dice_other'] or '-'} | "
              f"{r['train_s']:.0f} |")


if __name__ == "__main__":
    main()

"""How the foundation model's quality falls with its input size, against what each size costs.

The same short supervised, prompt-free fine-tune of LiteMedSAM (LoRA) on the labeled domain's
labeled images (``--method suponly-foundation``: weak views only, the paper's optimiser) at every
input size, scored on a **validation split carved from the labeled domain's training images**: the
``--val-num`` training images that follow the labeled ones in name order, with their labels. The
test split is not read at all (the run's "test" split is replaced by the validation images). The
masks are scored at ``--score-size`` (the BUSI protocol's 128) so that sizes compare on one grid.
FLOPs: one forward of one image at that size (FlopCounterMode).

    python benchmarks/input_size.py --dataset ../shared/data/busi --sizes 64,96,128,256 --iters 300

Prints a table and appends one CSV row per size to ``benchmarks/results/input_size.csv``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops_breakdown import forward_gflop  # noqa: E402
from machine import append_csv, run_metadata  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CSV_COLUMNS = ("commit", "torch", "device", "threads", "domain", "labeled", "validation", "seed", "iters", "size",
               "score_size", "val_dice", "val_hd95", "gflop_forward", "train_s")


def validation_index(index, domain: str, labeled_num: int, val_num: int, other_num: int = 0):
    """A copy of ``index`` whose test split is ``val_num`` training images of ``domain``: those that
    follow the first ``labeled_num`` in name order (the MiDSS labeled set), and the first
    ``other_num`` training images in name order of every other domain (which would otherwise be
    unlabeled). They leave the training split, so they are neither labeled nor unlabeled; the real
    test cases are dropped."""
    train = sorted(index.cases_of(domain, "train"), key=lambda c: c.name)
    if len(train) < labeled_num + val_num:
        raise SystemExit(f"{domain} has {len(train)} training images, fewer than {labeled_num} labeled + "
                         f"{val_num} validation")
    val = train[labeled_num:labeled_num + val_num]
    for other in sorted({c.domain for c in index.cases} - {domain}) if other_num else []:
        cases = sorted(index.cases_of(other, "train"), key=lambda c: c.name)
        if len(cases) <= other_num:
            raise SystemExit(f"{other} has {len(cases)} training images, not more than {other_num} validation")
        val += cases[:other_num]
    return as_validation(index, val)


def as_validation(index, val_cases):
    """A copy of ``index`` whose test split is ``val_cases`` (training cases, which leave the training
    split); the real test cases are dropped."""
    val = {id(c) for c in val_cases}
    carved = copy.copy(index)
    carved.cases = [dataclasses.replace(c, split="test") if id(c) in val else c
                    for c in index.cases if c.split != "test"]
    return carved


def train_on(cfg, out: Path, index) -> tuple[dict, bool]:
    """Train ``cfg`` on ``index`` (in place of the dataset ``cfg`` names) into ``out``, resuming its
    checkpoint; a finished run's summary is reused. Returns (summary, whether this call trained)."""
    import synfoc.train
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text()), False
    with mock.patch.object(synfoc.train, "open_index", lambda _cfg: index):
        return synfoc.train.train(cfg, out, resume=(out / "checkpoint.pt").is_file(), progress=False), True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="../shared/data/busi")
    ap.add_argument("--preset", default="busi")
    ap.add_argument("--labeled-domain", default="benign")
    ap.add_argument("--labeled-num", type=int, default=64)
    ap.add_argument("--val-num", type=int, default=64)
    ap.add_argument("--sizes", default="64,96,128,256")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--score-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", default="runs/input_size")
    ap.add_argument("--csv", default=str(RESULTS / "input_size.csv"))
    args = ap.parse_args()

    import synfoc.train
    from synfoc.build import build_student
    from synfoc.config import resolve
    from synfoc.data.source import open_index

    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cfg = resolve(args.preset, None, {
            "dataset": args.dataset, "labeled_domain": args.labeled_domain, "labeled_num": args.labeled_num,
            "labeled_ratio": None, "method": "suponly-foundation", "foundation": "litemedsam", "image_size": size,
            "unet_size": args.score_size, "iters": args.iters, "seed": args.seed,
            "test_domains": [args.labeled_domain], "baseline": None})
        carved = validation_index(open_index(cfg), args.labeled_domain, args.labeled_num, args.val_num)
        start = time.time()
        with mock.patch.object(synfoc.train, "open_index", lambda _cfg: carved):
            summary = synfoc.train.train(cfg, Path(args.out) / f"size{size}", progress=False)
        seconds = time.time() - start
        mean = summary["students"]["foundation"]["mean"]
        gflop = forward_gflop(build_student("foundation", cfg, carved).eval(), carved.channels, size)
        rows.append({**run_metadata(Path(__file__).resolve().parent.parent), "size": size, "iters": args.iters,
                     "labeled": args.labeled_num, "score_size": args.score_size,
                     "validation": args.val_num, "domain": args.labeled_domain, "seed": args.seed,
                     "val_dice": round(100 * mean["dice"], 2), "val_hd95": round(mean["hd95"], 2),
                     "gflop_forward": round(gflop, 2), "train_s": round(seconds, 1)})
        print(f"size {size}: validation Dice {rows[-1]['val_dice']:.2f}, HD95 {rows[-1]['val_hd95']:.2f}, "
              f"{gflop:.1f} GFLOP per forward, {seconds:.0f} s", flush=True)
        append_csv(Path(args.csv), CSV_COLUMNS, [rows[-1]])
    print("\n| input size | validation Dice (%) | HD95 (px) | GFLOP per forward | train s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['val_dice']:.2f} | {r['val_hd95']:.2f} | {r['gflop_forward']:.1f} | {r['train_s']:.0f} |")


if __name__ == "__main__":
    main()

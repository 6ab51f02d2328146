"""Does the two students' agreement (``synfoc predict``'s review.csv) find the worst predictions?

For a finished SynFoC run (both students), every test image of the run's tested domains is segmented
as ``synfoc predict`` segments a file (the same reading, resizing and students, masks at the
image's original size), its review row is computed from the two students' masks, and the true Dice
of the written mask against the ground truth (mean over the reported parts; 1 when both are empty,
docs/metrics.md). For each mask choice (``foundation``: predict's default for such a run, ``unet``,
``average``) it reports:

- ``spearman``: Spearman's rank correlation between agreement and true Dice over the test images;
- ``dice_low10``: mean true Dice of the 10% lowest-agreement images (ceil(0.1 n), ties in input
  order), ``dice_rest``: of the others.

It prints a table and appends one row per mask choice to benchmarks/results/review_score.csv
(``--csv``; columns :data:`CSV_COLUMNS`).

    OMP_NUM_THREADS=1 python benchmarks/review_score.py --run runs/busi/synfoc/benign/seed1337
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from machine import append_csv, cpu_model, git_describe

ROOT = Path(__file__).resolve().parents[1]
CSV_COLUMNS = ("commit", "date", "torch", "cpu_model", "run", "mask", "n", "spearman", "dice_low10", "dice_rest")
MASKS = ("foundation", "unet", "average")
LOW_FRACTION = 0.1


def review_cases(run: Path, dataset: str | None, device: str) -> tuple[list[dict], float]:
    """One dict per test image: case, domain, agreement, flag, and the true Dice of each mask
    choice; and the flag threshold used."""
    from tqdm import tqdm

    from synfoc.evaluate import tested_domains
    from synfoc.metrics import dice_per_part
    from synfoc.predict import AVERAGE, load_predictor, review_row

    predictor, cfg, index = load_predictor(run, AVERAGE, device, dataset, review=True)
    cases = [c for d in tested_domains(index, cfg) for c in index.cases_of(d, "test")]
    rows = []
    for case in tqdm(cases, desc="review", unit="image", dynamic_ncols=True):
        sample = index.read(case)
        average, own = predictor.segment(sample.image[None])
        masks = {"average": average[0], **{k: v[0] for k, v in own.items()}}
        dice = {k: float(np.mean(list(dice_per_part(m, sample.label, predictor.parts).values())))
                for k, m in masks.items()}
        rows.append({"domain": case.domain, "case": case.name,
                     **review_row({k: v[0] for k, v in own.items()}, predictor.parts, predictor.threshold),
                     **{f"dice_{k}": v for k, v in dice.items()}})
    return rows, predictor.threshold


def scores(rows: list[dict], mask: str, fraction: float = LOW_FRACTION) -> dict:
    """n, Spearman (agreement vs true Dice), mean Dice of the lowest-agreement ``fraction`` and of the rest."""
    agreement = np.array([r["agreement"] for r in rows])
    dice = np.array([r[f"dice_{mask}"] for r in rows])
    order = np.argsort(agreement, kind="stable")
    k = math.ceil(fraction * len(rows))
    rho = spearmanr(agreement, dice)[0] if len(rows) > 2 else float("nan")
    return {"n": len(rows), "spearman": float(rho), "dice_low10": float(dice[order[:k]].mean()),
            "dice_rest": float(dice[order[k:]].mean()), "dice_all": float(dice.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished SynFoC run folder (both students)")
    parser.add_argument("--dataset", help="where the run's dataset is now (default: as in its config.yaml)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "review_score.csv")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args()

    rows, threshold = review_cases(args.run, args.dataset, args.device)
    results = {mask: scores(rows, mask) for mask in MASKS}
    flagged = [r for r in rows if r["flag"]]
    print(f"\n{args.run}: {len(rows)} test images; agreement median {np.median([r['agreement'] for r in rows]):.3f}, "
          f"{len(flagged)} flagged (agreement < {threshold})\n")
    print("| mask | n | Spearman (agreement, Dice) | Dice, 10% lowest agreement | Dice, the rest | Dice, all |")
    print("|---|---|---|---|---|---|")
    for mask, s in results.items():
        print(f"| {mask} | {s['n']} | {s['spearman']:.3f} | {s['dice_low10']:.3f} | {s['dice_rest']:.3f} "
              f"| {s['dice_all']:.3f} |")
    for domain in dict.fromkeys(r["domain"] for r in rows):
        s = scores([r for r in rows if r["domain"] == domain], MASKS[0])
        print(f"| {MASKS[0]}, {domain} only | {s['n']} | {s['spearman']:.3f} | {s['dice_low10']:.3f} "
              f"| {s['dice_rest']:.3f} | {s['dice_all']:.3f} |")
    if flagged:
        print(f"\nflagged images, mean true Dice of the {MASKS[0]} mask: "
              f"{np.mean([r['dice_' + MASKS[0]] for r in flagged]):.3f} "
              f"(unflagged {np.mean([r['dice_' + MASKS[0]] for r in rows if not r['flag']]):.3f})")
    if not args.no_csv:
        stamp = {"commit": git_describe(ROOT), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "torch": torch.__version__, "cpu_model": cpu_model(), "run": str(args.run)}
        append_csv(args.csv, CSV_COLUMNS, [{**stamp, "mask": mask, "n": s["n"], "spearman": f"{s['spearman']:.4f}",
                                            "dice_low10": f"{s['dice_low10']:.4f}",
                                            "dice_rest": f"{s['dice_rest']:.4f}"}
                                           for mask, s in results.items()])
        print(f"\nappended {len(results)} row(s) to {args.csv}")


if __name__ == "__main__":
    sys.exit(main())

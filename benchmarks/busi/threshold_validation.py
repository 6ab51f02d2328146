"""Choose the pseudo-label confidence threshold for the BUSI CPU protocol on a validation split.

At 1,000 iterations the confident pseudo-labels of the paper's threshold (0.95) carry almost no
lesion (benchmarks/results/busi/README.md). Whether a lower threshold serves the short schedule is
a hyperparameter choice, so it is made on a **validation split carved from the labeled domain's
training images**, never on the test set: the ``--val-num`` training images that follow the
labeled ones in name order leave the training split (neither labeled nor unlabeled) and replace
the test split (``input_size.validation_index``). Every method that uses the threshold is trained
at every threshold with the protocol's settings; one threshold is then chosen for all of them: the
one with the highest validation Dice averaged over the methods' students.

    python benchmarks/busi/threshold_validation.py --dataset ../shared/data/busi \\
        --thresholds 0.95,0.9,0.8 --methods base-unet,base-foundation,synfoc

The same split checks a longer schedule (``--iters 2000``), the paper's U-Net width instead of the
protocol's (``--unet-width 64``), each with another ``--out``, and methods without a threshold
(``suponly-unet``: its rows carry the threshold it ignores), and SynFoC without CDCR
(``--consistency none`` or ``cr``, Table 7's ablations; the run and its rows are named
``synfoc-consistency-<name>``, the method's name below).

Runs go to ``--out/<method>/t<threshold>/`` and resume where they stopped; ``--keep DIR`` copies
each finished run's small files (``KEPT_FILES``) to ``DIR/<method>/``, inside the repository, so a
run outlives a machine whose ignored ``runs/`` folder is lost before anyone commits. Prints a table and
appends one CSV row per run trained and student to ``benchmarks/results/busi/threshold_validation.csv``
(``train_s``: the seconds of this call, so a resumed run's earlier part is not in it).

``--seed-table`` trains nothing: it prints, from the CSV alone, every seed's validation Dice per
method and student at the given ``--iters``, ``--thresholds`` (one), ``--unet-width`` and labeled
domain, their mean and spread, and the differences paired by seed in the paper's ordering
(``ORDERING``)::

    python benchmarks/busi/threshold_validation.py --seed-table --iters 4000 --thresholds 0.95
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from input_size import train_on, validation_index  # noqa: E402
from machine import append_csv, run_metadata  # noqa: E402
from synfoc.method.registry import CONSISTENCIES  # noqa: E402

CSV = HERE.parent / "results" / "busi" / "threshold_validation.csv"
CSV_COLUMNS = ("commit", "torch", "device", "threads", "method", "student", "threshold", "domain", "labeled",
               "validation", "validation_other", "seed", "iters", "unet_width", "val_dice", "val_hd95", "val_dice_other",
               "train_s")
# The CPU protocol of benchmarks/busi/run_protocol.sh, less the split (labeled_num instead of the
# ratio: the carved-out validation images would otherwise shrink the labeled set).
# What benchmarks/busi/run_protocol.sh keeps of a finished run, too: small, and enough to
# regenerate every table and curve.
KEPT_FILES = ("summary.json", "config.yaml", "history.jsonl", "environment.jsonl", "per_case.csv", "labeled.txt")
PROTOCOL = {"iters": 1000, "unet_size": 128, "unet_width": 16, "foundation": "litemedsam", "image_size": 128,
            "batch_labeled": 2, "batch_unlabeled": 2}


# The paper's claim per student, best first (Table 6): each method should beat every one after it.
ORDERING = {"unet": ("synfoc", "base-unet", "suponly-unet"), "foundation": ("synfoc", "base-foundation", "samed")}
LABELS = {"unet": "U-Net", "foundation": "foundation"}


def seed_results(csv_path: Path, iters: int, threshold: float, unet_width: int, domain: str,
                 validation_other: int = 0, column: str = "val_dice") -> dict:
    """{(method, student): {seed: ``column``}} of the CSV rows with these settings (``val_dice``: the
    labeled domain's validation Dice; ``val_dice_other``: the other domains'). A cell trained twice
    keeps its last row: the CSV is appended in the order the runs finished."""
    cells: dict = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if (int(row["iters"]), float(row["threshold"]), int(row["unet_width"]), row["domain"],
                    int(row["validation_other"])) == (iters, threshold, unet_width, domain, validation_other):
                cells.setdefault((row["method"], row["student"]), {})[int(row["seed"])] = float(row[column])
    return cells


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f} (one seed)"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def seed_table(cells: dict) -> str:
    """Markdown: one row per (method, student) with a column per seed, mean ± sample std; then, per
    student, every method of ``ORDERING`` minus each one after it, paired by seed (the seeds where
    both ran)."""
    seeds = sorted({s for per_seed in cells.values() for s in per_seed})
    lines = ["| method | student | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|---|" + "---:|" * (len(seeds) + 1)]
    def rank(cell):  # the ORDERING's students and methods first, in its order; anything else after
        method, student = cell
        order = ORDERING.get(student, ())
        return (list(ORDERING).index(student) if student in ORDERING else len(ORDERING), student,
                order.index(method) if method in order else len(order), method)

    for (method, student), per_seed in sorted(cells.items(), key=lambda kv: rank(kv[0])):
        values = [per_seed[s] for s in seeds if s in per_seed]
        lines.append(f"| {method} | {LABELS.get(student, student)} | "
                     + " | ".join(f"{per_seed[s]:.2f}" if s in per_seed else "-" for s in seeds)
                     + f" | {_spread(values)} |")
    lines += ["", "| comparison (paired by seed) | " + " | ".join(f"seed {s}" for s in seeds)
              + " | mean ± std | positive |", "|---|" + "---:|" * (len(seeds) + 2)]
    for student, order in ORDERING.items():
        for i, better in enumerate(order):
            for worse in order[i + 1:]:
                a, b = cells.get((better, student), {}), cells.get((worse, student), {})
                diffs = {s: a[s] - b[s] for s in seeds if s in a and s in b}
                if not diffs:
                    continue
                lines.append(f"| {better} - {worse} ({LABELS[student]}) | "
                             + " | ".join(f"{diffs[s]:+.2f}" if s in diffs else "-" for s in seeds)
                             + f" | {_spread(list(diffs.values()))} | {sum(d > 0 for d in diffs.values())}/{len(diffs)} |")
    return "\n".join(lines) + "\n"


def keep_run(run: Path, dest: Path) -> None:
    """Copy a finished run's ``KEPT_FILES`` to ``dest``; a missing one is named before anything is copied."""
    missing = [str(run / name) for name in KEPT_FILES if not (run / name).is_file()]
    if missing:
        raise FileNotFoundError(f"not a finished run, missing: {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        shutil.copy2(run / name, dest / name)
    print(f"kept {', '.join(KEPT_FILES)} of {run} in {dest}", flush=True)


def add_split_arguments(ap: argparse.ArgumentParser) -> None:
    """The dataset and the validation split's options, shared by the scripts that train on it."""
    ap.add_argument("--dataset", default="../shared/data/busi")
    ap.add_argument("--labeled-domain", default="benign")
    ap.add_argument("--labeled-num", type=int, default=64)
    ap.add_argument("--val-num", type=int, default=64)
    ap.add_argument("--val-other", type=int, default=0,
                    help="also validate on the first N training images (by name) of every other domain, which "
                         "leave the unlabeled set: the mixed-domain score of the paper's tables")


def protocol_run(args: argparse.Namespace, out: Path, **settings) -> tuple[dict, bool]:
    """Train the protocol with ``settings`` on the validation split of ``args`` into ``out``
    (resuming; a finished run is reused). Returns (summary, whether this call trained)."""
    from synfoc.config import resolve
    from synfoc.data.source import open_index
    cfg = resolve("busi", None, {
        **PROTOCOL, "dataset": args.dataset, "labeled_domain": args.labeled_domain, "labeled_num": args.labeled_num,
        "iters": args.iters, "precision": args.precision, "seed": args.seed, "test_domains": [args.labeled_domain],
        "baseline": None, **settings})
    if args.val_other:
        cfg = dataclasses.replace(cfg, test_domains=None)   # every domain
    carved = validation_index(open_index(cfg), args.labeled_domain, args.labeled_num, args.val_num, args.val_other)
    return train_on(cfg, out, carved)


def run_label(method: str, consistency: str = "cdcr") -> str:
    """The name a run goes by in its folder and in the CSV: the method, and an ablated consistency
    regulariser after it (``synfoc-consistency-none``), so that tables never pool an ablation with the
    method."""
    return method if consistency == "cdcr" else f"{method}-consistency-{consistency}"


def validation_scores(student_result: dict, labeled_domain: str) -> dict:
    """A student's CSV scores from its summary: the labeled domain's validation Dice (%) and HD95,
    and the mean Dice (%) over the other validated domains (empty when there are none)."""
    per_domain = student_result["per_domain"]
    own = per_domain[labeled_domain]
    others = [r["dice"] for d, r in per_domain.items() if d != labeled_domain]
    return {"val_dice": round(100 * own["dice"], 2), "val_hd95": round(own["hd95"], 2),
            "val_dice_other": round(100 * sum(others) / len(others), 2) if others else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_split_arguments(ap)
    ap.add_argument("--thresholds", default="0.95,0.9,0.8")
    ap.add_argument("--methods", default="base-unet,base-foundation,synfoc")
    ap.add_argument("--iters", type=int, default=PROTOCOL["iters"])
    ap.add_argument("--unet-width", type=int, default=PROTOCOL["unet_width"],
                    help="the U-Net's base width (the protocol's 16; the paper's 64)")
    ap.add_argument("--consistency", default="cdcr", choices=tuple(CONSISTENCIES),
                    help="SynFoC's consistency regulariser; cr and none are Table 7's ablations, recorded as "
                         "the method synfoc-consistency-<name> (folder and CSV)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="auto picks bf16 on CPUs with bf16 arithmetic; fp32 keeps runs comparable with "
                         "runs made on CPUs without it")
    ap.add_argument("--out", default="runs/threshold_validation")
    ap.add_argument("--csv", default=str(CSV))
    ap.add_argument("--keep", default=None,
                    help="copy each finished run's small files to KEEP/<method>/ (one threshold only)")
    ap.add_argument("--seed-table", action="store_true",
                    help="train nothing: print every seed's result and the paired differences from --csv")
    args = ap.parse_args()
    if args.seed_table:
        threshold = float(args.thresholds.split(",")[0])
        columns = ["val_dice"] + (["val_dice_other"] if args.val_other else [])
        for column in columns:
            cells = seed_results(Path(args.csv), args.iters, threshold, args.unet_width, args.labeled_domain,
                                 args.val_other, column)
            if not cells:
                sys.exit(f"{args.csv}: no rows with iters {args.iters}, threshold {threshold:g}, unet_width "
                         f"{args.unet_width}, domain {args.labeled_domain}, validation_other {args.val_other}")
            if len(columns) > 1:
                print(f"\n{'labeled domain' if column == 'val_dice' else 'other domains'} ({column}):\n")
            print(seed_table(cells), end="")
        return

    thresholds = [float(t) for t in args.thresholds.split(",")]
    if args.keep and len(thresholds) > 1:
        ap.error(f"--keep takes the runs of one threshold, got --thresholds {args.thresholds}")
    methods = args.methods.split(",")
    if args.consistency != "cdcr" and methods != ["synfoc"]:
        ap.error(f"--consistency {args.consistency} is an ablation of SynFoC alone; got --methods {args.methods}")
    rows = []
    for method in methods:
        label = run_label(method, args.consistency)
        for threshold in thresholds:
            out = Path(args.out) / label / f"t{threshold:g}"
            start = time.time()
            summary, trained = protocol_run(args, out, method=method, threshold=threshold, unet_width=args.unet_width,
                                            consistency=args.consistency)
            seconds = time.time() - start
            if args.keep:
                keep_run(out, Path(args.keep) / label)
            for student, result in summary["students"].items():
                rows.append({**run_metadata(HERE.parent.parent), "method": label, "student": student,
                             "threshold": threshold, "domain": args.labeled_domain, "labeled": args.labeled_num,
                             "validation": args.val_num, "validation_other": args.val_other, "seed": args.seed,
                             "iters": args.iters, "unet_width": args.unet_width,
                             **validation_scores(result, args.labeled_domain), "train_s": round(seconds, 1)})
                other = f", other domains {rows[-1]['val_dice_other']:.2f}" if args.val_other else ""
                print(f"{label} {student} threshold {threshold:g}: validation Dice {rows[-1]['val_dice']:.2f}{other}",
                      flush=True)
                if trained:
                    append_csv(Path(args.csv), CSV_COLUMNS, [rows[-1]])
    print("\n| threshold | " + " | ".join(f"{r['method']} {r['student']}" for r in rows if r["threshold"] == thresholds[0])
          + " | mean |")
    print("|---:|" + "---:|" * (1 + sum(r["threshold"] == thresholds[0] for r in rows)))
    for t in thresholds:
        dice = [r["val_dice"] for r in rows if r["threshold"] == t]
        print(f"| {t:g} | " + " | ".join(f"{d:.2f}" for d in dice) + f" | {sum(dice) / len(dice):.2f} |")


if __name__ == "__main__":
    main()

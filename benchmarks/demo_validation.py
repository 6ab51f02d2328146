"""Choose the embedded default's settings on a validation split of the synthetic set, never its test set.

The demo (preset ``demo``) trains for 60 iterations, where two of the paper's proportions break:
the EMA teachers' warm-up ``min(1 - 1/(t+1), 0.99)`` makes each teacher the plain average of every
student so far for the whole run, and the foundation model works at half the U-Net's resolution
(the paper's MedSAM works at twice it). Each variant (preset overrides such as ``unet_size=64`` or
``ema_decay=0.9``) trains SynFoC and the supervised-only U-Net (``--methods`` names others, e.g.
``suponly-foundation``) with the demo's data and seeds. They are scored on ``--val-num`` further
*training-distribution* cases per site (synthetic training indices 40, 41, ...; no run trains on
them), which replace the test split.

    python benchmarks/demo_validation.py --variants "demo;unet_size=64;unet_size=64,ema_decay=0.9" \\
        --seeds 1337,1338,1339

Runs go to ``--out/<variant>/seed<N>/<method>`` and are reused when finished. Prints a table of
validation Dice per site (mean over seeds) and appends one CSV row per run, student and site to
``benchmarks/results/demo_validation.csv``; ``--table-only`` prints the table of every row there
(``--since REV``: of the rows of commit REV and later only).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from input_size import as_validation, train_on  # noqa: E402
from machine import append_csv, git_is_ancestor, run_metadata  # noqa: E402

CSV = HERE / "results" / "demo_validation.csv"
CSV_COLUMNS = ("commit", "torch", "device", "threads", "variant", "seed", "method", "student", "domain",
               "validation", "val_dice", "train_s")


def parse_variant(text: str) -> dict:
    """``"demo"`` (the preset as it is) or ``"key=value,key=value"`` (numbers parsed) -> overrides."""
    if text == "demo":
        return {}
    overrides = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {text!r}: {item!r} is not key=value")
        try:
            overrides[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            overrides[key.strip()] = value.strip()
    return overrides


# Settings the supervised-only U-Net does not read: one SupOnly run serves every variant that differs
# from another only in these.
TEACHER_ONLY = ("ema_decay", "threshold", "foundation", "image_size", "lora_rank")


def run_key(method: str, overrides: dict) -> str:
    """The run folder's name: the overrides that affect ``method``, or ``demo``."""
    used = {k: v for k, v in overrides.items() if method != "suponly-unet" or k not in TEACHER_ONLY}
    return "_".join(f"{k}{v}" for k, v in sorted(used.items())) or "demo"


def carved_synthetic(cfg, val_num: int):
    """The demo's synthetic set with ``val_num`` more training cases per site, which become the test split.

    The training split keeps exactly the demo's cases (indices below ``cfg.synthetic_train``)."""
    from synfoc.data.synthetic import SyntheticDataset, parse_case_name

    index = SyntheticDataset(seed=0, train_per_domain=cfg.synthetic_train + val_num, test_per_domain=0,
                             num_classes=cfg.synthetic_classes)
    return as_validation(index, [c for c in index.cases if parse_case_name(c.name)[2] >= cfg.synthetic_train])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="demo;unet_size=64;unet_size=64,ema_decay=0.9",
                    help="';'-separated; each 'demo' or comma-separated key=value preset overrides")
    ap.add_argument("--methods", default="synfoc,suponly-unet")
    ap.add_argument("--seeds", default="1337,1338,1339")
    ap.add_argument("--val-num", type=int, default=12)
    ap.add_argument("--out", default="runs/demo_validation")
    ap.add_argument("--csv", default=str(CSV))
    ap.add_argument("--table-only", action="store_true", help="print the table of every row of --csv; train nothing")
    ap.add_argument("--since", metavar="REV", help="with --table-only: only the rows of commit REV and later "
                    "(the training code changed at REV)")
    args = ap.parse_args()
    if args.table_only:
        with open(args.csv, newline="") as f:
            rows = list(csv.DictReader(f))
        if args.since:
            rows = [r for r in rows if git_is_ancestor(HERE.parent, args.since, r["commit"])]
        print_table(rows)
        return

    from synfoc.config import resolve

    seeds = [int(s) for s in args.seeds.split(",")]
    all_rows = []
    for variant in args.variants.split(";"):
        overrides = parse_variant(variant)
        for seed in seeds:
            for method in args.methods.split(","):
                cfg = resolve("demo", None, {**overrides, "seed": seed, "method": method})
                cfg = cfg.update({"baseline": None}, "demo validation")
                carved = carved_synthetic(cfg, args.val_num)
                out = Path(args.out) / run_key(method, overrides) / f"seed{seed}" / method
                start = time.time()
                summary, trained = train_on(cfg, out, carved)
                seconds = time.time() - start
                rows = []
                for student, result in summary["students"].items():
                    for domain, metrics in result["per_domain"].items():
                        dice = round(100 * metrics["dice"], 2)
                        rows.append({**run_metadata(HERE.parent), "variant": variant, "seed": seed,
                                     "method": method, "student": student, "domain": domain,
                                     "validation": args.val_num, "val_dice": dice, "train_s": round(seconds, 1)})
                print(f"{variant} seed {seed} {method}: " + ", ".join(
                    f"{r['student']} {r['domain']} {r['val_dice']:.2f}" for r in rows), flush=True)
                all_rows += rows
                if trained:
                    append_csv(Path(args.csv), CSV_COLUMNS, rows)

    print_table(all_rows)


def print_table(rows: list[dict]) -> None:
    """Validation Dice per site, mean (min-max) over the seeds of each (variant, method, student)."""
    cells = {}   # (variant, method, student) -> domain -> {seed: dice}; a later row of a seed wins
    for r in rows:
        cells.setdefault((r["variant"], r["method"], r["student"]), {}).setdefault(r["domain"], {})[
            int(r["seed"])] = float(r["val_dice"])
    domains = sorted({d for by_domain in cells.values() for d in by_domain})
    print("\nValidation Dice (%), mean (min-max) over seeds")
    print("| variant | run | student | seeds | " + " | ".join(domains) + " |")
    print("|---|---|---|---:|" + "---:|" * len(domains))
    for (variant, method, student), by_domain in sorted(cells.items()):
        values = [list(by_domain.get(d, {}).values()) for d in domains]
        print(f"| {variant} | {method} | {student} | {max(map(len, values))} | " + " | ".join(
            f"{statistics.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "" for v in values) + " |")


if __name__ == "__main__":
    main()

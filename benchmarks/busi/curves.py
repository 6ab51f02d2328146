"""The training curves of the BUSI protocol's mean-teacher runs, phase by phase, for every seed,
and the wall time of every run.

Reads the committed ``history.jsonl`` files under ``benchmarks/results/busi/<method>/<domain>/seed<N>/``
(nothing is trained or evaluated) and prints one markdown table per quantity: rows are runs, columns
are phases of the 1,000-iteration schedule, each cell the mean over the 10-iteration log windows of
that phase. Also writes every cell to ``curves.csv`` beside the runs.

    python benchmarks/busi/curves.py [RESULTS_DIR]
    python benchmarks/busi/curves.py --validation DIR [--iters 4000] [--keys K1,K2]

``--validation`` reads the runs of ``threshold_validation.py --keep DIR/seed<N>`` instead
(``DIR/seed<N>/<method>/history.jsonl``, every method there) and prints one table per quantity,
the phases stretched to ``--iters``; its default quantities include the per-domain ones of a
two-domain validation split (``--val-other``).

The wall time is the sum of the logged ``time`` increments of each run (seconds of training; where a
resume restarted the clock, the count restarts from 0), with the threads and commit of each session
from ``environment.jsonl``.

The quantities are the ones SynFoC logs per step (``synfoc/method/synfoc.py``):
- ``confident_foreground``: of the pixels whose teacher confidence passes the threshold, the
  fraction labeled lesion — the lesion signal the masked unsupervised loss carries;
- ``confident_fraction``: the fraction of pixels that pass the threshold;
- ``alpha_p50``: the median over instances of SMC's alpha (1: the U-Net teacher is trusted);
- ``teachers_both_empty``: instances where both teachers predict no lesion (alpha 1 by rule);
- ``pseudo_dice_*``: each teacher's pseudo-label Dice against the hidden labels of the unlabeled batch.

Where ``sweep_seeds.csv`` lies beside the runs, it also prints each mean-teacher student's gain over
the baseline without unlabeled data (U-Net: SupOnly; foundation: SAMed), paired by seed and labeled
domain, beside the lesion share of its confident pseudo-labels late in the run (iterations
801-1000), and Spearman's rank correlation of the two over the runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

PHASES = [(1, 100), (101, 300), (301, 600), (601, 800), (801, 1000)]
METHODS = ["base-unet", "base-foundation", "synfoc"]
QUANTITIES = ["confident_foreground", "confident_fraction", "alpha_p50", "teachers_both_empty",
              "pseudo_dice_unet", "pseudo_dice_foundation", "pseudo_dice_ensemble"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def stretched_phases(iters: int) -> list[tuple[int, int]]:
    """:data:`PHASES` in proportion for a run of ``iters`` iterations (4,000: 1-400, 401-1200, ...)."""
    return [((lo - 1) * iters // 1000 + 1, hi * iters // 1000) for lo, hi in PHASES]


def phase_means(history: Path, key: str, iters: int = 1000) -> list[float | None]:
    """Mean of ``key`` over the log rows whose step falls in each phase (None where absent); for a
    run of ``iters`` iterations the phases are stretched in proportion (4,000: 1-400, 401-1200, ...)."""
    rows = read_jsonl(history)
    out = []
    for lo, hi in stretched_phases(iters):
        values = [r[key] for r in rows if lo <= r.get("step", -1) <= hi and r.get(key) is not None]
        out.append(sum(values) / len(values) if values else None)
    return out


def wall_times(results: Path) -> list[str]:
    """One markdown row per run: method, labeled domain, seed, seconds, sessions' threads and commits."""
    lines = []
    for history in sorted(results.glob("*/*/seed*/history.jsonl")):
        rows, sessions = read_jsonl(history), read_jsonl(history.parent / "environment.jsonl")
        total, previous = 0.0, 0.0
        for r in rows:
            total += r["time"] - previous if r["time"] >= previous else r["time"]
            previous = r["time"]
        threads = "+".join(str(e.get("threads", "?")) for e in sessions) or "?"
        commits = ", ".join(sorted({str(e.get("synfoc_commit", "?"))[:7] for e in sessions})) or "?"
        run = history.parent
        lines.append(f"| {run.parent.parent.name} | {run.parent.name} | {run.name.removeprefix('seed')} | "
                     f"{total:.0f} | {threads} | {commits} |")
    return lines


LATE = f"{PHASES[-1][0]}-{PHASES[-1][1]}"
# student whose gain is scored -> the baseline trained on the labeled images alone
BASELINE = {("base-unet", "unet"): ("suponly-unet", "unet"), ("synfoc", "unet"): ("suponly-unet", "unet"),
            ("base-foundation", "foundation"): ("samed", "foundation"),
            ("synfoc", "foundation"): ("samed", "foundation")}


def run_dice(sweep_seeds: Path) -> dict[tuple[str, str, str, str], float]:
    """(method, student, labeled, seed) -> mean over test domains of the per-domain mean Dice, in %."""
    per_domain: dict[tuple[str, str, str, str], list[float]] = {}
    with open(sweep_seeds, newline="") as f:
        for r in csv.DictReader(f):
            if r["test_domain"] == "mean":   # the sweep's own average row; recomputed here from the domains
                continue
            key = (r["variant"], r["student"], r["labeled_domain"], r["seed"])
            per_domain.setdefault(key, []).append(100 * float(r["dice"]))
    return {k: sum(v) / len(v) for k, v in per_domain.items()}


def gain_rows(table: list[dict], dice: dict) -> list[dict]:
    """One row per mean-teacher student with a paired baseline run: late lesion share and gain."""
    share = {(t["method"], t["labeled"], t["seed"]): float(t[LATE])
             for t in table if t["quantity"] == "confident_foreground" and t[LATE] != ""}
    rows = []
    for (method, student), (base, base_student) in BASELINE.items():
        for (m, labeled, seed), value in sorted(share.items()):
            mine, theirs = dice.get((method, student, labeled, seed)), dice.get((base, base_student, labeled, seed))
            if m == method and mine is not None and theirs is not None:
                rows.append({"method": method, "student": student, "labeled": labeled, "seed": seed,
                             "share": value, "gain": mine - theirs, "baseline": base})
    return rows


def runs(results: Path) -> list[tuple[str, str, str, Path]]:
    found = []
    for method in METHODS:
        for history in sorted(results.glob(f"{method}/*/seed*/history.jsonl")):
            seed_dir = history.parent
            found.append((method, seed_dir.parent.name, seed_dir.name.removeprefix("seed"), history))
    return found


VALIDATION_QUANTITIES = ["confident_foreground/benign", "confident_foreground/malignant",
                         "confident_foreground_recall", "confident_fraction", "alpha/benign", "alpha/malignant",
                         "pseudo_dice_unet", "pseudo_dice_foundation", "pseudo_dice_ensemble/benign",
                         "pseudo_dice_ensemble/malignant"]


def validation_tables(results: Path, iters: int, keys: list[str]) -> int:
    """One markdown table per quantity over the kept runs of a validation split (rows: method, seed)."""
    found = sorted((h.parent.name, h.parent.parent.name.removeprefix("seed"), h)
                   for h in results.glob("seed*/*/history.jsonl"))
    if not found:
        print(f"no seed<N>/<method>/history.jsonl under {results}", file=sys.stderr)
        return 2
    phases = stretched_phases(iters)
    for key in keys:
        rows = [(method, seed, phase_means(history, key, iters)) for method, seed, history in found]
        lines = [f"| {method} | {seed} | " + " | ".join("-" if m is None else f"{m:.4f}" for m in means) + " |"
                 for method, seed, means in rows if any(m is not None for m in means)]
        if lines:
            print(f"\n### {key} (iterations)\n\n| method | seed | " + " | ".join(f"{lo}-{hi}" for lo, hi in phases)
                  + " |\n|---|---|" + "---:|" * len(phases))
            print("\n".join(lines))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path,
                        default=Path(__file__).resolve().parents[1] / "results" / "busi")
    parser.add_argument("--validation", type=Path, metavar="DIR",
                        help="tables of the runs kept under DIR/seed<N>/<method>/ by threshold_validation.py")
    parser.add_argument("--iters", type=int, default=1000, help="the runs' iterations (phases stretched to it)")
    parser.add_argument("--keys", help=f"comma-separated quantities (--validation; default {','.join(VALIDATION_QUANTITIES)})")
    args = parser.parse_args(argv)
    if args.validation is not None:
        keys = args.keys.split(",") if args.keys else VALIDATION_QUANTITIES
        return validation_tables(args.validation, args.iters, keys)
    results = args.results
    if not results.is_dir():
        print(f"no results folder at {results}", file=sys.stderr)
        return 2
    found = runs(results)
    if not found:
        print(f"no history.jsonl of {', '.join(METHODS)} under {results}", file=sys.stderr)
        return 2
    print("### wall time of each run\n\n| method | labeled | seed | seconds | threads (per session) | commit |\n"
          "|---|---|---|---:|---|---|")
    print("\n".join(wall_times(results)))
    header = "| method | labeled | seed | " + " | ".join(f"{lo}-{hi}" for lo, hi in PHASES) + " |"
    rule = "|---|---|---|" + "---:|" * len(PHASES)
    table = []
    for key in QUANTITIES:
        lines = []
        for method, domain, seed, history in found:
            means = phase_means(history, key)
            if all(m is None for m in means):
                continue
            table.append({"quantity": key, "method": method, "labeled": domain, "seed": seed,
                          **{f"{lo}-{hi}": "" if m is None else f"{m:.4f}"
                             for (lo, hi), m in zip(PHASES, means)}})
            cells = " | ".join("-" if m is None else f"{m:.3f}" for m in means)
            lines.append(f"| {method} | {domain} | {seed} | {cells} |")
        if lines:
            print(f"\n### {key} (iterations)\n\n{header}\n{rule}")
            print("\n".join(lines))
    if (results / "sweep_seeds.csv").is_file():
        rows = gain_rows(table, run_dice(results / "sweep_seeds.csv"))
        print(f"\n### gain over the baseline without unlabeled data against the confident lesion share "
              f"(iterations {LATE})\n\n| method | student | labeled | seed | lesion share | minus | gain (DSC points) |\n"
              "|---|---|---|---|---:|---|---:|")
        for r in sorted(rows, key=lambda r: (r["student"], r["method"], r["labeled"], r["share"])):
            print(f"| {r['method']} | {r['student']} | {r['labeled']} | {r['seed']} | {r['share']:.4f} | "
                  f"{r['baseline']} | {r['gain']:+.2f} |")
        for student in ("unet", "foundation"):
            mine = [r for r in rows if r["student"] == student]
            if len(mine) > 2:
                rho = spearmanr([r["share"] for r in mine], [r["gain"] for r in mine]).statistic
                print(f"\n{student}: Spearman rank correlation of lesion share and gain over {len(mine)} runs: {rho:+.2f}")
    with open(results / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""BUSI tables of the CPU protocol (benchmarks/busi/run_protocol.sh), from the committed run files.

Usage: python benchmarks/busi/tables.py [RESULTS_DIR]      (default benchmarks/results/busi)

Writes, as a pure function of every run's summary.json under RESULTS_DIR:
- sweep.md and sweep_seeds.csv: `synfoc sweep`'s tables (mean ± std over seeds, per-seed numbers,
  SynFoC-minus-baseline paired by seed);
- table6.md: the paper's Table 6 layout (one column per LABELED domain, each cell the mean DSC over
  both test domains; Avg and the other metrics averaged over the two columns), mean ± std over the
  seeds finished, beside the paper's numbers.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from synfoc.config import resolve
from synfoc.sweep import collect_summaries, parse_variants, seed_rows, write_tables

METHODS = "suponly-unet,base-unet,samed,base-foundation,synfoc"
DOMAINS = ["benign", "malignant"]
SEEDS = [1337, 1338, 1339]
# the settings of run_protocol.sh (the sweep checks every run folder's config.yaml against them)
PROTOCOL = {"dataset": "../shared/data/busi", "labeled_ratio": 0.125, "iters": 1000, "unet_size": 128,
            "unet_width": 16, "foundation": "litemedsam", "image_size": 128, "batch_labeled": 2,
            "batch_unlabeled": 2}
ROWS = [("suponly-unet", "unet", "SupOnly (U-Net)"), ("base-unet", "unet", "Base (U-Net)"),
        ("samed", "foundation", "SAMed (foundation)"), ("base-foundation", "foundation", "Base (foundation)"),
        ("synfoc", "unet", "SynFoC U-Net"), ("synfoc", "foundation", "SynFoC foundation")]
# Paper Table 6, 64 (1/8) labels: labeled Benign, labeled Malignant, DSC, Jaccard, 95HD, ASD.
PAPER = {"SupOnly (U-Net)": (55.38, 63.51, 59.45, 48.94, 61.10, 25.44),
         "SAMed (foundation)": (66.89, 63.52, 65.21, 54.13, 46.47, 18.39),
         "SynFoC U-Net": (59.56, 72.69, 66.13, 56.41, 43.52, 20.67),
         "SynFoC foundation": (70.16, 73.05, 71.61, 61.31, 34.77, 15.05)}


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table6(rows: list[dict]) -> str:
    """Mean ± sample std over seeds; the averages only over seeds that have both labeled domains."""
    lines = ["| Method | labeled benign: DSC | labeled malignant: DSC | DSC Avg | Jaccard | 95HD | ASD | seeds "
             "| paper (benign / malignant / DSC / Jaccard / 95HD / ASD) |", "|---|" + "---:|" * 7 + "---|"]
    for method, student, label in ROWS:
        mine = {(r["labeled_domain"], r["seed"]): r for r in rows
                if r["variant"] == method and r["student"] == student and r["test_domain"] == "mean"}
        columns = [[100 * r["dice"] for (d, _), r in sorted(mine.items()) if d == domain] for domain in DOMAINS]
        complete = sorted({s for (_, s) in mine if all((d, s) in mine for d in DOMAINS)})
        avg = {m: [statistics.mean(mine[(d, s)][m] for d in DOMAINS) * (100 if m in ("dice", "jaccard") else 1)
                   for s in complete] for m in ("dice", "jaccard", "hd95", "asd")}
        paper = " / ".join(f"{v:.2f}" for v in PAPER.get(label, ())) or "-"
        cells = [mean_std(c) for c in columns] + [mean_std(avg[m]) for m in ("dice", "jaccard", "hd95", "asd")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(complete)} | {paper} |")
    return "\n".join(lines) + "\n"


def main(out: Path) -> None:
    cfg = resolve("busi", overrides=PROTOCOL)
    variants = parse_variants(METHODS)
    write_tables(out, variants, DOMAINS, SEEDS, cfg, "busi")
    rows = seed_rows(variants, DOMAINS, collect_summaries(out, variants, DOMAINS, SEEDS), SEEDS)
    text = ("# BUSI, CPU protocol, in the layout of the paper's Table 6\n\n"
            "Mean ± sample std over the seeds finished (DSC and Jaccard in %, 95HD and ASD in pixels at 128). "
            "Averages over the seeds that have both labeled domains (column `seeds`). Paper: MedSAM ViT-B at "
            "512, U-Net width 64 at 256, 30k iterations, checkpoint chosen on the test set; ours: "
            "benchmarks/results/busi/README.md.\n\n" + table6(rows))
    (out / "table6.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/results/busi"))

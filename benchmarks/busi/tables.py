"""BUSI tables from the reduced-protocol runs (benchmarks/busi/run_reduced.sh).

Usage: python benchmarks/busi/tables.py runs/busi-benign [runs/busi-malignant]

1. Table 6 layout, as the paper reads it (method-spec section 1): one column per LABELED domain,
   each cell the mean DSC over all test domains of that run; Avg = mean of the columns; Jaccard,
   95HD and ASD averaged over the columns.
2. For each run, the DSC on each TEST domain.
"""

import json
import sys
from pathlib import Path

ROWS = [("suponly-unet", "unet", "SupOnly (U-Net)"), ("base-unet", "unet", "Base (U-Net)"),
        ("samed", "foundation", "SAMed (foundation)"), ("base-foundation", "foundation", "Base (foundation)"),
        ("synfoc", "unet", "SynFoC U-Net"), ("synfoc", "foundation", "SynFoC foundation")]
# Paper Table 6, 64 (1/8) labels: Benign, Malignant (labeled domain), DSC, Jaccard, 95HD, ASD.
PAPER = {"SupOnly (U-Net)": (55.38, 63.51, 59.45, 48.94, 61.10, 25.44),
         "SAMed (foundation)": (66.89, 63.52, 65.21, 54.13, 46.47, 18.39),
         "SynFoC U-Net": (59.56, 72.69, 66.13, 56.41, 43.52, 20.67),
         "SynFoC foundation": (70.16, 73.05, 71.61, 61.31, 34.77, 15.05)}


def load(folder: Path, method: str, student: str) -> dict | None:
    path = folder / method / "summary.json"
    return json.loads(path.read_text())["students"][student] if path.is_file() else None


def main(folders: list[Path]) -> None:
    labeled = [f.name.removeprefix("busi-") for f in folders]
    print("| Method | " + " | ".join(f"labeled {d}: DSC" for d in labeled)
          + " | DSC Avg | Jaccard | 95HD | ASD | paper (Benign / Malignant / DSC / Jaccard / 95HD / ASD) |")
    print("|---|" + "---:|" * (len(folders) + 4) + "---|")
    for method, student, label in ROWS:
        runs = [load(f, method, student) for f in folders]
        cells = [f"{100 * r['mean']['dice']:.2f}" if r else "(not run)" for r in runs]
        done = [r["mean"] for r in runs if r]
        avg = (lambda k, s=1: f"{s * sum(m[k] for m in done) / len(done):.2f}" + ("*" if len(done) < len(runs) else "")) if done else None
        tail = [avg("dice", 100), avg("jaccard", 100), avg("hd95"), avg("asd")] if done else ["-"] * 4
        paper = " / ".join(f"{v:.2f}" for v in PAPER.get(label, ())) or "-"
        print(f"| {label} | " + " | ".join(cells + tail) + f" | {paper} |")
    print("\n`*`: averaged over the runs that exist.\n")
    for folder, dom in zip(folders, labeled):
        print(f"\nDSC per test domain, labeled {dom}:\n")
        print("| Method | benign | malignant | mean |\n|---|---:|---:|---:|")
        for method, student, label in ROWS:
            r = load(folder, method, student)
            if r:
                d = r["per_domain"]
                print(f"| {label} | {100 * d['benign']['dice']:.2f} | {100 * d['malignant']['dice']:.2f} | "
                      f"{100 * r['mean']['dice']:.2f} |")


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])

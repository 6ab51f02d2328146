"""Table 6 layout (per-domain DSC, average DSC, Jaccard, 95HD, ASD) from the runs of one labeled domain.

Usage: python benchmarks/busi/tables.py runs/busi-benign
"""

import json
import sys
from pathlib import Path

ROWS = [("suponly-unet", "unet", "SupOnly (U-Net)"), ("base-unet", "unet", "Base (U-Net)"),
        ("samed", "foundation", "SAMed (foundation)"), ("base-foundation", "foundation", "Base (foundation)"),
        ("synfoc", "unet", "SynFoC U-Net"), ("synfoc", "foundation", "SynFoC foundation")]
# Paper Table 6, 64 (1/8) labels (MedSAM ViT-B at 512, U-Net at 256, 30k iterations).
PAPER = {"SupOnly (U-Net)": (55.38, 63.51, 59.45, 48.94, 61.10, 25.44),
         "SAMed (foundation)": (66.89, 63.52, 65.21, 54.13, 46.47, 18.39),
         "SynFoC U-Net": (59.56, 72.69, 66.13, 56.41, 43.52, 20.67),
         "SynFoC foundation": (70.16, 73.05, 71.61, 61.31, 34.77, 15.05)}


def main(folder: Path) -> None:
    head = "| Method | Benign DSC | Malignant DSC | DSC Avg | Jaccard | 95HD | ASD | paper (MedSAM ViT-B, full protocol) |"
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for method, student, label in ROWS:
        path = folder / method / "summary.json"
        if not path.is_file():
            print(f"| {label} | (not run) | | | | | | |")
            continue
        res = json.loads(path.read_text())["students"][student]
        d, m = res["per_domain"], res["mean"]
        paper = " / ".join(f"{v:.2f}" for v in PAPER.get(label, ())) or "-"
        print(f"| {label} | {100 * d['benign']['dice']:.2f} | {100 * d['malignant']['dice']:.2f} | "
              f"{100 * m['dice']:.2f} | {100 * m['jaccard']:.2f} | {m['hd95']:.2f} | {m['asd']:.2f} | {paper} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

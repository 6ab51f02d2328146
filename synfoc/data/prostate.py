"""Multi-site prostate MRI slices in their published 2D layout.

``ProstateSlice/{BIDMC,BMC,HK,I2CVB,RUNMC,UCL}/{train,test}/{image,mask}/*.png``: 384x384 grey
slices; masks are INVERTED (0 = prostate, 255 = background). The folder I2CVB is the paper's
"HCRUDB"; domains are named and ordered as in the paper's tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synfoc.data.io import PairedPngIndex, check_mask_values, scan_paired_layout

# paper name -> folder name, in the paper's column order
DOMAIN_FOLDERS = {"RUNMC": "RUNMC", "BMC": "BMC", "HCRUDB": "I2CVB", "UCL": "UCL",
                  "BIDMC": "BIDMC", "HK": "HK"}
PROSTATE, BACKGROUND = 0, 255  # the published masks are inverted


@dataclass
class ProstateIndex(PairedPngIndex):
    def label_from_mask(self, mask: np.ndarray, path: Path) -> np.ndarray:
        check_mask_values(mask, (PROSTATE, BACKGROUND), path)
        return (mask == PROSTATE).astype(np.uint8)


def looks_like(path: Path) -> Path | None:
    """The ProstateSlice root under ``path`` (itself or ``path/ProstateSlice``), or None."""
    for root in (path, path / "ProstateSlice"):
        if any((root / f / s / "image").is_dir()
               for f in DOMAIN_FOLDERS.values() for s in ("train", "test")):
            return root
    return None


def open_prostate(path: Path) -> ProstateIndex:
    root = looks_like(path) or path
    domains, cases, problems = scan_paired_layout(root, DOMAIN_FOLDERS, "image", "mask")
    return ProstateIndex(format="prostate", root=root, classes=["prostate"], domains=domains,
                         channels=1, cases=cases, problems=problems)

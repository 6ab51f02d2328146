"""Fundus (optic cup and disc), four domains, in its published layout.

``Fundus/Domain{1-4}/{train,test}/ROIs/{image,mask}/*.png``: RGB images; masks (RGB or grey)
with 0 = optic cup, 128 = disc rim, 255 = background. Training labels 0 background, 1 cup, 2 rim;
reported parts are the cup and the whole disc (cup and rim).
Domain1 Drishti-GS, Domain2 RIM-ONE-r3, Domain3 REFUGE-train, Domain4 REFUGE-val.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synfoc.data.io import PairedPngIndex, check_mask_values, scan_paired_layout

DOMAINS = ("Domain1", "Domain2", "Domain3", "Domain4")
CUP, RIM, BACKGROUND = 0, 128, 255  # grey values in the published masks


@dataclass
class FundusIndex(PairedPngIndex):
    def label_from_mask(self, mask: np.ndarray, path: Path) -> np.ndarray:
        check_mask_values(mask, (CUP, RIM, BACKGROUND), path)
        label = np.zeros(mask.shape, np.uint8)
        label[mask == CUP] = 1
        label[mask == RIM] = 2
        return label


def looks_like(path: Path) -> Path | None:
    """The Fundus root under ``path`` (``path`` itself or ``path/Fundus``), or None."""
    for root in (path, path / "Fundus"):
        if any((root / d / s / "ROIs").is_dir() for d in DOMAINS for s in ("train", "test")):
            return root
    return None


def open_fundus(path: Path) -> FundusIndex:
    root = looks_like(path) or path
    domains, cases, problems = scan_paired_layout(root, {d: d for d in DOMAINS},
                                                  "ROIs/image", "ROIs/mask")
    return FundusIndex(format="fundus", root=root, classes=["cup", "rim"], domains=domains,
                       channels=3, cases=cases, problems=problems,
                       report_parts=[("cup", (1,)), ("disc", (1, 2))])

"""M&Ms cardiac MRI (four vendors) in the 2D PNG layout the paper uses.

``mnms/vendor{A,B,C,D}/{train,test}/{image,mask}/*.png``: grey images at native sizes; RGB masks
with R=255 left ventricle (LV), G=255 myocardium (MYO), B=255 right ventricle (RV).
Training labels 1 LV, 2 MYO, 3 RV. Domains are named "vendorA" .. "vendorD" (the folder names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synfoc.data.io import FileDataError, PairedPngIndex, check_mask_values, scan_paired_layout

DOMAINS = ("vendorA", "vendorB", "vendorC", "vendorD")


@dataclass
class MnmsIndex(PairedPngIndex):
    rgb_masks: bool = field(default=True)

    def label_from_mask(self, mask: np.ndarray, path: Path) -> np.ndarray:
        check_mask_values(mask, (0, 255), path)
        on = mask == 255
        if np.any(on.sum(axis=-1) > 1):
            raise FileDataError(path, "pixels with more than one of R, G, B set (overlapping classes)")
        # channel c (R, G, B) set -> label c + 1 (LV, MYO, RV)
        return (on[..., 0] * 1 + on[..., 1] * 2 + on[..., 2] * 3).astype(np.uint8)


def looks_like(path: Path) -> Path | None:
    """The M&Ms root under ``path`` (itself or ``path/mnms``), or None."""
    for root in (path, path / "mnms"):
        if any((root / d / s / "image").is_dir() for d in DOMAINS for s in ("train", "test")):
            return root
    return None


def open_mnms(path: Path) -> MnmsIndex:
    root = looks_like(path) or path
    domains, cases, problems = scan_paired_layout(root, {d: d for d in DOMAINS}, "image", "mask")
    return MnmsIndex(format="mnms", root=root, classes=["LV", "MYO", "RV"], domains=domains,
                     channels=1, cases=cases, problems=problems, rgb_masks=True)

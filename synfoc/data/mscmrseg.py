"""MS-CMRSeg 2019 (multi-sequence cardiac MRI), the UDA benchmark: bSSFP ("C0") to LGE.

    MSCMRSeg/
      C0/train/patient1_C0.nii.gz   patient1_C0_manual.nii.gz
      C0/test/...
      LGE/train/patient1_LGE.nii.gz patient1_LGE_manual.nii.gz
      LGE/test/...

Domains "C0" and "LGE" (the sequence folders). An image ``X.nii.gz`` has its label in
``X_manual.nii.gz`` beside it. Volumes are cut into 2D slices along the last axis (the
short-axis slices), one case per slice, as in the ``folder`` format; every slice keeps its
volume's in-plane spacing and affine, and its patient (``patient1``) as ``Case.group``, so the
split labels whole volumes.

Label values, as the challenge's labels and nnU-Net's conversion of MyoPS 2020 (the same group's
data, same convention; its dataset_conversion script for MyoPS) state them: 200 = left-ventricular
myocardium, 500 = left-ventricular blood pool, 600 = right-ventricular blood pool. Training labels
1 MYO, 2 LV, 3 RV (in increasing stored value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from synfoc.data.base import Case, Problem
from synfoc.data.folder import FolderIndex, _volume_cases
from synfoc.data.io import NIFTI_EXTENSIONS, SPLITS, empty_split_problem, file_stem, list_files

DOMAINS = ("C0", "LGE")
LABELS = {"MYO": 200, "LV": 500, "RV": 600}
MANUAL = "_manual"
SLICE_AXIS = 2
_PATIENT = re.compile(r"^(.*?)_(C0|LGE|T2)$", re.IGNORECASE)


def patient_of(stem: str) -> str:
    """``patient1_C0`` -> ``patient1``; other names stay as they are."""
    match = _PATIENT.match(stem)
    return match.group(1) if match else stem


def looks_like(path: Path) -> Path | None:
    """The MS-CMRSeg root under ``path`` (itself, or a child named like MS-CMRSeg), or None:
    a folder whose C0/ or LGE/ has train/ or test/ holding NIfTI files."""
    candidates = [path] + [c for c in (path.iterdir() if path.is_dir() else [])
                           if c.is_dir() and c.name.lower().replace("-", "").replace("_", "") == "mscmrseg"]
    for root in candidates:
        if any(list_files(root / d / s, NIFTI_EXTENSIONS) for d in DOMAINS for s in SPLITS):
            return root
    return None


@dataclass
class MsCmrIndex(FolderIndex):
    """NIfTI slices read exactly as in the ``folder`` format, with MS-CMRSeg's fixed labels."""


def _pairs(folder: Path) -> tuple[list[tuple[Path, Path]], list[Problem]]:
    files = list_files(folder, NIFTI_EXTENSIONS)
    masks = {file_stem(f)[: -len(MANUAL)]: f for f in files if file_stem(f).endswith(MANUAL)}
    images = [f for f in files if not file_stem(f).endswith(MANUAL)]
    pairs, problems = [], []
    for image in images:
        mask = masks.pop(file_stem(image), None)
        if mask is None:
            problems.append(Problem(str(image), f"image has no label '{file_stem(image)}{MANUAL}.nii.gz' beside it"))
        else:
            pairs.append((image, mask))
    problems += [Problem(str(m), f"label has no image '{stem}.nii.gz' beside it") for stem, m in masks.items()]
    return pairs, problems


def open_mscmrseg(path: Path) -> MsCmrIndex:
    root = looks_like(path) or path
    domains: list[str] = []
    cases: list[Case] = []
    problems: list[Problem] = []
    for domain in DOMAINS:
        if not (root / domain).is_dir():
            problems.append(Problem(str(root / domain), f"domain folder '{domain}' is missing"))
            continue
        domains.append(domain)
        for split in SPLITS:
            pairs, pair_problems = _pairs(root / domain / split)
            problems += pair_problems
            split_cases: list[Case] = []
            for image, mask in pairs:
                slices, volume_problems = _volume_cases(image, mask, domain, split, SLICE_AXIS)
                problems += volume_problems
                split_cases += [replace(c, group=patient_of(file_stem(image))) for c in slices]
            if not split_cases:
                problems.append(empty_split_problem(root / domain / split, domain, split))
            cases += split_cases
    return MsCmrIndex(format="mscmrseg", root=root, classes=list(LABELS), domains=domains, channels=1,
                      cases=cases, problems=problems, label_values=list(LABELS.values()),
                      slice_axis=SLICE_AXIS)

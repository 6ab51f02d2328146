"""BUSI breast ultrasound (Al-Dhabyani et al. 2020) in its original layout.

``Dataset_BUSI_with_GT/{benign,malignant}/"<class> (<n>).png"`` with masks
``"<class> (<n>)_mask.png"`` and, for several lesions, ``..._mask_1.png``, ``..._mask_2.png``
(merged with a pixel-wise max). The ``normal`` folder has no lesions and is ignored. Domains are
the two categories. There is no published split: per category the image file names are sorted
as plain strings and the last ``int(0.2 * N)`` go to test (benign 350/87, malignant 168/42).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synfoc.data.base import Case, DataError, Problem, Sample
from synfoc.data.base import DatasetIndex
from synfoc.data.io import (check_mask_values, check_same_size, empty_split_problem, image_array,
                            mask_array)

FOLDER = "Dataset_BUSI_with_GT"
DOMAINS = ("benign", "malignant")
TEST_FRACTION = 0.2
_MASK_NAME = re.compile(r"^(?P<stem>.*)_mask(?:_(?P<extra>\d+))?\.png$", re.IGNORECASE)


@dataclass
class BusiIndex(DatasetIndex):
    def read(self, case: Case) -> Sample:
        if case.image is None or case.mask is None:
            raise DataError(f"case {case.domain}/{case.name} has no image or mask file")
        image = image_array(case.image, self.channels)
        merged = None
        for mask_path in (case.mask, *case.extra_masks):
            mask = mask_array(mask_path)
            check_same_size(image, mask, case.image, mask_path)
            check_mask_values(mask, (0, 255), mask_path)
            merged = mask if merged is None else np.maximum(merged, mask)
        return Sample(image=image, label=(merged == 255).astype(np.uint8))


def looks_like(path: Path) -> Path | None:
    """The Dataset_BUSI_with_GT folder (``path`` or ``path/Dataset_BUSI_with_GT``), or None."""
    for root in (path / FOLDER, path):
        if any((root / d).is_dir() and any((root / d).glob("*_mask.png")) for d in DOMAINS):
            return root
    return None


def split_names(image_names: list[str]) -> tuple[list[str], list[str]]:
    """The code-made split: plain string sort, the last ``int(0.2 * N)`` names go to test."""
    ordered = sorted(image_names)
    n_test = int(TEST_FRACTION * len(ordered))
    return ordered[: len(ordered) - n_test], ordered[len(ordered) - n_test:]


def _category_cases(folder: Path, domain: str) -> tuple[list[Case], list[Problem]]:
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    extras: dict[str, list[tuple[int, Path]]] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() != ".png":
            continue
        match = _MASK_NAME.match(p.name)
        if match is None:
            images[p.name] = p
        elif match["extra"] is None:
            masks[match["stem"]] = p
        else:
            extras.setdefault(match["stem"], []).append((int(match["extra"]), p))

    problems: list[Problem] = []
    stems = {Path(name).stem for name in images}
    for stem, mask in sorted(masks.items()):
        if stem not in stems:
            problems.append(Problem(str(mask), f"mask has no image named '{stem}.png'"))
    for stem, items in sorted(extras.items()):
        if stem not in masks:
            for _, p in items:
                problems.append(Problem(str(p), f"extra mask without '{stem}_mask.png'"))

    # The split is made over all image files, so a missing mask does not shift it.
    train, test = split_names(list(images))
    cases: list[Case] = []
    for split, names in (("train", train), ("test", test)):
        for name in names:
            stem = Path(name).stem
            if stem not in masks:
                problems.append(Problem(str(images[name]), f"image has no mask '{stem}_mask.png'"))
                continue
            extra = tuple(p for _, p in sorted(extras.get(stem, [])))
            cases.append(Case(domain=domain, split=split, name=stem, image=images[name],
                              mask=masks[stem], extra_masks=extra))
        if not any(c.split == split for c in cases):
            problems.append(empty_split_problem(folder, domain, split))
    return cases, problems


def open_busi(path: Path) -> BusiIndex:
    root = looks_like(path) or path
    domains: list[str] = []
    cases: list[Case] = []
    problems: list[Problem] = []
    for domain in DOMAINS:
        folder = root / domain
        if not folder.is_dir():
            problems.append(Problem(str(folder), f"category folder '{domain}' is missing"))
            continue
        domains.append(domain)
        domain_cases, domain_problems = _category_cases(folder, domain)
        cases.extend(domain_cases)
        problems.extend(domain_problems)
    return BusiIndex(format="busi", root=root, classes=["lesion"], domains=domains, channels=1,
                     cases=cases, problems=problems)

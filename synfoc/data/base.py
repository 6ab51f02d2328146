"""What every dataset format gives the rest of synfoc: an index of cases and a way to read one.

A format module (busi, fundus, prostate, mnms, folder, synthetic) turns a folder into a
:class:`DatasetIndex`. Training, evaluation and ``synfoc data check`` only ever talk to that
index, never to the files' layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(Exception):
    """A user-facing problem with input data (the message names the file or value)."""


@dataclass(frozen=True)
class Case:
    """One 2D training or test sample.

    ``image`` and ``mask`` are the files it comes from; ``extra_masks`` are further mask files
    merged into it with a pixel-wise max (BUSI lesions); ``slice_index`` picks one slice of a
    volume along ``slice_axis`` (NIfTI). ``name`` is unique within (domain, split). ``group``
    names the patient (or volume) a slice comes from where a format knows it: the split then
    labels whole groups, so that no patient gives both labeled and unlabeled slices.
    """

    domain: str
    split: str  # "train" or "test"
    name: str
    image: Path | None = None
    mask: Path | None = None
    extra_masks: tuple[Path, ...] = ()
    slice_index: int | None = None
    slice_axis: int = 2
    group: str | None = None


@dataclass(frozen=True)
class Problem:
    file: str
    problem: str


@dataclass
class Sample:
    """A decoded case. ``image`` is uint8 (H, W, channels); ``label`` uint8 (H, W) with values
    0 (background) .. C (training classes). ``spacing`` is the in-plane pixel size (row, col) in mm
    when the file says so, else None; ``affine`` the 4x4 of a NIfTI volume."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float] | None = None
    affine: np.ndarray | None = None


@dataclass
class DatasetIndex:
    """All cases of a dataset plus what its labels mean.

    classes:       names of the C training classes, label value i+1 = classes[i].
    report_parts:  what is reported, as (name, label values merged), e.g. Fundus
                   [("cup", (1,)), ("disc", (1, 2))]; default one part per class.
    channels:      1 (grey) or 3 (RGB) model input channels.
    domains:       domain names in the paper's order.
    """

    format: str
    root: Path | None
    classes: list[str]
    domains: list[str]
    channels: int
    cases: list[Case]
    problems: list[Problem] = field(default_factory=list)
    report_parts: list[tuple[str, tuple[int, ...]]] | None = None

    def __post_init__(self) -> None:
        if self.report_parts is None:
            self.report_parts = [(name, (i + 1,)) for i, name in enumerate(self.classes)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def cases_of(self, domain: str | None = None, split: str | None = None) -> list[Case]:
        return [c for c in self.cases
                if (domain is None or c.domain == domain) and (split is None or c.split == split)]

    def read(self, case: Case) -> Sample:  # pragma: no cover - each format overrides
        raise NotImplementedError

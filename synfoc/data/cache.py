"""Decode cases once and keep them in memory at each model's input size.

Each case is read once and resized once per requested size directly from its original
resolution: images with a box (area) filter when shrinking and bilinear when enlarging, masks
with nearest neighbour so that only label values occur. (The authors' script resizes everything
to 512 first and nearest-downsamples the U-Net input from that copy; see docs/data.md.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from synfoc.data.base import Case, DataError, DatasetIndex

if TYPE_CHECKING:  # torch is imported when cases are loaded, so `synfoc data check` starts fast
    import torch

_Size = int | tuple[int, int]


def _hw(size: _Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _filter(source: int, target: int) -> Image.Resampling:
    # Box averages every source pixel that falls in a target pixel (area interpolation);
    # bilinear is the usual choice when there is nothing to average.
    return Image.Resampling.BOX if target < source else Image.Resampling.BILINEAR


def resize_image(image: np.ndarray, size: _Size) -> np.ndarray:
    """Resize uint8 (H, W, C) to (S, S, C) (or (h, w, C) for a tuple size).

    Each axis is resized on its own so that an image shrunk along one axis and enlarged along
    the other gets the right filter on each.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"resize_image expects uint8 (H, W, C), got {image.dtype} {image.shape}")
    target_h, target_w = _hw(size)
    h, w, channels = image.shape
    planes = []
    for c in range(channels):
        plane = Image.fromarray(np.ascontiguousarray(image[..., c]))
        if target_w != w:
            plane = plane.resize((target_w, h), _filter(w, target_w))
        if target_h != h:
            plane = plane.resize((target_w, target_h), _filter(h, target_h))
        planes.append(np.asarray(plane))
    return np.stack(planes, axis=-1)


def resize_label(label: np.ndarray, size: _Size) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) label map (pixel centres, as PIL's NEAREST)."""
    if label.ndim != 2:
        raise ValueError(f"resize_label expects (H, W), got {label.shape}")
    target_h, target_w = _hw(size)
    h, w = label.shape
    rows = np.minimum(((np.arange(target_h) + 0.5) * h / target_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(target_w) + 0.5) * w / target_w).astype(np.int64), w - 1)
    return np.ascontiguousarray(label[rows[:, None], cols[None, :]])


@dataclass
class LoadedCases:
    """Cases in memory. ``arrays[size] = (images uint8 (N, C, S, S), labels uint8 (N, S, S))``;
    the per-case lists (same order) are what is needed to map a prediction back to its file."""

    cases: list[Case]
    arrays: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    spacings: list[tuple[float, float] | None] = field(default_factory=list)
    affines: list[np.ndarray | None] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.cases]

    @property
    def domains(self) -> list[str]:
        return [c.domain for c in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.arrays[size]

    def keys(self):
        return self.arrays.keys()


def load_cases(index: DatasetIndex, cases: list[Case], sizes: list[int],
               progress: bool = True) -> LoadedCases:
    """Read each case once and keep it at every size in ``sizes`` (see :class:`LoadedCases`).

    Raises:
        DataError: a case cannot be read (run ``synfoc data check`` to list every problem).
    """
    import torch

    sizes = list(dict.fromkeys(int(s) for s in sizes))  # unique, order kept
    n, c = len(cases), index.channels
    loaded = LoadedCases(cases=list(cases))
    for s in sizes:
        loaded.arrays[s] = (torch.empty((n, c, s, s), dtype=torch.uint8),
                            torch.empty((n, s, s), dtype=torch.uint8))
    for i, case in enumerate(tqdm(cases, desc="loading", unit="case", disable=not progress)):
        try:
            sample = index.read(case)
        except DataError as exc:
            raise DataError(f"{exc} (run 'synfoc data check' to list every problem)") from None
        loaded.original_sizes.append((int(sample.label.shape[0]), int(sample.label.shape[1])))
        loaded.spacings.append(sample.spacing)
        loaded.affines.append(sample.affine)
        for s in sizes:
            images, labels = loaded.arrays[s]
            images[i] = torch.from_numpy(resize_image(sample.image, s).transpose(2, 0, 1).copy())
            labels[i] = torch.from_numpy(resize_label(sample.label, s))
    return loaded

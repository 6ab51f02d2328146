"""Drawing shared by the report, ``progress.png``, the training-view preview and predict's overlays:
matplotlib without a display, PNG bytes, and each reported part's contour in its own colour."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# One colour per reported part (RGB); ground truth and predictions share them so that a part
# reads the same in every tile.
PART_COLOURS = [(255, 64, 64), (64, 220, 64), (64, 128, 255), (255, 210, 0), (255, 64, 255),
                (0, 230, 230), (255, 140, 0), (160, 96, 255)]
# their names, in order (figure legends)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display is ever needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path | None = None, dpi: int = 90) -> bytes:
    """PNG bytes of a figure; also written atomically to ``path`` when given (training may be
    writing progress.png while someone looks at it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    data = buf.getvalue()
    if path is not None:
        tmp = path.with_name(path.name + ".tmp.png")
        tmp.write_bytes(data)
        tmp.replace(path)
    return data


def part_boundary(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The inner boundary of a boolean region: its pixels with a 4-neighbour outside it (the image
    border counts as outside), grown inwards to ``thickness`` pixels."""
    from scipy.ndimage import binary_erosion
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    inner = binary_erosion(mask, iterations=max(1, thickness), border_value=0)
    return mask & ~inner


def overlay_contours(image: np.ndarray, label: np.ndarray, parts: list[tuple[str, tuple[int, ...]]],
                     thickness: int | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3): ``image`` (uint8 (H, W), (H, W, 1) or (H, W, 3)) with the contour of
    each reported part of ``label`` in that part's colour of :data:`PART_COLOURS`.

    Parts are drawn in order, so a part nested in another (Fundus cup in disc) stays visible.
    """
    rgb = image if image.ndim == 3 else image[..., None]
    rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb[..., :3]
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8).copy()
    if thickness is None:  # about 1 pixel per 200 so contours stay visible on large images
        thickness = max(1, round(min(label.shape) / 200))
    for i, (_, values) in enumerate(parts):
        edge = part_boundary(np.isin(label, values), thickness)
        rgb[edge] = PART_COLOURS[i % len(PART_COLOURS)]
    return rgb


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()

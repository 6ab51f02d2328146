"""Generated datasets in every layout synfoc reads, and the paths of the real data, for the data
tests (test_data_formats.py, test_data_check.py). Plain functions, not fixtures or tests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BUSI = SHARED / "busi" / "Dataset_BUSI_with_GT"
SAMPLES = SHARED / "paper-format-samples"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the shared data folder beside the repo)")
    return path


def raw(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------- writers for generated data

def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def noise(rng: np.random.Generator, h: int, w: int, channels: int = 1) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def make_fundus(root: Path, n: int = 2, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for d in range(1, 5):
        for split in ("train", "test"):
            for k in range(n):
                base = root / f"Domain{d}" / split / "ROIs"
                save_png(base / "image" / f"img{k}.png", noise(rng, size, size, 3))
                mask = np.full((size, size), 255, np.uint8)
                mask[disc(size, size, 16, 16, 10)] = 128
                mask[disc(size, size, 16, 16, 4 + k)] = 0
                save_png(base / "mask" / f"img{k}.png", np.stack([mask] * 3, -1))
    return root


PROSTATE_FOLDERS = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")


def make_prostate(root: Path, n: int = 2, size: int = 24) -> Path:
    rng = np.random.default_rng(1)
    for site in PROSTATE_FOLDERS:
        for split in ("train", "test"):
            for k in range(n):
                save_png(root / site / split / "image" / f"00_{k:02d}.png", noise(rng, size, size))
                mask = np.where(disc(size, size, 12, 12, 3 + k), 0, 255).astype(np.uint8)
                save_png(root / site / split / "mask" / f"00_{k:02d}.png", mask)
    return root


def make_mnms(root: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(2)
    for v in "ABCD":
        for split in ("train", "test"):
            for k in range(n):
                h, w = 20 + k, 26
                save_png(root / f"vendor{v}" / split / "image" / f"c{k}.png", noise(rng, h, w))
                mask = np.zeros((h, w, 3), np.uint8)
                mask[2:6, 2:8, 0] = 255     # LV
                mask[8:10, 2:12, 1] = 255   # MYO
                mask[12:18, 3:5, 2] = 255   # RV
                save_png(root / f"vendor{v}" / split / "mask" / f"c{k}.png", mask)
    return root


def make_busi(root: Path, counts: dict[str, int] | None = None, multi: bool = True) -> Path:
    rng = np.random.default_rng(3)
    counts = counts or {"benign": 10, "malignant": 5}
    folder = root / "Dataset_BUSI_with_GT"
    for category, n in {**counts, "normal": 2}.items():
        for k in range(1, n + 1):
            stem = f"{category} ({k})"
            save_png(folder / category / f"{stem}.png", noise(rng, 20, 30))
            mask = np.zeros((20, 30), np.uint8)
            mask[2:6, 2:6] = 255
            save_png(folder / category / f"{stem}_mask.png", mask)
            if multi and k == 3:
                extra = np.zeros((20, 30), np.uint8)
                extra[10:15, 20:28] = 255
                save_png(folder / category / f"{stem}_mask_1.png", extra)
    return root


def make_folder(root: Path, domains=("siteA", "siteB"), n: int = 3, values=(0, 255),
                image_ext: str = ".png", channels: int = 1, size=(16, 20)) -> Path:
    rng = np.random.default_rng(4)
    h, w = size
    for d in domains:
        for split in ("train", "test"):
            for k in range(n):
                image = noise(rng, h, w, channels)
                path = root / d / split / "images" / f"case{k}{image_ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
                mask = np.zeros((h, w), np.uint8)
                for i, v in enumerate(values[1:]):
                    mask[2 + 3 * i: 4 + 3 * i, 2:10] = v
                save_png(root / d / split / "masks" / f"case{k}.png", mask)
    return root


def make_nifti(path: Path, data: np.ndarray, affine: np.ndarray, zooms) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(zooms)
    nib.save(img, path)
    return path


NIFTI_AFFINE = np.array([[0.5, 0, 0, -10], [0, 0.7, 0, 5], [0, 0, 3.0, 2], [0, 0, 0, 1]])


def make_folder_nifti(root: Path, shape=(12, 10, 5)) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = np.zeros(shape, np.uint8)
    mask[3:7, 2:5, 1:4] = 1
    mask[8:10, 6:9, 2] = 2
    for split in ("train", "test"):
        make_nifti(root / "site" / split / "images" / "vol.nii.gz", image, NIFTI_AFFINE, (0.5, 0.7, 3.0))
        make_nifti(root / "site" / split / "masks" / "vol.nii.gz", mask, NIFTI_AFFINE, (0.5, 0.7, 3.0))
    return root, image, mask

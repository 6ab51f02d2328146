"""Reading image and mask files (PIL for 2D, nibabel for NIfTI) and pairing them by name.

Everything here is format-agnostic: the format modules (fundus, prostate, mnms, busi, folder)
say *where* the files are and *what* the mask values mean; this module turns files into arrays
and raises :class:`FileDataError` (a :class:`DataError` that knows the file at fault) when a file
cannot be used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from synfoc.data.base import Case, DataError, DatasetIndex, Problem, Sample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
SPLITS = ("train", "test")


class FileDataError(DataError):
    """A :class:`DataError` about one file; ``file`` and ``problem`` become a :class:`Problem`."""

    def __init__(self, file: Path | str, problem: str) -> None:
        problem = " ".join(problem.split())  # library messages may span lines
        super().__init__(f"{file}: {problem}")
        self.file = str(file)
        self.problem = problem

    def as_problem(self) -> Problem:
        return Problem(self.file, self.problem)


# ----------------------------------------------------------------------------- names and listing

def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_EXTENSIONS)


def file_stem(path: Path) -> str:
    """The name without its extension; ``.nii.gz`` counts as one extension."""
    name = path.name
    if name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    return path.stem


def list_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files in ``folder`` (not recursive, hidden files skipped) with one of ``extensions``, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(extensions))


def pair_by_stem(images: list[Path], masks: list[Path]
                 ) -> tuple[list[tuple[Path, Path]], list[Problem]]:
    """Pair image and mask files whose names match (the extension may differ).

    Never guesses: an image without a same-named mask, a mask without an image and a name
    with two candidate files are each reported as a :class:`Problem` and left out. When both
    folders have unpaired files the message says the names may be offset (the real I2CVB/train
    folder has images 00_01..03 but masks 00_00..02).
    """
    problems: list[Problem] = []
    by_stem: dict[str, list[Path]] = {}
    for m in masks:
        by_stem.setdefault(file_stem(m), []).append(m)
    image_stems: dict[str, list[Path]] = {}
    for i in images:
        image_stems.setdefault(file_stem(i), []).append(i)

    lonely_images = [i for i in images if file_stem(i) not in by_stem]
    lonely_masks = [m for m in masks if file_stem(m) not in image_stems]
    hint = (" (image and mask names look offset or renamed: they are paired by name only)"
            if lonely_images and lonely_masks else "")
    mask_dir = masks[0].parent if masks else None
    image_dir = images[0].parent if images else None
    for i in lonely_images:
        where = f" in {mask_dir}" if mask_dir else ""
        problems.append(Problem(str(i), f"image has no mask named '{file_stem(i)}.*'{where}{hint}"))
    for m in lonely_masks:
        where = f" in {image_dir}" if image_dir else ""
        problems.append(Problem(str(m), f"mask has no image named '{file_stem(m)}.*'{where}{hint}"))

    pairs: list[tuple[Path, Path]] = []
    for stem, imgs in image_stems.items():
        if stem not in by_stem:
            continue
        if len(imgs) > 1:
            problems.append(Problem(str(imgs[0]), f"several images share the name '{stem}': "
                                    + ", ".join(p.name for p in imgs)))
            continue
        if len(by_stem[stem]) > 1:
            problems.append(Problem(str(by_stem[stem][0]), f"several masks share the name '{stem}': "
                                    + ", ".join(p.name for p in by_stem[stem])))
            continue
        pairs.append((imgs[0], by_stem[stem][0]))
    pairs.sort(key=lambda pair: pair[0].name)
    return pairs, problems


def empty_split_problem(folder: Path, domain: str, split: str) -> Problem:
    return Problem(str(folder), f"domain '{domain}' has no cases in its {split} split")


# ----------------------------------------------------------------------------- 2D decoding

def open_2d(path: Path) -> Image.Image:
    """Open and fully decode a 2D image file, or raise :class:`FileDataError`.

    Decoding here (not lazily) is what finds truncated files; a file with several frames
    (multi-page TIFF, animated PNG) is a 3D image and refused.
    """
    try:
        im = Image.open(path)
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            raise FileDataError(path, f"3D image ({frames} frames) where a 2D image is expected")
        im.load()
    except FileDataError:
        raise
    except FileNotFoundError:
        raise FileDataError(path, "file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise FileDataError(path, f"unreadable or truncated image ({exc})") from None
    return im


def intensity_to_uint8(array: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Map intensities to 0..255: uint8 is kept; anything else is clipped to ``window`` (default
    the 0.5 and 99.5 percentiles, robust to a few hot voxels) and scaled linearly."""
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float32)
    if window is None:
        lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 0.0)
    else:
        lo, hi = window
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.clip(values, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def image_array(path: Path, channels: int) -> np.ndarray:
    """Decode a 2D image as uint8 (H, W, channels); colour is converted to grey (ITU-R 601 luma,
    PIL's "L") when ``channels`` is 1, grey repeated when it is 3."""
    im = open_2d(path)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit or float data (TIFF, 16-bit PNG): bring it to 8 bits before any colour handling.
        im = Image.fromarray(intensity_to_uint8(np.asarray(im)))
    array = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return array.reshape(array.shape[0], array.shape[1], channels)


def mask_array(path: Path, rgb: bool = False) -> np.ndarray:
    """Decode a mask file as stored: (H, W) values, or (H, W, 3) when ``rgb``.

    A colour mask whose three channels are equal (Fundus stores grey values in RGB files) is
    collapsed to one channel; a colour mask with different channels is refused unless ``rgb``.
    Palette images give their palette indices (the usual way label maps are stored).
    """
    im = open_2d(path)
    if rgb:
        if im.mode not in ("RGB", "RGBA"):
            raise FileDataError(path, f"expected an RGB mask, found image mode {im.mode}")
        return np.asarray(im.convert("RGB"))
    if im.mode in ("RGB", "RGBA", "LA"):
        array = np.asarray(im)
        colour = array[..., :3] if im.mode != "LA" else array[..., :1]
        if not all(np.array_equal(colour[..., 0], colour[..., c]) for c in range(1, colour.shape[-1])):
            raise FileDataError(path, "colour mask whose channels differ; store label values as grey")
        return colour[..., 0]
    return np.asarray(im)


def unique_values(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a histogram for 8-bit data (several times faster than a sort)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    return np.unique(array)


def check_mask_values(mask: np.ndarray, allowed: tuple[int, ...], path: Path) -> None:
    """Raise :class:`FileDataError` naming the unexpected values of ``mask``."""
    if mask.dtype == np.uint8 and all(0 <= a < 256 for a in allowed):
        lookup = np.zeros(256, bool)
        lookup[list(allowed)] = True
        if lookup[mask].all():  # the common case, without sorting or counting
            return
    values = unique_values(mask)
    unexpected = [int(v) for v in values if int(v) not in allowed]
    if unexpected:
        shown = ", ".join(str(v) for v in unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
        raise FileDataError(path, f"label values {shown} outside the declared set "
                            f"{{{', '.join(str(a) for a in allowed)}}}")


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    if image.shape[:2] != mask.shape[:2]:
        raise FileDataError(mask_path, f"mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from "
                            f"image {image_path.name} {image.shape[1]}x{image.shape[0]}")


# ----------------------------------------------------------------------------- the paper's PNG layouts

@dataclass
class PairedPngIndex(DatasetIndex):
    """An index of image/mask PNG pairs whose mask values a format maps to training labels.

    Subclasses set how a raw mask becomes labels (:meth:`label_from_mask`) and whether the mask
    is read as RGB (``rgb_masks``); images are converted to ``channels``.
    """

    rgb_masks: bool = False

    def label_from_mask(self, mask: np.ndarray, path: Path) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def read(self, case: Case) -> Sample:
        if case.image is None or case.mask is None:
            raise DataError(f"case {case.domain}/{case.split}/{case.name} has no image or mask file")
        image = image_array(case.image, self.channels)
        mask = mask_array(case.mask, rgb=self.rgb_masks)
        check_same_size(image, mask, case.image, case.mask)
        return Sample(image=image, label=self.label_from_mask(mask, case.mask))


def scan_paired_layout(root: Path, folders: dict[str, str], image_sub: str, mask_sub: str,
                       extensions: tuple[str, ...] = (".png",)) -> tuple[list[str], list[Case], list[Problem]]:
    """Cases of a ``ROOT/<folder>/<split>/<image_sub>|<mask_sub>/`` layout.

    ``folders`` maps domain names (in the paper's order) to folder names. A missing domain folder,
    an empty split and every unpaired file become problems; domains whose folder exists are
    returned in the given order.
    """
    domains: list[str] = []
    cases: list[Case] = []
    problems: list[Problem] = []
    for domain, folder in folders.items():
        domain_dir = root / folder
        if not domain_dir.is_dir():
            problems.append(Problem(str(domain_dir), f"domain folder '{folder}' is missing"))
            continue
        domains.append(domain)
        for split in SPLITS:
            image_dir = domain_dir / split / image_sub
            mask_dir = domain_dir / split / mask_sub
            pairs, pair_problems = pair_by_stem(list_files(image_dir, extensions),
                                                list_files(mask_dir, extensions))
            problems.extend(pair_problems)
            if not pairs:
                problems.append(empty_split_problem(domain_dir / split, domain, split))
            cases.extend(Case(domain=domain, split=split, name=file_stem(img), image=img, mask=msk)
                         for img, msk in pairs)
    return domains, cases, problems

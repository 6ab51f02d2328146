"""Users' own data: ``ROOT/<domain>/{train,test}/{images,masks}/`` plus an optional dataset.json.

Images and masks are paired by file name (the extension may differ). 2D files: PNG, JPEG, TIFF,
BMP. NIfTI volumes (``.nii``/``.nii.gz``) are cut into 2D slices along ``slice_axis`` (default 2),
one case per slice; a slice keeps the volume's in-plane spacing and affine so predictions can be
written back as a volume. ``ROOT/dataset.json`` (in the spirit of nnU-Net) may say::

    {"labels": {"background": 0, "tumour": 1, "oedema": 2},
     "domains": ["siteA", "siteB"], "channels": 1, "slice_axis": 2,
     "intensity_window": [-100, 300], "regions": {"lesion": [1, 2], "core": [2]}}

Without it the domains are the sub-folders in sorted order, the channels follow the first image
and the labels are discovered: the values found in the masks, in sorted order (0/255 masks are
one class). ``regions`` (nested regions, as nnU-Net calls them) name unions of mask values that are
reported instead of the single classes (metrics, tables, SMC, report). See docs/data.md.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from synfoc.data.base import Case, DataError, DatasetIndex, Problem, Sample
from synfoc.data.io import (IMAGE_EXTENSIONS, NIFTI_EXTENSIONS, SPLITS, FileDataError,
                            check_mask_values, check_same_size, empty_split_problem, file_stem,
                            image_array, intensity_to_uint8, unique_values, is_nifti, list_files, mask_array,
                            pair_by_stem)

DATASET_JSON = "dataset.json"
IMAGE_DIR, MASK_DIR = "images", "masks"
_NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


# ----------------------------------------------------------------------------- dataset.json

@dataclass
class DatasetDescription:
    """What ``dataset.json`` says; None where it is silent."""

    labels: dict[str, int] | None = None
    domains: list[str] | None = None
    channels: int | None = None
    slice_axis: int | None = None
    intensity_window: tuple[float, float] | None = None
    regions: dict[str, tuple[int, ...]] | None = None


def _read_regions(raw, path: Path) -> dict[str, tuple[int, ...]]:
    """``"regions": {name: [mask values]}`` checked for its form; whether the values are classes is
    checked once the labels are known (:func:`region_parts`)."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: 'regions' must map region names to lists of label values, "
                        f"e.g. {{\"disc\": [1, 2], \"cup\": [2]}}; got {raw!r}")
    regions = {}
    for name, values in raw.items():
        where = f"{path}: region {name!r}"
        if not name.strip():
            raise DataError(f"{path}: 'regions' has a region without a name")
        if not isinstance(values, list):
            raise DataError(f"{where} must be a list of label values, not {values!r}")
        if not values:
            raise DataError(f"{where} is empty: list the label values it merges")
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool):
                raise DataError(f"{where}: {v!r} is not an integer label value")
        if len(set(values)) != len(values):
            raise DataError(f"{where} lists a label value twice: {values}")
        regions[name] = tuple(values)
    return regions


def region_parts(regions: dict[str, tuple[int, ...]], label_values: list[int], classes: list[str],
                 path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """The reported parts of declared regions: each region's mask values as training labels
    (mask value ``label_values[i]`` is label ``i + 1``). A value that is no class is an error
    naming ``path`` (dataset.json), the region and the value."""
    known = ", ".join(f"{v} ({c})" for v, c in zip(label_values, classes)) or "none"
    parts = []
    for name, values in regions.items():
        for v in values:
            if v not in label_values:
                what = "is the background" if v == 0 else "is not among the classes"
                raise DataError(f"{path}: region {name!r} lists label value {v}, which {what}; "
                                f"the classes' mask values are {known}")
        parts.append((name, tuple(sorted(label_values.index(v) + 1 for v in values))))
    return parts


def read_description(root: Path) -> DatasetDescription:
    """Parse ``root/dataset.json`` (absent -> all None); malformed -> :class:`DataError`."""
    path = root / DATASET_JSON
    if not path.is_file():
        return DatasetDescription()
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object")
    desc = DatasetDescription()
    if "labels" in raw:
        labels = raw["labels"]
        if (not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                    and v >= 0 for v in labels.values())):
            raise DataError(f"{path}: 'labels' must map names to non-negative integer mask values")
        if 0 not in labels.values():
            raise DataError(f"{path}: 'labels' must give background the value 0")
        if len(set(labels.values())) != len(labels):
            raise DataError(f"{path}: two labels share a mask value")
        desc.labels = labels
    if "domains" in raw:
        if not isinstance(raw["domains"], list) or not all(isinstance(d, str) for d in raw["domains"]):
            raise DataError(f"{path}: 'domains' must be a list of folder names")
        desc.domains = raw["domains"]
    if "channels" in raw:
        if raw["channels"] not in (1, 3):
            raise DataError(f"{path}: 'channels' must be 1 or 3, not {raw['channels']!r}")
        desc.channels = raw["channels"]
    if "slice_axis" in raw:
        if raw["slice_axis"] not in (0, 1, 2):
            raise DataError(f"{path}: 'slice_axis' must be 0, 1 or 2, not {raw['slice_axis']!r}")
        desc.slice_axis = raw["slice_axis"]
    if "intensity_window" in raw:
        window = raw["intensity_window"]
        if (not isinstance(window, list) or len(window) != 2
                or not all(isinstance(v, (int, float)) for v in window) or window[0] >= window[1]):
            raise DataError(f"{path}: 'intensity_window' must be [low, high] with low < high")
        desc.intensity_window = (float(window[0]), float(window[1]))
    if "regions" in raw:
        desc.regions = _read_regions(raw["regions"], path)
    return desc


# ----------------------------------------------------------------------------- NIfTI volumes

@dataclass
class Volume:
    data: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray


def nifti_shape(path: Path) -> tuple[int, ...]:
    """Shape from the header only (cheap); trailing singleton axes dropped."""
    try:
        shape = tuple(int(s) for s in nib.load(path).shape)
    except _NIFTI_ERRORS as exc:
        raise FileDataError(path, f"unreadable NIfTI header ({exc})") from None
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def load_volume(path: Path, is_image: bool, window: tuple[float, float] | None) -> Volume:
    """Decode a whole NIfTI file; images become uint8 over the whole volume (so all slices of a
    volume share one intensity mapping), masks stay integer values."""
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except _NIFTI_ERRORS as exc:
        raise FileDataError(path, f"unreadable or truncated NIfTI ({exc})") from None
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise FileDataError(path, f"{data.ndim}D volume {data.shape} where a 3D volume is expected")
    if is_image:
        data = intensity_to_uint8(data, window)
    else:
        rounded = np.rint(data)
        if np.issubdtype(data.dtype, np.floating) and not np.array_equal(rounded, data):
            raise FileDataError(path, "mask has non-integer values")
        data = rounded.astype(np.int64)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    return Volume(data=data, spacing=zooms, affine=np.asarray(img.affine, dtype=np.float64))


class VolumeCache:
    """Keeps the last few decoded volumes: slices of one volume are read one after another, and
    decompressing a .nii.gz once per slice would be quadratic."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, bool], Volume] = OrderedDict()

    def get(self, path: Path, is_image: bool, window: tuple[float, float] | None) -> Volume:
        key = (str(path), is_image)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        volume = load_volume(path, is_image, window)
        self._items[key] = volume
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return volume


def _slice(volume: Volume, index: int | None, axis: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One 2D slice and its in-plane spacing (the zooms of the two remaining axes, in order)."""
    if volume.data.ndim == 2 or index is None:
        return volume.data, (volume.spacing[0], volume.spacing[1])
    plane = np.take(volume.data, index, axis=axis)
    rest = [s for a, s in enumerate(volume.spacing) if a != axis]
    return plane, (rest[0], rest[1])


# ----------------------------------------------------------------------------- the index

@dataclass
class FolderIndex(DatasetIndex):
    """A user dataset. ``label_values[i]`` is the mask value of training label ``i + 1``."""

    label_values: list[int] = field(default_factory=list)
    slice_axis: int = 2
    intensity_window: tuple[float, float] | None = None
    volumes: VolumeCache = field(default_factory=VolumeCache, repr=False, compare=False)

    def label_from_mask(self, mask: np.ndarray, path: Path) -> np.ndarray:
        check_mask_values(mask, (0, *self.label_values), path)
        label = np.zeros(mask.shape, np.uint8)
        for i, value in enumerate(self.label_values):
            label[mask == value] = i + 1
        return label

    def read(self, case: Case) -> Sample:
        if case.image is None or case.mask is None:
            raise DataError(f"case {case.domain}/{case.split}/{case.name} has no image or mask file")
        if not is_nifti(case.image):
            image = image_array(case.image, self.channels)
            mask = mask_array(case.mask)
            check_same_size(image, mask, case.image, case.mask)
            return Sample(image=image, label=self.label_from_mask(mask, case.mask))
        image_volume = self.volumes.get(case.image, True, self.intensity_window)
        mask_volume = self.volumes.get(case.mask, False, None)
        if image_volume.data.shape != mask_volume.data.shape:
            raise FileDataError(case.mask, f"mask volume shape {mask_volume.data.shape} differs from "
                                f"image {case.image.name} {image_volume.data.shape}")
        plane, spacing = _slice(image_volume, case.slice_index, case.slice_axis)
        mask_plane, _ = _slice(mask_volume, case.slice_index, case.slice_axis)
        image = np.repeat(plane[..., None], self.channels, axis=-1)
        return Sample(image=np.ascontiguousarray(image),
                      label=self.label_from_mask(np.ascontiguousarray(mask_plane), case.mask),
                      spacing=spacing, affine=image_volume.affine)


def looks_like(path: Path) -> Path | None:
    """``path`` when it has dataset.json or a ``<domain>/{train,test}/images`` folder."""
    if (path / DATASET_JSON).is_file():
        return path
    if path.is_dir() and any((d / s / IMAGE_DIR).is_dir() for d in path.iterdir() if d.is_dir()
                             for s in SPLITS):
        return path
    return None


def _volume_cases(image: Path, mask: Path, domain: str, split: str, axis: int
                  ) -> tuple[list[Case], list[Problem]]:
    """One case per slice of a NIfTI pair, from the headers only."""
    try:
        image_shape = nifti_shape(image)
        mask_shape = nifti_shape(mask)
    except FileDataError as exc:
        return [], [exc.as_problem()]
    if len(image_shape) > 3:
        return [], [Problem(str(image), f"{len(image_shape)}D volume {image_shape} where a 3D "
                            "volume (cut into 2D slices) is expected")]
    if image_shape != mask_shape:
        return [], [Problem(str(mask), f"mask volume shape {mask_shape} differs from image "
                            f"{image.name} {image_shape}")]
    stem = file_stem(image)
    if len(image_shape) == 2:
        return [Case(domain, split, stem, image=image, mask=mask, slice_axis=axis)], []
    count = image_shape[axis]
    width = max(3, len(str(count - 1)))  # zero-padded so that name order is slice order
    return [Case(domain, split, f"{stem}_{k:0{width}d}", image=image, mask=mask, slice_index=k,
                 slice_axis=axis) for k in range(count)], []


def _domain_folders(root: Path, desc: DatasetDescription) -> tuple[list[str], list[Problem]]:
    found = sorted(d.name for d in root.iterdir()
                   if d.is_dir() and not d.name.startswith(".") and any((d / s).is_dir() for s in SPLITS))
    if desc.domains is None:
        return found, []
    problems = [Problem(str(root / d), f"domain folder '{d}' listed in {DATASET_JSON} is missing")
                for d in desc.domains if not (root / d).is_dir()]
    problems += [Problem(str(root / d), f"folder '{d}' is not listed in {DATASET_JSON} 'domains'; ignored")
                 for d in found if d not in desc.domains]
    return [d for d in desc.domains if (root / d).is_dir()], problems


def _infer_channels(cases: list[Case]) -> int:
    """3 when the first 2D image is stored in colour, else 1 (NIfTI volumes are grey)."""
    for case in cases:
        if case.image is not None and not is_nifti(case.image):
            try:
                with Image.open(case.image) as im:
                    return 3 if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else 1
            except (OSError, SyntaxError, ValueError):
                continue  # check_dataset reports the unreadable file
    return 1


# A mask whose foreground has at least this many values, most of them on under RARE_SHARE of its
# foreground pixels each, looks lossy-compressed: label maps have a few large regions, not a fringe
# of rare values around every edge.
LOSSY_MIN_VALUES, RARE_SHARE = 4, 0.01


def _value_counts(data: np.ndarray) -> dict[int, int]:
    if data.dtype == np.uint8:
        counts = np.bincount(data.ravel(), minlength=256)
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(data, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _show(values) -> str:
    values = sorted(values)
    return "{" + ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "") + "}"


def encoding_problems(per_mask: dict[Path, dict[int, int]]) -> list[Problem]:
    """Masks whose values would invent classes when labels are discovered rather than declared:
    JPEG files (lossy), value sets that look lossy-compressed (many rare values), and masks whose
    foreground values differ from those of the other masks (0/1 beside 0/255 gives two classes)."""
    problems: list[Problem] = []
    flagged: set[Path] = set()
    for path, counts in per_mask.items():
        fg = {v: n for v, n in counts.items() if v != 0}
        total = sum(fg.values())
        rare = [v for v, n in fg.items() if n < RARE_SHARE * total]
        if path.suffix.lower() in (".jpg", ".jpeg"):
            problems.append(Problem(str(path), f"JPEG mask: lossy compression invents label values around edges "
                                    f"({len(fg)} foreground values found, {_show(fg)}); save masks as PNG"))
            flagged.add(path)
        elif len(fg) >= LOSSY_MIN_VALUES and len(rare) > len(fg) / 2:
            problems.append(Problem(str(path), f"mask looks lossy-compressed: {len(fg)} foreground values, "
                                    f"{len(rare)} of them on under {RARE_SHARE:.0%} of its pixels each "
                                    f"({_show(rare)}); each value would become a class. Re-save it losslessly, "
                                    f"or declare the labels in {DATASET_JSON}"))
            flagged.add(path)
    groups: dict[frozenset[int], list[Path]] = {}
    for path, counts in per_mask.items():
        fg = frozenset(v for v in counts if v != 0)
        if fg and path not in flagged:
            groups.setdefault(fg, []).append(path)
    if len(groups) > 1:
        common = max(groups, key=lambda k: (len(groups[k]), sorted(k)))
        example = groups[common][0].name
        for values, paths in groups.items():
            if values == common:
                continue
            for path in paths:
                problems.append(Problem(str(path), f"label values {_show(values)} differ from the {_show(common)} "
                                        f"of {len(groups[common])} other mask(s) (e.g. {example}); with labels "
                                        "discovered from the masks every distinct value becomes a class. Use one "
                                        f"encoding in all masks, or declare the labels in {DATASET_JSON}"))
    return problems


def _discover_values(cases: list[Case], axis: int) -> tuple[list[int], list[Problem]]:
    """All mask values found, each mask file decoded once, and the masks whose values would
    invent classes (:func:`encoding_problems`)."""
    per_mask: dict[Path, dict[int, int]] = {}
    problems: list[Problem] = []
    for case in cases:
        if case.mask is None or case.mask in per_mask:
            continue
        try:
            data = load_volume(case.mask, False, None).data if is_nifti(case.mask) else mask_array(case.mask)
        except FileDataError as exc:
            problems.append(exc.as_problem())
            per_mask[case.mask] = {}
            continue
        per_mask[case.mask] = _value_counts(data)
    values = {v for counts in per_mask.values() for v in counts}
    return sorted(values), problems + encoding_problems(per_mask)


def open_folder(path: Path, slice_axis: int | None = None) -> FolderIndex:
    """Index a user dataset (see the module docstring). ``slice_axis`` overrides dataset.json."""
    root = path
    desc = read_description(root)
    axis = slice_axis if slice_axis is not None else (desc.slice_axis if desc.slice_axis is not None else 2)
    if axis not in (0, 1, 2):
        raise DataError(f"slice axis must be 0, 1 or 2, not {axis}")
    domains, problems = _domain_folders(root, desc)
    cases: list[Case] = []
    for domain in domains:
        for split in SPLITS:
            split_dir = root / domain / split
            extensions = IMAGE_EXTENSIONS + NIFTI_EXTENSIONS
            pairs, pair_problems = pair_by_stem(list_files(split_dir / IMAGE_DIR, extensions),
                                                list_files(split_dir / MASK_DIR, extensions))
            problems.extend(pair_problems)
            split_cases: list[Case] = []
            for image, mask in pairs:
                if is_nifti(image) != is_nifti(mask):
                    problems.append(Problem(str(mask), f"image {image.name} and mask {mask.name} must "
                                            "both be NIfTI or both be 2D image files"))
                elif is_nifti(image):
                    volume_cases, volume_problems = _volume_cases(image, mask, domain, split, axis)
                    split_cases.extend(volume_cases)
                    problems.extend(volume_problems)
                else:
                    split_cases.append(Case(domain, split, file_stem(image), image=image, mask=mask))
            if not split_cases:
                problems.append(empty_split_problem(split_dir, domain, split))
            cases.extend(split_cases)

    if desc.labels is not None:
        named = sorted((v, k) for k, v in desc.labels.items() if v != 0)
        label_values = [v for v, _ in named]
        classes = [k for _, k in named]
    else:
        found, discover_problems = _discover_values(cases, axis)
        problems.extend(discover_problems)
        label_values = [v for v in found if v != 0]
        # a 0/255 mask is one foreground class; several values are named by their mask value
        classes = ["foreground"] if len(label_values) == 1 else [f"class{v}" for v in label_values]
    if not label_values:
        problems.append(Problem(str(root), "no foreground label: every mask is empty and "
                                f"{DATASET_JSON} declares no labels"))
    channels = desc.channels if desc.channels is not None else _infer_channels(cases)
    parts = (region_parts(desc.regions, label_values, classes, root / DATASET_JSON)
             if desc.regions is not None else None)
    return FolderIndex(format="folder", root=root, classes=classes, domains=domains, channels=channels,
                       cases=cases, problems=problems, report_parts=parts, label_values=label_values,
                       slice_axis=axis, intensity_window=desc.intensity_window)

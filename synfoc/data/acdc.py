"""ACDC cardiac cine MRI as the SSL4MIS collection prepares it (the usual SSMIS benchmark).

    ACDC/
      train_slices.list  val.list  test.list       one name per line, without ".h5"
      data/slices/patient001_frame01_slice_0.h5    training slices: "image" (H, W) float in [0, 1],
                                                   "label" (H, W) 0 background, 1 RV, 2 MYO, 3 LV
      data/patient081_frame01.h5                   volumes: "image" / "label" (slices, H, W)

One domain, "ACDC". Training cases are the slices of ``train_slices.list`` (every file in
``data/slices`` when the list is absent); test cases are the slices of the volumes of
``test.list``, cut along the first axis as SSL4MIS's test scripts do. ``val.list`` is not used:
synfoc evaluates the final students rather than selecting them on a validation set.

Every case carries its patient (``patient001``) as ``Case.group``, so the split labels whole
patients: ``--labeled-num 7`` is 7 patients with all their slices, the SSL literature's protocol.
Test metrics are per volume in 3D at the original slice size (synfoc.evaluate.volume_rows); the
files hold no voxel spacing, so HD95 and ASD are in voxels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synfoc.data.base import Case, DataError, DatasetIndex, Problem, Sample
from synfoc.data.io import FileDataError, check_mask_values, empty_split_problem

DOMAIN = "ACDC"
CLASSES = ["RV", "MYO", "LV"]        # label values 1, 2, 3 as SSL4MIS stores them
LISTS = {"train": "train_slices.list", "test": "test.list"}
_PATIENT = re.compile(r"^(patient\d+)")


def patient_of(name: str) -> str:
    """``patient001_frame01_slice_3`` -> ``patient001``; other names: the part before ``_slice``."""
    match = _PATIENT.match(name)
    return match.group(1) if match else name.split("_slice")[0]


def _h5py():
    """h5py, imported when an ACDC file is read, so that the other formats work without it."""
    try:
        import h5py
    except ImportError:
        raise DataError("reading the ACDC (SSL4MIS) layout needs h5py: pip install h5py") from None
    return h5py


def looks_like(path: Path) -> Path | None:
    """The ACDC root under ``path`` (itself or ``path/ACDC``), or None."""
    for root in (path, path / "ACDC"):
        if (root / "data" / "slices").is_dir() or ((root / "data").is_dir() and (root / LISTS["train"]).is_file()):
            return root
    return None


def _read_list(path: Path) -> list[str]:
    return [line.strip().removesuffix(".h5") for line in path.read_text().splitlines() if line.strip()]


def _volume_depth(path: Path) -> int:
    """Number of slices of a test volume, from the dataset's shape (nothing is decoded)."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            shape = f["image"].shape
            label_shape = f["label"].shape
    except KeyError as exc:
        raise FileDataError(path, f"no dataset {exc} (expected 'image' and 'label')") from None
    except OSError as exc:
        raise FileDataError(path, f"unreadable HDF5 file ({exc})") from None
    if shape != label_shape:
        raise FileDataError(path, f"'label' shape {label_shape} differs from 'image' {shape}")
    if len(shape) == 2:
        return 1
    if len(shape) != 3:
        raise FileDataError(path, f"'image' has shape {shape}; expected (slices, H, W)")
    return shape[0]


@dataclass
class AcdcIndex(DatasetIndex):
    # evaluate each test volume in 3D (synfoc.evaluate.volume_rows), as the SSL literature reports ACDC
    volume_metrics = True

    def read(self, case: Case) -> Sample:
        if case.image is None:
            raise DataError(f"case {case.domain}/{case.split}/{case.name} has no file")
        h5py = _h5py()
        try:
            with h5py.File(case.image, "r") as f:
                image_ds, label_ds = f["image"], f["label"]
                if case.slice_index is not None and image_ds.ndim == 3:
                    image, label = image_ds[case.slice_index], label_ds[case.slice_index]
                else:
                    image, label = image_ds[()], label_ds[()]
        except KeyError as exc:
            raise FileDataError(case.image, f"no dataset {exc} (expected 'image' and 'label')") from None
        except OSError as exc:
            raise FileDataError(case.image, f"unreadable HDF5 file ({exc})") from None
        if image.ndim != 2 or image.shape != label.shape:
            raise FileDataError(case.image, f"'image' {image.shape} and 'label' {label.shape} are not one 2D slice")
        if not np.issubdtype(image.dtype, np.floating):
            raise FileDataError(case.image, f"'image' is {image.dtype}; SSL4MIS stores float intensities in [0, 1]")
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise FileDataError(case.image, "'label' has non-integer values")
        label = rounded.astype(np.int64)
        check_mask_values(label, (0, 1, 2, 3), case.image)
        # [0, 1] as stored; clipping keeps a slightly out-of-range value from wrapping around
        grey = np.rint(np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0) * 255).astype(np.uint8)
        return Sample(image=grey[..., None], label=label.astype(np.uint8))


def open_acdc(path: Path) -> AcdcIndex:
    root = looks_like(path) or path
    data = root / "data"
    cases: list[Case] = []
    problems: list[Problem] = []

    train_list = root / LISTS["train"]
    if train_list.is_file():
        names = _read_list(train_list)
    else:
        names = sorted(p.name[:-3] for p in (data / "slices").glob("*.h5"))
    for name in names:
        file = data / "slices" / f"{name}.h5"
        if not file.is_file():
            problems.append(Problem(str(file), f"slice '{name}' of {LISTS['train']} has no file"))
            continue
        cases.append(Case(DOMAIN, "train", name, image=file, mask=file, group=patient_of(name)))

    test_list = root / LISTS["test"]
    if test_list.is_file():
        volumes = _read_list(test_list)
    else:
        problems.append(Problem(str(test_list), f"no {LISTS['test']}: no test volumes"))
        volumes = []
    for name in volumes:
        file = data / f"{name}.h5"
        if not file.is_file():
            problems.append(Problem(str(file), f"volume '{name}' of {LISTS['test']} has no file"))
            continue
        try:
            depth = _volume_depth(file)
        except FileDataError as exc:
            problems.append(exc.as_problem())
            continue
        width = max(3, len(str(depth - 1)))   # zero-padded, so that name order is slice order
        cases.extend(Case(DOMAIN, "test", f"{name}_{k:0{width}d}", image=file, mask=file, slice_index=k,
                          slice_axis=0, group=patient_of(name)) for k in range(depth))
    for split in ("train", "test"):
        if not any(c.split == split for c in cases):
            problems.append(empty_split_problem(root, DOMAIN, split))
    return AcdcIndex(format="acdc", root=root, classes=list(CLASSES), domains=[DOMAIN], channels=1,
                     cases=cases, problems=problems)

"""Open a dataset folder in any supported format; ``auto`` recognises the layout."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from synfoc.data import acdc, busi, folder, fundus, mnms, mscmrseg, prostate
from synfoc.data.base import DataError, DatasetIndex

# In the order ``auto`` tries them: the paper's fixed layouts before the generic one.
DETECTORS: dict[str, Callable[[Path], Path | None]] = {
    "fundus": fundus.looks_like,
    "prostate": prostate.looks_like,
    "mnms": mnms.looks_like,
    "busi": busi.looks_like,
    "acdc": acdc.looks_like,
    "mscmrseg": mscmrseg.looks_like,
    "folder": folder.looks_like,
}
FORMATS = tuple(DETECTORS)

_LAYOUTS = """  fundus:   Domain{1-4}/{train,test}/ROIs/{image,mask}/*.png
  prostate: {BIDMC,BMC,HK,I2CVB,RUNMC,UCL}/{train,test}/{image,mask}/*.png
  mnms:     vendor{A,B,C,D}/{train,test}/{image,mask}/*.png
  busi:     Dataset_BUSI_with_GT/{benign,malignant}/*.png
  acdc:     ACDC/data/slices/*.h5, ACDC/data/*.h5, ACDC/{train_slices,test}.list (SSL4MIS)
  mscmrseg: {C0,LGE}/{train,test}/*.nii.gz with *_manual.nii.gz labels beside them
  folder:   <domain>/{train,test}/{images,masks}/ (and optionally dataset.json)"""


def detect_format(path: Path) -> str:
    """The format whose layout ``path`` has; :class:`DataError` when none or several do
    (a folder holding both ``Fundus`` and ``ProstateSlice`` must be named more precisely)."""
    found = {name: root for name, looks_like in DETECTORS.items()
             if (root := looks_like(path)) is not None}
    if not found:
        raise DataError(f"{path}: no known dataset layout found. Expected one of:\n{_LAYOUTS}")
    if len(found) > 1:
        raise DataError(f"{path}: holds several datasets ("
                        + ", ".join(f"{name} at {root}" for name, root in found.items())
                        + "); give the dataset's own folder or a format")
    return next(iter(found))


def open_dataset(path: str | Path, format: str = "auto", *, slice_axis: int | None = None) -> DatasetIndex:
    """Index the dataset at ``path``.

    Args:
        path: the dataset folder (for the paper's sets also its parent, e.g. the folder that
            holds ``Fundus`` or ``Dataset_BUSI_with_GT``).
        format: one of ``auto``, ``fundus``, ``prostate``, ``mnms``, ``busi``, ``acdc``,
            ``mscmrseg``, ``folder``.
        slice_axis: for NIfTI volumes in the ``folder`` format, the axis cut into 2D slices
            (overrides dataset.json; default 2).

    Only cheap structural checks are made here (pairing of images and masks, empty domains);
    they are in ``index.problems``. :func:`synfoc.data.check_dataset` decodes every file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such folder")
    if not path.is_dir():
        raise DataError(f"{path}: not a folder")
    if format == "auto":
        format = detect_format(path)
    if format not in FORMATS:
        raise DataError(f"unknown dataset format '{format}'; choose one of auto, {', '.join(FORMATS)}")
    if DETECTORS[format](path) is None:
        raise DataError(f"{path}: does not have the '{format}' layout. Expected:\n"
                        + next(line for line in _LAYOUTS.splitlines() if line.strip().startswith(format)))
    if format == "folder":
        return folder.open_folder(path, slice_axis=slice_axis)
    opener = {"fundus": fundus.open_fundus, "prostate": prostate.open_prostate,
              "mnms": mnms.open_mnms, "busi": busi.open_busi, "acdc": acdc.open_acdc,
              "mscmrseg": mscmrseg.open_mscmrseg}[format]
    return opener(path)

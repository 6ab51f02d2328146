"""``synfoc predict``: segment new 2D images or NIfTI volumes with a trained run's student.

Each image (or each slice of a volume) is read exactly as training read the dataset (same
channel conversion; NIfTI intensities mapped to 0..255 over the whole volume with the dataset's
window), resized to the student's input size with :func:`synfoc.data.cache.resize_image`,
segmented with :func:`synfoc.evaluate.predict_labels` at that size and mapped back to the
original size with nearest-neighbour interpolation. Masks hold training label values 0..C
(0 background, i the run's class i); see docs/report.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synfoc.data.io import IMAGE_EXTENSIONS, NIFTI_EXTENSIONS, file_stem, is_nifti

INPUT_EXTENSIONS = IMAGE_EXTENSIONS + NIFTI_EXTENSIONS
OVERLAY_DIR = "overlays"
SLICE_CHUNK = 32  # slices of a volume resized and sent to the model at once (bounds memory)


@dataclass
class Predictor:
    """One student ready to segment: the model, its input size, the runtime and the dataset's
    reading conventions (channels, slice axis, intensity window)."""

    kind: str
    model: object
    input_size: int
    channels: int
    parts: list[tuple[str, tuple[int, ...]]]
    slice_axis: int
    intensity_window: tuple[float, float] | None
    device: object
    autocast: object

    def labels(self, images: np.ndarray) -> np.ndarray:
        """Labels uint8 (N, H, W) at the original size of uint8 images (N, H, W, C)."""
        import torch

        from synfoc.data.cache import resize_image, resize_label
        from synfoc.evaluate import predict_labels
        out = np.zeros(images.shape[:3], np.uint8)
        for start in range(0, len(images), SLICE_CHUNK):
            chunk = images[start:start + SLICE_CHUNK]
            x = torch.from_numpy(np.stack([resize_image(im, self.input_size).transpose(2, 0, 1)
                                           for im in chunk]))
            pred = predict_labels(self.model, x, self.input_size, self.device, self.autocast).numpy()
            for j, lab in enumerate(pred):
                out[start + j] = resize_label(lab, images.shape[1:3])
        return out


def make_predictor(run: Path, student: str | None = None, device: str = "auto", dataset: str | None = None,
                   slice_axis: int | None = None) -> Predictor:
    """Load a run's student (default: the foundation model when the run has one, else the U-Net)."""
    from synfoc.evaluate import load_run
    cfg, index, students, rt = load_run(Path(run), dataset=dataset, device=device)
    kind = student or ("foundation" if "foundation" in students else "unet")
    if kind not in students:
        raise ValueError(f"{run} has no {kind} student (it has: {', '.join(students)})")
    model = students[kind]
    size = int(model.image_size) if kind == "foundation" else int(cfg.unet_size)
    axis = slice_axis if slice_axis is not None else int(getattr(index, "slice_axis", 2))
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, not {axis}")
    return Predictor(kind=kind, model=model, input_size=size, channels=index.channels,
                     parts=list(index.report_parts), slice_axis=axis,
                     intensity_window=getattr(index, "intensity_window", None),
                     device=rt.device, autocast=rt.autocast)


# ----------------------------------------------------------------------------- inputs and names

def list_inputs(path: Path, output: Path | None = None) -> list[tuple[Path, Path]]:
    """(file, name relative to the output folder without extension) of every input.

    A file gives itself; a folder gives its image and NIfTI files at any depth (hidden files and
    folders, and the output folder when it lies inside, skipped) keeping their relative paths.
    """
    if path.is_file():
        return [(path, Path(file_stem(path)))]
    if not path.is_dir():
        raise ValueError(f"input not found: {path}")
    skip = output.resolve() if output is not None else None
    found = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        if skip is not None and (f.resolve() == skip or skip in f.resolve().parents):
            continue
        if f.name.lower().endswith(INPUT_EXTENSIONS):
            found.append((f, rel.with_name(file_stem(f))))
    if not found:
        raise ValueError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) or NIfTI files in {path}")
    return found


def output_names(inputs: list[tuple[Path, Path]]) -> list[Path]:
    """Output path (relative) of each input: the same name with .png for a 2D image and the
    input's own extension for NIfTI. Two inputs that would collide (a.png and a.jpg) keep their
    full file name instead (a.png.png, a.jpg.png)."""
    def plain(f: Path, rel: Path) -> Path:
        if is_nifti(f):
            return rel.with_name(rel.name + (".nii.gz" if f.name.lower().endswith(".nii.gz") else ".nii"))
        return rel.with_name(rel.name + ".png")

    names = [plain(f, rel) for f, rel in inputs]
    counts: dict[str, int] = {}
    for n in names:
        counts[str(n).lower()] = counts.get(str(n).lower(), 0) + 1
    return [n if counts[str(n).lower()] == 1 else rel.with_name(f.name + (".nii.gz" if is_nifti(f) else ".png"))
            for (f, rel), n in zip(inputs, names)]


def overlay_name(name: Path) -> Path:
    return Path(OVERLAY_DIR) / name.with_name(file_stem(name) + ".png")


# ----------------------------------------------------------------------------- one input

def predict_image_file(predictor: Predictor, path: Path, out: Path, overlay: Path | None) -> None:
    """A 2D image -> a PNG label mask of the image's size (and optionally an overlay PNG)."""
    from PIL import Image

    from synfoc.data.io import image_array
    image = image_array(path, predictor.channels)
    label = predictor.labels(image[None])[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(out)
    if overlay is not None:
        write_overlay(image, label, predictor.parts, overlay)


def predict_nifti_file(predictor: Predictor, path: Path, out: Path, overlay: Path | None) -> None:
    """A NIfTI volume -> a NIfTI mask with the same shape, affine and header (voxel sizes)."""
    import nibabel as nib

    from synfoc.data.folder import load_volume
    volume = load_volume(path, True, predictor.intensity_window)
    data = volume.data
    if data.ndim == 2:
        label = predictor.labels(np.repeat(data[None, ..., None], predictor.channels, axis=-1))[0]
        best = data, label
    else:
        axis = predictor.slice_axis
        planes = np.moveaxis(data, axis, 0)  # (slices, rest...) in the order training used
        images = np.repeat(planes[..., None], predictor.channels, axis=-1)
        labels = predictor.labels(images)
        label = np.moveaxis(labels, 0, axis)
        # the overlay shows the slice with the most predicted foreground (the middle one if none)
        area = (labels > 0).reshape(len(labels), -1).sum(axis=1)
        k = int(np.argmax(area)) if area.any() else len(labels) // 2
        best = planes[k], labels[k]
    source = nib.load(path)
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    # the image's intensity scaling (scl_slope/inter) must not rescale the labels
    header.set_slope_inter(1, 0)
    # trailing singleton axes that reading dropped come back, so the shape is the input's
    mask = type(source)(label.reshape(source.shape).astype(np.uint8), source.affine, header=header)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(mask, out)
    if overlay is not None:
        write_overlay(best[0], best[1], predictor.parts, overlay)


def write_overlay(image: np.ndarray, label: np.ndarray, parts, path: Path) -> None:
    """The image with the contour of each predicted part in its colour (as in the report)."""
    from PIL import Image

    from synfoc.report import overlay_contours
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay_contours(image, label, parts)).save(path)


# ----------------------------------------------------------------------------- the batch

def predict_inputs(predictor: Predictor, source: Path, output: Path, overlay: bool = False,
                   progress: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Segment every input under ``source`` into ``output``; (written files, [(skipped file, why)]).
    An input that cannot be read is reported on stderr and skipped; a mask that cannot be written
    (full disk, unwritable folder) stops everything with one :class:`ValueError`, since every
    further input would fail the same way."""
    from tqdm import tqdm

    from synfoc.data.base import DataError
    from synfoc.data.io import FileDataError
    inputs = list_inputs(source, output)
    written, skipped = [], []
    bar = tqdm(list(zip(inputs, output_names(inputs))), desc=f"predict ({predictor.kind})", unit="file",
               disable=not progress, dynamic_ncols=True)
    for (path, _), name in bar:
        target = output / name
        over = output / overlay_name(name) if overlay else None
        try:
            if is_nifti(path):
                predict_nifti_file(predictor, path, target, over)
            else:
                predict_image_file(predictor, path, target, over)
        except OSError as exc:  # input errors arrive as DataError: this is the output side
            from synfoc.errors import os_error_message
            raise ValueError(f"--output {output}: {os_error_message(exc)}; {len(written)} mask(s) were "
                             "written before it") from None
        except (DataError, ValueError) as exc:
            reason = exc.problem if isinstance(exc, FileDataError) else str(exc) or type(exc).__name__
            skipped.append((path, reason))
            tqdm.write(f"synfoc predict: skipped {path}: {reason}", file=sys.stderr)
            continue
        written.append(target)
    return written, skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder made by 'synfoc train --out RUN'")
    parser.add_argument("--input", "-i", required=True,
                        help="an image (PNG, JPEG, TIFF, BMP), a NIfTI volume (.nii, .nii.gz) or a folder of them")
    parser.add_argument("--output", "-o", required=True, help="folder for the masks (created when missing)")
    parser.add_argument("--student", choices=["foundation", "unet"],
                        help="which student segments (default: foundation when the run has it, else unet)")
    parser.add_argument("--overlay", action="store_true",
                        help=f"also write OUTPUT/{OVERLAY_DIR}/NAME.png: the image with coloured prediction contours")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the students run (default auto: CUDA when available)")
    parser.add_argument("--dataset", help="where the run's dataset is now (default: as in its config.yaml); "
                        "read for its classes, channels, slice axis and intensity window")
    parser.add_argument("--slice-axis", type=int, choices=[0, 1, 2],
                        help="axis along which volumes are cut into 2D slices (default: the dataset's, else 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_writable_folder(folder: Path, option: str) -> None:
    """Stop naming ``option`` unless ``folder`` can be created and written: checked before any
    model is loaded, not once per input. Folders made for the check are removed again, so a
    command that fails later leaves nothing behind."""
    from synfoc.errors import os_error_message, probe_write
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        probe_write(folder)
    except OSError as exc:
        raise ValueError(f"{option} {folder}: {os_error_message(exc)}") from None
    finally:
        for p in made:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break


def main(args: argparse.Namespace) -> int:
    source, output = Path(args.input), Path(args.output)
    if not source.exists():
        raise ValueError(f"input not found: {source}")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output must be a folder, but {output} is a file")
    check_writable_folder(output, "--output")
    list_inputs(source, output)  # fail before loading the models when there is nothing to do
    predictor = make_predictor(Path(args.run), args.student, args.device, args.dataset, args.slice_axis)
    written, skipped = predict_inputs(predictor, source, output, overlay=args.overlay,
                                      progress=not args.no_progress)
    print(f"{len(written)} mask(s) written to {output} by the {predictor.kind} student"
          + (f"; {len(skipped)} input(s) skipped (see above)" if skipped else ""))
    return 1 if skipped else 0

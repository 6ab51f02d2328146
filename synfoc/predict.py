"""``synfoc predict``: segment new 2D images or NIfTI volumes with a trained run's student.

Each image (or each slice of a volume) is read exactly as training read the dataset (same
channel conversion; NIfTI intensities mapped to 0..255 over the whole volume with the dataset's
window), resized to the student's input size with :func:`synfoc.data.cache.resize_image`,
segmented at that size (:func:`student_probabilities`: the soft-max of
:func:`synfoc.evaluate.predict_labels`, arg-maxed) and mapped back to the original size with
nearest-neighbour interpolation. Masks hold training label values 0..C
(0 background, i the run's class i); see docs/report.md.

With both students (a SynFoC run) the mask may also be their average (the mean of the two
students' soft-max probabilities, arg-maxed), and ``OUTPUT/review.csv`` gets one row per input
with the students' Dice agreement per reported part: where they disagree, the image is hard and
the mask should be checked first.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synfoc.data.io import IMAGE_EXTENSIONS, NIFTI_EXTENSIONS, file_stem, is_nifti

INPUT_EXTENSIONS = IMAGE_EXTENSIONS + NIFTI_EXTENSIONS
OVERLAY_DIR = "overlays"
SLICE_CHUNK = 8  # slices of a volume resized and sent to the models at once (bounds the probabilities' memory)
STUDENTS = ("unet", "foundation")
AVERAGE = "average"  # the mask of the two students' mean probabilities
REVIEW_FILE = "review.csv"
REVIEW_THRESHOLD = 0.5  # default: an input whose students agree less (mean Dice over parts) is flagged


@dataclass
class Student:
    """A trained student and its (square) input size in pixels."""

    model: object
    input_size: int


@dataclass
class Predictor:
    """What segments: ``kind`` is the mask written (a student's name, or ``average``), ``students``
    the students it runs (both for ``average`` and when ``review``), the runtime and the dataset's
    reading conventions (channels, reported parts, slice axis, intensity window). With ``review``
    each input's two students' masks are also returned, for the agreement of :func:`review_row`."""

    kind: str
    students: dict[str, Student]
    channels: int
    parts: list[tuple[str, tuple[int, ...]]]
    slice_axis: int
    intensity_window: tuple[float, float] | None
    device: object
    autocast: object
    review: bool = False
    threshold: float = REVIEW_THRESHOLD

    def probabilities(self, name: str, images: np.ndarray):
        """Soft-max probabilities (N, C+1, S, S), on the CPU, of student ``name`` at its input
        size S, of uint8 images (N, H, W, C)."""
        import torch

        from synfoc.data.cache import resize_image
        student = self.students[name]
        x = torch.from_numpy(np.stack([resize_image(im, student.input_size).transpose(2, 0, 1)
                                       for im in images]))
        return student_probabilities(student.model, x, self.device, self.autocast)

    def segment(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(labels of the mask written, {student: its own labels} when reviewing, else {}), all
        uint8 (N, H, W) at the original size of uint8 images (N, H, W, C). The average is taken
        at the larger input size (the other student's probabilities resized bilinearly)."""
        import torch
        import torch.nn.functional as F

        from synfoc.data.cache import resize_label
        needed = list(self.students) if self.review or self.kind == AVERAGE else [self.kind]
        mask = np.zeros(images.shape[:3], np.uint8)
        own = {name: np.zeros_like(mask) for name in self.students} if self.review else {}
        for start in range(0, len(images), SLICE_CHUNK):
            probs = {name: self.probabilities(name, images[start:start + SLICE_CHUNK]) for name in needed}
            if self.kind == AVERAGE:
                size = max(p.shape[-1] for p in probs.values())
                chosen = sum(p if p.shape[-1] == size else
                             F.interpolate(p, size=(size, size), mode="bilinear", align_corners=False)
                             for p in probs.values()) / len(probs)
            else:
                chosen = probs[self.kind]
            for out, p in [(mask, chosen), *((own[name], probs[name]) for name in own)]:
                for j, lab in enumerate(p.argmax(dim=1).to(torch.uint8).numpy()):
                    out[start + j] = resize_label(lab, images.shape[1:3])
        return mask, own

    def labels(self, images: np.ndarray) -> np.ndarray:
        """Labels uint8 (N, H, W) of the mask written, at the original size of uint8 images (N, H, W, C)."""
        return self.segment(images)[0]


def student_probabilities(model, images, device, autocast, batch: int = 8):
    """Soft-max probabilities (N, C+1, S, S) on the CPU of a student on uint8 images (N, C, S, S):
    :func:`synfoc.evaluate.predict_labels` before its arg-max."""
    import torch

    from synfoc.evaluate import probability_chunks
    return torch.cat([p.cpu() for p in probability_chunks(model, images, device, autocast, batch)])


def missing_student(run: Path, students: dict, why: str) -> ValueError:
    """The error for a run that lacks a student the command needs (``why`` says what needs it)."""
    missing = [s for s in STUDENTS if s not in students]
    files = ", ".join(str(Path(run) / f"{s}.safetensors") for s in missing)
    return ValueError(f"{why} needs both the unet and the foundation student, but {run} has no "
                      f"{' and no '.join(missing)} student ({files} missing)")


def make_predictor(run: Path, student: str | None = None, device: str = "auto", dataset: str | None = None,
                   slice_axis: int | None = None, review: bool | None = None,
                   threshold: float = REVIEW_THRESHOLD, domain: str | None = None) -> Predictor:
    """Load a run's students. ``student``: the mask written, a student's name or ``average``
    (default: the foundation model when the run has one, else the U-Net). ``review``: also return
    both students' masks (True: required; None: when the run has both students). ``domain``: a
    training domain whose BatchNorm statistics the U-Net uses (default: those of all training
    images together)."""
    return load_predictor(run, student, device, dataset, slice_axis, review, threshold, domain)[0]


def load_predictor(run: Path, student: str | None = None, device: str = "auto", dataset: str | None = None,
                   slice_axis: int | None = None, review: bool | None = None,
                   threshold: float = REVIEW_THRESHOLD,
                   domain: str | None = None) -> tuple[Predictor, object, object]:
    """(:func:`make_predictor`'s predictor, the run's config, its dataset index)."""
    from synfoc.checkpoint import load_run
    cfg, index, students, rt = load_run(Path(run), dataset=dataset, device=device)
    if domain is not None:
        use_domain_statistics(Path(run), students, domain)
    kind = student or ("foundation" if "foundation" in students else "unet")
    both = all(s in students for s in STUDENTS)
    if kind == AVERAGE and not both:
        raise missing_student(run, students, "--student average")
    if kind not in students and kind != AVERAGE:
        raise ValueError(f"{run} has no {kind} student (it has: {', '.join(students)})")
    if review and not both:
        raise missing_student(run, students, f"the review ({REVIEW_FILE})")
    review = both if review is None else review
    check_threshold(threshold)
    axis = slice_axis if slice_axis is not None else int(getattr(index, "slice_axis", 2))
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, not {axis}")
    sizes = {"unet": int(cfg.unet_size), "foundation": int(getattr(students.get("foundation"), "image_size", 0))}
    used = STUDENTS if review or kind == AVERAGE else (kind,)
    predictor = Predictor(kind=kind, students={s: Student(students[s], sizes[s]) for s in used},
                          channels=index.channels, parts=list(index.report_parts), slice_axis=axis,
                          intensity_window=getattr(index, "intensity_window", None),
                          device=rt.device, autocast=rt.autocast, review=review, threshold=threshold)
    return predictor, cfg, index


def use_domain_statistics(run: Path, students: dict, domain: str) -> None:
    """Give the U-Net the BatchNorm statistics of a training domain, as evaluation does on that domain."""
    from synfoc.checkpoint import DOMAIN_STATISTICS, load_domain_statistics
    if "unet" not in students:
        raise ValueError(f"--domain chooses the U-Net's BatchNorm statistics, but {run} has no U-Net student")
    stats = load_domain_statistics(run)
    if not stats:
        raise ValueError(f"--domain {domain}: {run} has no per-domain statistics ({DOMAIN_STATISTICS}; "
                         "runs trained with recalibrate_bn write it)")
    if domain not in stats:
        raise ValueError(f"--domain {domain}: not a training domain of {run} (it has: {', '.join(sorted(stats))})")
    unet = students["unet"]
    unet.load_state_dict({**unet.state_dict(), **stats[domain]})


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--review-threshold must be between 0 and 1 (a Dice agreement), not {threshold}")


# ----------------------------------------------------------------------------- the review

def review_row(own: dict[str, np.ndarray], parts, threshold: float) -> dict:
    """The review of one input from its two students' masks (2D or a whole volume): Dice
    agreement per reported part (1 where neither student predicts the part), ``agreement`` their
    mean, ``flag`` 1 when that is below ``threshold``, and each student's foreground area (pixels
    or voxels with a label above 0) out of ``pixels``."""
    from synfoc.metrics import dice_per_part
    scores = dice_per_part(own["unet"], own["foundation"], parts)
    agreement = float(np.mean(list(scores.values())))
    return {"agreement": agreement, "flag": int(agreement < threshold),
            **{f"agreement_{part}": value for part, value in scores.items()},
            **{f"foreground_{s}": int(np.count_nonzero(own[s])) for s in STUDENTS},
            "pixels": int(own["unet"].size)}


def review_columns(parts) -> list[str]:
    return ["input", "mask", "agreement", "flag", *(f"agreement_{name}" for name, _ in parts),
            *(f"foreground_{s}" for s in STUDENTS), "pixels"]


def write_review(rows: list[dict], parts, path: Path) -> None:
    """``review.csv``: the rows sorted by agreement, lowest (check first) on top."""
    rows = sorted(rows, key=lambda r: r["agreement"])
    columns = review_columns(parts)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)


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

def predict_image_file(predictor: Predictor, path: Path, out: Path, overlay: Path | None
                       ) -> dict[str, np.ndarray]:
    """A 2D image -> a PNG label mask of the image's size (and optionally an overlay PNG).
    Returns the students' own masks when the predictor reviews, else {}."""
    from PIL import Image

    from synfoc.data.io import image_array
    image = image_array(path, predictor.channels)
    labels, own = predictor.segment(image[None])
    label = labels[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(out)
    if overlay is not None:
        write_overlay(image, label, predictor.parts, overlay)
    return {s: m[0] for s, m in own.items()}


def predict_nifti_file(predictor: Predictor, path: Path, out: Path, overlay: Path | None
                       ) -> dict[str, np.ndarray]:
    """A NIfTI volume -> a NIfTI mask with the same shape, affine and header (voxel sizes).
    Returns the students' own masks (slices first) when the predictor reviews, else {}."""
    import nibabel as nib

    from synfoc.data.folder import load_volume
    volume = load_volume(path, True, predictor.intensity_window)
    data = volume.data
    if data.ndim == 2:
        labels, own = predictor.segment(np.repeat(data[None, ..., None], predictor.channels, axis=-1))
        label = labels[0]
        best = data, label
    else:
        axis = predictor.slice_axis
        planes = np.moveaxis(data, axis, 0)  # (slices, rest...) in the order training used
        images = np.repeat(planes[..., None], predictor.channels, axis=-1)
        labels, own = predictor.segment(images)
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
    return own


def write_overlay(image: np.ndarray, label: np.ndarray, parts, path: Path) -> None:
    """The image with the contour of each predicted part in its colour (as in the report)."""
    from PIL import Image

    from synfoc.figures import overlay_contours
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay_contours(image, label, parts)).save(path)


# ----------------------------------------------------------------------------- the batch

def predict_inputs(predictor: Predictor, source: Path, output: Path, overlay: bool = False,
                   progress: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Segment every input under ``source`` into ``output``; (written files, [(skipped file, why)]).
    An input that cannot be read is reported on stderr and skipped; a mask that cannot be written
    (full disk, unwritable folder) stops everything with one :class:`ValueError`, since every
    further input would fail the same way. A reviewing predictor also writes
    ``output/review.csv`` (:func:`review_row`, one row per segmented input)."""
    from tqdm import tqdm

    from synfoc.data.base import DataError
    from synfoc.data.io import FileDataError
    inputs = list_inputs(source, output)
    written, skipped, reviews = [], [], []
    bar = tqdm(list(zip(inputs, output_names(inputs))), desc=f"predict ({predictor.kind})", unit="file",
               disable=not progress, dynamic_ncols=True)
    for (path, _), name in bar:
        target = output / name
        over = output / overlay_name(name) if overlay else None
        try:
            predict_file = predict_nifti_file if is_nifti(path) else predict_image_file
            own = predict_file(predictor, path, target, over)
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
        if own:
            reviews.append({"input": str(path), "mask": name.as_posix(),
                            **review_row(own, predictor.parts, predictor.threshold)})
    if predictor.review:
        try:
            write_review(reviews, predictor.parts, output / REVIEW_FILE)
        except OSError as exc:
            from synfoc.errors import os_error_message
            raise ValueError(f"--output {output}: {os_error_message(exc)}; the {len(written)} mask(s) were "
                             f"written, {REVIEW_FILE} was not") from None
    return written, skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from synfoc.config import CHOICES
    parser.add_argument("--run", required=True, help="a run folder made by 'synfoc train --out RUN'")
    parser.add_argument("--input", "-i", required=True,
                        help="an image (PNG, JPEG, TIFF, BMP), a NIfTI volume (.nii, .nii.gz) or a folder of them")
    parser.add_argument("--output", "-o", required=True, help="folder for the masks (created when missing)")
    parser.add_argument("--student", choices=["foundation", "unet", AVERAGE],
                        help="which mask is written: a student's, or 'average' (the mean of both students' "
                        "probabilities; needs both). Default: foundation when the run has it, else unet")
    review = parser.add_mutually_exclusive_group()
    review.add_argument("--review", action="store_true", default=None,
                        help=f"write OUTPUT/{REVIEW_FILE}: per input the two students' Dice agreement per "
                        "class or region, their foreground areas and a flag (default: whenever the run has "
                        "both students; with --review a missing student is an error)")
    review.add_argument("--no-review", dest="review", action="store_false",
                        help=f"no {REVIEW_FILE} (runs only the student that writes the mask)")
    parser.add_argument("--review-threshold", type=float, default=REVIEW_THRESHOLD, metavar="T",
                        help=f"flag inputs whose agreement (mean Dice over the parts) is below T "
                        f"(default {REVIEW_THRESHOLD})")
    parser.add_argument("--domain", metavar="NAME",
                        help="the training domain (site, scanner) the inputs come from: the U-Net then "
                        "normalises with that domain's BatchNorm statistics, as the evaluation does "
                        "(default: the statistics of all training images together)")
    parser.add_argument("--overlay", action="store_true",
                        help=f"also write OUTPUT/{OVERLAY_DIR}/NAME.png: the image with coloured prediction contours")
    parser.add_argument("--device", choices=CHOICES["device"], default="auto",
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
    check_threshold(args.review_threshold)
    predictor = make_predictor(Path(args.run), args.student, args.device, args.dataset, args.slice_axis,
                               args.review, args.review_threshold, args.domain)
    written, skipped = predict_inputs(predictor, source, output, overlay=args.overlay,
                                      progress=not args.no_progress)
    by = "as the average of both students" if predictor.kind == AVERAGE else f"by the {predictor.kind} student"
    print(f"{len(written)} mask(s) written to {output} {by}"
          + (f"; {len(skipped)} input(s) skipped (see above)" if skipped else ""))
    if predictor.review:
        with (output / REVIEW_FILE).open(newline="") as fh:
            flagged = sum(row["flag"] == "1" for row in csv.DictReader(fh))
        print(f"review: {output / REVIEW_FILE}, lowest agreement first; {flagged} of {len(written)} input(s) "
              f"flagged (the students agree below {args.review_threshold})")
    elif args.review is None:
        print(f"no {REVIEW_FILE}: the run has only the {predictor.kind} student")
    if "unet" in predictor.students and args.domain is None:
        from synfoc.checkpoint import load_domain_statistics
        domains = sorted(load_domain_statistics(Path(args.run)))
        if domains:
            print(f"the U-Net normalised with the BatchNorm statistics of all training images together; if the "
                  f"inputs come from one training domain, --domain NAME uses that domain's ({', '.join(domains)}), "
                  "as the evaluation does")
    return 1 if skipped else 0

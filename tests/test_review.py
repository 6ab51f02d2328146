"""``synfoc predict``'s review of each input by the two students: agreement per part against numpy
Dice of the students' own masks, the flag threshold, the three mask choices and missing students.

Fixed "students" whose answers are known (thresholds of the mean intensity, three classes) stand in
for trained ones, at different input sizes so that each student's mask goes through its own
resizing; the command line is checked on the tiny runs of conftest.py.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from synfoc import predict

PARTS = [("disc", (1, 2)), ("cup", (2,))]
CUTS = {"unet": (0.30, 0.60), "foundation": (0.36, 0.72)}  # (rim from, cup from) in mean intensity


class Cuts(nn.Module):
    """Label 0 below ``low``, 1 from ``low``, 2 from ``high`` (mean intensity), as soft logits."""

    def __init__(self, low: float, high: float, sharp: float = 12.0) -> None:
        super().__init__()
        self.low, self.high, self.sharp = low, high, sharp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=1, keepdim=True)
        s = self.sharp
        return torch.cat([torch.zeros_like(m), s * (m - self.low), s * (2 * m - self.low - self.high)], dim=1)


def numpy_probabilities(image: np.ndarray, low: float, high: float, sharp: float = 12.0) -> np.ndarray:
    """Cuts' soft-max, independently, for an image at the student's input size: (3, H, W)."""
    m = image.astype(np.float64) / 255
    logits = np.stack([np.zeros_like(m), sharp * (m - low), sharp * (2 * m - low - high)])
    e = np.exp(logits - logits.max(axis=0))
    return e / e.sum(axis=0)


def fake_predictor(kind: str, review: bool, threshold: float = 0.5, sizes=(48, 64)) -> predict.Predictor:
    students = {name: predict.Student(Cuts(*CUTS[name]), size) for name, size in zip(("unet", "foundation"), sizes)}
    return predict.Predictor(kind=kind, students=students, channels=1, parts=PARTS, slice_axis=2,
                             intensity_window=None, device=torch.device("cpu"), autocast=contextlib.nullcontext,
                             review=review, threshold=threshold)


def blob(rng: np.random.Generator, shape, peak: float) -> np.ndarray:
    """A bright smooth blob (peak intensity ``peak`` of 255) on a dark background."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    cy, cx = rng.uniform(0.3, 0.7) * shape[0], rng.uniform(0.3, 0.7) * shape[1]
    r = rng.uniform(0.15, 0.3) * min(shape)
    return (peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))).round().astype(np.uint8)


def make_inputs(folder: Path) -> list[str]:
    """Non-square PNGs from hard (faint, the students disagree) to easy, an empty one, a volume."""
    rng = np.random.default_rng(11)
    folder.mkdir(parents=True)
    names = []
    for k, peak in enumerate((90, 110, 140, 170, 200, 250)):
        Image.fromarray(blob(rng, (50 + 7 * k, 70), peak)).save(folder / f"img{k}.png")
        names.append(f"img{k}.png")
    Image.fromarray(np.full((40, 60), 10, np.uint8)).save(folder / "dark.png")  # neither finds anything
    volume = np.stack([blob(rng, (40, 44), p) for p in (120, 180, 240)], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "vol.nii.gz")
    return names + ["dark.png", "vol.nii.gz"]


def read_mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj) if path.name.endswith(".nii.gz") else np.asarray(Image.open(path))


def read_review(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# ----------------------------------------------------------------------------- agreement and flag

@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """Masks of each student alone, and a reviewed prediction (the foundation model's mask)."""
    base = tmp_path_factory.mktemp("review")
    names = make_inputs(base / "in")
    for kind in ("unet", "foundation"):
        written, skipped = predict.predict_inputs(fake_predictor(kind, review=False), base / "in", base / kind,
                                                  progress=False)
        assert not skipped and not (base / kind / predict.REVIEW_FILE).exists()
    written, skipped = predict.predict_inputs(fake_predictor("foundation", review=True), base / "in",
                                              base / "both", progress=False)
    assert not skipped and len(written) == len(names)
    return base, names


def test_agreement_is_the_dice_of_the_students_masks(reviewed):
    base, names = reviewed
    rows = read_review(base / "both" / predict.REVIEW_FILE)
    assert list(rows[0]) == ["input", "mask", "agreement", "flag", "agreement_disc", "agreement_cup",
                             "foreground_unet", "foreground_foundation", "pixels"]
    assert sorted(Path(r["input"]).name for r in rows) == sorted(names)
    for row in rows:
        unet, foundation = read_mask(base / "unet" / row["mask"]), read_mask(base / "foundation" / row["mask"])
        want = {part: numpy_dice(np.isin(unet, values), np.isin(foundation, values)) for part, values in PARTS}
        for part in want:
            assert float(row[f"agreement_{part}"]) == pytest.approx(want[part], abs=1e-6), (row["mask"], part)
        assert float(row["agreement"]) == pytest.approx(np.mean(list(want.values())), abs=1e-6)
        assert int(row["foreground_unet"]) == np.count_nonzero(unet)
        assert int(row["foreground_foundation"]) == np.count_nonzero(foundation)
        assert int(row["pixels"]) == unet.size
        # the mask written is the foundation student's, the review changes nothing about it
        np.testing.assert_array_equal(read_mask(base / "both" / row["mask"]), foundation)
    by_name = {r["mask"]: r for r in rows}
    assert float(by_name["dark.png"]["agreement"]) == 1.0 and int(by_name["dark.png"]["foreground_unet"]) == 0
    agreements = [float(r["agreement"]) for r in rows]
    assert agreements == sorted(agreements)  # lowest first: what to check first
    assert agreements[0] < 0.5 < agreements[-2]  # the faint blobs split the students, the bright ones less


def test_flag_follows_the_threshold(reviewed, tmp_path):
    base, _ = reviewed
    agreements = sorted(float(r["agreement"]) for r in read_review(base / "both" / predict.REVIEW_FILE))
    assert [int(r["flag"]) for r in read_review(base / "both" / predict.REVIEW_FILE)] == \
        [int(a < predict.REVIEW_THRESHOLD) for a in agreements]
    threshold = (agreements[2] + agreements[3]) / 2
    predict.predict_inputs(fake_predictor("unet", review=True, threshold=threshold), base / "in", tmp_path / "o",
                           progress=False)
    rows = read_review(tmp_path / "o" / predict.REVIEW_FILE)
    assert [int(r["flag"]) for r in rows] == [1, 1, 1] + [0] * (len(rows) - 3)


# ----------------------------------------------------------------------------- the mask choices

def test_the_three_masks(tmp_path):
    rng = np.random.default_rng(5)
    image = np.clip(blob(rng, (64, 64), 230).astype(int) + rng.integers(0, 30, (64, 64)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    probs = {name: numpy_probabilities(image, *CUTS[name]) for name in CUTS}
    want = {"unet": probs["unet"].argmax(axis=0), "foundation": probs["foundation"].argmax(axis=0),
            "average": ((probs["unet"] + probs["foundation"]) / 2).argmax(axis=0)}
    got = {}
    for kind in want:  # both students at the image's size: no resizing, the numpy answer is exact
        predict.predict_inputs(fake_predictor(kind, review=False, sizes=(64, 64)), tmp_path / "a.png",
                               tmp_path / kind, progress=False)
        got[kind] = read_mask(tmp_path / kind / "a.png")
        np.testing.assert_array_equal(got[kind], want[kind], err_msg=kind)
    # the average is neither student's mask
    assert (got["average"] != got["unet"]).any() and (got["average"] != got["foundation"]).any()
    assert {0, 1, 2} <= set(np.unique(got["average"]).tolist())


# ----------------------------------------------------------------------------- the command line

def run_verb(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    return predict.main(parser.parse_args(argv))


@pytest.fixture(scope="module")
def runs(unet_run, two_student_run):
    return unet_run, two_student_run


def test_missing_student_is_named(runs, tmp_path, capsys):
    unet_only, _ = runs
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    common = ["--run", str(unet_only), "--input", str(tmp_path / "a.png"), "--device", "cpu", "--no-progress"]
    for extra, what in ((["--student", "average"], "--student average"), (["--review"], "review.csv")):
        with pytest.raises(ValueError) as err:
            run_verb([*common, "--output", str(tmp_path / "o"), *extra])
        message = str(err.value)
        assert what in message and str(unet_only / "foundation.safetensors") in message, message
        assert "no foundation student" in message
    # by default a one-student run writes its masks and says why there is no review
    assert run_verb([*common, "--output", str(tmp_path / "p")]) == 0
    assert not (tmp_path / "p" / predict.REVIEW_FILE).exists()
    assert "no review.csv: the run has only the unet student" in capsys.readouterr().out


def test_threshold_outside_zero_one_is_named(runs, tmp_path):
    _, both = runs
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"--review-threshold .* not 1\.5"):
        run_verb(["--run", str(both), "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "o"),
                  "--review-threshold", "1.5"])


def test_cli_review_of_a_two_student_run(runs, tmp_path, capsys):
    _, both = runs
    rng = np.random.default_rng(9)
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + k, 30), dtype=np.uint8)).save(src / f"x{k}.png")
    common = ["--run", str(both), "--input", str(src), "--device", "cpu", "--no-progress"]
    assert run_verb([*common, "--output", str(tmp_path / "r")]) == 0
    assert "review: " in capsys.readouterr().out
    for kind in ("unet", "foundation"):
        assert run_verb([*common, "--output", str(tmp_path / kind), "--student", kind, "--no-review"]) == 0
        assert not (tmp_path / kind / predict.REVIEW_FILE).exists()
    assert run_verb([*common, "--output", str(tmp_path / "avg"), "--student", "average"]) == 0
    rows = read_review(tmp_path / "r" / predict.REVIEW_FILE)
    assert len(rows) == 3 and list(rows[0])[4] == "agreement_lesion"
    for row in rows:
        unet, foundation = read_mask(tmp_path / "unet" / row["mask"]), read_mask(tmp_path / "foundation" / row["mask"])
        assert float(row["agreement_lesion"]) == pytest.approx(numpy_dice(unet > 0, foundation > 0), abs=1e-6)
        np.testing.assert_array_equal(read_mask(tmp_path / "r" / row["mask"]), foundation)  # the default mask
        assert read_mask(tmp_path / "avg" / row["mask"]).shape == unet.shape
    assert read_review(tmp_path / "avg" / predict.REVIEW_FILE) == rows  # the review does not depend on the mask

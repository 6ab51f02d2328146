"""``synfoc predict``: sizes, label values, folders, unreadable inputs and NIfTI geometry.

A tiny run (U-Net only, 2 iterations on the embedded synthetic set; conftest.py) is trained once per
session and shared with other modules. Geometry is checked with a
fixed thresholding "model" whose right answer is known, so that a transposed, flipped or shifted
mapping back to the original size would fail.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from synfoc import predict

@pytest.fixture(scope="module")
def run(unet_run) -> Path:
    return unet_run


def run_verb(argv: list[str]) -> int:
    """The verb as the CLI wires it: the module's own arguments, then its main."""
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    return predict.main(parser.parse_args(argv))


def label_set(run: Path) -> set[int]:
    from synfoc.evaluate import load_run
    _, index, _, _ = load_run(run, device="cpu")
    return set(range(index.num_classes + 1))


class Threshold(nn.Module):
    """Foreground where the mean intensity exceeds one half: a model whose answer is known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=1, keepdim=True)
        return torch.cat([0.5 - m, m - 0.5], dim=1) * 20


def threshold_predictor(axis: int = 2, size: int = 64) -> predict.Predictor:
    return predict.Predictor(kind="unet", students={"unet": predict.Student(Threshold(), size)}, channels=1,
                             parts=[("fg", (1,))], slice_axis=axis, intensity_window=None,
                             device=torch.device("cpu"), autocast=contextlib.nullcontext)


# ----------------------------------------------------------------------------- 2D images

def test_png_mask_has_original_size_and_label_values(run, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)).save(src / "wide.png")
    Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(src / "tall_rgb.jpg")
    assert run_verb(["--run", str(run), "--input", str(src / "wide.png"), "--output", str(tmp_path / "o1"),
                     "--device", "cpu", "--no-progress"]) == 0
    mask = np.asarray(Image.open(tmp_path / "o1" / "wide.png"))
    assert mask.shape == (70, 90) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= label_set(run)
    assert run_verb(["--run", str(run), "--input", str(src / "tall_rgb.jpg"), "--output", str(tmp_path / "o2"),
                     "--device", "cpu", "--no-progress"]) == 0
    assert np.asarray(Image.open(tmp_path / "o2" / "tall_rgb.png")).shape == (90, 70)


def test_prediction_maps_back_to_the_original_geometry(tmp_path):
    # a bright off-centre rectangle in a non-square image: the known answer is the rectangle
    image = np.full((70, 90), 20, np.uint8)
    image[10:40, 55:85] = 230
    Image.fromarray(image).save(tmp_path / "rect.png")
    written, skipped = predict.predict_inputs(threshold_predictor(), tmp_path / "rect.png", tmp_path / "out",
                                              progress=False)
    assert not skipped and written == [tmp_path / "out" / "rect.png"]
    mask = np.asarray(Image.open(written[0]))
    truth = image > 127
    assert mask.shape == truth.shape
    # resizing to 64 and back moves the edge by at most about a pixel
    assert np.mean((mask == 1) == truth) > 0.97
    inter, union = np.sum((mask == 1) & truth), np.sum((mask == 1) | truth)
    assert inter / union > 0.9


def test_folder_in_folder_out_and_unreadable_file_skipped(run, tmp_path, capsys):
    rng = np.random.default_rng(1)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(src / "sub" / "b.tif")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (src / "notes.txt").write_text("not an input")
    out = tmp_path / "out"
    rc = run_verb(["--run", str(run), "--input", str(src), "--output", str(out), "--overlay",
                   "--device", "cpu", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert str(src / "broken.png") in err and "unreadable" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "a.png", "overlays/a.png", "overlays/sub/b.png", "sub/b.png"]
    assert np.asarray(Image.open(out / "sub" / "b.png")).shape == (40, 50)
    overlay = np.asarray(Image.open(out / "overlays" / "a.png"))
    assert overlay.shape == (70, 90, 3)


def test_all_readable_gives_exit_code_zero_and_collisions_keep_full_names(run, tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(src / "x.png")
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(src / "x.bmp")
    out = tmp_path / "out"
    assert run_verb(["--run", str(run), "--input", str(src), "--output", str(out), "--device", "cpu",
                     "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x.bmp.png", "x.png.png"]


def test_missing_student_is_a_clear_error(run, tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="no foundation student"):
        run_verb(["--run", str(run), "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "o"),
                  "--student", "foundation", "--device", "cpu"])


def test_default_student_is_the_foundation_model(run, two_student_run):
    from synfoc.config import run_config
    both, sizes = two_student_run, run_config(two_student_run)
    foundation = predict.make_predictor(both, device="cpu")
    assert foundation.kind == "foundation" and foundation.students["foundation"].input_size == sizes.image_size
    unet = predict.make_predictor(run, device="cpu")  # a run without a foundation student
    assert unet.kind == "unet" and unet.students["unet"].input_size == sizes.unet_size


def test_domain_chooses_the_unets_batchnorm_statistics(run, tmp_path):
    """A run writes the U-Net's statistics per training domain; ``--domain`` puts that domain's
    into the U-Net, an unknown domain is an error naming the known ones."""
    from safetensors.torch import load_file
    stored = load_file(str(run / "unet_domains.safetensors"))
    assert {k.split("/")[0] for k in stored} == {"siteA", "siteB", "siteC"}
    predictor = predict.make_predictor(run, device="cpu", domain="siteB")
    buffers = dict(predictor.students["unet"].model.named_buffers())
    for key, value in stored.items():
        if key.startswith("siteB/"):
            torch.testing.assert_close(buffers[key.partition("/")[2]], value)
    with pytest.raises(ValueError, match="not a training domain.*siteA, siteB, siteC"):
        predict.make_predictor(run, device="cpu", domain="siteZ")
    older = tmp_path / "older"
    shutil.copytree(run, older)
    (older / "unet_domains.safetensors").unlink()
    with pytest.raises(ValueError, match="no per-domain statistics.*unet_domains.safetensors"):
        predict.make_predictor(older, device="cpu", domain="siteB")


def test_cli_wiring(run, tmp_path, capsys):
    from synfoc.cli import main
    Image.fromarray(np.zeros((12, 9), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", "--run", str(run), "--input", str(tmp_path / "a.png"), "--output",
                 str(tmp_path / "o"), "--device", "cpu", "--no-progress"]) == 0
    assert np.asarray(Image.open(tmp_path / "o" / "a.png")).shape == (12, 9)
    assert "--domain NAME uses that domain's (siteA, siteB, siteC)" in capsys.readouterr().out
    assert main(["predict", "--run", str(run), "--input", str(tmp_path / "a.png"), "--output",
                 str(tmp_path / "o2"), "--device", "cpu", "--no-progress", "--domain", "siteA"]) == 0
    assert "--domain NAME" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- NIfTI

def oblique_affine() -> np.ndarray:
    """Voxel sizes 0.7 x 0.8 x 2.5 mm, rotated 20 degrees about z, translated."""
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [-12.5, 30.0, 7.25]
    return affine


def test_nifti_round_trip_keeps_shape_affine_and_spacing(run, tmp_path):
    rng = np.random.default_rng(3)
    volume = rng.normal(300, 80, (30, 40, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, oblique_affine()), tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    assert run_verb(["--run", str(run), "--input", str(tmp_path / "ct.nii.gz"), "--output", str(out),
                     "--overlay", "--device", "cpu", "--no-progress"]) == 0
    result = nib.load(out / "ct.nii.gz")
    assert result.shape == (30, 40, 5)
    np.testing.assert_allclose(result.affine, oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(result.header.get_zooms(), (0.7, 0.8, 2.5), atol=1e-6)
    data = np.asarray(result.dataobj)
    assert np.issubdtype(data.dtype, np.integer)
    assert set(np.unique(data).tolist()) <= label_set(run)
    assert (out / "overlays" / "ct.png").is_file()


@pytest.mark.parametrize("axis", [0, 2])
def test_nifti_slices_along_the_slice_axis(tmp_path, axis):
    # each slice has its own rectangle (so slices cannot be mixed up) in a float volume whose
    # intensities need scaling to 0..255, as training reads volumes
    rng = np.random.default_rng(4)
    shape = (20, 24, 28)
    truth = np.zeros(shape, bool)
    for k in range(shape[axis]):
        plane = np.take(truth, k, axis=axis).copy()
        r, c = 2 + (k % 5), 3 + (k * 3) % 9
        plane[r:r + 8, c:c + 10] = True
        index = [slice(None)] * 3
        index[axis] = k
        truth[tuple(index)] = plane
    volume = (1000 + 800 * truth + rng.normal(0, 5, shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, oblique_affine()), tmp_path / "v.nii")
    written, skipped = predict.predict_inputs(threshold_predictor(axis), tmp_path / "v.nii", tmp_path / "out",
                                              progress=False)
    assert not skipped and written[0].name == "v.nii"
    mask = np.asarray(nib.load(written[0]).dataobj)
    assert mask.shape == shape
    assert np.mean((mask == 1) == truth) > 0.97
    assert np.sum((mask == 1) & truth) / np.sum((mask == 1) | truth) > 0.85


def test_truncated_nifti_is_skipped(tmp_path, capsys):
    good = np.zeros((16, 16, 3), np.float32)
    good[4:10, 4:10] = 1
    nib.save(nib.Nifti1Image(good, np.eye(4)), tmp_path / "good.nii.gz")
    data = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    written, skipped = predict.predict_inputs(threshold_predictor(), tmp_path, tmp_path / "out", progress=False)
    assert [p.name for p in written] == ["good.nii.gz"]
    assert [p.name for p, _ in skipped] == ["cut.nii.gz"]
    assert "cut.nii.gz" in capsys.readouterr().err

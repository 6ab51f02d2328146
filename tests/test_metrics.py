"""synfoc.metrics against medpy.metric.binary (the reference) and the documented empty rules."""

from __future__ import annotations

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy.ndimage import binary_erosion, gaussian_filter, generate_binary_structure

from synfoc.metrics import (
    batch_binary_metrics,
    batch_multiclass_metrics,
    binary_metrics,
    multiclass_metrics,
    surface,
)

TOLERANCE = 1e-6
FUNDUS_PARTS = [("cup", (1,)), ("disc", (1, 2))]


def blob_mask(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float, level: float
) -> np.ndarray:
    """Blob-like mask (one or several organs, sometimes holes): thresholded smoothed noise."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=sigma)
    return field > level * field.std()


def perturbed(rng: np.random.Generator, mask: np.ndarray, sigma: float) -> np.ndarray:
    """A prediction-like copy of ``mask`` with a noisy boundary and some stray blobs."""
    noise = gaussian_filter(rng.standard_normal(mask.shape), sigma=sigma)
    smooth = gaussian_filter(mask.astype(float), sigma=sigma / 2)
    return smooth + 2.0 * noise / noise.std() * 0.15 > 0.5


def medpy_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing=None, connectivity: int = 1
) -> dict[str, float]:
    """The reference numbers (defined only when both masks are non-empty)."""
    return {
        "dice": medpy_binary.dc(pred, gt),
        "jaccard": medpy_binary.jc(pred, gt),
        "hd95": medpy_binary.hd95(pred, gt, voxelspacing=spacing, connectivity=connectivity),
        "asd": medpy_binary.asd(pred, gt, voxelspacing=spacing, connectivity=connectivity),
    }


def assert_close(ours: dict[str, float], reference: dict[str, float]) -> None:
    assert set(ours) == {"dice", "jaccard", "hd95", "asd"}
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=TOLERANCE), key


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [None, (0.5, 1.3)])
def test_2d_blobs_match_medpy(seed: int, spacing) -> None:
    rng = np.random.default_rng(seed)
    gt = blob_mask(rng, (96, 80), sigma=6, level=0.8)
    pred = perturbed(rng, gt, sigma=3)
    assert gt.any() and pred.any()
    assert_close(binary_metrics(pred, gt, spacing=spacing), medpy_metrics(pred, gt, spacing))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("spacing", [None, (2.5, 0.7, 0.7)])
def test_3d_blobs_match_medpy_with_anisotropic_spacing(seed: int, spacing) -> None:
    rng = np.random.default_rng(100 + seed)
    gt = blob_mask(rng, (12, 40, 44), sigma=(1.5, 5, 5), level=0.9)
    pred = perturbed(rng, gt, sigma=2)
    assert gt.any() and pred.any()
    assert_close(binary_metrics(pred, gt, spacing=spacing), medpy_metrics(pred, gt, spacing))


def test_asd_is_directed_from_pred_to_gt() -> None:
    # A big gt and a small pred inside it: pred->gt distances differ from gt->pred ones.
    gt = np.zeros((40, 40), bool)
    gt[5:35, 5:35] = True
    pred = np.zeros_like(gt)
    pred[18:22, 18:22] = True
    ours = binary_metrics(pred, gt)
    assert ours["asd"] == pytest.approx(medpy_binary.asd(pred, gt), abs=TOLERANCE)
    assert ours["asd"] != pytest.approx(medpy_binary.asd(gt, pred), abs=1e-3)


def test_connectivity_2_matches_medpy() -> None:
    rng = np.random.default_rng(7)
    gt = blob_mask(rng, (64, 64), sigma=5, level=0.7)
    pred = perturbed(rng, gt, sigma=3)
    assert_close(binary_metrics(pred, gt, connectivity=2), medpy_metrics(pred, gt, connectivity=2))


@pytest.mark.parametrize(
    "pred_pixel, gt_pixel", [((3, 4), (3, 4)), ((0, 0), (9, 9)), ((5, 2), (1, 7))]
)
def test_single_pixels_match_medpy(pred_pixel, gt_pixel) -> None:
    pred = np.zeros((10, 10), bool)
    gt = np.zeros((10, 10), bool)
    pred[pred_pixel] = True
    gt[gt_pixel] = True
    assert_close(binary_metrics(pred, gt, spacing=(1.5, 0.5)), medpy_metrics(pred, gt, (1.5, 0.5)))


def test_masks_touching_the_image_border_match_medpy() -> None:
    # Outside the image is background: border rows/columns are surface in both implementations.
    gt = np.zeros((30, 30), bool)
    gt[:, :12] = True  # touches three borders
    pred = np.ones((30, 30), bool)  # the whole image
    pred[10:20, 20:] = False
    assert_close(binary_metrics(pred, gt), medpy_metrics(pred, gt))
    full = np.ones((30, 30), bool)
    assert_close(binary_metrics(full, gt), medpy_metrics(full, gt))


def test_zero_one_integer_input_equals_boolean() -> None:
    rng = np.random.default_rng(3)
    gt = blob_mask(rng, (50, 50), sigma=4, level=0.6)
    pred = perturbed(rng, gt, sigma=2)
    assert binary_metrics(pred.astype(np.uint8), gt.astype(np.int64)) == binary_metrics(pred, gt)


def test_surface_is_medpy_border() -> None:
    rng = np.random.default_rng(11)
    for shape, connectivity in [((40, 50), 1), ((40, 50), 2), ((8, 20, 20), 1), ((8, 20, 20), 3)]:
        mask = blob_mask(rng, shape, sigma=3, level=0.3)
        footprint = generate_binary_structure(mask.ndim, connectivity)
        expected = mask ^ binary_erosion(mask, structure=footprint, iterations=1)
        np.testing.assert_array_equal(surface(mask, connectivity), expected)


# --- undefined cases: the documented rules -------------------------------------------------


def test_empty_prediction_uses_empty_distance() -> None:
    gt = np.zeros((20, 20), bool)
    gt[5:9, 5:9] = True
    empty = np.zeros_like(gt)
    assert binary_metrics(empty, gt) == {"dice": 0.0, "jaccard": 0.0, "hd95": 100.0, "asd": 100.0}
    assert binary_metrics(empty, gt, empty_distance=42.5)["hd95"] == 42.5
    # Dice and Jaccard still agree with medpy, which is defined there for overlap metrics.
    assert medpy_binary.dc(empty, gt) == 0.0 and medpy_binary.jc(empty, gt) == 0.0


def test_empty_ground_truth_uses_empty_distance() -> None:
    pred = np.zeros((20, 20), bool)
    pred[2, 3] = True
    empty = np.zeros_like(pred)
    assert binary_metrics(pred, empty, empty_distance=7.0) == {
        "dice": 0.0,
        "jaccard": 0.0,
        "hd95": 7.0,
        "asd": 7.0,
    }
    with pytest.raises(RuntimeError):  # why we need our own rule
        medpy_binary.hd95(pred, empty)


def test_both_empty_is_a_perfect_score() -> None:
    empty = np.zeros((6, 7, 8), bool)
    assert binary_metrics(empty, empty) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_bad_inputs_raise_value_error() -> None:
    mask = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(mask, np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(mask, mask, spacing=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(mask, mask, spacing=(1.0, -2.0))
    with pytest.raises(ValueError, match="connectivity"):
        binary_metrics(mask, mask, connectivity=3)
    with pytest.raises(ValueError, match="N, H, W"):
        batch_binary_metrics(mask, mask)


# --- batched path -------------------------------------------------------------------------


def slice_stack(seed: int, count: int = 10, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(preds, gts) with blob slices plus empty-pred, empty-gt, both-empty and border slices."""
    rng = np.random.default_rng(seed)
    gts = np.stack([blob_mask(rng, (size, size), sigma=5, level=0.9) for _ in range(count)])
    preds = np.stack([perturbed(rng, gt, sigma=3) for gt in gts])
    preds[1] = False
    gts[2] = False
    preds[3] = gts[3] = False
    gts[4, :, :5] = True  # touches the border
    preds[5] = False
    preds[5, 0, size - 1] = True  # a single corner pixel
    return preds, gts


@pytest.mark.parametrize("spacing", [None, (0.8, 1.7)])
def test_batch_equals_per_slice_and_medpy(spacing) -> None:
    preds, gts = slice_stack(seed=21)
    batch = batch_binary_metrics(preds, gts, spacing=spacing, empty_distance=55.0)
    assert len(batch) == len(preds)
    for pred, gt, result in zip(preds, gts, batch):
        assert result == binary_metrics(pred, gt, spacing=spacing, empty_distance=55.0)
        if pred.any() and gt.any():
            assert_close(result, medpy_metrics(pred, gt, spacing))
    assert batch[1]["hd95"] == 55.0 and batch[2]["asd"] == 55.0
    assert batch[3] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_batch_slices_do_not_see_each_other() -> None:
    # A full slice next to a one-pixel slice: a 3D erosion would leak between them.
    preds = np.zeros((3, 16, 16), bool)
    gts = np.zeros((3, 16, 16), bool)
    preds[0] = gts[0] = True
    preds[1, 8, 8] = gts[1, 4, 4] = True
    preds[2] = True
    gts[2, 3:6, 3:6] = True
    for pred, gt, result in zip(preds, gts, batch_binary_metrics(preds, gts)):
        assert_close(result, medpy_metrics(pred, gt))


# --- multiclass parts ---------------------------------------------------------------------


def fundus_labels(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """0 background, 1 optic cup, 2 disc rim (cup inside the disc), with boundary noise."""
    rows, cols = np.mgrid[0:size, 0:size]
    centre = rng.uniform(0.35, 0.65, size=2) * size
    wobble = gaussian_filter(rng.standard_normal((size, size)), sigma=3) * 6
    radius = np.hypot(rows - centre[0], cols - centre[1]) + wobble
    labels = np.zeros((size, size), np.uint8)
    labels[radius < size * rng.uniform(0.2, 0.3)] = 2
    labels[radius < size * rng.uniform(0.08, 0.15)] = 1
    return labels


def test_multiclass_fundus_disc_is_cup_union_rim() -> None:
    rng = np.random.default_rng(5)
    gt = fundus_labels(rng)
    pred = fundus_labels(rng)
    ours = multiclass_metrics(pred, gt, FUNDUS_PARTS, spacing=(0.9, 1.1))
    assert list(ours) == ["cup", "disc"]
    assert_close(ours["cup"], medpy_metrics(pred == 1, gt == 1, (0.9, 1.1)))
    assert_close(ours["disc"], medpy_metrics(pred > 0, gt > 0, (0.9, 1.1)))
    # The merged part is not just one of its classes.
    assert ours["disc"]["dice"] != pytest.approx(binary_metrics(pred == 2, gt == 2)["dice"])


def test_batch_multiclass_equals_per_slice() -> None:
    rng = np.random.default_rng(9)
    gts = np.stack([fundus_labels(rng) for _ in range(5)])
    preds = np.stack([fundus_labels(rng) for _ in range(5)])
    preds[2][preds[2] == 1] = 2  # no cup predicted on slice 2: the empty rule applies
    batch = batch_multiclass_metrics(preds, gts, FUNDUS_PARTS, empty_distance=100.0)
    for pred, gt, result in zip(preds, gts, batch):
        assert result == multiclass_metrics(pred, gt, FUNDUS_PARTS)
    assert batch[2]["cup"] == {"dice": 0.0, "jaccard": 0.0, "hd95": 100.0, "asd": 100.0}


def test_parts_are_validated() -> None:
    labels = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="unique"):
        multiclass_metrics(labels, labels, [("a", (1,)), ("a", (2,))])
    with pytest.raises(ValueError, match="no label values"):
        multiclass_metrics(labels, labels, [("a", ())])

"""The weak and strong views against an independent computation of the reference formulas.

The reference script augments a 512 x 512 copy of every image: elastic deformation with a U(-1, 1)
value per pixel smoothed by a Gaussian of sigma 0.08 S and scaled by alpha = 2 S, and a blur of
sigma ~ U(0.1, 2) pixels of that image (method-spec section 3). Here the same formulas are computed
with numpy/scipy at full resolution, and synfoc's views at other sizes must match them relative to
the image side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from synfoc.augment import AugmentConfig, StrongParams, draw_strong, elastic_field, strong, warp, weak_grid

REF = 512


def reference_displacement_std(draws: int, seed: int = 0) -> float:
    """Per-axis std of the reference elastic displacement, as a fraction of the side."""
    rng = np.random.default_rng(seed)
    fields = [gaussian_filter(rng.uniform(-1, 1, (REF, REF)), 0.08 * REF) * 2 * REF for _ in range(draws)]
    return float(np.std(fields)) / REF


@pytest.fixture(scope="module")
def reference_std() -> float:
    return reference_displacement_std(16)


@pytest.mark.parametrize("size", [128, 256, 512])
def test_elastic_displacement_matches_the_reference_relative_to_the_side(size, reference_std):
    g = torch.Generator().manual_seed(1)
    field = elastic_field(48, size, AugmentConfig(), g)       # normalised units: 2 per side
    per_axis = (field.std(dim=(0, 2, 3)) / 2).tolist()          # fraction of the side, x and y
    for std in per_axis:
        assert abs(std / reference_std - 1) < 0.10, (size, per_axis, reference_std)
    # and the reference really is small: under 1% of the side (about 4 px at 512)
    assert reference_std < 0.01


@pytest.mark.parametrize("size", [128, 512])
def test_elastic_deformation_never_folds(size):
    """The map x -> x + d(x) keeps a positive Jacobian determinant at every pixel of every draw."""
    g = torch.Generator().manual_seed(2)
    n = 64
    d = elastic_field(n, size, AugmentConfig(), g) * (size / 2)  # pixels
    ddx_dx = 1 + (d[:, 0, :, 1:] - d[:, 0, :, :-1])[:, :-1]     # d(x + dx)/dx
    ddx_dy = (d[:, 0, 1:, :] - d[:, 0, :-1, :])[:, :, :-1]
    ddy_dx = (d[:, 1, :, 1:] - d[:, 1, :, :-1])[:, :-1]
    ddy_dy = 1 + (d[:, 1, 1:, :] - d[:, 1, :-1, :])[:, :, :-1]
    det = ddx_dx * ddy_dy - ddx_dy * ddy_dx
    assert (det <= 0).sum().item() == 0
    assert det.min() > 0.5  # not even close to folding


@pytest.mark.parametrize("size", [128, 256, 512])
def test_strong_blur_sigma_is_relative_to_the_reference_image(size):
    """A point blurred at any size equals scipy's Gaussian of the drawn sigma scaled by size / 512."""
    cfg = AugmentConfig()
    drawn = 4.0  # pixels at 512 (the upper end of a wider range, so the kernel is resolvable at 128)
    params = StrongParams(brightness=torch.ones(1), contrast=torch.ones(1), blur_sigma=torch.tensor([drawn]))
    x = torch.zeros(1, 1, size, size)
    x[0, 0, size // 2, size // 2] = 0.5
    # mean grey level is tiny, contrast 1: the photometric part leaves the point unchanged
    y = strong(x, params, cfg)[0, 0].double().numpy()
    expected = gaussian_filter(x[0, 0].double().numpy(), drawn * size / REF, mode="reflect", truncate=6)
    np.testing.assert_allclose(y, expected, atol=2e-4 * 0.5)
    # measured spread of the impulse response, relative to the side, is the same at every size
    r = np.arange(size) - size // 2
    var = float((y.sum(axis=0) * r ** 2).sum() / y.sum())
    assert abs(np.sqrt(var) / size - drawn / REF) < 0.02 * drawn / REF


def test_views_use_the_same_relative_geometry_at_both_model_sizes():
    """The displacement is one field in normalised coordinates: resampled to another size it is
    the same fraction of the side (the U-Net and foundation inputs see one view)."""
    g = torch.Generator().manual_seed(3)
    field = elastic_field(4, 128, AugmentConfig(), g)
    big = F.interpolate(field, size=(256, 256), mode="bilinear", align_corners=False)
    assert torch.allclose(big[..., ::2, ::2].std(), field.std(), rtol=0.02)


def test_augmentation_geometry_is_shared_between_resolutions():
    g = torch.Generator().manual_seed(0)
    grid = weak_grid(3, 32, AugmentConfig(p=1.0), g)
    lab = torch.zeros(3, 64, 64, dtype=torch.long)
    lab[:, 16:48, 20:40] = 1
    img = lab[:, None].float()
    small_img, small_lab = warp(img[..., ::2, ::2].contiguous(), lab[:, ::2, ::2].contiguous(), grid)
    big_img, big_lab = warp(img, lab, grid)
    # the same transform at two sizes: the big warped label, downsampled, matches the small one
    agree = (big_lab[:, ::2, ::2] == small_lab).float().mean()
    assert agree > 0.97
    assert set(big_lab.unique().tolist()) <= {0, 1}  # nearest: no new label values


def test_strong_view_photometric_only():
    g = torch.Generator().manual_seed(0)
    cfg = AugmentConfig()
    x = torch.rand(2, 1, 32, 32)
    params = draw_strong(2, cfg, g)
    y = strong(x, params, cfg)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.all((params.brightness >= 0.1) & (params.brightness <= 2.0))

"""Weak and strong views and intermediate samples, batched on the device (method-spec section 3).

Every random draw comes from a ``torch.Generator`` on the CPU (small tensors), so a view is a pure
function of the generator's seed whatever the device: resumed and distributed runs see the same
augmentations. Geometry is drawn once per sample in normalised coordinates and applied to every
resolution of that sample (U-Net input, foundation input), so the two models see the same view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    p: float = 0.5                       # probability of each weak transform
    scale: tuple[float, float] = (1.0, 1.5)
    max_rotation: int = 20               # integer degrees in [-20, 20]
    elastic_alpha: float = 2.0           # x image side
    elastic_sigma: float = 0.08          # x image side
    brightness: tuple[float, float] = (0.1, 2.0)   # Fundus (0.5, 1.5)
    contrast: tuple[float, float] = (0.1, 2.0)
    blur_kernel: float = 0.1             # x image side
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # pixels at reference_size
    box_area: tuple[float, float] = (0.02, 0.4)
    box_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    # The side at which the reference script augments (every image is resized to 512 first): the
    # elastic field's magnitude and the blur's sigma are defined there, and kept relative to the
    # side at every model input size.
    reference_size: int = 512


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def weak_grid(n: int, size: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Sampling grid (n, size, size, 2) in [-1, 1] coordinates for the weak transforms, each with
    probability p: independent W/H scaling by U(scale) and a random crop back to size, rotation by an
    integer angle, horizontal flip, and elastic deformation (:func:`elastic_field`)."""
    apply = torch.rand(n, 4, generator=g) < cfg.p
    sx = torch.where(apply[:, 0], _uniform(g, n, *cfg.scale), torch.ones(n))
    sy = torch.where(apply[:, 0], _uniform(g, n, *cfg.scale), torch.ones(n))
    # a crop of side 1/s of the zoomed image, anywhere inside it
    ox = (1 - 1 / sx) * (2 * torch.rand(n, generator=g) - 1)
    oy = (1 - 1 / sy) * (2 * torch.rand(n, generator=g) - 1)
    angle = torch.randint(-cfg.max_rotation, cfg.max_rotation + 1, (n,), generator=g).float()
    angle = torch.where(apply[:, 1], angle, torch.zeros(n)) * math.pi / 180
    flip = torch.where(apply[:, 2], -torch.ones(n), torch.ones(n))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output coords -> flip -> rotate -> zoomed crop -> input coords
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip / sx
    theta[:, 0, 1] = -sin / sx
    theta[:, 1, 0] = sin * flip / sy
    theta[:, 1, 1] = cos / sy
    theta[:, 0, 2] = ox
    theta[:, 1, 2] = oy
    base = F.affine_grid(theta, [n, 1, size, size], align_corners=False)

    field = elastic_field(n, size, cfg, g) * apply[:, 3].float().view(n, 1, 1, 1)
    return base + field.permute(0, 2, 3, 1)


ELASTIC_GRID = 64  # coarse side on which the smooth field is drawn (its sigma is 0.08 x 64 = 5 cells)


def _gaussian_kernel_energy(sigma: float) -> float:
    """Sum of the squared weights of the normalised 1-D Gaussian kernel (radius 4 sigma)."""
    r = torch.arange(-math.ceil(4 * sigma), math.ceil(4 * sigma) + 1, dtype=torch.float64)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return float(((k / k.sum()) ** 2).sum())


def elastic_field(n: int, size: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Elastic displacement (n, 2, size, size) in normalised [-1, 1] units (x, y).

    The reference: U(-1, 1) noise per pixel of the R x R image (R = ``reference_size``), smoothed by
    a Gaussian of sigma 0.08 R, times alpha = 2 R pixels. Smoothing white noise that much is a
    band-limited field, so it is drawn on a coarse G x G grid and upsampled; but the smoothing
    removes variance in proportion to the kernel's energy (sum of squared weights, ~1 / (2 sqrt(pi)
    sigma) per axis), which is R / G times larger on the coarse grid. The field is scaled by the
    ratio of the two energies, so its statistics relative to the side match the reference's (about
    0.8% of the side per axis; the map does not fold) at every model size.
    """
    coarse = ELASTIC_GRID
    sigma_c, sigma_r = cfg.elastic_sigma * coarse, cfg.elastic_sigma * cfg.reference_size
    field = 2 * torch.rand(n, 2, coarse, coarse, generator=g) - 1
    field = _gaussian_blur(field, torch.full((n,), sigma_c), kernel=2 * math.ceil(4 * sigma_c) + 1)
    # per axis the 2-D kernel is separable, so the std ratio is the ratio of the 1-D energies
    field = field * (_gaussian_kernel_energy(sigma_r) / _gaussian_kernel_energy(sigma_c))
    field = F.interpolate(field, size=(size, size), mode="bilinear", align_corners=False)
    # alpha x R pixels of an R-pixel side -> normalised units (2 / R per pixel): 2 alpha
    return field * (2 * cfg.elastic_alpha)


def resample(grid: torch.Tensor, size: int) -> torch.Tensor:
    """The same geometric transform on another resolution's pixel grid."""
    if grid.shape[1] == size:
        return grid
    g = F.interpolate(grid.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False)
    return g.permute(0, 2, 3, 1)


def warp(image: torch.Tensor, label: torch.Tensor | None, grid: torch.Tensor):
    """Apply a grid: image bilinear, label nearest; outside the image: 0 (background)."""
    grid = resample(grid.to(image.device), image.shape[-1])
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if label is None:
        return out, None
    lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out, lab[:, 0].to(label.dtype)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (reflect padding)."""
    n, c, h, w = x.shape
    kernel = max(3, kernel | 1)
    r = torch.arange(kernel, dtype=x.dtype, device=x.device) - kernel // 2
    k = torch.exp(-(r[None] ** 2) / (2 * sigma.to(x)[:, None] ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, kernel)
    pad = kernel // 2
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect" if pad < w else "replicate"),
                 k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect" if pad < h else "replicate"),
                 k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


@dataclass
class StrongParams:
    brightness: torch.Tensor
    contrast: torch.Tensor
    blur_sigma: torch.Tensor


def draw_strong(n: int, cfg: AugmentConfig, g: torch.Generator) -> StrongParams:
    return StrongParams(_uniform(g, n, *cfg.brightness), _uniform(g, n, *cfg.contrast),
                        _uniform(g, n, *cfg.blur_sigma))


def strong(image: torch.Tensor, params: StrongParams, cfg: AugmentConfig) -> torch.Tensor:
    """Strong view of a weak view: brightness and contrast factors (p=1), then a Gaussian blur of
    kernel 0.1 S. Sigma is drawn in pixels of the ``reference_size`` image, as the reference script
    blurs its 512 copy, and scaled to this resolution: the blur relative to the side is the
    reference's at every model size, and both models' views are equally blurred."""
    dev = image.device
    b = params.brightness.to(dev).view(-1, 1, 1, 1)
    c = params.contrast.to(dev).view(-1, 1, 1, 1)
    x = (image * b).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # contrast blends with the mean grey level
    x = ((x - mean) * c + mean).clamp(0, 1)
    size = image.shape[-1]
    sigma = params.blur_sigma.to(dev) * size / cfg.reference_size
    return _gaussian_blur(x, sigma, kernel=int(cfg.blur_kernel * size))


def draw_boxes(n: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One box per sample as (y0, x0, y1, x1) in [0, 1]: area U(0.02, 0.4) of the image, aspect
    ratio U(0.3, 1/0.3), random position inside the image."""
    area = _uniform(g, n, *cfg.box_area)
    ratio = _uniform(g, n, *cfg.box_ratio)
    h = torch.sqrt(area * ratio).clamp(max=1.0)
    w = torch.sqrt(area / ratio).clamp(max=1.0)
    y0 = torch.rand(n, generator=g) * (1 - h)
    x0 = torch.rand(n, generator=g) * (1 - w)
    return torch.stack([y0, x0, y0 + h, x0 + w], dim=1)


def box_mask(boxes: torch.Tensor, size: int, device: torch.device | str) -> torch.Tensor:
    """The one-centred mask M (n, size, size) of each box at a given resolution (pixel centres)."""
    centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    b = boxes.to(device)
    rows = (centres[None] >= b[:, 0:1]) & (centres[None] < b[:, 2:3])
    cols = (centres[None] >= b[:, 1:2]) & (centres[None] < b[:, 3:4])
    return rows[:, :, None] & cols[:, None, :]


def intermediate_sample(labeled: torch.Tensor, unlabeled: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Eq. (1): U_c = M * X_w + (1 - M) * U_s (images (n,C,H,W) or labels/masks (n,H,W))."""
    m = box if labeled.dim() == box.dim() else box[:, None]
    return torch.where(m, labeled, unlabeled)

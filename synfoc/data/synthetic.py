"""The embedded default: a synthetic mixed-domain segmentation set generated in code.

Three "sites" differ the way scanners and hospitals do: intensity mapping (one site shows the
lesion darker than its surroundings), contrast, noise model (additive Gaussian, multiplicative
speckle, Rician-like) and level, blur, background texture, and the size and shape distribution of
the lesions. Every case is a pure function of (seed, domain, split, index), so the set costs no
disk and is identical on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synfoc.data.base import Case, DatasetIndex, Sample


@dataclass(frozen=True)
class Site:
    background: float      # mean background intensity
    foreground: float      # mean lesion intensity (lower than background = darker lesion)
    contrast: float        # scales (foreground - background)
    gamma: float           # intensity mapping x -> x ** gamma
    noise: str             # "gaussian", "speckle" or "rician"
    noise_level: float
    blur: float            # Gaussian blur sigma in pixels (at 128)
    texture: str           # "smooth", "blobs" or "stripes"
    texture_level: float
    radius: tuple[float, float]       # lesion radius range (fraction of the side)
    elongation: tuple[float, float]   # aspect ratio range
    lobulation: float                 # amplitude of the boundary's higher harmonics


SITES: dict[str, Site] = {
    "siteA": Site(0.25, 0.70, 1.0, 1.0, "gaussian", 0.05, 0.6, "smooth", 0.05, (0.14, 0.24), (1.0, 1.4), 0.06),
    "siteB": Site(0.35, 0.80, 0.9, 0.8, "speckle", 0.20, 1.2, "blobs", 0.07, (0.10, 0.18), (1.5, 2.4), 0.10),
    "siteC": Site(0.60, 0.35, 1.0, 1.5, "rician", 0.10, 1.8, "stripes", 0.08, (0.18, 0.30), (1.0, 1.6), 0.22),
}


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(img, sigma) if sigma > 0 else img


def _lesion(rng: np.random.Generator, size: int, site: Site, centre=None, scale: float = 1.0) -> np.ndarray:
    """A filled closed curve r(theta) = R (1 + sum_k a_k cos(k theta + phi_k)), stretched and rotated."""
    radius = rng.uniform(*site.radius) * size * scale
    elong = rng.uniform(*site.elongation)
    rot = rng.uniform(0, np.pi)
    cy, cx = centre if centre is not None else rng.uniform(0.3, 0.7, size=2) * size
    k = np.arange(2, 7)
    amp = site.lobulation * rng.uniform(0.3, 1.0, size=k.size) / k * 2
    phase = rng.uniform(0, 2 * np.pi, size=k.size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(rot) + dy * np.sin(rot)) / np.sqrt(elong)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) * np.sqrt(elong)
    theta = np.arctan2(v, u)
    r = radius * (1 + (amp[:, None, None] * np.cos(k[:, None, None] * theta + phase[:, None, None])).sum(0))
    return np.hypot(u, v) <= r


def _texture(rng: np.random.Generator, size: int, site: Site) -> np.ndarray:
    if site.texture == "smooth":
        return _blur(rng.standard_normal((size, size)), size / 8) * size / 8 * site.texture_level
    if site.texture == "blobs":
        t = _blur(rng.standard_normal((size, size)), size / 24)
        return t / (t.std() + 1e-8) * site.texture_level
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq, ang = rng.uniform(4, 9), rng.uniform(0, np.pi)
    return np.sin(2 * np.pi * freq * (xx * np.cos(ang) + yy * np.sin(ang))) * site.texture_level


def make_case(seed: int, domain: str, split: str, index: int, size: int = 128,
              num_classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (uint8 H x W x 1) and label (uint8 H x W; 1 = lesion, 2 = its core)."""
    site = SITES[domain]
    key = [seed, list(SITES).index(domain), 0 if split == "train" else 1, index]
    rng = np.random.default_rng(key)
    lesion = _lesion(rng, size, site)
    label = lesion.astype(np.uint8)
    img = np.full((size, size), site.background, dtype=np.float64) + _texture(rng, size, site)
    fg = site.background + site.contrast * (site.foreground - site.background)
    img[lesion] += fg - site.background
    if num_classes == 2:  # an inner core, brighter again (cup inside disc, necrosis inside tumour)
        ys, xs = np.nonzero(lesion)
        core = _lesion(rng, size, site, centre=(ys.mean(), xs.mean()), scale=0.45) & lesion
        label[core] = 2
        img[core] += 0.5 * (fg - site.background)
    img = _blur(img, site.blur * size / 128)
    img = np.clip(img, 0, 1) ** site.gamma
    if site.noise == "gaussian":
        img = img + rng.normal(0, site.noise_level, img.shape)
    elif site.noise == "speckle":
        img = img * (1 + rng.normal(0, site.noise_level, img.shape))
    else:  # Rician: magnitude of a complex signal with Gaussian noise on both channels
        img = np.hypot(img + rng.normal(0, site.noise_level, img.shape), rng.normal(0, site.noise_level, img.shape))
    img = np.clip(img, 0, 1)
    return (img * 255).round().astype(np.uint8)[..., None], label


def case_name(domain: str, split: str, index: int) -> str:
    """The name of a synthetic case, e.g. ``siteA_train_007``; :func:`parse_case_name` inverts it."""
    return f"{domain}_{split}_{index:03d}"


def parse_case_name(name: str) -> tuple[str, str, int]:
    """(domain, split, index) of a :func:`case_name`."""
    domain, split, index = name.rsplit("_", 2)
    return domain, split, int(index)


class SyntheticDataset(DatasetIndex):
    """The embedded default as a :class:`DatasetIndex` (no files)."""

    def __init__(self, seed: int = 0, train_per_domain: int = 40, test_per_domain: int = 12,
                 size: int = 128, num_classes: int = 1, domains: list[str] | None = None) -> None:
        domains = domains or list(SITES)
        cases = [Case(d, split, case_name(d, split, i))
                 for d in domains for split, n in (("train", train_per_domain), ("test", test_per_domain))
                 for i in range(n)]
        classes = ["lesion"] if num_classes == 1 else ["lesion", "core"]
        parts = None if num_classes == 1 else [("lesion", (1, 2)), ("core", (2,))]
        super().__init__("synthetic", None, classes, domains, 1, cases, [], parts)
        self.seed, self.size = seed, size

    def read(self, case: Case) -> Sample:
        # The image is a function of the case's name, not of the split it is assigned to, so that a
        # validation split carved from the training cases reads the same images.
        image, label = make_case(self.seed, *parse_case_name(case.name), self.size, self.num_classes)
        return Sample(image, label)

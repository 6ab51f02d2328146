"""What one iteration sees: batches drawn from the training cases held in memory, and their weak,
strong and intermediate views at every model input size (the transforms are in
:mod:`synfoc.augment`). Each draw is a function of (seed, iteration), so a resumed or distributed
run sees exactly the batches and augmentations of an uninterrupted one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from synfoc.augment import AugmentConfig, box_mask, draw_boxes, draw_strong, strong, warp, weak_grid

if TYPE_CHECKING:
    from synfoc.config import TrainConfig


@dataclass
class Views:
    """One iteration's inputs on the device. ``*_u`` at the U-Net input size, ``*_f`` at the
    foundation input size; labels are long (B, H, W). ``box`` is the intermediate-sample mask M at
    each size. ``unlabeled_truth`` (hidden labels of U_w) is only used for monitoring, and
    ``unlabeled_index`` (positions of U_w's images in the unlabeled set, on the CPU) only for logging."""

    x_u: torch.Tensor
    y_u: torch.Tensor
    x_f: torch.Tensor | None = None
    y_f: torch.Tensor | None = None
    uw_u: torch.Tensor | None = None
    us_u: torch.Tensor | None = None
    uw_f: torch.Tensor | None = None
    us_f: torch.Tensor | None = None
    box_u: torch.Tensor | None = None
    box_f: torch.Tensor | None = None
    unlabeled_truth: torch.Tensor | None = None
    unlabeled_index: torch.Tensor | None = None


@dataclass
class Arrays:
    """Cases held in memory as uint8, once per model input size."""

    images: dict[int, torch.Tensor]   # size -> (N, C, S, S)
    labels: dict[int, torch.Tensor]   # size -> (N, S, S)

    def __len__(self) -> int:
        return next(iter(self.labels.values())).shape[0]

    def subset(self, idx: torch.Tensor) -> Arrays:
        return Arrays({s: a[idx] for s, a in self.images.items()}, {s: a[idx] for s, a in self.labels.items()})

    def take(self, idx: torch.Tensor, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[size][idx].to(device, non_blocking=True).float().div_(255)
        return img, self.labels[size][idx].to(device, non_blocking=True).long()


def load_arrays(index, cases, sizes: list[int], progress: bool) -> Arrays:
    from synfoc.data import load_cases
    loaded = load_cases(index, cases, sorted(set(sizes)), progress=progress)
    return Arrays({s: a[0] for s, a in loaded.arrays.items()}, {s: a[1] for s, a in loaded.arrays.items()})


def epoch_order(n: int, batch: int, t: int, seed: int) -> torch.Tensor:
    """Indices of iteration t's batch: shuffled epochs, each permutation a function of (seed, epoch),
    so the data order is reproducible and a resumed run picks up exactly where it stopped."""
    out = []
    for k in range(t * batch, (t + 1) * batch):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(perm[pos])
    return torch.stack(out)


def make_views(cfg: TrainConfig, aug: AugmentConfig, labeled: Arrays, unlabeled: Arrays, t: int,
               sizes: dict[str, int], rt, seed: int) -> Views:
    """Weak views of a labeled and an unlabeled batch, the strong view of the unlabeled one, and the
    intermediate-sample boxes, at every model input size, drawn on the CPU generator of iteration t
    and put on ``rt.device`` (``rt``: a :class:`synfoc.runtime.Runtime`)."""
    g = torch.Generator().manual_seed(seed * 7_919 + t)
    li = epoch_order(len(labeled), cfg.batch_labeled, t, seed)
    ui = epoch_order(len(unlabeled), cfg.batch_unlabeled, t, seed + 1)
    su, sf = sizes.get("unet"), sizes.get("foundation")
    base = su or sf
    grid_l = weak_grid(len(li), base, aug, g)
    grid_u = weak_grid(len(ui), base, aug, g)
    strong_params = draw_strong(len(ui), aug, g)
    boxes = draw_boxes(min(len(li), len(ui)), aug, g)
    v = {"unlabeled_index": ui}
    for key, size in (("u", su), ("f", sf)):
        if size is None:
            continue
        x, y = warp(*labeled.take(li, size, rt.device), grid_l)
        uw, uy = warp(*unlabeled.take(ui, size, rt.device), grid_u)
        v[f"x_{key}"], v[f"y_{key}"] = x, y
        v[f"uw_{key}"], v[f"us_{key}"] = uw, strong(uw, strong_params, aug)
        v[f"box_{key}"] = box_mask(boxes, size, rt.device)
        if size == base:
            v["unlabeled_truth"] = uy
    if su is None:  # foundation-only methods read the *_f fields; unet-only the *_u fields
        v["x_u"], v["y_u"] = v["x_f"], v["y_f"]
    return Views(**v)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, sources: list[Arrays], size: int, aug: AugmentConfig, rt,
                          seed: int, batch: int = 16, max_images: int = 512) -> int:
    """Re-estimate BatchNorm's running statistics on weak views of the training images.

    During training the U-Net's running statistics follow batches that are half labeled weak views
    and half intermediate samples, whose strong views scale brightness and contrast by up to 20x;
    test images are neither, so the running statistics used at evaluation match neither half.
    Here they are reset and set to the plain average over weak views of (at most ``max_images``)
    training images, labeled and unlabeled, as "precise BatchNorm" does. Returns the image count.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    g = torch.Generator().manual_seed(seed * 7_919 - 1)
    total = sum(len(a) for a in sources)
    keep = torch.randperm(total, generator=g)[:max_images].sort().values
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    offset, count = 0, 0
    for arrays in sources:
        idx = keep[(keep >= offset) & (keep < offset + len(arrays))] - offset
        offset += len(arrays)
        for chunk in idx.split(batch):
            if len(chunk) < 2:  # a batch of one has no batch variance
                continue
            x, _ = warp(*arrays.take(chunk, size, rt.device), weak_grid(len(chunk), size, aug, g))
            with rt.autocast():
                model(x)
            count += len(chunk)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return count


def domain_batchnorm_statistics(model: nn.Module, sources: list[Arrays], domains: list[list[str]], size: int,
                                aug: AugmentConfig, rt, seed: int, **kwargs) -> dict[str, dict[str, torch.Tensor]]:
    """Per training domain, the statistics :func:`recalibrate_batchnorm` finds on weak views of that
    domain's training images alone, labeled and unlabeled (``domains[i][j]``: the domain of image j
    of ``sources[i]``). A domain's images share intensity and contrast, which the pooled average
    over every domain fits for none of them when the domains differ much; evaluation on a domain
    then normalises with its own statistics. No label is read. The model's statistics are left as
    they were; a domain with fewer than two images gets none."""
    from synfoc.method.norm import batchnorm_statistics, using_batchnorm_statistics
    out = {}
    with using_batchnorm_statistics(model, batchnorm_statistics(model)):  # restores them afterwards
        for domain in sorted({d for names in domains for d in names}):
            parts = [arrays.subset(torch.tensor([j for j, d in enumerate(names) if d == domain], dtype=torch.long))
                     for arrays, names in zip(sources, domains)]
            if recalibrate_batchnorm(model, parts, size, aug, rt, seed, **kwargs):
                out[domain] = batchnorm_statistics(model)
    return out

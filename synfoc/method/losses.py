"""Losses and agreement measures of SynFoC (method-spec sections 4.2, 4.6, 4.7).

All functions take logits or probabilities shaped (B, C+1, H, W) and integer labels (B, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-10


def dice_loss(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice loss with squared denominator, summed over the whole batch, averaged over all C+1
    classes (background included). ``weight`` (B, H, W), the confidence mask W, masks pixels out of
    the foreground classes' terms only: the background term counts every pixel, as in the
    published script (method-spec section 9)."""
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    mask = None
    if weight is not None:   # per class: ones for the background, W for every foreground class
        w = weight.unsqueeze(1).to(probs.dtype)
        mask = torch.cat([torch.ones_like(w), w.expand(-1, probs.shape[1] - 1, -1, -1)], dim=1)

    def total(x: torch.Tensor) -> torch.Tensor:
        return (x if mask is None else x * mask).sum(dim=(0, 2, 3))

    inter = total(probs * onehot)
    denom = total(probs * probs) + total(onehot)
    return (1 - (2 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise CE; with ``weight`` (B, H, W) the masked CE = mean over ALL pixels of CE * W."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    if weight is None:
        return ce.mean()
    return (ce * weight.to(ce.dtype)).mean()


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 ce_weight: float = 1.0, dice_weight: float = 1.0) -> torch.Tensor:
    """L_x (unmasked) and L_u (masked with W, Eq. 7): CE + Dice on softmax probabilities."""
    probs = torch.softmax(logits.float(), dim=1)
    return ce_weight * cross_entropy(logits, target, weight) + dice_weight * dice_loss(probs, target, weight)


def part_dice(a: torch.Tensor, b: torch.Tensor, parts: list[tuple[int, ...]]) -> torch.Tensor:
    """Per-instance Dice between two label maps (B, H, W), averaged over the foreground parts
    (Eqs. 4-5): (2|A∩B| + 1) / (|A| + |B| + 1.001), and exactly 1 when both are empty. Returns (B,)."""
    scores = []
    for values in parts:
        va = torch.as_tensor(values, device=a.device)
        ma, mb = torch.isin(a, va), torch.isin(b, va)
        inter = (ma & mb).sum(dim=(1, 2)).float()
        size = ma.sum(dim=(1, 2)).float() + mb.sum(dim=(1, 2)).float()
        d = (2 * inter + 1) / (size + 1.001)
        scores.append(torch.where(size == 0, torch.ones_like(d), d))
    return torch.stack(scores, dim=0).mean(dim=0)


def entropy_on_consensus(probs: torch.Tensor, consensus: torch.Tensor) -> torch.Tensor:
    """One model's term of L_c (Eq. 9): mean over B*(C+1)*H*W of -p log p on the consensus region."""
    ent = -probs * torch.log(probs.clamp_min(1e-8))
    return (ent * consensus.unsqueeze(1).to(ent.dtype)).mean()


def divergence_mse(probs_ut: torch.Tensor, probs_ms: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
    """L_d (Eq. 10): mean of (P^MS - P^UT)^2 on the divergence region, minimised (method-spec 4.6:
    the paper prints a minus sign; the published script minimises the positive MSE)."""
    return (((probs_ms - probs_ut) ** 2) * divergence.unsqueeze(1).to(probs_ut.dtype)).mean()

"""The paper's baselines and single-model ablations (method-spec section 6).

- ``base``: mean teacher + intermediate samples with one model (Table 7's "Base").
- ``suponly``: labeled data only.
- ``samed``: prompt-free LoRA fine-tuning of the foundation model on labeled data, with SAMed's
  loss weights (0.2 CE + 0.8 Dice).
- ``fixmatch``: U-Net; pseudo-label of the weak view (threshold 0.95) supervises the strong view.
"""

from __future__ import annotations

import torch
from torch import nn

from synfoc.augment import intermediate_sample
from synfoc.method.losses import ce_dice_loss, cross_entropy
from synfoc.method.synfoc import (Views, confident_foreground, frozen_batchnorm_stats, probs_of, pseudo_label,
                                  ramp_weight, resize_labels)
from synfoc.models.unet import independent_batches

METHODS = ("synfoc", "base-unet", "base-foundation", "suponly-unet", "suponly-foundation", "samed", "fixmatch")


def models_of(method: str) -> tuple[str, ...]:
    """Which students a method trains: ("unet", "foundation"), ("unet",) or ("foundation",)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "synfoc":
        return ("unet", "foundation")
    return ("unet",) if method.endswith("unet") or method == "fixmatch" else ("foundation",)


def _inputs(v: Views, kind: str):
    """(labeled image, its label, weak unlabeled, strong unlabeled, box) at the model's input size."""
    if kind == "unet":
        return v.x_u, v.y_u, v.uw_u, v.us_u, v.box_u
    return v.x_f, v.y_f, v.uw_f, v.us_f, v.box_f


class SingleModel(nn.Module):
    """One student (and, for ``base``, its EMA teacher) trained by one of the baselines."""

    def __init__(self, method: str, student: nn.Module, teacher: nn.Module | None, threshold: float = 0.95) -> None:
        super().__init__()
        self.method, self.student, self.teacher, self.threshold = method, student, teacher, threshold
        self.kind = models_of(method)[0]

    def step(self, v: Views, t: int, total: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, u_w, u_s, box = _inputs(v, self.kind)
        if self.method.startswith("suponly") or self.method == "samed":
            logits = self.student(x)
            y = resize_labels(y, logits.shape[-1])
            if self.method == "samed":
                loss = ce_dice_loss(logits, y, ce_weight=0.2, dice_weight=0.8)
            else:
                loss = ce_dice_loss(logits, y)
            return loss, {"loss": loss.detach(), "loss_x": loss.detach()}

        if self.method == "fixmatch":
            with torch.inference_mode(), frozen_batchnorm_stats(self.student):
                p_w = probs_of(self.student, u_w)
            q, w = pseudo_label(p_w.clone(), self.threshold)
            loss_x = ce_dice_loss(self.student(x), y)
            loss_u = cross_entropy(self.student(u_s), q, w)
            loss = loss_x + loss_u
            return loss, {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                          "confident_fraction": w.float().mean()}

        # base: mean teacher + intermediate samples (Eq. 1) with one model
        with torch.inference_mode():
            p_hat = probs_of(self.teacher, u_w)
        p_hat = p_hat.clone()
        so = p_hat.shape[-1]
        y_o, box_o = resize_labels(y, so), resize_labels(box, so)
        q, w = pseudo_label(p_hat, self.threshold)
        u_c = intermediate_sample(x, u_s, box)
        b = x.shape[0]
        with independent_batches(self.student, 2):  # one batch, BatchNorm statistics per half
            logits = self.student(torch.cat([x, u_c]))
        logits_x, logits_c = logits[:b], logits[b:]
        loss_x = ce_dice_loss(logits_x, y_o)
        loss_u = ce_dice_loss(logits_c, intermediate_sample(y_o, q, box_o), box_o | w)
        lam = ramp_weight(t, total)
        loss = loss_x + lam * loss_u
        logs = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                "lambda": torch.tensor(lam), "confident_fraction": w.float().mean(),
                "confident_foreground": confident_foreground(q, w)}
        return loss, logs

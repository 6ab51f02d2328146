"""The paper's baselines and single-model ablations (method-spec section 6), one class each; their
names, students and titles are in :data:`synfoc.method.registry.METHODS`.

- :class:`MeanTeacher` (``base-unet``, ``base-foundation``): mean teacher + intermediate samples
  with one model (Table 7's "Base").
- :class:`SupOnly` (``suponly-unet``, ``suponly-foundation``): labeled data only.
- :class:`SAMed` (``samed``): prompt-free LoRA fine-tuning of the foundation model on labeled data,
  with SAMed's loss weights (0.2 CE + 0.8 Dice).
- :class:`FixMatch` (``fixmatch``): U-Net; the pseudo-label of the weak view (threshold 0.95)
  supervises the strong view.
"""

from __future__ import annotations

import torch
from torch import nn

from synfoc.augment import intermediate_sample
from synfoc.method.losses import ce_dice_loss, cross_entropy, part_dice
from synfoc.method.norm import batchnorm_per_part, frozen_batchnorm_stats
from synfoc.method.synfoc import (INSTANCES, confident_against_truth, confident_foreground, labels_of, probs_of,
                                  pseudo_label, ramp_weight, resize_labels, resize_probs)
from synfoc.views import Views

Step = tuple[torch.Tensor, dict[str, torch.Tensor]]


class SingleModel(nn.Module):
    """One student (``kind`` "unet" or "foundation") and its EMA teacher, trained by a baseline.

    Subclasses implement :meth:`step` on the views at the student's input size (:meth:`inputs`).
    """

    def __init__(self, kind: str, student: nn.Module, teacher: nn.Module | None, threshold: float = 0.95,
                 parts: list[tuple[int, ...]] | None = None) -> None:
        super().__init__()
        self.kind, self.student, self.teacher, self.threshold = kind, student, teacher, threshold
        self.parts = parts   # foreground parts for pseudo-label Dice (monitoring), as SynFoC's

    @classmethod
    def build(cls, cfg, students: dict[str, nn.Module], teachers: dict[str, nn.Module], parts) -> "SingleModel":
        (kind,) = students
        return cls(kind, students[kind], teachers.get(kind), cfg.threshold, parts)

    def inputs(self, v: Views):
        """(labeled image, its label, weak unlabeled, strong unlabeled, box) at the student's input size."""
        if self.kind == "unet":
            return v.x_u, v.y_u, v.uw_u, v.us_u, v.box_u
        return v.x_f, v.y_f, v.uw_f, v.us_f, v.box_f

    def step(self, v: Views, t: int, total: int) -> Step:
        raise NotImplementedError


class SupOnly(SingleModel):
    """Supervised only: CE + Dice on the labeled weak view."""

    ce_weight, dice_weight = 1.0, 1.0

    def step(self, v: Views, t: int, total: int) -> Step:
        x, y, *_ = self.inputs(v)
        logits = self.student(x)
        loss = ce_dice_loss(logits, resize_labels(y, logits.shape[-1]), ce_weight=self.ce_weight,
                            dice_weight=self.dice_weight)
        return loss, {"loss": loss.detach(), "loss_x": loss.detach()}


class SAMed(SupOnly):
    """SAMed: the foundation model on labeled data with its loss weights 0.2 CE + 0.8 Dice."""

    ce_weight, dice_weight = 0.2, 0.8


class FixMatch(SingleModel):
    """The weak view's confident pseudo-label supervises the strong view."""

    def step(self, v: Views, t: int, total: int) -> Step:
        x, y, u_w, u_s, _ = self.inputs(v)
        with torch.inference_mode(), frozen_batchnorm_stats(self.student):
            p_w = probs_of(self.student, u_w)
        q, w = pseudo_label(p_w.clone(), self.threshold)
        loss_x = ce_dice_loss(self.student(x), y)
        loss_u = cross_entropy(self.student(u_s), q, w)
        loss = loss_x + loss_u
        return loss, {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                      "confident_fraction": w.float().mean()}


class MeanTeacher(SingleModel):
    """Base: the EMA teacher's pseudo-label on intermediate samples (Eq. 1), with one model."""

    def step(self, v: Views, t: int, total: int) -> Step:
        x, y, u_w, u_s, box = self.inputs(v)
        with torch.inference_mode():
            p_hat = probs_of(self.teacher, u_w)
        p_hat = p_hat.clone()
        so = p_hat.shape[-1]
        y_o, box_o = resize_labels(y, so), resize_labels(box, so)
        q, w = pseudo_label(p_hat, self.threshold)
        u_c = intermediate_sample(x, u_s, box)
        b = x.shape[0]
        with batchnorm_per_part(self.student, 2):  # one batch, BatchNorm statistics per half
            logits = self.student(torch.cat([x, u_c]))
        logits_x, logits_c = logits[:b], logits[b:]
        loss_x = ce_dice_loss(logits_x, y_o)
        loss_u = ce_dice_loss(logits_c, intermediate_sample(y_o, q, box_o), box_o | w)
        lam = ramp_weight(t, total)
        loss = loss_x + lam * loss_u
        fg_batch, fg_instances = confident_foreground(q, w)
        logs = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                "lambda": torch.tensor(lam), "confident_fraction": w.float().mean(),
                "confident_foreground": fg_batch, "confident_foreground" + INSTANCES: fg_instances}
        if v.unlabeled_truth is not None:  # monitoring only
            truth = v.unlabeled_truth
            logs.update(confident_against_truth(q, w, truth))
            if self.parts:  # the teacher's pseudo-label Dice, as SynFoC logs its teachers' (at the U-Net size)
                dice = part_dice(labels_of(resize_probs(p_hat, truth.shape[-1])), truth, self.parts)
                logs["pseudo_dice_" + self.kind] = dice.mean()
                logs["pseudo_dice_" + self.kind + INSTANCES] = dice
        return loss, logs

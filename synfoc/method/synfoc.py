"""One SynFoC training iteration, equation by equation (paper section 3, method-spec section 4).

UT = the U-Net, MS = the foundation model (MedSAM family); a hat (``teacher_``) = EMA teacher.
Everything stays on the device: no host synchronisation happens inside :meth:`SynFoC.step`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from synfoc.augment import intermediate_sample
from synfoc.method.losses import ce_dice_loss, divergence_mse, entropy_on_consensus, part_dice
from synfoc.method.norm import batchnorm_per_part, frozen_batchnorm_stats
from synfoc.method.registry import ALPHA_STRATEGIES, CONSISTENCIES
from synfoc.views import Views


def ramp_weight(t: int, total: int) -> float:
    """lambda(t) = exp(-5 (1 - t/T)^2): the sigmoid ramp-up of the published script (method-spec
    4.8; the paper's Eq. 2 omits the square)."""
    return math.exp(-5.0 * (1.0 - min(t, total) / total) ** 2)


def resize_probs(p: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    if p.shape[-1] == size:
        return p
    return F.interpolate(p, size=(size, size), mode=mode, align_corners=False if mode == "bilinear" else None)


def resize_labels(y: torch.Tensor, size: int) -> torch.Tensor:
    if y.shape[-1] == size:
        return y
    return F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(y.dtype)


def ensemble(p_ut: torch.Tensor, p_ms: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Eq. (3): P^EN = alpha * P^UT + (1 - alpha) * P^MS, alpha per instance (B, 1, 1, 1)."""
    return alpha * p_ut + (1 - alpha) * p_ms


def labels_of(p: torch.Tensor) -> torch.Tensor:
    """argmax over the class dimension, through ``max`` (same first-index ties): on the CPU, argmax
    over a short dimension of a contiguous tensor is an order of magnitude slower
    (``benchmarks/kernels.py``)."""
    return p.max(dim=1).indices


def pseudo_label(p: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Q = argmax P and the confidence mask W = max P > threshold."""
    conf, q = p.max(dim=1)
    return q, conf > threshold


INSTANCES = "@instances"  # a log entry of one value per unlabeled image (a distribution, not a mean)


def confident_foreground(q: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of the confident pseudo-label pixels that are foreground, over the batch and per
    instance (B,), of (B, H, W) label and confidence maps (0 where none is confident)."""
    foreground, confident = ((q > 0) & w).flatten(1).sum(1), w.flatten(1).sum(1)
    return foreground.sum() / confident.sum().clamp(min=1), foreground / confident.clamp(min=1)


def confident_against_truth(q: torch.Tensor, w: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """Monitoring with the hidden labels (B, H, W): the foreground share of the confident pixels by
    the truth (what ``confident_foreground`` would be if the pseudo-label were right there), and
    the fraction of the confident truly-foreground pixels the pseudo-label gets right: a teacher
    that is confident and wrong on lesions shows as a low recall, where a teacher that is merely
    unconfident on them shows as a low truth share."""
    truth = resize_labels(truth, q.shape[-1])
    fg = (truth > 0) & w
    return {"confident_foreground_truth": fg.sum() / w.sum().clamp(min=1),
            "confident_foreground_recall": ((q == truth) & fg).sum() / fg.sum().clamp(min=1)}


def empty_prediction(q: torch.Tensor) -> torch.Tensor:
    """Per instance: the label map has no foreground pixel."""
    return ~(q > 0).flatten(1).any(dim=1)


def consensus_mask(p_ut: torch.Tensor, p_ms: torch.Tensor) -> torch.Tensor:
    """Eq. (8): M_c = 1(argmax P^UT == argmax P^MS); M_d = 1 - M_c."""
    return labels_of(p_ut) == labels_of(p_ms)


def probs_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(x).float(), dim=1)


class SynFoC(nn.Module):
    """Both students and both EMA teachers, and the loss of one iteration.

    Args:
        unet, foundation: the students; teacher_unet, teacher_foundation: their EMA teachers.
        parts: foreground parts for SMC, as tuples of label values (Fundus: cup, cup+rim).
        threshold: confidence threshold of the ensemble pseudo-label (0.95).
        alpha: "smc" (Eq. 6), "self", "mutual", "constant" (0.5), "linear" (t/T) or "cps".
        consistency: "cdcr" (Eqs. 8-10), "cr" (MSE between the students everywhere) or "none".
    """

    def __init__(self, unet: nn.Module, foundation: nn.Module, teacher_unet: nn.Module,
                 teacher_foundation: nn.Module, parts: list[tuple[int, ...]], threshold: float = 0.95,
                 alpha: str = "smc", consistency: str = "cdcr") -> None:
        super().__init__()
        if alpha not in ALPHA_STRATEGIES:
            raise ValueError(f"unknown alpha strategy {alpha!r}; choose from {', '.join(ALPHA_STRATEGIES)}")
        if consistency not in CONSISTENCIES:
            raise ValueError(f"unknown consistency {consistency!r}; choose from {', '.join(CONSISTENCIES)}")
        self.unet, self.foundation = unet, foundation
        self.teacher_unet, self.teacher_foundation = teacher_unet, teacher_foundation
        self.parts, self.threshold = parts, threshold
        self.alpha_strategy, self.consistency = alpha, consistency

    @classmethod
    def build(cls, cfg, students: dict[str, nn.Module], teachers: dict[str, nn.Module], parts) -> "SynFoC":
        return cls(students["unet"], students["foundation"], teachers["unet"], teachers["foundation"], parts,
                   cfg.threshold, cfg.alpha, cfg.consistency)

    def alpha(self, self_conf: torch.Tensor, mutual_conf: torch.Tensor, t: int, total: int):
        """Ensemble weights (alpha for the UT target, alpha for the MS target), each (B,1,1,1)."""
        b = self_conf.shape[0]
        if self.alpha_strategy == "smc":
            a = self_conf * mutual_conf                       # Eq. (6)
        elif self.alpha_strategy == "self":
            a = self_conf
        elif self.alpha_strategy == "mutual":
            a = mutual_conf
        elif self.alpha_strategy == "constant":
            a = torch.full_like(self_conf, 0.5)
        elif self.alpha_strategy == "linear":
            a = torch.full_like(self_conf, min(t, total) / total)
        else:  # cps: each model learns from the other's teacher only
            zeros, ones = torch.zeros_like(self_conf), torch.ones_like(self_conf)
            return zeros.view(b, 1, 1, 1), ones.view(b, 1, 1, 1)
        a = a.view(b, 1, 1, 1)
        return a, a

    def step(self, v: Views, t: int, total: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        su, b = v.x_u.shape[-1], v.x_u.shape[0]
        # 1. Teachers on U_w, no gradient.
        with torch.inference_mode():
            p_ut_hat = probs_of(self.teacher_unet, v.uw_u)
            p_ms_hat_native = probs_of(self.teacher_foundation, v.uw_f)
        p_ut_hat, p_ms_hat_native = p_ut_hat.clone(), p_ms_hat_native.clone()
        so = p_ms_hat_native.shape[-1]

        # 2. Intermediate samples (Eq. 1): the box M of U_s takes the labeled image.
        u_c_u = intermediate_sample(v.x_u, v.us_u, v.box_u)
        u_c_f = intermediate_sample(v.x_f, v.us_f, v.box_f)

        # 3. Students, each on X_w and U_c in one batch. MS's trainable parts have no BatchNorm; the
        #    U-Net's BatchNorm layers normalise each half with its own statistics, so the batched
        #    forward is the paper's two separate forwards (only the convolutions are batched).
        logits_ms = self.foundation(torch.cat([v.x_f, u_c_f]))
        logits_ms_x, logits_ms_c = logits_ms[:b], logits_ms[b:]
        with batchnorm_per_part(self.unet, 2):
            logits_ut = self.unet(torch.cat([v.x_u, u_c_u]))
        logits_ut_x, logits_ut_c = logits_ut[:b], logits_ut[b:]

        # 4. The UT student on U_w for its self-confidence: no graph, BatchNorm's running statistics
        #    untouched. The students' weights do not change within the iteration, so running it after
        #    their training forwards is the same; under autocast it reuses their cast weights.
        with torch.no_grad(), frozen_batchnorm_stats(self.unet):
            q_ut_student = labels_of(self.unet(v.uw_u))
        p_ms_hat = resize_probs(p_ms_hat_native, su)
        q_ut_hat = labels_of(p_ut_hat)

        # 5. Self-mutual confidence, per instance and detached (Eqs. 4-6). Mutual confidence is
        #    measured at the foundation model's output size, against the U-Net teacher's labels
        #    nearest-resized there (method-spec section 9).
        q_ms_hat_native, q_ut_hat_o = labels_of(p_ms_hat_native), resize_labels(q_ut_hat, so)
        self_conf = part_dice(q_ut_student, q_ut_hat, self.parts)            # Eq. (4)
        mutual_conf = part_dice(q_ms_hat_native, q_ut_hat_o, self.parts)     # Eq. (5)
        alpha_ut, alpha_ms = self.alpha(self_conf, mutual_conf, t, total)

        # 6. Ensemble pseudo-labels and confidence masks (Eq. 3), at the U-Net size and, resized
        #    then thresholded again, at the foundation model's output size.
        p_en_ut = ensemble(p_ut_hat, p_ms_hat, alpha_ut)
        # Every strategy but cps gives both students the same alpha: reuse that ensemble.
        p_en_ms = resize_probs(p_en_ut if alpha_ms is alpha_ut else ensemble(p_ut_hat, p_ms_hat, alpha_ms), so)
        q_en_ut, w_en_ut = pseudo_label(p_en_ut, self.threshold)
        q_en_ms, w_en_ms = pseudo_label(p_en_ms, self.threshold)

        # 7. Intermediate pseudo-labels (Eq. 1): inside the box M the label of X_w.
        box_o = resize_labels(v.box_f, so)
        y_o = resize_labels(v.y_f, so)
        q_c_ut = intermediate_sample(v.y_u, q_en_ut, v.box_u)
        q_c_ms = intermediate_sample(y_o, q_en_ms, box_o)
        w_c_ut = v.box_u | w_en_ut      # inside the box the label is true: confidence 1
        w_c_ms = box_o | w_en_ms

        # 8. Losses. L_x: supervised CE + Dice of each student (MS against nearest-resized labels).
        loss_x = ce_dice_loss(logits_ut_x, v.y_u) + ce_dice_loss(logits_ms_x, y_o)
        # L_u (Eq. 7): masked CE + masked Dice against the intermediate pseudo-label Q_c (the Dice
        # mask covers the foreground terms only; the background term counts every pixel).
        loss_u = ce_dice_loss(logits_ut_c, q_c_ut, w_c_ut) + ce_dice_loss(logits_ms_c, q_c_ms, w_c_ms)

        p_c_ut = torch.softmax(logits_ut_c.float(), dim=1)
        p_c_ms_native = torch.softmax(logits_ms_c.float(), dim=1)
        p_c_ms = resize_probs(p_c_ms_native, su, mode="nearest")   # nearest, as the script (method-spec section 9)
        zero = p_c_ut.new_zeros(())
        loss_c, loss_d = zero, zero
        if self.consistency == "cdcr":
            m_c = consensus_mask(p_c_ut.detach(), p_c_ms.detach())          # Eq. (8)
            m_d = ~m_c
            loss_c = 0.5 * (entropy_on_consensus(p_c_ut, m_c)               # Eq. (9)
                            + entropy_on_consensus(p_c_ms_native, resize_labels(m_c, so)))
            loss_d = divergence_mse(p_c_ut, p_c_ms, m_d)                    # Eq. (10)
        elif self.consistency == "cr":
            loss_d = ((p_c_ut - p_c_ms) ** 2).mean()

        lam = ramp_weight(t, total)
        loss = loss_x + lam * (loss_u + loss_c + loss_d)                    # Eq. (2)

        fg_batch, fg_instances = confident_foreground(q_en_ut, w_en_ut)
        logs = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                "loss_c": loss_c.detach(), "loss_d": loss_d.detach(), "lambda": torch.tensor(lam),
                "alpha": alpha_ut.mean(), "self_confidence": self_conf.mean(),
                "mutual_confidence": mutual_conf.mean(), "confident_fraction": w_en_ut.float().mean(),
                "confident_foreground": fg_batch,
                # Dice(empty, empty) = 1: where both teachers see no foreground, SMC gives alpha 1
                "teachers_both_empty": (empty_prediction(q_ut_hat_o)
                                        & empty_prediction(q_ms_hat_native)).float().mean(),
                "alpha" + INSTANCES: alpha_ut.flatten().detach(),
                "confident_foreground" + INSTANCES: fg_instances}
        if v.unlabeled_truth is not None:  # monitoring only: pseudo-label quality (Fig. 6)
            truth = v.unlabeled_truth
            logs["pseudo_dice_unet"] = part_dice(q_ut_hat, truth, self.parts).mean()
            logs["pseudo_dice_foundation"] = part_dice(labels_of(p_ms_hat), truth, self.parts).mean()
            dice_en = part_dice(q_en_ut, truth, self.parts)
            logs["pseudo_dice_ensemble"] = dice_en.mean()
            logs["pseudo_dice_ensemble" + INSTANCES] = dice_en
            logs.update(confident_against_truth(q_en_ut, w_en_ut, truth))
        return loss, logs

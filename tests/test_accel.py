"""synfoc.accel: plain models, and the opt-in kernels that compute the same function.

The models are built from plain PyTorch modules; :func:`synfoc.accel.accelerate` swaps in faster
kernels. Each kernel is compared with the module it replaces (values and gradients: equal up to
float rounding in fp32, within bf16 rounding under bf16 autocast), the whole U-Net and LiteMedSAM
accelerated with the plain ones, and the choice per CPU is checked. Tests of a kernel's fast path
itself skip, naming the feature, where this CPU lacks it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synfoc import accel, cpu
from synfoc.models.foundation import build_foundation_model, trainable_parameters
from synfoc.models.unet import build_unet

pytestmark = pytest.mark.usefixtures("two_threads")

BF16 = torch.bfloat16


def _needs(name: str):
    """Skip unless this CPU has what kernel ``name``'s fast path needs (the reason names it)."""
    kernel = accel.KERNELS[name]
    return pytest.mark.skipif(not kernel.available(), reason=f"{name} needs {kernel.needs}; this CPU has none")


@pytest.fixture(scope="module")
def lite_plain() -> nn.Module:
    """A tiny LiteMedSAM (32x32 inputs, bundled weights, LoRA B drawn so LoRA carries gradients)
    with non-trivial BatchNorm statistics in the encoder, so that a wrong BatchNorm fold cannot pass."""
    torch.manual_seed(0)
    model = build_foundation_model("litemedsam", 1, lora_rank=4, image_size=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.1)
        for m in model.image_encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.train()


def _accelerated(model: nn.Module, *names: str) -> nn.Module:
    """A copy of ``model`` with the named kernels (all when none are named), whatever this CPU has."""
    return accel.accelerate(copy.deepcopy(model), "cpu", names or list(accel.KERNELS))


def _classes(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


# ----------------------------------------------------------------------------- plain models
def test_plain_unet_is_made_of_torch_nn_modules():
    """Every layer of a plain U-Net is a torch.nn module; synfoc's own classes are containers (no
    parameters or buffers of their own)."""
    unet = build_unet(1, 2, 4)
    for name, m in unet.named_modules():
        cls = type(m)
        if cls.__module__.startswith("torch.nn."):
            continue
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        assert not own and list(m.children()), f"{name}: {cls.__qualname__}"
    layers = {type(m) for m in unet.modules() if not list(m.children())}
    assert {nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.ReLU} <= layers
    assert layers <= {nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.ReLU, nn.BatchNorm2d}  # exact classes


def test_plain_foundation_model_has_no_replacement_modules():
    """The foundation model keeps the vendored and segment_anything modules: plain nn.Linear and
    nn.ConvTranspose2d, no module of synfoc.accel."""
    model = build_foundation_model("litemedsam", 1, image_size=64, pretrained=False)
    kinds = _classes(model)
    assert nn.Linear in kinds and nn.ConvTranspose2d in kinds
    assert not [k for k in kinds if k.__module__ == accel.__name__]
    assert {"Attention", "Conv2d_BN", "MBConv", "LayerNorm2d"} <= {k.__name__ for k in kinds}


def test_accelerate_keeps_state_dict_names_and_weight_files(tmp_path):
    """Swapping kernels changes no parameter or buffer name: weights saved from a plain model load
    into an accelerated one and back, for both students."""
    from safetensors.torch import load_file, save_file

    from synfoc.models.weights import load_trainable, save_trainable

    unet = build_unet(1, 2, 4)
    fast = _accelerated(unet)
    assert fast.state_dict().keys() == unet.state_dict().keys()
    save_file(unet.state_dict(), str(tmp_path / "unet.safetensors"))
    fast.load_state_dict(load_file(str(tmp_path / "unet.safetensors")))

    lite = build_foundation_model("litemedsam", 1, image_size=64, pretrained=False)
    fast_lite = _accelerated(lite)
    assert fast_lite.state_dict().keys() == lite.state_dict().keys()
    save_trainable(fast_lite, tmp_path / "foundation.safetensors")
    load_trainable(lite, tmp_path / "foundation.safetensors")


# ----------------------------------------------------------------------------- choice per device
def test_accelerate_is_a_no_op_without_the_cpu_features(monkeypatch):
    """On a CPU without bf16 arithmetic and without oneDNN (not x86-64) no kernel applies and every
    module keeps its class; on CUDA neither; nor with SYNFOC_NO_ACCEL=1."""
    monkeypatch.delenv("SYNFOC_NO_ACCEL", raising=False)
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: True)
    monkeypatch.setenv("SYNFOC_NO_ACCEL", "1")
    assert accel.available_kernels("cpu") == []
    monkeypatch.delenv("SYNFOC_NO_ACCEL")
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(cpu, "onednn_bf16", lambda: False)
    monkeypatch.setattr(cpu, "onednn_kernels", lambda dtype: False)
    assert accel.available_kernels("cpu") == []
    for model in (build_unet(1, 1, 4), build_foundation_model("litemedsam", 1, image_size=64, pretrained=False)):
        before = _classes(model)
        assert accel.accelerate(model, "cpu") is model
        assert _classes(model) == before


def test_kernels_are_chosen_by_cpu_feature(monkeypatch):
    """An x86-64 CPU (oneDNN), with bf16 arithmetic or without (AVX2): every kernel that pays in fp32
    too (a fused convolution without oneDNN's bf16 kernels falls back at call time); the compiled SAM
    ViT blocks only with AMX and a C++ compiler; without oneDNN (ARM): none; CUDA: none."""
    monkeypatch.delenv("SYNFOC_NO_ACCEL", raising=False)
    monkeypatch.setattr(cpu, "onednn_kernels", lambda dtype: dtype == torch.float32)
    monkeypatch.setattr(accel, "_inductor_compiles", lambda: True)
    every_cpu = [name for name in accel.KERNELS if name != "compiled_sam_vit_blocks"]
    for bf16, amx in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: bf16)
        monkeypatch.setattr(cpu, "onednn_bf16", lambda: bf16)
        monkeypatch.setattr(cpu, "cpu_has_amx", lambda: amx)
        assert accel.available_kernels("cpu") == (list(accel.KERNELS) if amx else every_cpu)
    monkeypatch.setattr(accel, "_inductor_compiles", lambda: False)  # AMX, but no C++ compiler
    assert accel.available_kernels("cpu") == every_cpu
    monkeypatch.setattr(cpu, "onednn_kernels", lambda dtype: False)
    assert accel.available_kernels("cpu") == []
    assert accel.available_kernels("cuda") == [] and accel.available_kernels(torch.device("cuda", 0)) == []
    with pytest.raises(ValueError, match="unknown kernel"):
        accel.accelerate(build_unet(1, 1, 4), "cpu", ["no_such_kernel"])


# ----------------------------------------------------------------------------- whole models
def _forward_backward(model: nn.Module, images: torch.Tensor, params, bf16: bool):
    """Logits (fp32) and the gradients of a loss w.r.t. ``params`` (None where unused)."""
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=BF16, enabled=bf16):
        out = model(images).float()
    side = out.shape[-1]
    target = (torch.arange(side)[None, :, None] > side // 2).long().expand(out.shape[0], side, side)
    grads = torch.autograd.grad(F.cross_entropy(out, target), params, allow_unused=True)
    return out.detach(), torch.cat([g.flatten() for g in grads if g is not None])


def _assert_same_function(plain: nn.Module, fast: nn.Module, images: torch.Tensor, params_of) -> torch.Tensor:
    """fp32: the same logits and gradients up to float rounding; bf16 autocast: as close to fp32 as
    the plain model is (errors of the logits, cosine of the gradients). Returns the fp32 logits."""
    out32, grad32 = _forward_backward(plain, images, params_of(plain), bf16=False)
    fast32, fast_grad32 = _forward_backward(fast, images, params_of(fast), bf16=False)
    torch.testing.assert_close(fast32, out32, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_grad32, grad32, rtol=1e-3, atol=1e-5)

    plain16, fast16 = copy.deepcopy(plain), copy.deepcopy(fast)  # channels-last copies
    out16, grad16 = _forward_backward(plain16, images, params_of(plain16), bf16=True)
    fout16, fgrad16 = _forward_backward(fast16, images, params_of(fast16), bf16=True)
    plain_error = (out16 - out32).abs().mean()
    fast_error = (fout16 - out32).abs().mean()
    assert fast_error <= 2 * plain_error + 1e-3 * out32.abs().mean(), (fast_error, plain_error)
    plain_cosine = F.cosine_similarity(grad16, grad32, dim=0)
    fast_cosine = F.cosine_similarity(fgrad16, grad32, dim=0)
    assert fast_cosine >= plain_cosine - 0.02, (fast_cosine, plain_cosine)
    return out32


def test_accelerated_unet_computes_the_plain_function():
    torch.manual_seed(0)
    unet = build_unet(1, 1, 4).train()
    fast = _accelerated(unet)
    _assert_same_function(unet, fast, torch.rand(4, 1, 32, 32), lambda m: list(m.parameters()))


def test_accelerated_litemedsam_computes_the_plain_function(lite_plain):
    """The student (LoRA gradients, frozen first stage) and the EMA teacher's bf16 forward without a
    gradient, with every kernel."""
    fast = _accelerated(lite_plain)
    assert {"TinyViTWindowAttention", "FoldedConv2dBN", "FusedMBConv", "ChannelLayerNorm"} <= {
        k.__name__ for k in _classes(fast)}
    images = torch.rand(1, 1, 32, 32)
    exact = _assert_same_function(lite_plain, fast, images, trainable_parameters)
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        teacher, plain_teacher = fast(images).float(), lite_plain(images).float()
    assert (teacher - exact).abs().mean() <= 2 * (plain_teacher - exact).abs().mean() + 1e-3 * exact.abs().mean()


# ----------------------------------------------------------------------------- one kernel at a time
def test_channel_layer_norm_equals_sam_layernorm2d():
    from segment_anything.modeling.common import LayerNorm2d

    torch.manual_seed(3)
    reference = LayerNorm2d(16)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    fast = _accelerated(nn.Sequential(reference), "channel_layer_norm")[0]
    assert type(fast).__name__ == "ChannelLayerNorm" and isinstance(fast, LayerNorm2d)
    for channels_last in (False, True):
        x = 3 * torch.randn(2, 16, 8, 8) + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        expected = reference(x)
        grads_expected = torch.autograd.grad(expected.square().sum(), [x, reference.weight, reference.bias])
        got = fast(x)
        grads = torch.autograd.grad(got.square().sum(), [x, fast.weight, fast.bias])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, grads_expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def _attention_reference(attention, x: torch.Tensor) -> torch.Tensor:
    """TinyViT window attention written out in fp32 from the module's weights."""
    batch, tokens, _ = x.shape
    qkv = attention.qkv(attention.norm(x)).view(batch, tokens, attention.num_heads, -1)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([attention.key_dim, attention.key_dim, attention.d], dim=3))
    bias = attention.attention_biases[:, attention.attention_bias_idxs]
    weights = torch.softmax(q @ k.transpose(-2, -1) * attention.scale + bias, dim=-1)
    return attention.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, attention.dh))


def _window_attention(lite_plain, tokens: int, seed: int):
    """The accelerated window attention of ``tokens`` tokens from a copy of ``lite_plain``, its bias
    table drawn (``seed``), and its LoRA factors."""
    model = _accelerated(lite_plain, "tinyvit_attention")
    attention = next(m for m in model.image_encoder.modules()
                     if type(m).__name__ == "TinyViTWindowAttention" and m.attention_bias_idxs.shape[0] == tokens)
    torch.manual_seed(seed)
    with torch.no_grad():
        attention.attention_biases.normal_()
    return attention, [p for name, p in attention.named_parameters() if "lora_" in name]


@pytest.mark.parametrize("tokens", [49, 196])
def test_window_attention_bf16_kernels_match_fp32_values_and_gradients(tokens, lite_plain):
    """Both CPU bf16 paths (explicit with a gradient, fused without) and the fp32 path agree with an
    fp32 computation written out here, for TinyViT's 7x7 and 14x14 windows; the bf16 gradient of the
    LoRA factors follows the fp32 one."""
    attention, lora = _window_attention(lite_plain, tokens, seed=2)
    x = torch.randn(8, tokens, attention.norm.normalized_shape[0])

    expected = _attention_reference(attention, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), lora)
    torch.testing.assert_close(attention(x), expected, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=BF16):
        explicit = attention(x)                      # a gradient is wanted: explicit bf16
        with torch.no_grad():
            fused = attention(x)                     # no gradient: fused bf16 kernel
    scale = expected.abs().mean()
    for low in (explicit, fused):
        assert low.dtype == BF16
        assert (low.float() - expected).abs().mean() < 0.02 * scale
    grads = torch.autograd.grad(explicit.float().square().sum(), lora)
    for grad, reference in zip(grads, expected_grads):
        assert F.cosine_similarity(grad.flatten().float(), reference.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("tokens", [49, 196])
def test_window_attention_fp32_matches_values_and_gradients(tokens, lite_plain):
    """fp32 with a gradient (the student on a CPU without bf16): the fused kernel gives the written-out
    attention's values and the gradients of the input and of the LoRA factors."""
    attention, wrt = _window_attention(lite_plain, tokens, seed=3)
    assert wrt
    x = torch.randn(4, tokens, attention.norm.normalized_shape[0], requires_grad=True)
    expected = _attention_reference(attention, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *wrt])
    got = attention(x)
    grads = torch.autograd.grad(got.square().sum(), [x, *wrt])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


def _tiny_sam_vit_encoder() -> nn.Module:
    """segment_anything's ViT encoder, tiny: an 8x8 token grid, a windowed block (window 3, so the
    grid is padded to 9x9) and a global one, relative-position tables and LoRA factors drawn."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    from synfoc.models.lora import add_lora_to_qkv, sam_vit_qv_indices
    torch.manual_seed(4)
    encoder = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=4, out_chans=8,
                              use_rel_pos=True, window_size=3, global_attn_indexes=(1,))
    for block in encoder.blocks:
        add_lora_to_qkv(block.attn, "qkv", *sam_vit_qv_indices(32), rank=2)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "rel_pos" in name or "lora_b" in name:
                p.normal_(std=0.5)
    return encoder


def test_sam_vit_attention_folded_relative_positions_match_segment_anything():
    """The folded attention gives segment_anything's encoder output and the gradients of the image
    and of the LoRA factors, windowed and global blocks alike (fp32: float rounding); under bf16
    autocast it is as close to fp32 as the plain encoder; without relative positions it is plain."""
    plain = _tiny_sam_vit_encoder()
    fast = _accelerated(plain, "sam_vit_attention")
    assert [type(b.attn).__name__ for b in fast.blocks] == ["SamViTAttention"] * 2
    images = torch.randn(2, 3, 64, 64)
    weights = torch.randn(2, 8, 8, 8)  # the neck ends in a layer norm: a loss of out**2 would have no gradient

    def run(model, bf16=False):
        x = images.clone().requires_grad_()
        with torch.autocast("cpu", dtype=BF16, enabled=bf16):
            out = model(x).float()
        lora = [p for name, p in model.named_parameters() if "lora_" in name]
        return out, torch.autograd.grad((out * weights).sum(), [x, *lora])

    out32, grads32 = run(plain)
    fast32, fast_grads32 = run(fast)
    torch.testing.assert_close(fast32, out32, rtol=1e-4, atol=1e-4)
    for g, e in zip(fast_grads32, grads32):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)
    out16, grads16 = run(plain, bf16=True)
    fast16, fast_grads16 = run(fast, bf16=True)
    assert (fast16 - out32).abs().mean() <= 2 * (out16 - out32).abs().mean() + 1e-3 * out32.abs().mean()
    for g16, f16, e in zip(grads16, fast_grads16, grads32):
        plain_cos = F.cosine_similarity(g16.flatten().float(), e.flatten(), dim=0)
        assert F.cosine_similarity(f16.flatten().float(), e.flatten(), dim=0) >= plain_cos - 0.02
    # the relative positions matter here (a kernel that dropped them would fail above) ...
    with torch.no_grad():
        for block in fast.blocks:
            block.attn.rel_pos_h.zero_()
    assert (run(fast)[0] - out32).abs().max() > 1e-2
    # ... and without them the kernel is the plain forward
    for model in (plain, fast):
        for block in model.blocks:
            block.attn.use_rel_pos = False
    torch.testing.assert_close(run(fast)[0], run(plain)[0])


def test_vit_features_runs_segment_anythings_encoder_with_a_bf16_residual_stream():
    """vit_features computes segment_anything's ImageEncoderViT.forward (fp32: float rounding).
    Under bf16 autocast its residual stream (each block's input) is bf16, where segment_anything's
    forward lets the fp32 position table promote it to fp32, and its output and LoRA gradients stay
    as close to fp32 as that forward's."""
    from synfoc.models.foundation import vit_features
    encoder = _tiny_sam_vit_encoder()
    with torch.no_grad():
        encoder.pos_embed.normal_(std=0.5)  # zeros as built: a dropped table would pass unseen
    images = torch.randn(2, 3, 64, 64)
    weights = torch.randn(2, 8, 8, 8)
    stream = []
    for block in encoder.blocks:
        block.register_forward_pre_hook(lambda module, args: stream.append(args[0].dtype))

    def run(forward, bf16):
        stream.clear()
        with torch.autocast("cpu", dtype=BF16, enabled=bf16):
            out = forward(images).float()
        lora = [p for name, p in encoder.named_parameters() if "lora_" in name]
        return out.detach(), torch.autograd.grad((out * weights).sum(), lora), list(stream)

    def ours(x):
        return vit_features(encoder, x)

    ref32, ref_grads32, _ = run(encoder, False)
    out32, grads32, _ = run(ours, False)
    torch.testing.assert_close(out32, ref32, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads32, ref_grads32):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    ref16, ref_grads16, ref_stream = run(encoder, True)
    out16, grads16, our_stream = run(ours, True)
    assert ref_stream == [torch.float32] * 2 and our_stream == [BF16] * 2
    assert (out16 - ref32).abs().mean() <= 2 * (ref16 - ref32).abs().mean() + 1e-3 * ref32.abs().mean()
    for g16, r16, e in zip(grads16, ref_grads16, ref_grads32):
        reference_cos = F.cosine_similarity(r16.flatten().float(), e.flatten(), dim=0)
        assert F.cosine_similarity(g16.flatten().float(), e.flatten(), dim=0) >= reference_cos - 0.02


needs_inductor = pytest.mark.skipif(
    not accel._inductor_compiles(),
    reason="compiled_sam_vit_blocks needs a C++ compiler for torch.compile's inductor; none found here")


def _counting_compiled(monkeypatch) -> list:
    """Make accel._compiled record each call (what the compiled path runs) and return the record."""
    calls, compiled = [], accel._compiled

    def counted(forward):
        calls.append(forward)
        return compiled(forward)

    monkeypatch.setattr(accel, "_compiled", counted)
    monkeypatch.setattr(accel, "_COMPILE_FAILED", [])
    return calls


@needs_inductor
def test_compiled_sam_vit_blocks_train_with_the_plain_blocks_values_and_gradients(monkeypatch):
    """Under bf16 autocast with a gradient the compiled blocks run (windowed and global) and give
    the plain blocks' output and gradients of the image and the LoRA factors within bf16 rounding of
    fp32, with and without checkpointing; without a gradient, and in fp32, they are the plain blocks
    (no compiled call, the same numbers)."""
    from synfoc.models.foundation import vit_features
    calls = _counting_compiled(monkeypatch)
    plain = _accelerated(_tiny_sam_vit_encoder(), "sam_vit_attention")
    fast = accel.accelerate(copy.deepcopy(plain), "cpu", ["compiled_sam_vit_blocks"])
    assert [type(b).__name__ for b in fast.blocks] == ["CompiledSamViTBlock"] * 2
    images = torch.randn(2, 3, 64, 64)
    weights = torch.randn(2, 8, 8, 8)

    def run(model, bf16, checkpoint=False):
        x = images.clone().requires_grad_()
        with torch.autocast("cpu", dtype=BF16, enabled=bf16):
            out = vit_features(model, x, checkpoint_blocks=checkpoint).float()
        lora = [p for name, p in model.named_parameters() if "lora_" in name]
        return out.detach(), torch.autograd.grad((out * weights).sum(), [x, *lora])

    out32, grads32 = run(plain, False)
    fast32, fast_grads32 = run(fast, False)
    assert not calls
    torch.testing.assert_close(fast32, out32, rtol=0, atol=0)
    out16, grads16 = run(plain, True)
    for checkpoint in (False, True):
        calls.clear()
        fast16, fast_grads16 = run(fast, True, checkpoint)
        assert len(calls) >= 2, calls  # each block went through the compiled forward
        assert (fast16 - out32).abs().mean() <= 2 * (out16 - out32).abs().mean() + 1e-3 * out32.abs().mean()
        for g16, f16, e in zip(grads16, fast_grads16, grads32):
            plain_cos = F.cosine_similarity(g16.flatten().float(), e.flatten(), dim=0)
            assert F.cosine_similarity(f16.flatten().float(), e.flatten(), dim=0) >= plain_cos - 0.02
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        torch.testing.assert_close(vit_features(fast, images), vit_features(plain, images), rtol=0, atol=0)
    assert not calls


def test_compiled_sam_vit_blocks_fall_back_to_the_plain_blocks_where_inductor_fails(monkeypatch):
    """A compiler failure warns once, naming the cause, and the blocks run uncompiled from then on."""
    from torch._dynamo.exc import BackendCompilerFailed
    tried = []

    def broken(forward):
        def fail(*args):
            tried.append(forward)
            raise BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None)
        return fail

    monkeypatch.setattr(accel, "_compiled", broken)
    monkeypatch.setattr(accel, "_COMPILE_FAILED", [])
    plain = _tiny_sam_vit_encoder()
    fast = accel.accelerate(copy.deepcopy(plain), "cpu", ["compiled_sam_vit_blocks"])
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=BF16):
        with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler"):
            out = fast(images)
        expected = plain(images)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(tried) == 1


def test_folded_conv_bn_matches_convolution_then_batchnorm(lite_plain):
    """Eval mode: the BatchNorm folded into the convolution, values and input gradients, including
    the strided depthwise convolution whose bf16 input gradient is computed in fp32; train mode:
    the plain pair."""
    encoder = _accelerated(lite_plain, "folded_conv_bn").image_encoder
    merge = encoder.layers[1].downsample.conv2                       # strided depthwise
    assert type(merge).__name__ == "FoldedConv2dBN" and merge.c.stride == (2, 2) and merge.c.groups > 1
    x = torch.randn(2, merge.c.in_channels, 16, 16)
    for bf16 in (False, True):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=BF16, enabled=bf16):
            got = merge(x1.to(BF16) if bf16 else x1)
            want = merge.bn(merge.c(x2))
        g1, = torch.autograd.grad(got.float().square().sum(), x1)
        g2, = torch.autograd.grad(want.float().square().sum(), x2)
        tol = 3e-2 if bf16 else 1e-4
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        assert F.cosine_similarity(g1.flatten(), g2.flatten(), dim=0) > (0.999 if bf16 else 1 - 1e-6)
    merge.train()
    torch.testing.assert_close(merge(x), merge.bn(merge.c(x)))


def _fused_blocks(encoder: nn.Module) -> list[nn.Module]:
    return [m for m in encoder.modules() if type(m).__name__ in ("FusedPatchEmbed", "FusedMBConv", "FusedPatchMerging")]


@pytest.mark.parametrize("onednn", [pytest.param(True, marks=_needs("tinyvit_fused_convs")), False],
                         ids=["onednn-fused", "fallback"])
def test_fused_conv_stage_folds_batchnorm_exactly_and_bf16_stays_close(onednn, lite_plain, monkeypatch):
    """TinyViT's first stage with BatchNorm folded and GELU / residual inside the convolution: the
    function is unchanged in fp32, and under bf16 autocast it stays as close to fp32 as the module
    path is; where oneDNN has no kernels for the dtype the plain modules run (oneDNN's operator is
    then never called)."""
    plain = lite_plain.image_encoder
    encoder = _accelerated(lite_plain, "tinyvit_fused_convs").image_encoder
    assert len(_fused_blocks(encoder)) == 1 + len(plain.layers[0].blocks) + 3
    calls = []
    op = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", _Counted(op, calls))
    if not onednn:
        monkeypatch.setattr(cpu, "onednn_kernels", lambda dtype: False)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        modules = plain.layers[0](plain.patch_embed(images))
        fused = encoder.layers[0](encoder.patch_embed(images))
        torch.testing.assert_close(fused, modules, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=BF16):
            fused_bf16 = encoder.layers[0](encoder.patch_embed(images))
            modules_bf16 = plain.layers[0](plain.patch_embed(images))
    assert bool(calls) == onednn
    assert fused_bf16.dtype == BF16
    error_fused = (fused_bf16.float() - modules).abs().mean()
    error_modules = (modules_bf16.float() - modules).abs().mean()
    assert error_fused < 2 * error_modules + 1e-3


def test_fused_conv_blocks_with_a_gradient_are_the_plain_modules(lite_plain, monkeypatch):
    """Where a gradient is wanted (an input that requires one), the fused blocks run the vendored
    forward, never oneDNN's fused operator."""
    encoder = _accelerated(lite_plain, "tinyvit_fused_convs").image_encoder
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", _Counted(None, []))
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    out = encoder.layers[0](encoder.patch_embed(images))
    out.sum().backward()
    assert images.grad is not None


class _Counted:
    """Stands for ``op`` (and its overloads), recording each call; with ``op`` None every call fails."""

    def __init__(self, op, calls: list) -> None:
        self.op, self.calls = op, calls

    def __call__(self, *args):
        if self.op is None:
            raise AssertionError("oneDNN's fused convolution was called")
        self.calls.append(1)
        return self.op(*args)

    def __getattr__(self, overload: str):
        return _Counted(None if self.op is None else getattr(self.op, overload), self.calls)

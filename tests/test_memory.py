"""The step-memory estimate that decides automatic gradient checkpointing (synfoc.memory)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from synfoc.memory import estimate_step_bytes, parameter_bytes, saved_activation_bytes


def test_saved_activations_of_a_small_network_match_the_hand_count():
    # Linear saves its input, ReLU its output, the second Linear its input (the same storage as the
    # ReLU's output, counted once); the weights saved for the input gradients are parameters.
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    for batch in (1, 5):
        x = torch.rand(batch, 64, requires_grad=True)
        assert saved_activation_bytes(net, x) == batch * (64 + 128) * 4


def test_saved_activations_under_autocast_count_the_bf16_copies():
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    x = torch.rand(4, 64, requires_grad=True)
    bf16 = saved_activation_bytes(net, x, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    # autocast saves bf16 copies of the inputs (the ReLU's bf16 output is the second linear's input)
    # and the bf16 copies of both weights, which live until the backward pass
    assert bf16 == 4 * (64 + 128) * 2 + (64 * 128 + 128 * 32) * 2


def test_the_probe_runs_compiled_code_eagerly():
    """A torch.compile'd model is probed eagerly: the same count as the plain model, and no graph
    compiled for the probe's sample (training would compile again for its batch)."""
    from torch._dynamo.utils import counters
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    x = torch.rand(3, 64, requires_grad=True)
    graphs = counters["stats"]["unique_graphs"]
    assert saved_activation_bytes(torch.compile(net), x) == saved_activation_bytes(net, x)
    assert counters["stats"]["unique_graphs"] == graphs


def test_parameter_bytes_count_gradients_and_optimizer_states():
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))  # 110 + 22 parameters
    net[0].requires_grad_(False)
    assert parameter_bytes(net, optimizer_states=2) == (132 + 22 * 4) * 4


def test_gradient_checkpointing_lowers_the_foundation_models_estimate():
    from synfoc.models.foundation import build_foundation_model
    model = build_foundation_model("litemedsam", 1, image_size=64, pretrained=False)
    shape = {"foundation": (1, 3, 64, 64)}
    plain = estimate_step_bytes({"foundation": model}, shape, batch=2, optimizer_states={"foundation": 2})
    model.grad_checkpointing = True
    ckpt = estimate_step_bytes({"foundation": model}, shape, batch=2, optimizer_states={"foundation": 2})
    fixed = parameter_bytes(model, 2)
    assert fixed < ckpt < plain
    # the activation part scales with the batch
    four = estimate_step_bytes({"foundation": model}, shape, batch=4, optimizer_states={"foundation": 2})
    assert abs((four - fixed) - 2 * (ckpt - fixed)) <= 2  # int() rounding of the margin


def test_the_probe_leaves_batchnorm_statistics_and_random_streams_alone():
    from synfoc.models.unet import build_unet
    unet = build_unet(1, 1, 8).eval()
    before = {n: b.clone() for n, b in unet.named_buffers()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    estimate_step_bytes({"unet": unet}, {"unet": (1, 1, 32, 32)}, batch=2, optimizer_states={"unet": 1})
    assert torch.equal(torch.rand(3), expected)
    assert not unet.training
    for name, b in unet.named_buffers():
        assert torch.equal(b, before[name]), name


@pytest.mark.parametrize("free_bytes, switched", [(1, True), (2**50, False)])
def test_training_switches_gradient_checkpointing_on_when_the_step_would_not_fit(tmp_path, monkeypatch, capsys,
                                                                               free_bytes, switched):
    import yaml

    from synfoc import memory
    from synfoc.config import resolve
    from synfoc.train import train
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: free_bytes)
    run = tmp_path / "run"
    settings = {"iters": 1, "synthetic_train": 4, "synthetic_test": 2, "labeled_num": 2, "unet_size": 32,
                "image_size": 64, "unet_width": 4, "device": "cpu", "precision": "fp32", "baseline": None}
    train(resolve("demo", None, settings), run, progress=False)
    out = capsys.readouterr().out
    assert ("gradient checkpointing switched on" in out) == switched
    assert yaml.safe_load((run / "config.yaml").read_text())["grad_checkpointing"] is switched
    if switched:
        assert "still more than is free" in out

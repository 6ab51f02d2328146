"""The step-memory estimate that decides automatic gradient checkpointing (synfoc.memory)."""

from __future__ import annotations

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

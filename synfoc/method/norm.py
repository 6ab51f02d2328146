"""BatchNorm beyond a plain forward: the two things a training step asks of it, and statistics
swapped in per domain at evaluation.

All act on any ``torch.nn`` BatchNorm layer, so a model needs no special normalisation class.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Run a model in train mode (batch statistics) without moving its running statistics."""
    bns = _batchnorms(model)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def _forward_per_part(layer: nn.Module, forward, parts: int, x: torch.Tensor) -> torch.Tensor:
    if not layer.training or parts == 1:
        return forward(layer, x)
    if x.shape[0] % parts:
        raise ValueError(f"a batch of {x.shape[0]} cannot be split into {parts} equal batches")
    return torch.cat([forward(layer, part) for part in x.chunk(parts)])


@contextmanager
def batchnorm_per_part(model: nn.Module, parts: int):
    """Within the block, every BatchNorm layer of ``model`` in training mode treats a batch as
    ``parts`` equal batches: each is normalised with its own batch statistics and updates the
    running statistics in turn. One forward of ``cat([a, b])`` then computes what the separate
    forwards of ``a`` and of ``b`` do (outputs, gradients, running statistics), while every other
    layer runs once on the whole batch. Any ``torch.nn`` BatchNorm qualifies: the layer's own
    ``forward`` is shadowed for the block, whatever class the model uses."""
    norms = _batchnorms(model)
    for m in norms:
        m.forward = functools.partial(_forward_per_part, m, type(m).forward, parts)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def batchnorm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the running means and variances of every BatchNorm layer, by buffer name."""
    names = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return {name: buf.detach().clone() for name, buf in model.named_buffers()
            if name.rpartition(".")[0] in names and name.rpartition(".")[2] in ("running_mean", "running_var")}


@contextmanager
def using_batchnorm_statistics(model: nn.Module, stats: dict[str, torch.Tensor] | None):
    """Within the block the model's BatchNorm layers normalise (in eval mode) with ``stats`` (as
    :func:`batchnorm_statistics` returns them); its own statistics are back afterwards. ``None``:
    the model as it is."""
    if not stats:
        yield model
        return
    buffers = dict(model.named_buffers())
    missing = sorted(set(stats) - set(buffers))
    if missing:
        raise ValueError(f"BatchNorm statistics for buffers the model does not have: {', '.join(missing[:3])}")
    saved = {name: buffers[name].detach().clone() for name in stats}
    try:
        with torch.no_grad():
            for name, value in stats.items():
                buffers[name].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                buffers[name].copy_(value)

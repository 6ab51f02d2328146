"""Mean teachers: exponential moving averages of the students (method-spec section 2)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, max_decay: float = 0.99) -> float:
    """a_t = min(1 - 1/(t+1), max_decay): the first update (t=0) copies the student."""
    return min(1.0 - 1.0 / (step + 1), max_decay)


def make_teacher(student: nn.Module) -> nn.Module:
    """A copy of ``student`` that never takes gradients. Frozen student parameters (a foundation
    model's image encoder) are shared with the teacher rather than copied: they never change, and
    sharing saves a whole encoder's memory."""
    teacher = copy.deepcopy(student)
    frozen = {n: p for n, p in student.named_parameters() if not p.requires_grad}
    for name, param in list(teacher.named_parameters()):
        if name in frozen:
            module_name, _, attr = name.rpartition(".")
            module = teacher.get_submodule(module_name) if module_name else teacher
            setattr(module, attr, frozen[name])
        param.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, max_decay: float = 0.99) -> None:
    """teacher <- a_t * teacher + (1 - a_t) * student for every trainable parameter; buffers
    (BatchNorm running statistics) are copied from the student."""
    decay = ema_decay(step, max_decay)
    t_params = dict(teacher.named_parameters())
    pairs = [(t_params[n], p) for n, p in student.named_parameters() if p.requires_grad]
    if pairs:
        t, s = zip(*pairs)
        torch._foreach_lerp_(list(t), list(s), 1.0 - decay)
    t_buffers = dict(teacher.named_buffers())
    for name, buf in student.named_buffers():
        if name in t_buffers:
            t_buffers[name].copy_(buf)

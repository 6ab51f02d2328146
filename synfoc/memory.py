"""The memory a training step will need, estimated before training starts, so that gradient
checkpointing can be switched on where the step would not fit.

The estimate is measured, not modelled: one forward of each student on a single sample counts the
bytes autograd keeps for the backward pass (every saved tensor's storage, once), and the step keeps
that much per sample of the batch the students train on. Parameters, their gradients and the
optimizers' states come from the parameter counts. What this leaves out (the backward pass's
transient buffers, the teachers' forward, the allocator's slack) is covered by a margin.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

# Backward-pass temporaries, the teachers' no-grad forward and allocator slack, relative to the
# saved activations. Against the paper configuration's measured peaks (MedSAM ViT-B at 512 + U-Net
# 64 at 256, 4+4; peak resident memory less about 1.5 GiB of interpreter and libraries) the step
# needed about 1.5x its saved activations in fp32 without checkpointing and up to 1.9x in bf16 with
# it; the parameters, already resident when the probe runs, are counted again, which covers part of
# the difference.
MARGIN = 1.5


def saved_activation_bytes(model: nn.Module, inputs: torch.Tensor, autocast=contextlib.nullcontext) -> int:
    """Bytes of the tensors autograd saves for backward during ``model(inputs)``, each storage
    counted once (views of one tensor share it)."""
    storages: dict[tuple[int, torch.device], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # Eagerly: torch.compile'd parts (synfoc.accel's compiled blocks, --compile) would compile for
    # the probe's one sample, then again for the training batch. The compiled blocks keep about as
    # much for backward as the eager ones, which the margin covers.
    with (torch.compiler.set_stance("force_eager"),
          torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast()):
        model(inputs)
    # A parameter saved for backward (a weight for the input gradient) costs nothing extra.
    return sum(n for (ptr, _), n in storages.items() if ptr not in params)


def parameter_bytes(model: nn.Module, optimizer_states: int) -> int:
    """Parameters (fp32, a teacher copy of the trainable ones), gradients and ``optimizer_states``
    tensors per trainable parameter (AdamW 2, SGD with momentum 1)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total + trainable * (2 + optimizer_states)


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take: CUDA's free memory, or on the CPU Linux's MemAvailable
    capped by the cgroup's limit; None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def estimate_step_bytes(students: dict[str, nn.Module], sample_shapes: dict[str, tuple[int, ...]],
                        batch: int, optimizer_states: dict[str, int], autocast=contextlib.nullcontext) -> int:
    """Estimated peak bytes of a training step: for every student, its parameters with their
    gradients and optimizer states, plus ``batch`` samples' saved activations (measured on one
    sample of shape ``sample_shapes[kind]``, e.g. ``(1, 3, 128, 128)``), times :data:`MARGIN`.

    The probe leaves the students as it found them: same mode, same BatchNorm running statistics,
    and the global random streams untouched (its input comes from its own generator)."""
    total = 0
    for kind, model in students.items():
        device = next(model.parameters()).device
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        was_training = model.training
        model.train()
        generator = torch.Generator().manual_seed(0)
        inputs = torch.rand(sample_shapes[kind], generator=generator).to(device)
        try:
            activations = saved_activation_bytes(model, inputs, autocast) * batch
        finally:
            model.train(was_training)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
        total += parameter_bytes(model, optimizer_states[kind]) + int(activations * MARGIN)
    return total


def needs_grad_checkpointing(students: dict[str, nn.Module], sample_shapes: dict[str, tuple[int, ...]],
                             batch: int, optimizer_states: dict[str, int], device: torch.device,
                             autocast=contextlib.nullcontext) -> tuple[bool, str]:
    """Whether the foundation student must recompute its encoder activations for the step to fit
    in the free memory of ``device``; switches it on in ``students["foundation"]`` if so, and
    returns a line saying why (empty when nothing changed)."""
    foundation = students.get("foundation")
    free = free_memory_bytes(device)
    if foundation is None or foundation.grad_checkpointing or free is None:
        return False, ""
    plain = estimate_step_bytes(students, sample_shapes, batch, optimizer_states, autocast)
    if plain <= free:
        return False, ""
    foundation.grad_checkpointing = True
    checkpointed = estimate_step_bytes(students, sample_shapes, batch, optimizer_states, autocast)
    line = (f"estimated peak memory {gib(plain)} > {gib(free)} free: gradient checkpointing switched on "
            f"(estimate now {gib(checkpointed)})")
    if checkpointed > free:
        line += "; still more than is free: lower --batch-labeled/--batch-unlabeled or the input sizes"
    return True, line


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"

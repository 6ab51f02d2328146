"""Where and how a run executes: device, autocast precision, seeding, DDP ranks, the layout of the
weights, and the process-wide allocator setting that only a training command may make.

Nothing here changes the process on import. :func:`prepare_process` (glibc's allocator) is called
by the command-line entry points that train (``synfoc train``, ``synfoc sweep``), never by the
evaluation, prediction or report paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from synfoc.config import TrainConfig
from synfoc.cpu import cpu_has_bf16
from synfoc.errors import TrainingError


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    rank: int = 0
    world: int = 1
    keeps_freed_memory: bool = False  # glibc keeps freed blocks for reuse (see keep_freed_memory)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def uses_cuda(cfg: TrainConfig) -> bool:
    """Whether the run goes to a CUDA device (``--device cuda``, or ``auto`` with one available)."""
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def make_runtime(cfg: TrainConfig) -> Runtime:
    """The device, autocast dtype and DDP rank of this process; starts the process group under torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but no CUDA device is available")
    use_cuda = uses_cuda(cfg)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    # bf16 on the CPU only where the CPU has bf16 arithmetic: elsewhere PyTorch runs bf16 on
    # emulating or reference kernels, slower than fp32, so asking for it there is refused.
    if cfg.precision == "fp32":
        dtype = None
    elif use_cuda or cpu_has_bf16():
        dtype = torch.bfloat16
    elif cfg.precision == "bf16":
        raise TrainingError("--precision bf16: this CPU has no bf16 support (needs AVX512-BF16 or AMX); "
                            "use --precision auto or fp32")
    else:
        dtype = None
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(device, dtype, rank, world, keeps_freed_memory=not use_cuda and _freed_memory_kept)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def environment(rt: Runtime) -> dict:
    """Where a run ran: CPU model and the flags that decide synfoc's kernels, GPU, torch, commit."""
    import subprocess

    from synfoc.cpu import cpu_flags, cpu_model
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        src = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(src), "describe", "--always", "--abbrev=12"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
        # -dirty where the package itself differs from the commit, not where results files beside it do
        changed = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--", "."],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and changed:
            commit += "-dirty"
    return {"cpu": cpu_model(), "cpu_flags": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16",
                                                     "amx_bf16", "avx_ne_convert"}),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(), "synfoc_commit": commit,
            "device": str(rt.device), "precision": "bf16" if rt.dtype else "fp32", "processes": rt.world}


def fast_layout(models: dict[str, nn.Module], rt: Runtime) -> dict[str, nn.Module]:
    """channels_last weights under bf16 autocast, where oneDNN/cuDNN convolutions prefer it."""
    if rt.dtype is not None:
        for m in models.values():
            m.to(memory_format=torch.channels_last)
    return models


def unwrap(m: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DistributedDataParallel wrappers."""
    m = getattr(m, "_orig_mod", m)
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


# ----------------------------------------------------------------------------- the process's allocator
# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_freed_memory_kept = False   # set by keep_freed_memory


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (``mallopt``, ``malloc_trim``), else None."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of giving it back to the OS (CPU training).

    By default glibc serves every block above a (dynamic, at most 32 MB) threshold with its own
    ``mmap`` and unmaps it on ``free``, and trims the heap's free top. Most activations of a training
    step are such blocks, so every iteration faulted in and zeroed fresh pages for them, several
    times slower than writing into reused memory. Without ``mmap`` for large blocks and without
    trimming, the step reuses its own freed memory (faster, at a somewhat higher peak resident
    memory; ``benchmarks/step_time.py --with-system-malloc`` measures it). Process-wide, so only
    entry points call it (:func:`prepare_process`); only on glibc; ``SYNFOC_SYSTEM_MALLOC=1``
    leaves the allocator as it is. Returns whether it was set.
    """
    global _freed_memory_kept
    libc = _glibc()
    if os.environ.get("SYNFOC_SYSTEM_MALLOC") or libc is None:
        return False
    # mallopt returns 1 on success; a trim threshold of -1 disables trimming (mallopt(3)).
    kept = bool(libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)
    _freed_memory_kept = _freed_memory_kept or kept
    return kept


def release_freed_memory() -> None:
    """Give the free memory kept by :func:`keep_freed_memory` back to the OS (glibc ``malloc_trim``).

    Called at every checkpoint: with freed blocks kept, heap fragmentation lets the resident memory
    creep up over many iterations; trimming now and then bounds that, at the cost of faulting pages in again once."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def prepare_process(cfg: TrainConfig) -> None:
    """Process-wide settings for a command that trains ``cfg``: on the CPU, glibc keeps freed memory
    for reuse. Called by ``synfoc train`` and ``synfoc sweep`` only."""
    if not uses_cuda(cfg):
        keep_freed_memory()

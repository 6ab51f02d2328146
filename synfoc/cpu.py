"""What this CPU can compute, so that each faster path is taken only where it can run.

Two separate questions:

* :func:`cpu_has_bf16`: does the CPU do bf16 arithmetic in hardware (AMX-BF16 or AVX512-BF16)?
  Only there is bf16 autocast faster than fp32, so ``--precision auto`` picks bf16 there and
  ``--precision bf16`` is refused elsewhere (:func:`synfoc.train.make_runtime`).
* :func:`onednn_kernels`: can oneDNN's fused convolution (``torch.ops.mkldnn._convolution_pointwise``,
  used by :mod:`synfoc.accel`) run in a given dtype? Unlike the public PyTorch operators, which pick
  another kernel by themselves, it raises where oneDNN has no kernel, e.g. bf16 on a CPU without
  AVX-512 BW/VL/DQ. Callers fall back to the plain operators.

:func:`synfoc.accel.available_kernels` asks both which faster kernels to swap into a model; the
swapped modules ask again at each call, so a model computes correctly on a machine it was not built
on. The answers are cached per process, since the CPU does not change under it.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

# The instruction sets oneDNN's bf16 kernels need (oneDNN's avx512_core, avx2_vnni_2 or AMX), as the
# skip reasons and messages name them.
ONEDNN_BF16_ISAS = "AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX"


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name`` line of ``/proc/cpuinfo`` (the first CPU's); None where
    there is no such file (not Linux) or no such line."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The x86 feature flags of the first CPU; empty where they cannot be read (not Linux, not x86)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str:
    """The processor's name as the OS reports it (``model name``), with its x86 family and model
    numbers where the OS gives them (virtual machines often report only "AMD EPYC", which hides
    whether it is a Zen 2 or a Zen 3), else the platform's word for it."""
    import platform
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    return f"{name} (family {family} model {model})" if family and model else name


def cpu_has_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: the CPUs on which bf16 autocast is much faster than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_has_amx() -> bool:
    """AMX-BF16 (Intel Sapphire Rapids and later): bf16 matmuls several times faster than with
    AVX512-BF16, so the memory-bound work between them dominates a step."""
    return "amx_bf16" in cpu_flags()


@functools.cache
def _onednn_fused_ops() -> bool:
    """oneDNN is built in and has the fused convolution, on x86-64: the fusions were written and checked
    against oneDNN's x86 kernels; on other CPUs the plain operators run."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU, as oneDNN itself reports it: it needs
    AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX (and honours ``ONEDNN_MAX_CPU_ISA``, which can cap it)."""
    return _onednn_fused_ops() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_kernels(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused convolution can run on CPU tensors of ``dtype`` here: fp32 wherever it
    exists, bf16 where :func:`onednn_bf16`; never while oneDNN is switched off
    (``torch.backends.mkldnn.enabled = False``)."""
    if not torch.backends.mkldnn.enabled:
        return False
    if dtype == torch.float32:
        return _onednn_fused_ops()
    return dtype == torch.bfloat16 and onednn_bf16()

"""What a benchmark number depends on besides the code: the processor, and the peak it can reach.

Imports nothing from synfoc, so that it describes the machine the same way whichever commit of
synfoc a benchmark is timing.
"""

from __future__ import annotations

import csv
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

# The CPU features that decide which kernels (and which autocast dtype) synfoc gets on the CPU.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model() -> str:
    """``model name`` with the x86 family and model numbers (a VM's "AMD EPYC" alone hides the generation)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if fields.get("cpu family") and fields.get("model"):
        return f"{name} (family {fields['cpu family']} model {fields['model']})"
    return name


def cpu_flags() -> list[str]:
    """The :data:`CPU_FLAGS` this CPU has (Linux's /proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its relevant flags."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    flags = " ".join(cpu_flags()) or "none of " + " ".join(CPU_FLAGS)
    return f"{cpu_model()} [{flags}]"


def run_metadata(root: Path) -> dict:
    """What a CPU result row depends on besides its configuration: commit, torch, CPU, threads."""
    return {"commit": git_describe(root), "torch": torch.__version__,
            "device": device_description(torch.device("cpu")), "threads": torch.get_num_threads()}


def git_describe(root: Path) -> str:
    """``git describe --always`` of the repository at ``root``, with ``-dirty`` where a tracked file
    outside ``benchmarks/results`` changed ('unknown' outside git). The results folder is excluded
    because a benchmark's own first CSV row would otherwise mark every later row of the same code
    dirty."""
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always"],
                             capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                 "--", ".", ":(exclude)benchmarks/results"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0 or not out.stdout.strip():
        return "unknown"
    return out.stdout.strip() + ("-dirty" if status.returncode == 0 and status.stdout.strip() else "")


def git_is_ancestor(root: Path, ancestor: str, commit: str) -> bool:
    """``commit`` (a row's ``git describe`` value; a ``-dirty`` suffix is ignored) is ``ancestor`` or
    comes after it in the history of the repository at ``root``."""
    commit = commit.removesuffix("-dirty")
    out = subprocess.run(["git", "-C", str(root), "merge-base", "--is-ancestor", ancestor, commit],
                         capture_output=True, text=True, timeout=30)
    if out.returncode not in (0, 1):
        raise SystemExit(f"git cannot compare {ancestor!r} with {commit!r}: {out.stderr.strip()}")
    return out.returncode == 0


def matmul_flops(n: int) -> int:
    """Multiply-adds of an (n, n) @ (n, n) product, counted as two FLOPs each (FlopCounterMode's convention)."""
    return 2 * n**3


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> dict:
    """TFLOP/s of a large square matmul in ``dtype`` on ``device`` with the current thread count:
    the median of ``repeats`` timed products after one untimed one (which pays for the kernel choice
    and the first touch of the output)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        a @ b
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "seconds": seconds,
            "tflops": matmul_flops(n) / seconds / 1e12}


def append_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """Append ``rows`` to the CSV file ``path``, with the header first when the file is new. A file
    with other columns is refused (its rows would be misread)."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != tuple(columns):
            raise SystemExit(f"{path} has other columns than this script writes; pass another --csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerows(rows)

"""The speed benchmark still drives the training iteration as ``synfoc train`` runs it: one tiny
configuration, both allocator modes, with and without synfoc.accel, finite losses. Its timings are not checked here (they belong
in benchmarks/results/), nor its own arithmetic (medians, CSV rows, MFU), which cannot fail for a
reason of the product."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# U-Net width 4 at 32 and LiteMedSAM at 64, one iteration: the smallest step that runs every path
TINY = ["--config", "demo", "--image-size", "64", "--unet-size", "32", "--unet-width", "4", "--threads", "1",
        "--matmul-size", "64"]


def test_step_time_runs_the_training_iteration_in_its_modes():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), *TINY, "--with-system-malloc", "--with-no-accel",
           "--iters", "2", "--warmup", "1", "--trace", "--no-csv", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["accel_speedup"] > 0
    for mode in ("fast", "fast-system-malloc", "fast-no-accel"):
        assert len(summary[f"{mode}_times"]) == 2 and all(t > 0 for t in summary[f"{mode}_times"])
        assert summary[f"{mode}_peak_mb"] > 0
        trace = summary[f"{mode}_trace"]
        assert len(trace) == 3  # warm-up + timed iterations, not the FLOP-counting one after them
        assert all(math.isfinite(step["loss"]) for step in trace)

"""The speed benchmark runs end to end on a tiny configuration (its numbers are not checked here:
timings belong in benchmarks/RESULTS.md, never in tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

"""The speed benchmark runs end to end on a tiny configuration (its timings are not checked here:
they belong in benchmarks/results/, never in tests): its CSV row, its named configurations, its
matmul peak, and its A/B against a worktree of a commit."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synfoc.config import preset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # the benchmarks folder is not a package
    sys.path.insert(0, str(ROOT / "benchmarks"))

import machine  # noqa: E402
import step_time  # noqa: E402

# U-Net width 4 at 32 and LiteMedSAM at 64, one iteration: the smallest step that runs every path
TINY = ["--config", "demo", "--image-size", "64", "--unet-size", "32", "--unet-width", "4", "--threads", "1",
        "--matmul-size", "64"]


def run_step_time(*options: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), *TINY, *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_step_time_alternates_its_modes_and_reports_json():
    summary = json.loads(run_step_time("--with-system-malloc", "--with-no-accel", "--iters", "2", "--warmup", "1",
                                       "--trace", "--no-csv", "--json").stdout.strip().splitlines()[-1])
    assert summary["accel_speedup"] == summary["fast-no-accel_s"] / summary["fast_s"]
    for mode in ("fast", "fast-system-malloc", "fast-no-accel"):
        assert len(summary[f"{mode}_times"]) == 2 and all(t > 0 for t in summary[f"{mode}_times"])
        assert summary[f"{mode}_peak_mb"] > 0
        trace = summary[f"{mode}_trace"]
        assert len(trace) == 3  # warm-up + timed iterations, not the FLOP-counting one after them
        assert all(math.isfinite(step["loss"]) for step in trace)
        assert summary[f"{mode}_s"] == sum(summary[f"{mode}_times"]) / 2  # the median of two
        assert summary[f"{mode}_s_iqr"] == pytest.approx(abs(summary[f"{mode}_times"][0] - summary[f"{mode}_times"][1]) / 2)
        assert summary[f"{mode}_mfu"] == summary[f"{mode}_tflops_per_s"] / summary[f"{mode}_peak_tflops"]


def test_step_time_appends_one_csv_row_with_its_utilisation(tmp_path):
    path = tmp_path / "step_time.csv"
    proc = run_step_time("--iters", "2", "--warmup", "0", "--precision", "fp32", "--csv", str(path))
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header, rows = next(reader), list(reader)
    assert tuple(header) == step_time.CSV_COLUMNS and len(rows) == 1
    row = dict(zip(header, rows[0]))
    assert row["mode"] == "fast" and row["config"] == "demo" and row["dtype"] == "fp32"
    # the named configuration's values, with the explicit options over them
    assert (row["foundation"], row["image_size"], row["unet_size"], row["unet_width"]) == ("litemedsam", "64", "32", "4")
    assert (row["batch_labeled"], row["batch_unlabeled"], row["threads"], row["iters"]) == ("2", "2", "1", "2")
    assert row["synfoc_commit"] == machine.git_describe(ROOT) and row["torch"] == torch.__version__
    assert row["device"].startswith("cpu: " + machine.cpu_model())
    assert all(flag in row["device"] for flag in machine.cpu_flags())
    assert row["peak_source"].startswith("matmul 64^3 float32")
    s, lo, hi = float(row["s_per_iter_median"]), float(row["s_per_iter_min"]), float(row["s_per_iter_max"])
    assert 0 < lo <= s <= hi and float(row["s_per_iter_iqr"]) >= 0
    flops, achieved, peak = int(row["flops_per_iter"]), float(row["tflops_per_s"]), float(row["matmul_peak_tflops"])
    assert flops > 1e9 and peak > 0 and float(row["peak_memory_mb"]) > 0
    assert achieved == pytest.approx(flops / s / 1e12, rel=1e-9)
    assert float(row["mfu"]) == pytest.approx(achieved / peak, rel=1e-9)
    assert "| fast |" in proc.stdout and "MFU" in proc.stdout  # the table too

    machine.append_csv(path, step_time.CSV_COLUMNS, [dict(row, mode="again")])  # a second run: a row, no second header
    assert [r[1] for r in csv.reader(path.open(newline=""))] == ["mode", "fast", "again"]
    other = tmp_path / "other.csv"
    other.write_text("date,mode\n")
    with pytest.raises(SystemExit, match="other columns"):
        machine.append_csv(other, step_time.CSV_COLUMNS, [row])


def test_named_configurations_resolve_to_their_documented_sizes():
    sizes = ("foundation", "image_size", "unet_size", "unet_width", "batch_labeled", "batch_unlabeled")

    def resolved(*argv):
        args = step_time.parse_args(list(argv))
        return tuple(getattr(args, k) for k in sizes)

    assert resolved("--config", "demo") == tuple(preset("demo")[k] for k in sizes)
    assert resolved("--config", "demo") == ("litemedsam", 64, 128, 16, 2, 2)
    assert resolved("--config", "reduced") == ("litemedsam", 128, 128, 16, 2, 2)
    assert resolved("--config", "paper") == ("medsam_vit_b", 512, 256, 64, 4, 4)
    # explicit options win, before or after --config
    assert resolved("--image-size", "256", "--config", "paper") == ("medsam_vit_b", 256, 256, 64, 4, 4)
    assert step_time.parse_args(["--config", "paper"]).config == "paper"
    assert step_time.parse_args([]).config is None


def test_matmul_peak_counts_2n3_flops_and_is_positive():
    assert machine.matmul_flops(2048) == 2 * 2048**3
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        torch.ones(48, 48) @ torch.ones(48, 48)
    assert counter.get_total_flops() == machine.matmul_flops(48)
    for dtype in (torch.float32, torch.bfloat16):
        peak = machine.matmul_peak(torch.device("cpu"), dtype, n=64, repeats=2)
        assert peak["tflops"] > 0 and peak["n"] == 64 and peak["dtype"] == str(dtype).removeprefix("torch.")
        assert peak["tflops"] == pytest.approx(machine.matmul_flops(64) / peak["seconds"] / 1e12)


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git repository (a worktree of HEAD)")
def test_step_time_against_head_runs_the_worktree_code_and_reports_the_ratio():
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    summary = json.loads(run_step_time("--iters", "1", "--warmup", "0", "--no-flops", "--against", "HEAD",
                                       "--no-csv", "--json").stdout.strip().splitlines()[-1])
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert summary["against_commit"] == head and summary["against_rev"] == "HEAD"
    assert summary["fast_commit"] == machine.git_describe(ROOT)
    # each child imported its own checkout's package: the worktree's, not the editable install's
    assert Path(summary["fast_synfoc_file"]) == ROOT / "synfoc" / "__init__.py"
    against = Path(summary["against_synfoc_file"])
    assert not against.is_relative_to(ROOT) and against.parts[-2:] == ("synfoc", "__init__.py")
    assert not against.exists()  # the worktree is gone
    assert summary["against_s"] > 0 and summary["fast_s"] > 0
    assert summary["against_ratio"] == summary["fast_s"] / summary["against_s"]
    assert summary["against_paired_speedup"] == summary["against_s"] / summary["fast_s"]
    assert subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout == listed

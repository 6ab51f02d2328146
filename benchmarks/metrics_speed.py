"""Speed of ``synfoc.metrics.batch_binary_metrics`` against medpy slice by slice.

Generates realistic blob-like ground-truth masks (smoothed noise, one to three organs per slice)
and predictions that are perturbed copies (shifted, boundary noise, a false-positive speck,
sometimes empty), times medpy's ``dc, jc, hd95, asd`` per slice against the batched path, checks
that they agree to 1e-6, prints a Markdown table and appends one row to
benchmarks/results/metrics_speed.csv (``--csv``).

    python benchmarks/metrics_speed.py [--n 64] [--size 256] [--seed 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np
from medpy.metric import binary as medpy_binary
from scipy.ndimage import gaussian_filter, shift

from machine import append_csv, device_description, git_describe

import torch

from synfoc.metrics import batch_binary_metrics

ROOT = Path(__file__).resolve().parents[1]
CSV_COLUMNS = ("date", "synfoc_commit", "torch", "device", "threads", "n", "size", "repeats", "medpy_s",
               "synfoc_s", "speedup", "max_abs_difference")


def blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth organ-like mask: thresholded low-pass noise around a random centre."""
    rows, cols = np.mgrid[0:size, 0:size] / size
    centre = rng.uniform(0.3, 0.7, size=2)
    radius = rng.uniform(0.08, 0.22)
    distance = np.hypot(rows - centre[0], cols - centre[1]) / radius
    wobble = gaussian_filter(rng.standard_normal((size, size)), sigma=size / 16) * size / 8
    return (distance + wobble) < 1.0


def perturbed_prediction(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """A plausible network output for ``gt``: shifted, with a noisy boundary and a stray speck."""
    size = gt.shape[0]
    moved = shift(gt.astype(np.float32), rng.uniform(-size / 40, size / 40, size=2), order=1)
    noise = gaussian_filter(rng.standard_normal(gt.shape), sigma=size / 64) * 2.0
    pred = gaussian_filter(moved, sigma=size / 128) + 0.3 * noise > 0.5
    speck = rng.integers(0, size - 4, size=2)
    pred[speck[0] : speck[0] + 3, speck[1] : speck[1] + 3] = True
    return pred


def make_batch(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(preds, gts), each (n, size, size) bool, every slice with a non-empty gt and pred."""
    rng = np.random.default_rng(seed)
    gts = np.stack([blob_mask(rng, size) for _ in range(n)])
    preds = np.stack([perturbed_prediction(rng, gt) for gt in gts])
    return preds, gts


def medpy_per_slice(preds: np.ndarray, gts: np.ndarray) -> list[dict[str, float]]:
    """The reference: medpy's four metrics, one slice at a time."""
    return [
        {
            "dice": medpy_binary.dc(pred, gt),
            "jaccard": medpy_binary.jc(pred, gt),
            "hd95": medpy_binary.hd95(pred, gt),
            "asd": medpy_binary.asd(pred, gt),
        }
        for pred, gt in zip(preds, gts)
    ]


def best_time(function, repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` runs (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="number of slices")
    parser.add_argument("--size", type=int, default=256, help="slice side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    parser.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "metrics_speed.csv",
                        help="CSV file the row is appended to")
    args = parser.parse_args()

    preds, gts = make_batch(args.n, args.size, args.seed)
    medpy_seconds, reference = best_time(lambda: medpy_per_slice(preds, gts), args.repeats)
    batch_seconds, ours = best_time(lambda: batch_binary_metrics(preds, gts), args.repeats)

    worst = max(abs(r[k] - o[k]) for r, o in zip(reference, ours) for k in r)
    if worst > 1e-6:
        raise SystemExit(f"batch_binary_metrics disagrees with medpy: max abs difference {worst:g}")

    print(f"{args.n} slices of {args.size}x{args.size}, max |difference| to medpy {worst:.1e}\n")
    print("| method | seconds | per-slice ms | speed-up |")
    print("|---|---:|---:|---:|")
    for name, seconds in (
        ("medpy per slice (dc, jc, hd95, asd)", medpy_seconds),
        ("synfoc batch_binary_metrics", batch_seconds),
    ):
        print(
            f"| {name} | {seconds:.3f} | {1000 * seconds / args.n:.2f} "
            f"| {medpy_seconds / seconds:.1f}x |"
        )
    append_csv(args.csv, CSV_COLUMNS, [{
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "synfoc_commit": git_describe(ROOT), "torch": torch.__version__,
        "device": device_description(torch.device("cpu")), "threads": torch.get_num_threads(),
        "n": args.n, "size": args.size, "repeats": args.repeats, "medpy_s": f"{medpy_seconds:.4f}",
        "synfoc_s": f"{batch_seconds:.4f}", "speedup": f"{medpy_seconds / batch_seconds:.2f}",
        "max_abs_difference": f"{worst:.1e}"}])


if __name__ == "__main__":
    main()

"""Validation Dice of a validation run's students at an earlier iteration, from a kept checkpoint.

``threshold_validation.py`` scores the students a run ends with. How they moved on the way there
shows whether a longer schedule helps a method or only costs time. A run overwrites its
``checkpoint.pt`` (about 20 times per run, and every 10 minutes), so copies are kept while it trains:
``--keep 1000,2000,3000`` runs beside the training and copies ``checkpoint.pt`` to
``RUN/../ckpt_<step>.pt`` whenever it holds one of those steps, until the last is kept. Each copy
is then evaluated on the same validation split as the run (the ``--val-num`` training images of
the labeled domain after the labeled ones in name order; never the test set):

    nohup python benchmarks/busi/checkpoint_validation.py runs/long4k/synfoc/t0.95 --keep 1000,2000,3000 &
    python benchmarks/busi/checkpoint_validation.py runs/long4k/synfoc/t0.95 runs/long4k/synfoc/ckpt_1000.pt

For each checkpoint it makes ``RUN_at<step>/`` (the run's split and configuration, the copy as its
checkpoint), lets training resume there at that step with nothing left to train, so that the
students get exactly the final treatment of a run (U-Net BatchNorm statistics per training domain
from weak views, then evaluation), and appends one row per student to
``benchmarks/results/busi/checkpoint_validation.csv``. The students are the students at that step
of a run whose schedules (the lambda ramp) span the whole run: not the same as a run of that many
iterations.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from input_size import train_on, validation_index  # noqa: E402
from machine import append_csv, run_metadata  # noqa: E402

CSV = HERE.parent / "results" / "busi" / "checkpoint_validation.csv"
CSV_COLUMNS = ("commit", "torch", "device", "threads", "run", "method", "student", "threshold", "domain", "labeled",
               "validation", "seed", "run_iters", "step", "unet_width", "val_dice", "val_hd95", "eval_s")
SPLIT_FILES = ("labeled.txt", "unlabeled.txt", "history.jsonl")


def checkpoint_step(path: Path) -> int:
    """The iteration a checkpoint copy was saved at; training's own loader says what is wrong with a bad one."""
    from synfoc.checkpoint import load_checkpoint
    return int(load_checkpoint(path, "cpu", path.parent)["step"])


def keep_checkpoints(run: Path, steps: set[int], poll_s: float = 30.0, within_s: float | None = None) -> None:
    """Copy ``run/checkpoint.pt`` to ``run/../ckpt_<step>.pt`` each time it holds one of ``steps``
    (training replaces the file atomically, so a copy is never half-written); return when all are
    kept, or stop after ``within_s`` seconds without them."""
    ckpt, seen, start = run / "checkpoint.pt", None, time.time()
    while missing := steps - {s for s in steps if (run.parent / f"ckpt_{s}.pt").is_file()}:
        if within_s is not None and time.time() - start > within_s:
            raise SystemExit(f"{run}: no checkpoint of iteration(s) {sorted(missing)} within {within_s:g} s")
        stamp = ckpt.stat().st_mtime_ns if ckpt.is_file() else None
        if stamp is not None and stamp != seen:
            seen = stamp
            tmp = run.parent / "ckpt_copy.tmp"
            shutil.copyfile(ckpt, tmp)
            step = checkpoint_step(tmp)
            if step in steps:
                tmp.replace(run.parent / f"ckpt_{step}.pt")
                print(f"kept the checkpoint of iteration {step}", flush=True)
        time.sleep(poll_s)


def at_step(run: Path, ckpt: Path, step: int) -> Path:
    """``RUN_at<step>/``: the run's split files, its configuration with ``iters`` = step, and the
    checkpoint copy; made once (a finished one keeps its summary)."""
    out = run.parent / f"{run.name}_at{step}"
    if (out / "summary.json").is_file():
        return out
    out.mkdir(exist_ok=True)
    for name in SPLIT_FILES:
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**config, "iters": step}, sort_keys=False))
    shutil.copyfile(ckpt, out / "checkpoint.pt")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder of threshold_validation.py")
    ap.add_argument("checkpoints", type=Path, nargs="*", help="kept copies of the run's checkpoint.pt")
    ap.add_argument("--keep", metavar="STEPS", help="instead: keep copies of the training run's checkpoint at these steps")
    ap.add_argument("--val-num", type=int, default=64, help="as the run was made with (threshold_validation.py)")
    ap.add_argument("--csv", default=str(CSV))
    args = ap.parse_args()

    from synfoc.config import run_config
    from synfoc.data.source import open_index

    if args.keep:
        keep_checkpoints(args.run, {int(x) for x in args.keep.split(",")})
        return
    if not args.checkpoints:
        raise SystemExit("name the checkpoint copies to evaluate, or --keep STEPS to keep them")
    cfg = run_config(args.run)
    carved = validation_index(open_index(cfg), cfg.labeled_domain, cfg.labeled_num, args.val_num)
    for ckpt in args.checkpoints:
        step = checkpoint_step(ckpt)
        if step > cfg.iters:
            raise SystemExit(f"{ckpt}: step {step} is beyond the run's {cfg.iters} iterations")
        out = at_step(args.run, ckpt, step)
        start = time.time()
        summary, evaluated = train_on(run_config(out), out, carved)
        for student, result in summary["students"].items():
            mean = result["mean"]
            row = {**run_metadata(HERE.parent.parent), "run": str(args.run), "method": cfg.method,
                   "student": student, "threshold": cfg.threshold, "domain": cfg.labeled_domain,
                   "labeled": cfg.labeled_num, "validation": args.val_num, "seed": cfg.seed, "run_iters": cfg.iters,
                   "step": step, "unet_width": cfg.unet_width, "val_dice": round(100 * mean["dice"], 2),
                   "val_hd95": round(mean["hd95"], 2), "eval_s": round(time.time() - start, 1)}
            print(f"{cfg.method} {student} at {step}/{cfg.iters}: validation Dice {row['val_dice']:.2f}", flush=True)
            if evaluated:
                append_csv(Path(args.csv), CSV_COLUMNS, [row])


if __name__ == "__main__":
    main()

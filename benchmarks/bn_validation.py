"""Which BatchNorm statistics suit a finished run's U-Net, on a validation split, not the test set.

For each domain, the run's unlabeled training images of that domain are split in two halves by
name order. Statistics estimated on the first half are scored on the second, with the hidden labels
(Dice %, mean over images). Three choices are scored:
- ``pooled``: the statistics saved with the student (``unet.safetensors``);
- ``running``: the training-time running statistics (``checkpoint.pt``);
- ``per-domain``: the running statistics replaced by the first half's average.

    python benchmarks/bn_validation.py RUN [RUN ...]

Prints one line per (run, domain).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch


def dice_percent(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred > 0, truth > 0
    inter, total = (p & t).sum((1, 2)), p.sum((1, 2)) + t.sum((1, 2))
    return float(np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1)).mean() * 100)


def with_statistics_of(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None   # a plain average over the batches
    model.train()
    with torch.no_grad():
        for chunk in images.split(16):
            if len(chunk) > 1:
                model(chunk.float().div(255))
    return model.eval()


def unlabeled_training_cases(run: Path, index) -> list:
    """The run's unlabeled training cases (``unlabeled.txt``), in the index's domain order."""
    from synfoc.data.split import read_split, split_key
    listed = read_split(run)[1]
    if listed is None:
        raise FileNotFoundError(f"{run / 'unlabeled.txt'} is missing: not a synfoc run folder")
    unlabeled = set(listed)
    return [c for d in index.domains for c in index.cases_of(d, "train") if split_key(c) in unlabeled]


def main(runs: list[str]) -> None:
    from synfoc.checkpoint import load_run
    from synfoc.data import load_cases
    from synfoc.evaluate import predict_labels
    for run in map(Path, runs):
        cfg, index, students, rt = load_run(run)
        pooled = students["unet"]
        running = copy.deepcopy(pooled)
        running.load_state_dict(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
                                ["students"]["unet"])
        running.eval()
        unlabeled = unlabeled_training_cases(run, index)
        size = cfg.unet_size
        for domain in index.domains:
            cases = [c for c in unlabeled if c.domain == domain]
            if len(cases) < 4:
                continue
            images, labels = load_cases(index, cases, [size]).arrays[size]
            half = len(cases) // 2
            scored = {"pooled": pooled, "running": running, "per-domain": with_statistics_of(running, images[:half])}
            dice = {k: dice_percent(predict_labels(m, images[half:], size, rt.device, rt.autocast).numpy(),
                                    labels[half:].numpy()) for k, m in scored.items()}
            print(run, domain, f"{len(cases) - half} images", " ".join(f"{k} {v:.1f}" for k, v in dice.items()),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

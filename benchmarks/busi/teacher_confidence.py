"""How much lesion the confident pseudo-labels of a finished run's teachers carry, on its unlabeled
training images (their labels hidden from training; the test set is not read).

For each unlabeled training image of the run (``unlabeled.txt``), without augmentation, in batches
of the run's unlabeled batch size and with the teachers' train/eval mode of training, the final
EMA teachers of ``checkpoint.pt`` give the pseudo-labels the unsupervised loss would see: the U-Net
teacher's, the foundation teacher's (resized to the U-Net size as in training) and, where the run has
both, SynFoC's SMC ensemble (Eqs. 3-6, alpha from the final U-Net student). For each threshold it
prints, against the hidden labels:
- ``confident``: fraction of pixels whose top probability passes the threshold;
- ``lesion share``: of the confident pixels, the fraction labeled lesion;
- ``lesion recall``: of the true lesion pixels, the fraction that get a confident lesion label;
- ``lesion precision``: of the confident lesion labels, the fraction that are true lesion.

    python benchmarks/busi/teacher_confidence.py RUN [RUN ...] [--thresholds 0.95,0.9,0.8,0.7] [--domain D]

The first line per run gives the true lesion fraction of the images, for scale; then, per
pseudo-label, quantiles of its lesion probability on the true lesion pixels, and for the U-Net
teacher the lesion probability its 1x1 head gives when every (ReLU) feature before it is 0 (the
bias alone): where the U-Net encodes lesion by silencing those features, that is its ceiling.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bn_validation import unlabeled_training_cases  # noqa: E402

THRESHOLDS = "0.95,0.9,0.8,0.7"


def teacher_probs(model: torch.nn.Module, images: torch.Tensor, size: int, batch: int, train_mode: bool) -> torch.Tensor:
    """Soft-max probabilities of ``model`` on uint8 images, ``batch`` at a time, brought to ``size``
    as training does (``resize_probs``: bilinear on probabilities). In train mode a U-Net normalises
    each batch with its own statistics, as the teachers and the self-confidence forward do in
    training (``teacher_mode: train``), and its running statistics stay as they are."""
    from synfoc.method.norm import frozen_batchnorm_stats
    from synfoc.method.synfoc import probs_of, resize_probs
    out = []
    model.train(train_mode)
    with torch.no_grad(), frozen_batchnorm_stats(model):
        for chunk in images.split(batch):
            out.append(resize_probs(probs_of(model, chunk.float().div(255)), size))
    return torch.cat(out)


def confidence_rows(p: torch.Tensor, truth: torch.Tensor, thresholds: list[float]) -> list[dict]:
    conf, q = p.max(dim=1)
    lesion = truth > 0
    rows = []
    for tau in thresholds:
        w = conf > tau
        confident_lesion = w & (q > 0)
        rows.append({"threshold": tau, "confident": w.float().mean().item(),
                     "lesion share": (confident_lesion.sum() / w.sum().clamp(min=1)).item(),
                     "lesion recall": ((confident_lesion & lesion).sum() / lesion.sum().clamp(min=1)).item(),
                     "lesion precision": ((confident_lesion & lesion).sum()
                                          / confident_lesion.sum().clamp(min=1)).item()})
    return rows


def with_state(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    model = copy.deepcopy(model)
    model.load_state_dict(state, strict=False)
    return model


def main() -> None:
    from synfoc.checkpoint import load_run
    from synfoc.data import load_cases
    from synfoc.method.losses import part_dice
    from synfoc.method.synfoc import ensemble, labels_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--thresholds", default=THRESHOLDS)
    ap.add_argument("--domain", help="only the unlabeled training images of this domain (default: all)")
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    for run in args.runs:
        ckpt = run / "checkpoint.pt"
        if not ckpt.is_file():
            raise SystemExit(f"{ckpt} not found: the teachers are only in a run's checkpoint")
        cfg, index, students, _ = load_run(run, device="cpu")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        teachers = {k: with_state(m, state["teachers"][k]) for k, m in students.items()}
        cases = [c for c in unlabeled_training_cases(run, index) if args.domain in (None, c.domain)]
        if not cases:
            raise SystemExit(f"{run}: no unlabeled training images of domain {args.domain!r} "
                             f"(domains: {', '.join(index.domains)})")
        size = cfg.unet_size
        loaded = load_cases(index, cases, [size, cfg.image_size], progress=False)
        # the unlabeled batches of training: ``batch_unlabeled`` images drawn in a shuffled order
        order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(0))
        images, truth = (a[order] for a in loaded.arrays[size])
        images_f = loaded.arrays[cfg.image_size][0][order]
        batch, train_mode = cfg.batch_unlabeled, cfg.teacher_mode == "train"
        print(f"{run}: {len(cases)} unlabeled training images, step {state['step']}, "
              f"true lesion fraction {(truth > 0).float().mean().item():.3f}")
        probs = {}
        if "unet" in teachers:
            probs["U-Net teacher"] = teacher_probs(teachers["unet"], images, size, batch, train_mode)
        if "foundation" in teachers:
            probs["foundation teacher"] = teacher_probs(teachers["foundation"], images_f, size, batch, train_mode)
        if len(probs) == 2:   # SynFoC's ensemble with SMC's alpha (Eqs. 4-6), final U-Net student
            p_ut, p_ms = probs["U-Net teacher"], probs["foundation teacher"]
            q_student = labels_of(teacher_probs(students["unet"], images, size, batch, True))   # train mode in training
            parts = [values for _, values in index.report_parts]   # as training builds SynFoC
            alpha = (part_dice(q_student, labels_of(p_ut), parts)
                     * part_dice(labels_of(p_ms), labels_of(p_ut), parts)).view(-1, 1, 1, 1)
            probs["SMC ensemble"] = ensemble(p_ut, p_ms, alpha)
            print(f"  alpha over images: p10 {alpha.quantile(0.1):.2f}  p50 {alpha.median():.2f}  "
                  f"p90 {alpha.quantile(0.9):.2f}")
        for name, p in probs.items():
            on_lesion = 1 - p[:, 0][truth > 0]   # the probability of not-background on true lesion pixels
            q = torch.quantile(on_lesion[torch.randperm(len(on_lesion), generator=torch.Generator().manual_seed(0))[:100000]],
                               torch.tensor([0.5, 0.9, 0.99]))
            print(f"  {name}: lesion probability on true lesion pixels p50 {q[0]:.3f}  p90 {q[1]:.3f}  "
                  f"p99 {q[2]:.3f}  max {on_lesion.max():.3f}")
        if "unet" in teachers and index.num_classes == 1:
            # ReLU features feed the 1x1 head: with every feature at 0 the logits are the head's bias
            bias = teachers["unet"].head.bias.detach()
            print(f"  U-Net teacher: lesion probability with all last-layer features 0 (head bias only) "
                  f"{torch.softmax(bias, 0)[1]:.3f}")
        print(f"  {'pseudo-label':<20} {'threshold':>9} {'confident':>9} {'lesion share':>12} "
              f"{'lesion recall':>13} {'lesion precision':>16}")
        for name, p in probs.items():
            for r in confidence_rows(p, truth, thresholds):
                print(f"  {name:<20} {r['threshold']:>9.2f} {r['confident']:>9.3f} {r['lesion share']:>12.3f} "
                      f"{r['lesion recall']:>13.3f} {r['lesion precision']:>16.3f}", flush=True)


if __name__ == "__main__":
    main()

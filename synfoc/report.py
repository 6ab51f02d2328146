"""Pictures of a run: ``progress.png`` (kept up to date by training) and the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = [("losses", ("loss", "loss_x", "loss_u", "loss_c", "loss_d")),
          ("ramp and ensemble weight", ("lambda", "alpha", "self_confidence", "mutual_confidence")),
          ("pseudo-label Dice (hidden labels)", ("pseudo_dice_unet", "pseudo_dice_foundation", "pseudo_dice_ensemble"))]


def read_history(run: Path) -> list[dict]:
    path = Path(run) / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(history: list[dict], path: Path) -> None:
    """Training curves (losses; lambda, alpha, self and mutual confidence; pseudo-label Dice)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(title, [k for k in keys if any(k in h for h in history)]) for title, keys in CURVES]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(h["step"], h[k]) for h in history if k in h]
            ax.plot(*zip(*pts), label=k)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def write_progress_png(run: Path) -> None:
    history = read_history(run)
    if history:
        plot_curves(history, Path(run) / "progress.png")

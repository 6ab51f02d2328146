"""``synfoc data preview``: the training views drawn before training, from the training code."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from synfoc.config import resolve
from synfoc.preview import preview_png
from synfoc.data.source import open_index


def test_preview_draws_every_case_at_both_sizes():
    cfg = resolve("demo", overrides={"synthetic_train": 6, "synthetic_test": 1, "labeled_num": 3})
    png = preview_png(cfg, open_index(cfg), cases=2)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG"
    arr = np.asarray(im.convert("RGB")).astype(int)
    # the box M is drawn in yellow and the labels' contours in red: both present
    yellow = (arr[..., 0] > 200) & (arr[..., 1] > 200) & (arr[..., 2] < 80)
    red = (arr[..., 0] > 200) & (arr[..., 1] < 100) & (arr[..., 2] < 100)
    assert yellow.sum() > 50 and red.sum() > 50
    # 2 rows x 8 tiles: the figure is wider than tall
    assert im.size[0] > 2 * im.size[1]


def test_preview_is_the_first_training_batch(monkeypatch):
    """The preview calls the training code's make_views with the run's seed at iteration 0."""
    import synfoc.views as views
    seen = {}
    real = views.make_views

    def spy(cfg, aug, labeled, unlabeled, t, sizes, rt, seed):
        seen.update(t=t, seed=seed, sizes=dict(sizes), batch=(cfg.batch_labeled, cfg.batch_unlabeled))
        return real(cfg, aug, labeled, unlabeled, t, sizes, rt, seed)

    monkeypatch.setattr(views, "make_views", spy)
    cfg = resolve("demo", overrides={"synthetic_train": 6, "synthetic_test": 1, "labeled_num": 3, "seed": 7})
    preview_png(cfg, open_index(cfg), cases=3)
    assert seen == {"t": 0, "seed": 7, "sizes": {"unet": 128, "foundation": 64}, "batch": (3, 3)}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "synfoc", "data", "preview", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_writes_png_and_names_bad_input(tmp_path):
    out = tmp_path / "views.png"
    done = run_cli("synthetic", "--out", str(out), "--cases", "1")
    assert done.returncode == 0, done.stderr
    assert Image.open(out).format == "PNG"
    bad = run_cli(str(tmp_path / "nowhere"), "--out", str(out))
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("synthetic", "--out", str(tmp_path / "views.jpg"))
    assert bad.returncode == 2 and "--out" in bad.stderr and "Traceback" not in bad.stderr

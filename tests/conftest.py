"""Fixtures shared by several test modules. A fixture that trains writes into its own temporary
folder (``tmp_path_factory.mktemp``); a test that changes a shared run copies it first."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

# A finished run's settings: 2 iterations on the embedded synthetic set, tiny models, on the CPU.
TINY_RUN = {"iters": 2, "log_every": 1, "synthetic_train": 4, "synthetic_test": 2, "labeled_num": 2,
            "unet_size": 64, "image_size": 64, "unet_width": 8, "device": "cpu", "precision": "fp32"}


@pytest.fixture
def two_threads():
    """Two torch threads for the test (what the suite's machines have), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def unet_run(tmp_path_factory) -> Path:
    """A finished suponly-unet run (a U-Net student only), trained once per session. Read-only."""
    from synfoc.config import resolve
    from synfoc.train import train
    run = tmp_path_factory.mktemp("unet_run") / "run"
    torch.set_num_threads(1)
    train(resolve("demo", None, {**TINY_RUN, "method": "suponly-unet"}), run, progress=False)
    return run


@pytest.fixture(scope="session")
def two_student_run(unet_run, tmp_path_factory) -> Path:
    """A copy of :func:`unet_run` that also holds an untrained foundation student (LiteMedSAM at
    64 px), re-evaluated so summary.json has both. Read-only."""
    from synfoc.evaluate import evaluate_run
    from synfoc.models import build_foundation_model
    from synfoc.models.weights import save_trainable
    both = tmp_path_factory.mktemp("two_student_run") / "run"
    shutil.copytree(unet_run, both)
    fm = build_foundation_model("litemedsam", 1, lora_rank=4, image_size=TINY_RUN["image_size"], checkpoint=None)
    save_trainable(fm, both / "foundation.safetensors")
    evaluate_run(both, device="cpu")  # summary.json and per_case.csv of both students
    return both

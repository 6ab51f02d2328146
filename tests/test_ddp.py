"""Multi-process training: two CPU processes (gloo) launched by torchrun keep identical students.

The training loop wraps the students in DistributedDataParallel and lets each rank draw its own
batches (seed offset by rank); only rank 0 writes checkpoints. A small driver, run under torchrun,
calls :func:`synfoc.train.train` and then makes every rank save its own students, so the two
ranks' weights can be compared. It also records a checksum of each rank's first labeled batch: the
ranks must have seen different data, otherwise identical weights would prove nothing about the
gradient synchronisation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch.distributed")

DRIVER = r'''
"""Run synfoc.train.train under torchrun, then save this rank's students to OUT/rank{R}.pt."""
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
import synfoc.train as T
from synfoc.config import TrainConfig

root = Path(sys.argv[1])
runs = json.loads(sys.argv[2])
rank = int(os.environ["RANK"])
for name, settings in runs.items():
    out = root / name
    students, initial, first_batch = {}, {}, []
    make_optimizers, make_views = T.make_optimizers, T.make_views

    def spy_optimizers(cfg, models):  # the loop passes its (unwrapped) students here, on every rank
        students.update(models)
        initial.update({k: {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
                        for k, m in models.items()})
        return make_optimizers(cfg, models)

    def spy_views(*a, **kw):
        views = make_views(*a, **kw)
        if not first_batch:
            first_batch.append(float(views.x_u.double().sum()))
        return views

    T.make_optimizers, T.make_views = spy_optimizers, spy_views
    try:
        T.train(TrainConfig(**settings), out, progress=False)
    finally:
        T.make_optimizers, T.make_views = make_optimizers, make_views
    torch.save({"world": dist.get_world_size(), "first_batch": first_batch[0],
                "initial": initial,
                "students": {k: {n: p.detach().cpu().clone() for n, p in m.named_parameters() if p.requires_grad}
                             for k, m in students.items()}},
               out / f"rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
'''

TINY = {"dataset": "synthetic", "synthetic_train": 4, "synthetic_test": 1, "labeled_num": 2,
        "batch_labeled": 2, "batch_unlabeled": 2, "unet_size": 32, "unet_width": 4, "iters": 3,
        "device": "cpu", "log_every": 1, "checkpoint_every": 3}
RUNS = {"suponly-unet": {**TINY, "method": "suponly-unet"},
        "synfoc": {**TINY, "method": "synfoc", "foundation": "litemedsam", "image_size": 32}}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> Path:
    """Both runs, in one torchrun launch of two gloo processes (one interpreter start-up per rank)."""
    root = tmp_path_factory.mktemp("ddp")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", str(driver), str(root), json.dumps(RUNS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return root


@pytest.mark.parametrize("run", list(RUNS))
def test_ranks_keep_identical_students(two_rank_runs: Path, run: str) -> None:
    out = two_rank_runs / run
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    # The ranks drew different batches, so identical weights need the gradient all-reduce.
    assert r0["first_batch"] != pytest.approx(r1["first_batch"], rel=1e-6)
    assert r0["students"].keys() == r1["students"].keys() and r0["students"]
    for kind, params in r0["students"].items():
        other = r1["students"][kind]
        assert params.keys() == other.keys()
        for name, p in params.items():
            assert torch.equal(p, other[name]), f"{run}: {kind}.{name} differs between ranks"
        # Training moved the weights (identical because unchanged would prove nothing).
        moved = [not torch.equal(p, r0["initial"][kind][name]) for name, p in params.items()]
        assert sum(moved) > len(moved) // 2, f"{run}: {kind} barely changed in training"


@pytest.mark.parametrize("run", list(RUNS))
def test_rank0_checkpoint_holds_the_synchronised_students(two_rank_runs: Path, run: str) -> None:
    out = two_rank_runs / run
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True, map_location="cpu")
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert ckpt["step"] == 3
    for kind, params in r1["students"].items():
        for name, p in params.items():
            assert torch.equal(ckpt["students"][kind][name], p), f"{run}: checkpoint {kind}.{name} != rank 1"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]  # one writer: rank 0

"""Bad input and faults a user can hit: each ends in one message naming the file or option (exit
2 for user errors, 130 for Ctrl-C), no Python traceback, and nothing that existed before is lost.

The table in docs/reliability.md lists every case with the test that checks it. Runs are tiny
(U-Net only, 32-pixel inputs, a few iterations) and mostly in-process, through ``synfoc.cli.main``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synfoc import train as train_module
from synfoc.cli import main

TINY_NO_SPLIT = ["--unet-size", "32", "--unet-width", "4", "--image-size", "64", "--batch-labeled", "2",
                 "--batch-unlabeled", "2", "--no-progress", "--device", "cpu", "--method", "suponly-unet"]
TINY = [*TINY_NO_SPLIT, "--labeled-num", "2"]


def tiny_config(tmp_path: Path, **extra) -> Path:
    cfg = {"synthetic_train": 4, "synthetic_test": 2, "log_every": 1, "precision": "fp32"}
    cfg.update(extra)
    path = tmp_path / "tiny.yaml"
    path.write_text("\n".join(f"{k}: {v}" for k, v in cfg.items()))
    return path


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of ``synfoc ARGV`` run in this process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    for name in names:
        assert str(name) in err, (name, err)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: "nothing lost" compares two of these."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_args(tmp_path: Path, out: Path, iters: int = 2, split: bool = True, **cfg) -> list:
    return ["train", "--config", tiny_config(tmp_path, **cfg), "--out", out, "--iters", iters,
            *(TINY if split else TINY_NO_SPLIT)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoints at 1 and 2), copied by the tests that damage one."""
    base = tmp_path_factory.mktemp("finished")
    out = base / "run"
    assert main([str(a) for a in train_args(base, out, checkpoint_every=1)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def save_png(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def folder_dataset(root: Path, n: int = 3, size: int = 32, value: int = 255) -> Path:
    """A user dataset: two domains, n train and n test cases each, 0/``value`` masks."""
    rng = np.random.default_rng(0)
    for domain in ("siteA", "siteB"):
        for split in ("train", "test"):
            for k in range(n):
                save_png(root / domain / split / "images" / f"case{k}.png",
                         rng.integers(0, 256, (size, size), dtype=np.uint8))
                mask = np.zeros((size, size), np.uint8)
                mask[8:20, 6 + k:18 + k] = value
                save_png(root / domain / split / "masks" / f"case{k}.png", mask)
    return root


# ============================================================================= 2. late failures

@pytest.mark.parametrize("option, value", [
    ("--iters", "0"), ("--iters", "-5"), ("--batch-labeled", "0"), ("--batch-unlabeled", "-1"),
    ("--unet-width", "0"), ("--unet-size", "40"), ("--image-size", "0"), ("--lora-rank", "-1"),
    ("--checkpoint-every", "0"), ("--eval-every", "-1"), ("--labeled-ratio", "1.5"),
    ("--labeled-num", "0"),
])
def test_numeric_options_are_checked_up_front(tmp_path, capsys, option, value):
    out = tmp_path / "run"
    args = train_args(tmp_path, out, split=not option.startswith("--labeled"))
    code, err = run_main(capsys, [*args, option, value])
    assert_user_error(code, err, option, value)
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("setting, value", [("threshold", 2), ("lr_unet", 0), ("log_every", 0),
                                            ("brightness", "[2.0, 0.5]"), ("teacher_mode", "sleepy"),
                                            ("synthetic_train", 0)])
def test_config_file_settings_are_checked_up_front(tmp_path, capsys, setting, value):
    out = tmp_path / "run"
    code, err = run_main(capsys, ["train", "--config", tiny_config(tmp_path, **{setting: value}), "--out", out,
                                  "--iters", "2", *TINY])
    assert_user_error(code, err, setting)
    assert not out.exists()


def test_all_bad_options_are_named_at_once(tmp_path, capsys):
    code, err = run_main(capsys, [*train_args(tmp_path, tmp_path / "run"), "--iters", "0", "--unet-width", "0"])
    assert_user_error(code, err, "--iters", "--unet-width")


def test_corrupt_test_image_stops_before_the_first_iteration(tmp_path, capsys):
    data = folder_dataset(tmp_path / "data")
    bad = data / "siteB" / "test" / "images" / "case1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "run"
    code, err = run_main(capsys, ["train", "--dataset", data, "--labeled-domain", "siteA", "--out", out,
                                  "--iters", "2", *TINY])
    assert_user_error(code, err, bad, "test split")
    assert not out.exists()  # stopped during setup: no half-written run folder


def test_numeric_checks_reach_the_python_api(tmp_path):
    from synfoc.config import TrainConfig
    with pytest.raises(ValueError, match="--iters"):
        train_module.train(TrainConfig(iters=-5), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ============================================================================= 5. tracebacks

def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    code, err = run_main(capsys, train_args(tmp_path, target))
    assert_user_error(code, err, "--out", target)
    assert target.read_text() == "keep me"


def test_out_in_an_unwritable_place(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    code, err = run_main(capsys, train_args(tmp_path, blocker / "run"))
    assert_user_error(code, err, "--out", blocker / "run")
    assert blocker.read_text() == "keep me"


def test_out_permission_denied(tmp_path, capsys, monkeypatch):
    """As root chmod does not stop writes, so the refusal is simulated where the folder is made."""
    real_mkdir = Path.mkdir

    def denied(self, *a, **kw):
        if self.name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)
    monkeypatch.setattr(Path, "mkdir", denied)
    code, err = run_main(capsys, train_args(tmp_path, tmp_path / "locked"))
    assert_user_error(code, err, "--out", "locked", "permission denied")


def test_report_output_unwritable(run_copy, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    before = snapshot(run_copy)
    code, err = run_main(capsys, ["report", run_copy, "--output", blocker / "r.html", "--cases", "0"])
    assert_user_error(code, err, "--output", blocker)
    code, err = run_main(capsys, ["report", run_copy, "--output", tmp_path, "--cases", "0"])
    assert_user_error(code, err, "--output", "is a folder")
    assert snapshot(run_copy) == before and blocker.read_text() == "keep me"


def test_truncated_checkpoint_on_resume(run_copy, capsys):
    ckpt = run_copy / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = snapshot(run_copy)
    code, err = run_main(capsys, ["train", "--resume", run_copy, "--no-progress"])
    assert_user_error(code, err, ckpt, "truncated or corrupt", "--config")
    assert "PytorchStreamReader" not in err
    assert snapshot(run_copy) == before


class _Payload:
    """Pickles to a call that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_checkpoint_is_refused_without_traceback(run_copy, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    torch.save({"step": 1, "students": {}, "teachers": {}, "optimizers": {}, "x": _Payload(marker)},
               run_copy / "checkpoint.pt")
    before = snapshot(run_copy)
    code, err = run_main(capsys, ["train", "--resume", run_copy, "--no-progress"])
    assert_user_error(code, err, run_copy / "checkpoint.pt", "refuses")
    assert "weights_only" not in err
    assert not marker.exists() and snapshot(run_copy) == before


def test_random_bytes_as_foundation_checkpoint(tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out = tmp_path / "run"
    code, err = run_main(capsys, ["train", "--config", tiny_config(tmp_path), "--out", out, "--iters", "2",
                                  *TINY, "--method", "suponly-foundation", "--checkpoint", weights])
    assert_user_error(code, err, weights)
    assert "weights_only" not in err
    assert not out.exists()


def _disk_fills_on_second_save(monkeypatch, failure: BaseException):
    """torch.save writes the first checkpoint, then fails part-way through the second."""
    real_save, calls = torch.save, []

    def save(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) == 1:
            return real_save(obj, path, *a, **kw)
        Path(path).write_bytes(b"partial" * 1000)
        raise failure
    monkeypatch.setattr(train_module.torch, "save", save)
    return calls


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 40960 vs 40918"),
])
def test_disk_full_while_checkpointing(tmp_path, capsys, monkeypatch, failure):
    calls = _disk_fills_on_second_save(monkeypatch, failure)
    if isinstance(failure, RuntimeError):  # PyTorch gives no errno: the free space decides
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    out = tmp_path / "run"
    code, err = run_main(capsys, train_args(tmp_path, out, iters=4, checkpoint_every=1))
    assert_user_error(code, err, f"no space left on {out}", "previous checkpoint.pt is kept")
    assert len(calls) == 2
    assert not (out / "checkpoint.pt.tmp").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1  # the previous one survived


def test_disk_full_writing_the_final_weights_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    from safetensors import torch as st

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(st, "save_file", full)
    out = tmp_path / "run"
    code, err = run_main(capsys, train_args(tmp_path, out, iters=2))
    assert_user_error(code, err, f"no space left on {out}", "--resume")
    assert not list(out.glob("*.tmp"))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    code, err = run_main(capsys, ["train", "--resume", out, "--no-progress"])  # space freed: it finishes
    assert code == 0, err
    assert (out / "summary.json").is_file()


def test_predict_into_unwritable_folder_is_one_error(run_copy, tmp_path, capsys):
    inputs = tmp_path / "in"
    for k in range(3):
        save_png(inputs / f"scan{k}.png", np.full((20, 20), 40 * k, np.uint8))
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    code, err = run_main(capsys, ["predict", "--run", run_copy, "--input", inputs, "--output", blocker / "masks",
                                  "--device", "cpu", "--no-progress"])
    assert_user_error(code, err, "--output", blocker / "masks")
    assert "skipped" not in err and len(err.strip().splitlines()) == 1


def test_predict_disk_full_midway_is_one_error(run_copy, tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    for k in range(3):
        save_png(inputs / f"scan{k}.png", np.full((20, 20), 40 * k, np.uint8))
    real_save, saved = Image.Image.save, []

    def save(self, fp, *a, **kw):
        if str(fp).startswith(str(tmp_path / "masks")) and saved:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        saved.append(fp)
        return real_save(self, fp, *a, **kw)
    monkeypatch.setattr(Image.Image, "save", save)
    code, err = run_main(capsys, ["predict", "--run", run_copy, "--input", inputs, "--output", tmp_path / "masks",
                                  "--device", "cpu", "--no-progress"])
    assert_user_error(code, err, "--output", "no space left", "1 mask(s) were written")
    assert "skipped" not in err
    assert (tmp_path / "masks" / "scan0.png").is_file()


# ============================================================================= 3. kills and Ctrl-C

def test_checkpoint_interval_scales_with_the_run():
    from synfoc.config import TrainConfig
    from synfoc.train import checkpoint_interval
    assert checkpoint_interval(TrainConfig(iters=40)) == 2          # the demo killed at 20/40 keeps 9/20 of it
    assert checkpoint_interval(TrainConfig(iters=200)) == 10
    assert checkpoint_interval(TrainConfig(iters=30000)) == 1000
    assert checkpoint_interval(TrainConfig(iters=3)) == 1
    assert checkpoint_interval(TrainConfig(iters=30000, checkpoint_every=7)) == 7


def _saved_steps(monkeypatch) -> list[int]:
    steps, real = [], train_module.atomic_save

    def record(obj, path):
        steps.append(obj["step"])
        real(obj, path)
    monkeypatch.setattr(train_module, "atomic_save", record)
    return steps


def test_checkpoint_every_on_the_command_line(tmp_path, capsys, monkeypatch):
    steps = _saved_steps(monkeypatch)
    code, err = run_main(capsys, [*train_args(tmp_path, tmp_path / "run", iters=5), "--checkpoint-every", "2"])
    assert code == 0, err
    assert steps == [2, 4, 5]


def test_wall_time_also_triggers_a_checkpoint(tmp_path, capsys, monkeypatch):
    steps = _saved_steps(monkeypatch)
    monkeypatch.setattr(train_module, "CHECKPOINT_SECONDS", 0.0)  # "ten minutes" pass every iteration
    code, err = run_main(capsys, train_args(tmp_path, tmp_path / "run", iters=3, checkpoint_every=100))
    assert code == 0, err
    assert steps == [1, 2, 3]


def test_ctrl_c_writes_a_checkpoint_and_says_so(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("SYNFOC_INTERRUPT_AT_STEP", "1")  # SIGINT to this process before iteration 2
    code, err = run_main(capsys, train_args(tmp_path, out, iters=4, checkpoint_every=100))
    assert code == 130 and "Traceback" not in err
    assert "checkpoint of iteration 2" in err and f"--resume {out}" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.delenv("SYNFOC_INTERRUPT_AT_STEP")
    code, err = run_main(capsys, ["train", "--resume", out, "--no-progress"])
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_ctrl_c_before_any_checkpoint_tells_the_truth(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "load_arrays", interrupted)  # Ctrl-C while the data loads
    out = tmp_path / "run"
    code, err = run_main(capsys, train_args(tmp_path, out))
    assert code == 130 and "Traceback" not in err
    assert "no checkpoint was written" in err and "kept" not in err
    assert not out.exists()


def test_second_ctrl_c_stops_at_once_and_tells_the_truth(tmp_path, capsys, monkeypatch):
    """A second SIGINT inside the iteration (here: inside the loss) stops without a checkpoint."""
    import signal
    monkeypatch.setenv("SYNFOC_INTERRUPT_AT_STEP", "0")
    real_views = train_module.make_views

    def views_then_ctrl_c(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # the first one was handled; this one interrupts
        return real_views(*a, **kw)
    monkeypatch.setattr(train_module, "make_views", views_then_ctrl_c)
    out = tmp_path / "run"
    code, err = run_main(capsys, train_args(tmp_path, out, iters=4, checkpoint_every=100))
    assert code == 130 and "Traceback" not in err
    assert "before any checkpoint was written" in err and "nothing to resume" in err
    assert not out.exists()


def test_resume_after_kill_has_no_duplicated_steps_and_time_continues(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "synfoc", *map(str, train_args(tmp_path, out, iters=5, checkpoint_every=2))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(args, capture_output=True, text=True, timeout=600,
                            env={**env, "SYNFOC_FAULT_AT_STEP": "3"})
    assert killed.returncode != 0
    before = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in before] == [1, 2, 3]  # step 3 was logged after the checkpoint of 2
    resumed = subprocess.run([sys.executable, "-m", "synfoc", "train", "--resume", str(out), "--no-progress"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    times = [r["time"] for r in rows]
    assert times == sorted(times) and times[2] >= before[1]["time"]
    assert rows[:2] == before[:2]  # rows up to the checkpoint are kept as they were


# ============================================================================= 4. run folders from anywhere

def test_run_folder_works_from_anywhere_and_after_the_data_moved(tmp_path, capsys, monkeypatch):
    data = folder_dataset(tmp_path / "start" / "data")
    monkeypatch.chdir(tmp_path / "start")
    out = tmp_path / "start" / "run"
    code, err = run_main(capsys, ["train", "--dataset", "data", "--labeled-domain", "siteA", "--out", "run",
                                  "--iters", "2", "--checkpoint-every", "1", *TINY])
    assert code == 0, err
    import yaml
    stored = yaml.safe_load((out / "config.yaml").read_text())["dataset"]
    assert Path(stored).is_absolute() and Path(stored) == data.resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = run_main(capsys, ["evaluate", out, "--device", "cpu"])
    assert code == 0, err

    moved = tmp_path / "moved"
    shutil.move(str(data), str(moved))
    code, err = run_main(capsys, ["evaluate", out, "--device", "cpu"])
    assert_user_error(code, err, stored, "--dataset")
    code, err = run_main(capsys, ["evaluate", out, "--device", "cpu", "--dataset", moved])
    assert code == 0, err
    code, err = run_main(capsys, ["train", "--resume", out, "--dataset", moved, "--device", "cpu",
                                  "--iters", "3", "--no-progress"])
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["dataset"] == str(moved.resolve())
    masks = tmp_path / "masks"
    code, err = run_main(capsys, ["predict", "--run", out, "--input", moved / "siteA" / "test" / "images",
                                  "--output", masks, "--device", "cpu", "--no-progress", "--dataset", moved])
    assert code == 0, err
    assert len(list(masks.glob("*.png"))) == 3


def test_other_data_is_refused_on_resume_and_evaluate(run_copy, tmp_path, capsys):
    other = folder_dataset(tmp_path / "other")
    before = snapshot(run_copy)
    code, err = run_main(capsys, ["train", "--resume", run_copy, "--dataset", other, "--no-progress"])
    assert_user_error(code, err, other, "labeled.txt", "siteA/siteA_train_000")
    code, err = run_main(capsys, ["evaluate", run_copy, "--dataset", other, "--device", "cpu"])
    assert_user_error(code, err, other, "missing")
    assert snapshot(run_copy) == before


def test_resume_refuses_settings_that_define_the_run(run_copy, capsys):
    code, err = run_main(capsys, ["train", "--resume", run_copy, "--unet-width", "8"])
    assert_user_error(code, err, "--unet-width", "--dataset", "--device")


def test_reusing_out_of_a_run_without_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("iters: 7\n")
    (out / "history.jsonl").write_text('{"step": 1}\n')
    before = snapshot(out)
    code, err = run_main(capsys, train_args(tmp_path, out))
    assert_user_error(code, err, out, "config.yaml", "history.jsonl")
    assert snapshot(out) == before


def test_reusing_out_of_a_finished_run_is_refused(run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    code, err = run_main(capsys, train_args(tmp_path, run_copy))
    assert_user_error(code, err, run_copy, "--resume")
    assert snapshot(run_copy) == before


def test_failed_start_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(capsys, [*train_args(tmp_path, out), "--labeled-domain", "nowhere"])
    assert_user_error(code, err, "nowhere")
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(capsys, [*train_args(tmp_path, empty), "--labeled-domain", "nowhere"])
    assert code == 2 and empty.is_dir() and not list(empty.iterdir())


# ============================================================================= 1. masks that invent classes

def _check(capsys, path) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["data", "check", str(path)])
    return code, capsys.readouterr().out


def test_jpeg_mask_is_flagged_by_data_check_and_train(tmp_path, capsys):
    data = folder_dataset(tmp_path / "data")
    png = data / "siteA" / "train" / "masks" / "case2.png"
    jpeg = png.with_suffix(".jpg")
    Image.open(png).save(jpeg, quality=75)
    png.unlink()
    code, out = _check(capsys, data)
    assert code == 1 and str(jpeg) in out and "JPEG" in out and "no problems found" not in out
    run = tmp_path / "run"
    code, err = run_main(capsys, ["train", "--dataset", data, "--labeled-domain", "siteA", "--out", run,
                                  "--iters", "2", *TINY])
    assert_user_error(code, err, jpeg, "JPEG")
    assert not run.exists()


def test_mixed_0_1_and_0_255_masks_are_flagged(tmp_path, capsys):
    data = folder_dataset(tmp_path / "data")
    odd = [data / "siteB" / "train" / "masks" / f"case{k}.png" for k in (0, 1)]
    for path in odd:
        save_png(path, (np.asarray(Image.open(path)) > 0).astype(np.uint8))
    code, out = _check(capsys, data)
    assert code == 1
    for path in odd:
        assert f"{path}: label values {{1}} differ from the {{255}}" in out
    code, err = run_main(capsys, ["train", "--dataset", data, "--labeled-domain", "siteA", "--out",
                                  tmp_path / "run", "--iters", "2", *TINY])
    assert_user_error(code, err, odd[0], "dataset.json")


def test_mask_with_many_rare_values_is_flagged(tmp_path, capsys):
    data = folder_dataset(tmp_path / "data")
    path = data / "siteA" / "test" / "masks" / "case0.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[8, 6:12] = [1, 2, 3, 250, 252, 254]  # the fringe a lossy save leaves along an edge
    save_png(path, mask)
    code, out = _check(capsys, data)
    assert code == 1 and f"{path}: mask looks lossy-compressed" in out


def test_declared_labels_allow_masks_without_every_class(tmp_path, capsys):
    data = folder_dataset(tmp_path / "data", value=1)
    path = data / "siteA" / "train" / "masks" / "case0.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[0:4, 0:4] = 2
    save_png(path, mask)
    code, out = _check(capsys, data)
    assert code == 1 and "differ from" in out  # discovered: {1, 2} beside {1} is suspicious
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    code, out = _check(capsys, data)
    assert code == 0 and "no problems found" in out


def test_classes_absent_from_prediction_and_truth_leave_the_mean(tmp_path):
    from synfoc.config import TrainConfig
    from synfoc.data.base import DatasetIndex
    from synfoc.evaluate import markdown_table, summarise
    index = DatasetIndex("folder", None, ["lesion", "ghost"], ["A"], 1, [])
    rows = []
    for case, lesion_dice in (("c0", 0.2), ("c1", 0.4)):
        rows.append({"student": "unet", "domain": "A", "case": case, "class": "lesion", "dice": lesion_dice,
                     "jaccard": 0.1, "hd95": 5.0, "asd": 1.0, "truth_present": 1, "pred_present": 1})
        rows.append({"student": "unet", "domain": "A", "case": case, "class": "ghost", "dice": 1.0,
                     "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "truth_present": 0, "pred_present": 0})
    summary = summarise(rows, TrainConfig(), index)
    domain = summary["students"]["unet"]["per_domain"]["A"]
    assert domain["dice"] == pytest.approx(0.3)  # not (0.3 + 1) / 2
    assert domain["absent_classes"] == ["ghost"]
    assert domain["classes"]["lesion"]["truth_cases"] == 2 and domain["classes"]["ghost"]["truth_cases"] == 0
    assert "ghost" in markdown_table(summary, ["A"])
    rows[-1]["pred_present"] = 1  # predicted somewhere: a false positive, so it counts again
    rows[-1]["dice"] = 0.0
    domain = summarise(rows, TrainConfig(), index)["students"]["unet"]["per_domain"]["A"]
    assert "absent_classes" not in domain and domain["dice"] == pytest.approx((0.3 + 0.5) / 2)


# ============================================================================= 6. small things

def test_data_check_does_not_import_torch(tmp_path):
    folder_dataset(tmp_path / "data", n=1)
    code = ("import sys; from synfoc.cli import main; rc = main(['data', 'check', sys.argv[1], '--json']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split()[-2:] == ["NO-TORCH", "0"], proc.stdout + proc.stderr


def test_every_option_has_help_and_the_description_is_plain():
    import argparse

    from synfoc.cli import build_parser
    parser = build_parser()
    missing = []

    def walk(p, name):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for verb, sub in action.choices.items():
                    walk(sub, f"{name} {verb}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{name} {action.option_strings or action.dest}")
    walk(parser, "synfoc")
    assert not missing
    assert "``" not in parser.format_help() and ":class:" not in parser.format_help()
    train_help = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    resume = next(a for a in train_help._actions if "--resume" in a.option_strings)
    assert "--dataset" in resume.help and "--device" in resume.help


def test_readme_lists_every_preset():
    from synfoc.config import PRESETS
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "--preset prostate|" in line)
    assert all(name in line for name in PRESETS)


def test_weight_files_have_the_ordinary_file_mode(finished_run):
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    assert (finished_run / "config.yaml").stat().st_mode & 0o777 == expected
    assert (finished_run / "unet.safetensors").stat().st_mode & 0o777 == expected


# ============================================================================= more user errors, one message each

def _scenario(name: str, tmp_path: Path, run: Path) -> tuple[list, list[str]]:
    """(argv, texts the message must hold) of one bad invocation."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    image = save_png(tmp_path / "in" / "a.png", np.zeros((8, 8), np.uint8))
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    data = tmp_path / "data"
    if name == "config_missing":
        return ["train", "--config", tmp_path / "nope.yaml"], ["nope.yaml", "not found"]
    if name == "config_not_yaml":
        (tmp_path / "bad.yaml").write_text("iters: [1,\n")
        return ["train", "--config", tmp_path / "bad.yaml"], ["bad.yaml", "YAML"]
    if name == "config_unknown_setting":
        (tmp_path / "u.yaml").write_text("iterations: 5\n")
        return ["train", "--config", tmp_path / "u.yaml"], ["u.yaml", "iterations"]
    if name == "config_wrong_type":
        (tmp_path / "t.yaml").write_text("iters: many\n")
        return ["train", "--config", tmp_path / "t.yaml"], ["iters", "many"]
    if name == "resume_not_a_run":
        return ["train", "--resume", empty], [empty, "config.yaml"]
    if name == "resume_without_checkpoint":
        (run / "checkpoint.pt").unlink()
        return ["train", "--resume", run, "--no-progress"], [run, "checkpoint.pt not found"]
    if name == "resume_with_other_out":
        return ["train", "--resume", run, "--out", empty], ["--out"]
    if name == "evaluate_not_a_run":
        return ["evaluate", empty, "--device", "cpu"], [empty, "config.yaml"]
    if name == "evaluate_no_test_selection":
        return ["evaluate", run, "--select-on", "test", "--device", "cpu"], [run, "--eval-every"]
    if name == "predict_input_missing":
        return (["predict", "--run", run, "--input", tmp_path / "nothing", "--output", tmp_path / "o"],
                [tmp_path / "nothing", "not found"])
    if name == "predict_output_is_a_file":
        return ["predict", "--run", run, "--input", image, "--output", blocker], ["--output", blocker]
    if name == "predict_run_without_weights":
        for f in run.glob("*.safetensors"):
            f.unlink()
        return (["predict", "--run", run, "--input", image, "--output", tmp_path / "o", "--device", "cpu"],
                [run, "no student weights"])
    if name == "report_not_a_run":
        return ["report", empty], [empty, "config.yaml"]
    if name == "dataset_json_malformed":
        folder_dataset(data, n=1)
        (data / "dataset.json").write_text("{not json")
        return ["train", "--dataset", data, "--out", tmp_path / "r", *TINY], [data / "dataset.json", "JSON"]
    if name == "unpaired_image":
        folder_dataset(data)
        (data / "siteA" / "train" / "masks" / "case1.png").unlink()
        return (["train", "--dataset", data, "--out", tmp_path / "r", *TINY],
                [data / "siteA" / "train" / "images" / "case1.png", "no mask", "--skip-bad"])
    raise KeyError(name)


SCENARIOS = ["config_missing", "config_not_yaml", "config_unknown_setting", "config_wrong_type",
             "resume_not_a_run", "resume_without_checkpoint", "resume_with_other_out", "evaluate_not_a_run",
             "evaluate_no_test_selection", "predict_input_missing", "predict_output_is_a_file",
             "predict_run_without_weights", "report_not_a_run", "dataset_json_malformed", "unpaired_image"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_user_error_is_one_message(name, run_copy, tmp_path, capsys):
    argv, texts = _scenario(name, tmp_path, run_copy)
    before = snapshot(run_copy)
    code, err = run_main(capsys, argv)
    assert_user_error(code, err, *texts)
    assert snapshot(run_copy) == before
    assert (tmp_path / "file.txt").read_text() == "keep me"
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(capsys, [*train_args(tmp_path, out), "--device", "cuda"])
    assert_user_error(code, err, "--device cuda", "no CUDA")
    assert not out.exists()


def test_skip_bad_leaves_out_a_corrupt_test_case_and_says_so(tmp_path, capsys):
    data = folder_dataset(tmp_path / "data")
    bad = data / "siteB" / "test" / "images" / "case1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "run"
    capsys.readouterr()
    code = main([str(a) for a in ["train", "--dataset", data, "--labeled-domain", "siteA", "--out", out,
                                  "--iters", "2", "--skip-bad", *TINY]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "skipping 1 case(s)" in captured.out
    cases = {line.split(",")[2] for line in (out / "per_case.csv").read_text().splitlines()[1:]
             if ",siteB," in line}
    assert cases == {"case0", "case2"}

"""End to end: a tiny SynFoC run and one run of every baseline, resume after SIGKILL, the command
line's user errors, the optimizers, the allocator and BatchNorm recalibration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synfoc.cli import main
from synfoc.method.registry import METHODS

TINY = ["--unet-size", "32", "--unet-width", "4", "--image-size", "64", "--batch-labeled", "2",
        "--batch-unlabeled", "2", "--labeled-num", "2", "--no-progress", "--device", "cpu"]


def tiny_config(tmp_path: Path, **extra) -> Path:
    cfg = {"synthetic_train": 4, "synthetic_test": 2, "log_every": 1, "checkpoint_every": 2}
    cfg.update(extra)
    path = tmp_path / "tiny.yaml"
    path.write_text("\n".join(f"{k}: {v}" for k, v in cfg.items()))
    return path


def run_cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "synfoc", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}, timeout=600)


def test_end_to_end_tiny_synfoc(tmp_path):
    cfg = tiny_config(tmp_path, dataset="synthetic", labeled_domain="siteA")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--iters", "3", *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "synfoc" and summary["iterations"] == 3
    for student in ("unet", "foundation"):
        res = summary["students"][student]
        assert set(res["per_domain"]) == {"siteA", "siteB", "siteC"}
        for d in res["per_domain"].values():
            assert 0 <= d["dice"] <= 1 and 0 <= d["jaccard"] <= d["dice"] + 1e-9
            assert d["hd95"] >= 0 and d["asd"] >= 0
        means = [res["per_domain"][k]["dice"] for k in res["per_domain"]]
        assert res["mean"]["dice"] == pytest.approx(sum(means) / 3)
    for name in ("config.yaml", "unet.safetensors", "foundation.safetensors", "labeled.txt", "unlabeled.txt",
                 "per_case.csv", "summary.md", "history.jsonl", "progress.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    history = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    assert {"alpha", "self_confidence", "mutual_confidence", "lambda", "pseudo_dice_ensemble"} <= set(history[-1])
    last = history[-1]
    assert last["alpha_p10"] <= last["alpha_p50"] <= last["alpha_p90"]
    assert {"confident_foreground", "teachers_both_empty"} <= set(last)
    # Per unlabeled domain: each window (one iteration here) names exactly the domains of the
    # unlabeled images it drew, and the domain means, weighted by their image counts, give back the
    # batch mean of alpha and of the ensemble's pseudo-label Dice.
    from synfoc.views import epoch_order
    unlabeled = (out / "unlabeled.txt").read_text().split()
    for t, h in enumerate(history):
        drawn = [unlabeled[i].split("/")[0] for i in epoch_order(len(unlabeled), 2, t, 1337 + 1).tolist()]
        for name in ("alpha", "confident_foreground", "pseudo_dice_ensemble"):
            assert {k.partition("/")[2] for k in h if k.startswith(name + "/")} == set(drawn), (t, name)
        for name in ("alpha", "pseudo_dice_ensemble"):
            weighted = sum(h[f"{name}/{d}"] * drawn.count(d) for d in set(drawn)) / len(drawn)
            assert weighted == pytest.approx(h[name], abs=1e-6)
    env = json.loads((out / "environment.jsonl").read_text().splitlines()[0])
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["resumed"] is False
    assert (out / "labeled.txt").read_text().split() == ["siteA/siteA_train_000", "siteA/siteA_train_001"]


def test_domain_means_average_each_domains_instances():
    from synfoc.train import domain_means
    spread = {"alpha": torch.tensor([0.0, 1.0, 0.5, 0.25]), "other": torch.tensor([1.0, 2.0])}
    domains = torch.tensor([2, 0, 2, 2])
    assert domain_means(spread, domains, ["siteA", "siteB", "siteC"]) == {
        "alpha/siteA": 1.0, "alpha/siteC": pytest.approx(0.25)}   # no siteB image; "other" is no per-image log


@pytest.mark.parametrize("method", [m for m in METHODS if m != "synfoc"])   # synfoc: the test above
def test_baseline_trains_end_to_end_and_writes_its_summary(method, tmp_path):
    from synfoc.config import TrainConfig
    from synfoc.train import train
    # LiteMedSAM works from 32 pixels up (a multiple of 4); 32 keeps each run to a few seconds.
    cfg = TrainConfig(dataset="synthetic", synthetic_train=6, synthetic_test=2, labeled_domain="siteA",
                      labeled_num=2, batch_labeled=2, batch_unlabeled=2, method=method, image_size=32, unet_size=32,
                      unet_width=4, iters=2, log_every=1, checkpoint_every=1, device="cpu", precision="fp32")
    torch.set_num_threads(1)
    summary = train(cfg, tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary and on_disk["method"] == method and on_disk["iterations"] == 2
    assert tuple(on_disk["students"]) == METHODS[method].students
    for res in on_disk["students"].values():
        assert set(res["per_domain"]) == {"siteA", "siteB", "siteC"}   # every domain's test set
        assert 0 <= res["mean"]["dice"] <= 1
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2] and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    cfg = tiny_config(tmp_path, dataset="synthetic", labeled_domain="siteA", precision="fp32", deterministic="true")
    common = ["train", "--config", str(cfg), "--iters", "4", *TINY]
    straight = tmp_path / "straight"
    assert run_cli([*common, "--out", str(straight)]).returncode == 0
    killed = tmp_path / "killed"
    proc = run_cli([*common, "--out", str(killed)], env={"SYNFOC_FAULT_AT_STEP": "3"})
    assert proc.returncode != 0  # SIGKILL part-way, after the checkpoint of iteration 2
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (killed / "summary.json").exists()
    resumed = run_cli(["train", "--resume", str(killed), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    for name in ("unet.safetensors", "foundation.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_atomic_checkpoint_survives_nonfinite_loss(tmp_path):
    cfg = tiny_config(tmp_path, dataset="synthetic", labeled_domain="siteA", lr_unet=1e30, checkpoint_every=1,
                      method="suponly-unet")
    out = tmp_path / "run"
    proc = run_cli(["train", "--config", str(cfg), "--out", str(out), "--iters", "6", *TINY])
    assert proc.returncode == 2
    assert "non-finite loss" in proc.stderr and "Traceback" not in proc.stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # the last good checkpoint is intact
    assert 1 <= state["step"] < 6
    assert all(torch.isfinite(v).all() for v in state["students"]["unet"].values() if v.is_floating_point())


@pytest.mark.parametrize("args, message", [
    (["--dataset", "/no/such/folder"], "does not exist"),
    (["--foundation", "no_such_model"], "no_such_model"),
    (["--labeled-num", "999"], "999"),
    (["--method", "nonsense"], "nonsense"),
])
def test_user_errors_are_one_clear_message(tmp_path, args, message):
    proc = run_cli(["train", "--out", str(tmp_path / "r"), "--iters", "1", *args])
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") < 3


def test_evaluate_reproduces_training_summary_and_test_selection(tmp_path):
    cfg = tiny_config(tmp_path, dataset="synthetic", labeled_domain="siteA", method="suponly-unet")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--iters", "3", "--eval-every", "1", *TINY]) == 0
    trained = json.loads((out / "summary.json").read_text())
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["students"] == trained["students"] and again["selection"] == "final"
    best = json.loads((out / "best_on_test" / "best.json").read_text())
    assert 1 <= best["unet"]["step"] <= 3
    assert main(["evaluate", str(out), "--select-on", "test", "--device", "cpu"]) == 0
    selected = json.loads((out / "summary_test-selected.json").read_text())
    assert selected["selection"] == "test-selected"
    assert selected["students"]["unet"]["mean"]["dice"] == pytest.approx(best["unet"]["dice"])
    assert "ON THE TEST SETS" in (out / "summary_test-selected.md").read_text()


def test_fused_optimizers_update_like_the_plain_ones():
    """make_optimizers uses PyTorch's fused SGD / AdamW: the same updates up to float rounding."""
    import copy

    from synfoc.config import TrainConfig
    from synfoc.models import build_unet
    from synfoc.build import make_optimizers

    cfg = TrainConfig()
    torch.manual_seed(0)
    students = {"unet": build_unet(1, 1, 4), "foundation": torch.nn.Linear(6, 3)}
    plain, start = copy.deepcopy(students), copy.deepcopy(students)
    fused = make_optimizers(cfg, students)
    assert all(o.defaults.get("fused") for o in fused.values())
    reference = {
        "unet": torch.optim.SGD(plain["unet"].parameters(), lr=cfg.lr_unet, momentum=cfg.momentum_unet,
                                weight_decay=cfg.weight_decay_unet),
        "foundation": torch.optim.AdamW(plain["foundation"].parameters(), lr=cfg.lr_foundation,
                                        weight_decay=cfg.weight_decay_foundation),
    }
    for _ in range(3):
        for key in students:
            for p, q in zip(students[key].parameters(), plain[key].parameters()):
                g = torch.randn_like(p)
                p.grad, q.grad = g.clone(), g.clone()
            fused[key].step()
            reference[key].step()
    for key in students:
        for p, q, p0 in zip(students[key].parameters(), plain[key].parameters(), start[key].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            assert not torch.equal(p, p0)  # the steps did move every parameter


_FAULTS_AFTER_REUSE = """
import resource, sys, torch
from synfoc.runtime import keep_freed_memory, release_freed_memory
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
print(keep_freed_memory(), end=" ")
for i in range(14):
    if i == 4:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, written
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start, end=" ")
before = resident()
release_freed_memory()
print(before - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    """With keep_freed_memory, a freed 64 MB block is reused (no fresh pages to fault in) and stays
    resident until release_freed_memory; glibc's default unmaps it and faults in 16384 new pages for
    every new one (ten measured after four warm-up allocations)."""
    def faults(env):
        out = subprocess.run([sys.executable, "-c", _FAULTS_AFTER_REUSE], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=120, check=True).stdout.split()
        return out[0] == "True", int(out[1]), int(out[2])
    kept, kept_faults, kept_released = faults({})
    system, system_faults, _ = faults({"SYNFOC_SYSTEM_MALLOC": "1"})
    assert kept and not system
    assert system_faults > 10 * 16384 * 0.9       # ten new 64 MB blocks, each faulted in
    # Mostly 0; now and then the heap grows by a few blocks instead (fragmentation: seen up to 3).
    assert kept_faults < 0.5 * system_faults
    assert kept_released > 48 * 2**20              # release_freed_memory hands the kept block back


def test_batchnorm_recalibration_is_the_average_over_training_views():
    """After recalibration the first BatchNorm's running mean is the mean of its input over the
    training images (an independent forward of the first convolution), whatever it was before."""
    from synfoc.augment import AugmentConfig
    from synfoc.models import build_unet
    from synfoc.runtime import Runtime
    from synfoc.views import Arrays, recalibrate_batchnorm

    torch.manual_seed(0)
    net = build_unet(1, 2, 4)
    first_bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_bn.running_mean.fill_(5.0)   # stale statistics, as after training on strong views
    imgs = torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8)
    arrays = [Arrays({32: imgs[:12]}, {32: torch.zeros(12, 32, 32, dtype=torch.uint8)}),
              Arrays({32: imgs[12:]}, {32: torch.zeros(20, 32, 32, dtype=torch.uint8)})]
    rt = Runtime(torch.device("cpu"), None)
    no_geometry = AugmentConfig(p=0.0)   # weak views = the images themselves
    n = recalibrate_batchnorm(net, arrays, 32, no_geometry, rt, seed=0, batch=4)
    assert n == 32
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        feats = conv(imgs.float() / 255)
    torch.testing.assert_close(first_bn.running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    # every batch has 4 images, so the average of their unbiased variances is the expected value
    per_batch = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats.split(4)])
    torch.testing.assert_close(first_bn.running_var, per_batch.mean(dim=0), rtol=1e-4, atol=1e-5)
    assert first_bn.momentum == 0.1 and net.training   # momentum and mode restored


def test_domain_statistics_are_each_domains_average_and_swap_back():
    """Per-domain statistics: the first BatchNorm's running mean for a domain is the mean of its
    input over that domain's images only (labeled and unlabeled, an independent forward of the
    first convolution); the model's own statistics are untouched, and
    ``using_batchnorm_statistics`` normalises with a domain's statistics only within its block."""
    import copy

    from synfoc.augment import AugmentConfig
    from synfoc.method.norm import batchnorm_statistics, using_batchnorm_statistics
    from synfoc.models import build_unet
    from synfoc.runtime import Runtime
    from synfoc.views import Arrays, domain_batchnorm_statistics

    torch.manual_seed(0)
    net = build_unet(1, 2, 4)
    first = next(name for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_bn = net.get_submodule(first)
    first_bn.running_mean.fill_(5.0)
    dark = torch.randint(0, 100, (12, 1, 32, 32), dtype=torch.uint8)
    bright = torch.randint(150, 256, (12, 1, 32, 32), dtype=torch.uint8)
    # labeled: 4 dark; unlabeled: 8 dark and 12 bright, interleaved
    unlabeled = torch.cat([dark[4:], bright])[torch.tensor([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7,
                                                            15, 16, 17, 18, 19])]
    names_u = ["dark" if i < 8 else "bright" for i in [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7,
                                                         15, 16, 17, 18, 19]]
    zeros = lambda n: torch.zeros(n, 32, 32, dtype=torch.uint8)
    sources = [Arrays({32: dark[:4]}, {32: zeros(4)}), Arrays({32: unlabeled}, {32: zeros(20)})]
    stats = domain_batchnorm_statistics(net, sources, [["dark"] * 4, names_u], 32, AugmentConfig(p=0.0),
                                        Runtime(torch.device("cpu"), None), seed=0, batch=4)
    assert sorted(stats) == ["bright", "dark"]
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        for domain, imgs in (("dark", dark), ("bright", bright)):
            torch.testing.assert_close(stats[domain][f"{first}.running_mean"],
                                       conv(imgs.float() / 255).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.all(first_bn.running_mean == 5.0)        # the model's own statistics are left alone
    assert set(stats["dark"]) == set(batchnorm_statistics(net))

    net.eval()
    x = bright[:2].float() / 255
    reference = copy.deepcopy(net)
    reference.load_state_dict({**reference.state_dict(), **stats["bright"]})
    before = net(x)
    with using_batchnorm_statistics(net, stats["bright"]):
        torch.testing.assert_close(net(x), reference(x))
    torch.testing.assert_close(net(x), before)
    assert not torch.allclose(before, reference(x))


def test_baseline_is_trained_beside_and_printed(tmp_path, capsys):
    """``baseline: suponly-unet`` (the demo preset's) trains that method with the same settings into
    RUN/suponly-unet/ and prints its row under the method's."""
    cfg = tiny_config(tmp_path, dataset="synthetic", labeled_domain="siteA", baseline="suponly-unet")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--iters", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    base = json.loads((out / "suponly-unet" / "summary.json").read_text())
    assert base["method"] == "suponly-unet" and base["iterations"] == 2
    rows = [l for l in printed.splitlines() if l.startswith("| synfoc") or l.startswith("| suponly-unet")]
    assert [r.split(" |")[0] for r in rows] == ["| synfoc (U-Net)", "| synfoc (foundation)", "| suponly-unet (U-Net)"]
    dice_a = 100 * base["students"]["unet"]["per_domain"]["siteA"]["dice"]
    assert rows[2].split("|")[2].strip() == f"{dice_a:.2f}"
    import yaml
    mine = yaml.safe_load((out / "config.yaml").read_text())
    theirs = yaml.safe_load((out / "suponly-unet" / "config.yaml").read_text())
    assert {k for k in mine if mine[k] != theirs[k]} == {"method", "baseline"}

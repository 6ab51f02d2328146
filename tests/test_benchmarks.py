"""The speed benchmark still drives the training iteration as ``synfoc train`` runs it: one tiny
configuration, both allocator modes, with and without synfoc.accel (or one of its kernels), in
separate children or one, finite losses. Its timings are not checked here (they belong
in benchmarks/results/), nor its own arithmetic (medians, CSV rows, MFU), which cannot fail for a
reason of the product."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# U-Net width 4 at 32 and LiteMedSAM at 64, one iteration: the smallest step that runs every path
TINY = ["--config", "demo", "--image-size", "64", "--unet-size", "32", "--unet-width", "4", "--threads", "1",
        "--matmul-size", "64"]


def test_step_time_runs_the_training_iteration_in_its_modes():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), *TINY, "--with-system-malloc", "--with-no-accel",
           "--iters", "2", "--warmup", "1", "--trace", "--profile", "3", "--no-csv", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["accel_speedup"] > 0
    for mode in ("fast", "fast-system-malloc", "fast-no-accel"):
        assert len(summary[f"{mode}_times"]) == 2 and all(t > 0 for t in summary[f"{mode}_times"])
        assert summary[f"{mode}_peak_mb"] > 0
        trace = summary[f"{mode}_trace"]
        assert len(trace) == 3  # warm-up + timed iterations, not the FLOP-counting one after them
        assert all(math.isfinite(step["loss"]) for step in trace)
        profile = summary[f"{mode}_profile"]["ops"]   # the costliest operators of one more iteration, costliest first
        assert len(profile) == 3 and profile[0]["self_ms"] >= profile[-1]["self_ms"] > 0
        assert all(0 < r["share"] <= 1 and r["calls"] >= 1 for r in profile)
        kinds_ms = summary[f"{mode}_profile"]["kinds_ms"]   # every operator's self time, by kind
        assert set(kinds_ms) == {"matmul", "convolution", "other"} and all(ms > 0 for ms in kinds_ms.values())
        assert sum(kinds_ms.values()) >= sum(r["self_ms"] for r in profile)
        flops = summary[f"{mode}_flops_by_kind"]   # every counted FLOP is a matmul's or a convolution's
        assert set(flops) == {"matmul", "convolution"} and sum(flops.values()) == summary[f"{mode}_flops"]


def test_step_time_one_process_runs_the_accel_modes_side_by_side_in_one_child():
    """--one-process: fast, fast-no-accel and fast-kernel-off alternate in one child (one peak
    memory for them all); the kernel-off mode has every kernel of the fast mode but the one named."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), *TINY, "--one-process", "--with-no-accel",
           "--with-kernel-off", "tinyvit_attention", "--accel-kernels", "tinyvit_attention,channel_layer_norm",
           "--iters", "2", "--warmup", "1", "--no-flops", "--peak-tflops", "1", "--no-csv", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["fast_accel_kernels"] == ["tinyvit_attention", "channel_layer_norm"]
    assert summary["fast-kernel-off_accel_kernels"] == ["channel_layer_norm"]
    assert summary["fast-no-accel_accel_kernels"] == []
    assert summary["kernel_off"] == "tinyvit_attention" and summary["kernel_speedup"] > 0
    for mode in ("fast", "fast-no-accel", "fast-kernel-off"):
        assert len(summary[f"{mode}_times"]) == 2 and all(t > 0 for t in summary[f"{mode}_times"])
    assert summary["peak_memory_kind"].endswith("of one process running fast, fast-no-accel, fast-kernel-off")
    refused = subprocess.run([*cmd[:2], *TINY, "--one-process", "--with-system-malloc", "--no-csv"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--one-process" in refused.stderr


def test_input_size_validation_split_is_carved_from_training_data():
    """The input-size study scores on training images of the labeled domain that follow the labeled
    ones in name order: they leave the training split, and no test case is left in the index."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from input_size import validation_index

    from synfoc.config import resolve
    from synfoc.data.source import open_index
    from synfoc.data.split import split_labeled

    index = open_index(resolve("demo", None, {"synthetic_train": 10, "synthetic_test": 3}))
    carved = validation_index(index, "siteA", labeled_num=3, val_num=4)
    names = sorted(c.name for c in index.cases_of("siteA", "train"))
    assert sorted(c.name for c in carved.cases_of(split="test")) == names[3:7]
    assert {c.domain for c in carved.cases_of(split="test")} == {"siteA"}
    assert sorted(c.name for c in carved.cases_of("siteA", "train")) == names[:3] + names[7:]
    labeled, _ = split_labeled(carved, "siteA", num=3)
    assert sorted(c.name for c in labeled) == names[:3]     # the same labeled images as without carving
    assert len(index.cases_of(split="test")) == 9            # the original index is untouched
    # with other_num, the first training images of every other domain leave the unlabeled set too
    both = validation_index(index, "siteA", labeled_num=3, val_num=4, other_num=2)
    for site in ("siteB", "siteC"):
        site_names = sorted(c.name for c in index.cases_of(site, "train"))
        assert sorted(c.name for c in both.cases_of(site, "test")) == site_names[:2]
        assert sorted(c.name for c in both.cases_of(site, "train")) == site_names[2:]
    assert sorted(c.name for c in both.cases_of("siteA", "test")) == names[3:7]
    with pytest.raises(SystemExit, match="siteB has 10 training images"):
        validation_index(index, "siteA", labeled_num=3, val_num=4, other_num=10)


def test_teacher_confidence_rows_count_against_the_hidden_labels():
    """The BUSI diagnosis's numbers: confident share, lesion share, recall and precision of confident
    lesion labels, checked against counts made by hand on a 1x1x2x3 map."""
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks" / "busi"))
    from teacher_confidence import confidence_rows
    lesion_p = torch.tensor([[0.99, 0.97, 0.60], [0.02, 0.96, 0.01]])   # P(lesion) per pixel
    p = torch.stack([1 - lesion_p, lesion_p])[None]                    # (1, 2, 2, 3)
    truth = torch.tensor([[[1, 1, 1], [0, 0, 0]]])
    row, = confidence_rows(p, truth, [0.95])
    # confident: 0.99, 0.97, 0.02 (bg 0.98), 0.96, 0.01 (bg 0.99) -> 5 of 6; lesion among them: 3
    assert row["confident"] == pytest.approx(5 / 6)
    assert row["lesion share"] == pytest.approx(3 / 5)
    assert row["lesion recall"] == pytest.approx(2 / 3)         # true lesions 3; confident lesion labels on them: 2
    assert row["lesion precision"] == pytest.approx(2 / 3)      # confident lesion labels 3, of which 2 true


def test_curves_phase_means_average_the_log_rows_of_each_phase(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "busi"))
    from curves import PHASES, phase_means
    history = tmp_path / "history.jsonl"
    rows = [{"step": s, "x": float(s)} for s in range(10, 1001, 10)] + [{"step": 1000, "y": 1.0}]
    history.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    means = phase_means(history, "x")
    for (lo, hi), m in zip(PHASES, means):
        steps = [s for s in range(10, 1001, 10) if lo <= s <= hi]
        assert m == sum(steps) / len(steps)
    assert phase_means(history, "y") == [None] * (len(PHASES) - 1) + [1.0]
    # a 4,000-iteration run: the same phases stretched four times (1-400, 401-1200, ...)
    long = tmp_path / "long.jsonl"
    long.write_text("\n".join(json.dumps({"step": s, "x": float(s)}) for s in range(10, 4001, 10)) + "\n")
    for (lo, hi), m in zip(PHASES, phase_means(long, "x", iters=4000)):
        steps = [s for s in range(10, 4001, 10) if 4 * lo - 3 <= s <= 4 * hi]
        assert m == sum(steps) / len(steps)


def test_curves_validation_tables_read_every_kept_run_by_method_and_seed(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks" / "busi"))
    from curves import main
    for method, seed, value in [("synfoc", 1, 0.25), ("synfoc", 2, 0.5), ("base-foundation", 1, 1.0)]:
        run = tmp_path / f"seed{seed}" / method
        run.mkdir(parents=True)
        rows = [{"step": s, "alpha/malignant": value * s / 4000} for s in range(10, 4001, 10)]
        if method == "synfoc":
            rows = [{**r, "only_synfoc": 1.0} for r in rows]
        (run / "history.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["--validation", str(tmp_path), "--iters", "4000", "--keys", "alpha/malignant,only_synfoc"]) == 0
    out = capsys.readouterr().out
    assert "| 1-400 | 401-1200 | 1201-2400 | 2401-3200 | 3201-4000 |" in out
    alpha = out.split("### only_synfoc")[0]
    last = [s for s in range(10, 4001, 10) if s >= 3201]
    expected = sum(last) / len(last) / 4000
    assert "| synfoc | 2 |" in alpha and f"{0.5 * expected:.4f} |" in alpha.split("| synfoc | 2 |")[1].splitlines()[0]
    assert "| base-foundation | 1 |" in alpha
    only = out.split("### only_synfoc")[1]
    assert "base-foundation" not in only and only.count("| synfoc |") == 2     # a run without the key: no row
    assert main(["--validation", str(tmp_path / "none")]) == 2


def test_curves_gain_pairs_each_student_with_its_baseline_by_seed_and_domain(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "busi"))
    from curves import gain_rows, run_dice
    lines = ["variant,student,labeled_domain,seed,test_domain,dice,jaccard,hd95,asd"]
    dice = {("synfoc", "unet"): (0.50, 0.30), ("suponly-unet", "unet"): (0.60, 0.10),
            ("synfoc", "foundation"): (0.70, 0.50), ("samed", "foundation"): (0.80, 0.20)}
    for (variant, student), (b, m) in dice.items():
        lines += [f"{variant},{student},benign,1,benign,{b},0,0,0", f"{variant},{student},benign,1,malignant,{m},0,0,0",
                  f"{variant},{student},benign,1,mean,0.99,0,0,0"]          # the sweep's average row is not a domain
    (tmp_path / "sweep_seeds.csv").write_text("\n".join(lines) + "\n")
    table = [{"quantity": "confident_foreground", "method": "synfoc", "labeled": "benign", "seed": "1",
              "801-1000": "0.0200"},
             {"quantity": "confident_foreground", "method": "synfoc", "labeled": "benign", "seed": "2",
              "801-1000": "0.0300"}]                                      # seed 2 has no Dice: no row
    rows = gain_rows(table, run_dice(tmp_path / "sweep_seeds.csv"))
    by_student = {r["student"]: r for r in rows}
    assert len(rows) == 2 and by_student.keys() == {"unet", "foundation"}
    assert by_student["unet"]["gain"] == pytest.approx(100 * ((0.50 + 0.30) / 2 - (0.60 + 0.10) / 2))
    assert by_student["foundation"]["gain"] == pytest.approx(100 * ((0.70 + 0.50) / 2 - (0.80 + 0.20) / 2))
    assert by_student["unet"]["share"] == 0.02 and by_student["unet"]["baseline"] == "suponly-unet"


def test_demo_validation_split_holds_unseen_training_cases(capsys):
    """benchmarks/demo_validation.py scores on training-distribution cases that no run trains on."""
    import numpy as np
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from demo_validation import carved_synthetic, print_table, run_key

    from synfoc.config import resolve
    from synfoc.data.source import open_index
    from synfoc.data.synthetic import make_case

    cfg = resolve("demo")
    carved = carved_synthetic(cfg, val_num=2)
    train = [c for c in carved.cases if c.split == "train"]
    val = [c for c in carved.cases if c.split == "test"]
    assert {c.name for c in train} == {c.name for c in open_index(cfg).cases if c.split == "train"}
    assert sorted(c.name for c in val if c.domain == "siteB") == ["siteB_train_040", "siteB_train_041"]
    # a carved case reads the training image its name says, not a test image of the same index
    sample = carved.read(val[0])
    domain, _, index = val[0].name.rsplit("_", 2)
    expect_image, expect_label = make_case(0, domain, "train", int(index))
    other_image, _ = make_case(0, domain, "test", int(index))
    assert np.array_equal(sample.image, expect_image) and np.array_equal(sample.label, expect_label)
    assert not np.array_equal(sample.image, other_image)
    assert run_key("suponly-unet", {"ema_decay": 0.9, "unet_size": 64}) == "unet_size64"
    assert run_key("synfoc", {"ema_decay": 0.9, "unet_size": 64}) == "ema_decay0.9_unet_size64"
    assert run_key("synfoc", {}) == "demo"
    row = {"variant": "demo", "method": "synfoc", "student": "unet", "domain": "siteA"}
    print_table([{**row, "seed": "1", "val_dice": "90"}, {**row, "seed": "2", "val_dice": "80"},
                 {**row, "seed": "1", "val_dice": "96"}])          # a rerun of seed 1 replaces its row
    assert "| demo | synfoc | unet | 2 | 88.00 (80.00-96.00) |" in capsys.readouterr().out


def test_rows_since_a_commit_follow_git_history():
    """demo_validation --since keeps the rows of a commit and its descendants (machine.git_is_ancestor)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    parent = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD~1"], capture_output=True, text=True)
    if head.returncode or parent.returncode:
        pytest.skip("needs a git checkout with at least two commits")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import git_is_ancestor
    head, parent = head.stdout.strip(), parent.stdout.strip()
    assert git_is_ancestor(ROOT, parent, head) and git_is_ancestor(ROOT, head, head + "-dirty")
    assert not git_is_ancestor(ROOT, head, parent)


def test_fused_cpu_attention_counts_the_flops_of_the_explicit_matmuls():
    """FlopCounterMode with step_time's registration counts the CPU's fused attention (forward and
    backward) as the explicit q k^T, softmax, (.) v sequence it replaces."""
    from torch.utils.flop_counter import FlopCounterMode
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_time
    import torch
    step_time.count_cpu_kernel_flops()
    q, k, v = (torch.randn(3, 2, 49, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 2, 49, 49)

    def counted(attention) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            attention().square().sum().backward()
        return counter.get_total_flops()

    fused = counted(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    explicit = counted(lambda: torch.softmax(q @ k.transpose(-2, -1) / 4 + mask, dim=-1) @ v)
    assert fused == explicit == 3 * (2 * 2 * 3 * 2 * 49 * 49 * 16)   # forward 2 matmuls, backward 4


def test_fused_cpu_convolution_counts_the_flops_of_the_plain_convolutions():
    """With step_time's registration, LiteMedSAM with synfoc.accel's fused convolutions (oneDNN's
    ``_convolution_pointwise``, plain and with the residual add) counts the FLOPs of the plain
    model: the utilisation of an accelerated step is not read low."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from synfoc import accel, cpu
    from synfoc.models.foundation import build_foundation_model
    if not cpu.onednn_kernels(torch.float32):
        pytest.skip("the fused convolution needs oneDNN's _convolution_pointwise on x86-64; this build has none")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_time
    step_time.count_cpu_kernel_flops()
    torch.manual_seed(0)
    plain = build_foundation_model("litemedsam", 1, lora_rank=4, image_size=32).eval()
    fused = accel.accelerate(copy.deepcopy(plain), "cpu", ["tinyvit_fused_convs"])
    x = torch.randn(2, 3, 32, 32)

    def counted(model) -> dict:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}

    plain_counts, fused_counts = counted(plain), counted(fused)
    assert fused_counts.get("mkldnn._convolution_pointwise", 0) > 0   # the fused path ran
    assert sum(fused_counts.values()) == sum(plain_counts.values())


def test_checkpoint_validation_keeps_the_checkpoint_of_a_named_step(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "busi"))
    import torch
    from checkpoint_validation import keep_checkpoints
    run = tmp_path / "t0.95"
    run.mkdir()
    torch.save({"step": 200, "students": {}, "teachers": {}, "optimizers": {}}, run / "checkpoint.pt")
    keep_checkpoints(run, {200}, poll_s=0, within_s=30)
    with pytest.raises(SystemExit, match="no checkpoint of iteration"):
        keep_checkpoints(run, {400}, poll_s=0, within_s=0.2)
    assert torch.load(tmp_path / "ckpt_200.pt", weights_only=True)["step"] == 200


def test_threshold_validation_keeps_a_finished_runs_small_files(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "busi"))
    from threshold_validation import KEPT_FILES, keep_run
    run = tmp_path / "runs" / "synfoc" / "t0.95"
    run.mkdir(parents=True)
    for name in KEPT_FILES[:-1]:
        (run / name).write_text(name)
    dest = tmp_path / "results" / "synfoc"
    with pytest.raises(FileNotFoundError, match="labeled.txt"):
        keep_run(run, dest)
    assert not dest.exists()
    (run / "labeled.txt").write_text("benign/a.png\n")
    (run / "checkpoint.pt").write_bytes(b"large")
    keep_run(run, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(KEPT_FILES)
    assert (dest / "labeled.txt").read_text() == "benign/a.png\n"


def test_threshold_validation_seed_table_pairs_seeds_from_the_csv(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "busi"))
    from threshold_validation import CSV_COLUMNS, seed_results, seed_table
    import csv
    rows = [  # (method, student, seed, iters, dice)
        ("synfoc", "unet", 1, 4000, 60.0), ("synfoc", "unet", 2, 4000, 50.0),
        ("base-unet", "unet", 1, 4000, 55.0), ("base-unet", "unet", 2, 4000, 52.5),
        ("base-unet", "unet", 2, 4000, 54.0),      # trained again: the later row counts
        ("suponly-unet", "unet", 1, 4000, 58.0),   # seed 2 missing: paired on seed 1 only
        ("synfoc", "foundation", 1, 4000, 70.0), ("samed", "foundation", 1, 4000, 71.5),
        ("synfoc", "unet", 1, 1000, 10.0),         # another schedule: left out
    ]
    path = tmp_path / "tv.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS)
        w.writeheader()
        for method, student, seed, iters, dice in rows:
            w.writerow({c: "" for c in CSV_COLUMNS} | {
                "method": method, "student": student, "threshold": 0.95, "domain": "benign", "seed": seed,
                "iters": iters, "unet_width": 16, "val_dice": dice, "validation_other": 0})
        # validated on the other domain too: another split, kept apart, its second score readable
        w.writerow({c: "" for c in CSV_COLUMNS} | {
            "method": "synfoc", "student": "unet", "threshold": 0.95, "domain": "benign", "seed": 1, "iters": 4000,
            "unet_width": 16, "val_dice": 1.0, "validation_other": 40, "val_dice_other": 2.0})
    assert seed_results(path, 4000, 0.95, 16, "benign", 40, "val_dice_other") == {("synfoc", "unet"): {1: 2.0}}
    cells = seed_results(path, 4000, 0.95, 16, "benign")
    assert cells[("synfoc", "unet")] == {1: 60.0, 2: 50.0}
    assert cells[("base-unet", "unet")] == {1: 55.0, 2: 54.0}
    table = seed_table(cells)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    # synfoc - base-unet: +5 and -4, mean 0.5, sample std of (5, -4) = 6.36
    assert lines["synfoc - base-unet (U-Net)"].endswith("| +5.00 | -4.00 | 0.50 ± 6.36 | 1/2 |")
    assert lines["synfoc - suponly-unet (U-Net)"].endswith("| +2.00 | - | 2.00 (one seed) | 1/1 |")
    assert lines["synfoc - samed (foundation)"].endswith("| -1.50 | - | -1.50 (one seed) | 0/1 |")
    assert "synfoc - base-foundation (foundation)" not in lines   # never ran: no row
    assert seed_results(path, 2000, 0.95, 16, "benign") == {}


def test_pseudo_label_oracle_swaps_the_mean_teachers_targets():
    """Within ``pseudo_labels_from(variant)`` MeanTeacher's unsupervised loss is the masked loss
    against the hidden labels and/or an all-ones mask, computed here independently of the step."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "busi"))
    import torch
    from pseudo_label_oracle import pseudo_labels_from
    from synfoc.augment import intermediate_sample
    from synfoc.method.baselines import MeanTeacher
    from synfoc.method.losses import ce_dice_loss
    from synfoc.method.synfoc import pseudo_label
    from synfoc.models import build_unet
    from synfoc.views import Views

    torch.manual_seed(0)
    student, teacher = build_unet(1, 2, 4), build_unet(1, 2, 4)
    mt = MeanTeacher("unet", student, teacher, threshold=0.6)
    b, s = 2, 32
    box = torch.zeros(b, s, s, dtype=torch.bool)
    box[:, 4:12, 4:12] = True
    truth = (torch.rand(b, s, s) > 0.7).long()
    v = Views(x_u=torch.rand(b, 1, s, s), y_u=(torch.rand(b, s, s) > 0.5).long(), uw_u=torch.rand(b, 1, s, s),
              us_u=torch.rand(b, 1, s, s), box_u=box, unlabeled_truth=truth)
    with torch.no_grad():
        q_teacher, w_teacher = pseudo_label(torch.softmax(teacher(v.uw_u), 1), 0.6)
    assert 0 < w_teacher.float().mean() < 1   # the mask matters for this teacher
    ones = torch.ones_like(w_teacher)
    expected = {"teacher": (q_teacher, w_teacher), "truth": (truth, ones),
                "truth-masked": (truth, w_teacher), "unmasked": (q_teacher, ones)}
    student.train()
    losses = {}
    for variant, (q, w) in expected.items():
        with pseudo_labels_from(variant):
            _, logs = mt.step(v, 1, 2)
        # the step's student forward normalises labeled and intermediate halves separately; in train
        # mode a forward of the intermediate half alone does the same
        with torch.no_grad():
            logits_c = student(intermediate_sample(v.x_u, v.us_u, box))
            want = ce_dice_loss(logits_c, intermediate_sample(v.y_u, q, box), box | w)
        assert torch.allclose(logs["loss_u"], want, atol=1e-5), variant
        losses[variant] = float(logs["loss_u"])
    assert len({round(x, 5) for x in losses.values()}) == 4   # every variant trains on other targets


@pytest.mark.parametrize(("script", "message"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed \\(SIGKILL\\), most likely out of memory"),
    ("raise SystemExit(3)", "failed \\(exit 3\\); its error is above"),
])
def test_step_time_names_a_child_killed_for_memory(script, message):
    """A mode's child that dies says how: killed (what the out-of-memory killer does to the two
    side-by-side children of a large configuration) or its own exit status."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_time
    child = step_time.Child.__new__(step_time.Child)
    child.mode = "against"
    child.proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    with pytest.raises(SystemExit, match=message):
        child.answer()


def test_threshold_validation_runs_the_consistency_ablation_under_its_own_name(monkeypatch):
    """``--consistency none`` reaches the trained configuration, and the run is named
    synfoc-consistency-none, so that no table pools the ablation with SynFoC itself; it is refused
    for any other method."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "busi"))
    import threshold_validation as tv
    import synfoc.data.source
    monkeypatch.setattr(synfoc.data.source, "open_index", lambda cfg: None)
    monkeypatch.setattr(tv, "validation_index", lambda *args: None)
    monkeypatch.setattr(tv, "train_on", lambda cfg, out, carved: (cfg, out))
    args = tv.argparse.Namespace(dataset="busi", labeled_domain="benign", labeled_num=64, val_num=64, val_other=0,
                                 iters=2, precision="fp32", seed=1)
    cfg, _ = tv.protocol_run(args, ROOT / "unused", method="synfoc", threshold=0.95, unet_width=16, consistency="none")
    assert (cfg.method, cfg.consistency) == ("synfoc", "none")
    cfg, _ = tv.protocol_run(args, ROOT / "unused", method="synfoc", threshold=0.95, unet_width=16)
    assert cfg.consistency == "cdcr"
    assert tv.run_label("synfoc", "none") == "synfoc-consistency-none" and tv.run_label("synfoc") == "synfoc"
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "busi" / "threshold_validation.py"),
                              "--consistency", "none", "--methods", "synfoc,samed"], capture_output=True, text=True)
    assert refused.returncode == 2 and "ablation of SynFoC alone" in refused.stderr

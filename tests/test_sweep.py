"""`synfoc sweep`: runs per (method, labeled domain[, seed]), the paper-style tables, resuming.

Two tiny sweeps (BUSI layout generated here, 2 iterations, tiny models) are shared by the tests of
this module, one with one seed and one with two; each later test works on its own copy where it
changes run folders.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synfoc.cli import main as cli_main
from synfoc.config import TrainConfig
from synfoc.sweep import (Variant, main_table, paired_differences, parse_seeds, parse_variants, read_summary,
                          sweep_markdown)

METHODS = "synfoc,suponly-unet,base-foundation"
TINY = ["--iters", "2", "--unet-size", "32", "--unet-width", "4", "--image-size", "32",
        "--batch-labeled", "2", "--batch-unlabeled", "2", "--device", "cpu", "--precision", "fp32",
        "--no-progress"]


def make_tiny_busi(root: Path, per_class: int = 10, size: int = 64) -> Path:
    """Dataset_BUSI_with_GT/{benign,malignant}/"<class> (n).png" with a bright blob and its 0/255
    mask. Per class int(0.2 * 10) = 2 cases go to test, 8 to train; 1/8 of 16 -> 2 labeled."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for domain in ("benign", "malignant"):
        folder = root / "Dataset_BUSI_with_GT" / domain
        folder.mkdir(parents=True)
        for n in range(1, per_class + 1):
            cy, cx = rng.uniform(0.3, 0.7, 2) * size
            r = rng.uniform(0.1, 0.25) * size
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
            image = np.clip(60 + 140 * mask + rng.normal(0, 15, mask.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{domain} ({n}).png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"{domain} ({n})_mask.png")
    return root


def sweep(dataset: Path, out: Path, *extra: str) -> int:
    return cli_main(["sweep", "--preset", "busi", "--dataset", str(dataset), "--out", str(out),
                     "--methods", METHODS, *TINY, *extra])


def snapshot(out: Path) -> dict[str, int]:
    """mtime (ns) of every file in the run folders."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("sweep.md", "sweep_seeds.csv")}


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_busi(tmp_path_factory.mktemp("busi"))


@pytest.fixture(scope="module")
def swept(busi, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    assert sweep(busi, out) == 0
    return busi, out


def table_rows(text: str) -> dict[str, list[str]]:
    """First Markdown table of sweep.md: row label -> cells."""
    section = text.split("## DSC by labeled domain", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_sweep_folders_and_table(swept):
    dataset, out = swept
    for method in ("synfoc", "suponly-unet", "base-foundation"):
        for domain in ("benign", "malignant"):
            run = out / method / domain
            summary = json.loads((run / "summary.json").read_text())
            assert summary["method"] == method and summary["labeled_domain"] == domain
            assert summary["iterations"] == 2
            assert len((run / "labeled.txt").read_text().splitlines()) == 2   # int(0.125 * 16)
            assert all(line.startswith(domain + "/") for line in (run / "labeled.txt").read_text().splitlines())
    text = (out / "sweep.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert "| benign | malignant | DSC Avg | Jaccard | 95HD | ASD |" in header
    rows = table_rows(text)
    assert set(rows) == {"SynFoC_U-Net", "SynFoC_LiteMedSAM", "SupOnly_U-Net", "Base_LiteMedSAM"}
    # Every cell is recomputed here from the runs' summary.json files.
    for label, method, student in [("SynFoC_U-Net", "synfoc", "unet"), ("SynFoC_LiteMedSAM", "synfoc", "foundation"),
                                   ("SupOnly_U-Net", "suponly-unet", "unet"),
                                   ("Base_LiteMedSAM", "base-foundation", "foundation")]:
        means = [json.loads((out / method / d / "summary.json").read_text())["students"][student]["mean"]
                 for d in ("benign", "malignant")]
        expected = [100 * m["dice"] for m in means]
        expected.append(sum(expected) / 2)
        expected += [100 * (means[0]["jaccard"] + means[1]["jaccard"]) / 2,
                     (means[0]["hd95"] + means[1]["hd95"]) / 2, (means[0]["asd"] + means[1]["asd"]) / 2]
        assert [float(c) for c in rows[label]] == pytest.approx(expected, abs=0.006), label
    assert "±" not in text and "SynFoC minus baseline" not in text
    # One seed: the CSV still lists every run (seed 1337, the preset's) as its summary.json has it.
    assert csv_rows(out) == expected_csv_rows(out, {m: [None] for m in METHODS.split(",")}, 1337)


def csv_rows(out: Path) -> set[tuple]:
    with open(out / "sweep_seeds.csv", newline="") as f:
        return {(r["variant"], r["student"], r["labeled_domain"], int(r["seed"]), r["test_domain"],
                 *(float(r[m]) for m in ("dice", "jaccard", "hd95", "asd"))) for r in csv.DictReader(f)}


def expected_csv_rows(out: Path, folders: dict[str, list], seed: int | None = None) -> set[tuple]:
    """The CSV as it should be, read from each run's summary.json: folders maps a method to its
    seeds (None: the one-seed layout, whose seed is ``seed``)."""
    rows = set()
    for method, seeds in folders.items():
        for domain in ("benign", "malignant"):
            for sd in seeds:
                run = out / method / domain / (f"seed{sd}" if sd is not None else "")
                summary = json.loads((run / "summary.json").read_text())
                for student, res in summary["students"].items():
                    for test, m in [*res["per_domain"].items(), ("mean", res["mean"])]:
                        rows.add((method, student, domain, sd if sd is not None else seed, test,
                                  m["dice"], m["jaccard"], m["hd95"], m["asd"]))
    return rows


def test_second_invocation_redoes_nothing(swept, capsys):
    dataset, out = swept
    before = snapshot(out)
    capsys.readouterr()
    assert sweep(dataset, out) == 0
    printed = capsys.readouterr().out
    assert printed.count("done, skipping") == 6
    assert "training in" not in printed and "resuming" not in printed
    assert snapshot(out) == before


def test_interrupted_run_resumes_and_fresh_folder_restarts(swept, tmp_path, capsys):
    dataset, original = swept
    out = tmp_path / "out"
    shutil.copytree(original, out)
    resumed = out / "suponly-unet" / "malignant"
    (resumed / "summary.json").unlink()                         # died after its last checkpoint
    restarted = out / "suponly-unet" / "benign"
    (restarted / "summary.json").unlink()                       # died before its first checkpoint
    (restarted / "checkpoint.pt").unlink()
    history_lines = len((resumed / "history.jsonl").read_text().splitlines())
    assert len((restarted / "history.jsonl").read_text().splitlines()) == history_lines >= 1
    untouched = {k: v for k, v in snapshot(out).items() if not k.startswith("suponly-unet")}
    capsys.readouterr()
    assert sweep(dataset, out) == 0
    printed = capsys.readouterr().out
    assert printed.count("done, skipping") == 4
    assert "suponly-unet / malignant: resuming from" in printed
    assert "suponly-unet / benign: training in" in printed
    assert read_summary(resumed) is not None and read_summary(restarted) is not None
    # The resumed run continued at its checkpoint (iteration 2 of 2): no iteration was redone.
    assert len((resumed / "history.jsonl").read_text().splitlines()) == history_lines
    # The fresh run did not append to the stale curve of the dead one.
    assert len((restarted / "history.jsonl").read_text().splitlines()) == history_lines
    after = snapshot(out)
    assert {k: after[k] for k in untouched} == untouched


def test_truncated_summary_counts_as_unfinished(swept, tmp_path, capsys):
    dataset, original = swept
    out = tmp_path / "out"
    shutil.copytree(original, out, ignore=shutil.ignore_patterns("tensorboard"))
    run = out / "suponly-unet" / "benign"
    (run / "summary.json").write_text('{"method": "suponly-un')   # a crash while writing it
    capsys.readouterr()
    assert sweep(dataset, out, "--methods", "suponly-unet", "--labeled-domains", "benign") == 0
    assert "resuming from" in capsys.readouterr().out
    assert read_summary(run) is not None


def test_other_settings_in_existing_folder_are_refused(swept, capsys):
    dataset, out = swept
    before = snapshot(out)
    assert cli_main(["sweep", "--preset", "busi", "--dataset", str(dataset), "--out", str(out),
                     "--methods", "suponly-unet", *TINY[2:], "--iters", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run with other settings" in err and "iters: 2 -> 3" in err
    assert snapshot(out) == before


def test_unknown_labeled_domain_is_refused_before_training(swept, tmp_path, capsys):
    dataset, _ = swept
    assert sweep(dataset, tmp_path / "o", "--labeled-domains", "benign,normal") == 2
    assert "unknown domain(s) normal" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- several seeds
SEEDS = [11, 12]
SEEDED_METHODS = "synfoc,suponly-unet"
DOMAINS = ("benign", "malignant")


@pytest.fixture(scope="module")
def seeded(busi, tmp_path_factory):
    """2 methods x 2 labeled domains x 2 seeds (--seed 11 --seeds 2), 2 iterations each."""
    out = tmp_path_factory.mktemp("seeded") / "out"
    assert sweep(busi, out, "--methods", SEEDED_METHODS, "--seed", "11", "--seeds", "2") == 0
    return busi, out


def summary_of(out: Path, method: str, domain: str, seed: int) -> dict:
    return json.loads((out / method / domain / f"seed{seed}" / "summary.json").read_text())


def mean_std(cell: str) -> tuple[float, float]:
    mean, std = cell.rstrip("*").split(" ± ")
    return float(mean), float(std)


def section(text: str, title: str) -> list[list[str]]:
    """The rows (cells) of the table under ``## title``, without its header."""
    body = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_seeds_layout_and_csv(seeded):
    _, out = seeded
    for method in SEEDED_METHODS.split(","):
        for domain in DOMAINS:
            assert not (out / method / domain / "summary.json").exists()     # runs live in seed<N>/ only
            assert sorted(p.name for p in (out / method / domain).iterdir()) == ["seed11", "seed12"]
            for seed in SEEDS:
                summary = summary_of(out, method, domain, seed)
                assert (summary["method"], summary["labeled_domain"]) == (method, domain)
                config = (out / method / domain / f"seed{seed}" / "config.yaml").read_text()
                assert f"\nseed: {seed}\n" in config
    rows = csv_rows(out)
    assert rows == expected_csv_rows(out, {m: SEEDS for m in SEEDED_METHODS.split(",")})
    # synfoc: 2 students, suponly-unet: 1; each 2 test domains + mean, per run
    assert len(rows) == (2 + 1) * 2 * 2 * 3


def test_seeds_cells_are_mean_and_sample_std(seeded):
    _, out = seeded
    text = (out / "sweep.md").read_text()
    assert "seeds 11, 12 (one run each)" in text and "8 of 8 runs finished" in text
    rows = {r[0]: r[1:] for r in section(text, "DSC by labeled domain")}
    assert set(rows) == {"SynFoC_U-Net", "SynFoC_LiteMedSAM", "SupOnly_U-Net"}
    for label, method, student in [("SynFoC_U-Net", "synfoc", "unet"), ("SynFoC_LiteMedSAM", "synfoc", "foundation"),
                                   ("SupOnly_U-Net", "suponly-unet", "unet")]:
        # m[metric][seed, domain], straight from summary.json
        m = {k: np.array([[summary_of(out, method, d, s)["students"][student]["mean"][k] for d in DOMAINS]
                          for s in SEEDS]) for k in ("dice", "jaccard", "hd95", "asd")}
        cells = [mean_std(c) for c in rows[label]]
        for i in range(len(DOMAINS)):
            assert cells[i] == pytest.approx((100 * m["dice"][:, i].mean(), 100 * m["dice"][:, i].std(ddof=1)),
                                             abs=0.006), (label, DOMAINS[i])
        # averages: mean and std over seeds of each seed's average over the labeled domains
        for j, (k, scale) in enumerate([("dice", 100), ("jaccard", 100), ("hd95", 1), ("asd", 1)]):
            per_seed = scale * m[k].mean(axis=1)
            assert cells[2 + j] == pytest.approx((per_seed.mean(), per_seed.std(ddof=1)), abs=0.006), (label, k)
    # The per-run table shows each test domain's DSC the same way.
    runs = {(r[0], r[1]): r[2:] for r in section(text, "Runs (DSC on each test domain)")}
    got = mean_std(runs[("SupOnly_U-Net", "malignant")][0])            # test benign
    dice = np.array([summary_of(out, "suponly-unet", "malignant", s)["students"]["unet"]["per_domain"]["benign"]["dice"]
                     for s in SEEDS])
    assert got == pytest.approx((100 * dice.mean(), 100 * dice.std(ddof=1)), abs=0.006)


def test_seeds_paired_differences(seeded):
    _, out = seeded
    rows = section((out / "sweep.md").read_text(), "SynFoC minus baseline")
    assert [(r[0], r[1], r[2]) for r in rows] == [("SynFoC_U-Net", "SupOnly_U-Net", d) for d in (*DOMAINS, "Avg")]
    diff = {d: np.array([100 * (summary_of(out, "synfoc", d, s)["students"]["unet"]["mean"]["dice"]
                                - summary_of(out, "suponly-unet", d, s)["students"]["unet"]["mean"]["dice"])
                         for s in SEEDS]) for d in DOMAINS}
    diff["Avg"] = (diff["benign"] + diff["malignant"]) / 2
    for row in rows:
        d = diff[row[2]]
        pairs, mean, std, span, positive = row[3:]
        assert pairs == "2/2"
        assert float(mean) == pytest.approx(d.mean(), abs=0.006)
        assert float(std) == pytest.approx(d.std(ddof=1), abs=0.006)
        low, high = (float(x) for x in span.split(" .. "))
        assert (low, high) == pytest.approx((d.min(), d.max()), abs=0.006)
        assert positive == f"{int((d > 0).sum())}/2"


def test_seeds_share_the_labeled_split_but_not_the_training(seeded):
    _, out = seeded
    for method in SEEDED_METHODS.split(","):
        for domain in DOMAINS:
            a, b = (out / method / domain / f"seed{s}" for s in SEEDS)
            for name in ("labeled.txt", "unlabeled.txt"):
                assert (a / name).read_text() == (b / name).read_text(), (method, domain, name)
            assert (a / "labeled.txt").read_text().splitlines() == [f"{domain}/{domain} (1)", f"{domain}/{domain} (10)"]
            losses = [json.loads((r / "history.jsonl").read_text().splitlines()[-1])["loss"] for r in (a, b)]
            assert losses[0] != losses[1], (method, domain)


def test_tables_only_rebuilds_the_same_tables_without_training(seeded, tmp_path, capsys):
    dataset, original = seeded
    out = tmp_path / "out"
    shutil.copytree(original, out, ignore=shutil.ignore_patterns("tensorboard"))
    (out / "sweep.md").unlink()
    (out / "sweep_seeds.csv").unlink()
    before = snapshot(out)
    capsys.readouterr()
    args = ("--methods", SEEDED_METHODS, "--seed", "11", "--seeds", "11,12", "--tables-only")
    assert sweep(dataset, out, *args) == 0
    assert "training in" not in capsys.readouterr().out
    assert snapshot(out) == before
    assert (out / "sweep.md").read_text() == (original / "sweep.md").read_text()
    assert (out / "sweep_seeds.csv").read_text() == (original / "sweep_seeds.csv").read_text()
    # A run without its summary (interrupted) drops out of its cell, its pairs and the CSV.
    (out / "suponly-unet" / "malignant" / "seed12" / "summary.json").unlink()
    assert sweep(dataset, out, *args) == 0
    text = (out / "sweep.md").read_text()
    assert "7 of 8 runs finished" in text
    supervised = next(r for r in section(text, "DSC by labeled domain") if r[0] == "SupOnly_U-Net")
    only = summary_of(out, "suponly-unet", "malignant", 11)["students"]["unet"]["mean"]["dice"]
    assert supervised[2] == f"{100 * only:.2f}*"                       # one seed left: no std, marked partial
    assert all(c.endswith("*") for c in supervised[3:])
    pairs = {r[2]: r[3] for r in section(text, "SynFoC minus baseline")}
    assert pairs == {"benign": "2/2", "malignant": "1/2", "Avg": "1/2"}
    assert not any(r[1:4] == ("unet", "malignant", 12) for r in csv_rows(out) if r[0] == "suponly-unet")


def test_one_listed_seed_reads_its_seed_folders(seeded, tmp_path, capsys):
    """``--seeds 12,`` (one seed, as a sweep split by seed gives it) uses the seed<N>/ folders too."""
    dataset, original = seeded
    out = tmp_path / "out"
    shutil.copytree(original, out, ignore=shutil.ignore_patterns("tensorboard"))
    before = snapshot(out)
    capsys.readouterr()
    assert sweep(dataset, out, "--methods", SEEDED_METHODS, "--seeds", "12,", "--tables-only") == 0
    assert "training in" not in capsys.readouterr().out
    text = (out / "sweep.md").read_text()
    assert "4 of 4 runs finished" in text
    supervised = next(r for r in section(text, "DSC by labeled domain") if r[0] == "SupOnly_U-Net")
    for cell, domain in zip(supervised[1:3], DOMAINS):
        assert cell == f"{100 * summary_of(out, 'suponly-unet', domain, 12)['students']['unet']['mean']['dice']:.2f}"
    assert {r[3] for r in csv_rows(out)} == {12}
    assert snapshot(out) == before


def test_multi_seed_sweep_names_one_seed_runs_it_does_not_count(swept, tmp_path, capsys):
    dataset, original = swept
    out = tmp_path / "out"
    shutil.copytree(original, out, ignore=shutil.ignore_patterns("tensorboard"))
    capsys.readouterr()
    assert sweep(dataset, out, "--methods", "suponly-unet", "--seeds", "2", "--tables-only") == 0
    printed = capsys.readouterr().out
    assert printed.count("holds a run of a sweep without --seeds") == 2 and "0 done" in printed


# ----------------------------------------------------------------------------- no training needed
def test_parse_variants_options_and_cross_product():
    assert parse_variants("synfoc") == [Variant("synfoc")]
    v = parse_variants("base-unet,synfoc:constant:cr,synfoc:none")
    assert v == [Variant("base-unet"), Variant("synfoc", "constant", "cr"), Variant("synfoc", "smc", "none")]
    assert [x.folder for x in v] == ["base-unet", "synfoc-constant-cr", "synfoc-none"]
    v = parse_variants("synfoc,fixmatch", alphas="smc,cps", consistencies="none")
    assert v == [Variant("synfoc", "smc", "none"), Variant("synfoc", "cps", "none"), Variant("fixmatch")]
    assert parse_variants("synfoc,synfoc:smc:cdcr") == [Variant("synfoc")]     # same run once
    for bad in ("unet", "fixmatch:cps", "synfoc:cps:self", "synfoc:nonsense"):
        with pytest.raises(ValueError):
            parse_variants(bad)
    with pytest.raises(ValueError, match="synfoc only"):
        parse_variants("base-unet", alphas="cps")


def test_table_with_a_missing_run_marks_partial_average():
    def summary(dice):
        mean = {"dice": dice, "jaccard": dice / 2, "hd95": 10 * dice, "asd": dice}
        return {"students": {"unet": {"mean": mean, "per_domain": {}}}}
    v = Variant("suponly-unet")
    text = main_table([v], ["A", "B", "C"], {(v, "A", 0): summary(0.5), (v, "C", 0): summary(0.7)}, "litemedsam")
    row = text.splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["SupOnly_U-Net", "50.00", "-", "70.00", "60.00*", "30.00*", "6.00*", "0.60*"]


def test_multi_part_dataset_gets_a_per_part_table():
    def summary(cup, disc):   # two test domains; the run's mean = mean over domains of mean over parts
        per = {d: {"dice": (c + k) / 2, "jaccard": 0.5, "hd95": 1.0, "asd": 1.0,
                   "classes": {"cup": {"dice": c}, "disc": {"dice": k}}} for d, c, k in zip("XY", cup, disc)}
        return {"method": "synfoc", "students": {s: {"per_domain": per, "mean": {
            "dice": sum(p["dice"] for p in per.values()) / 2, "jaccard": 0.5, "hd95": 1.0, "asd": 1.0}}
            for s in ("unet", "foundation")}}
    v = Variant("synfoc")
    text = sweep_markdown([v], ["X", "Y"], {(v, "X", 1): summary([0.6, 0.8], [0.9, 0.7]),
                                            (v, "Y", 1): summary([0.5, 0.5], [1.0, 0.8])},
                          TrainConfig(foundation="medsam_vit_b"), "fundus")
    assert "## DSC per part (cup / disc) by labeled domain" in text
    part_table = text.split("## DSC per part", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in part_table.splitlines() if line.startswith("| SynFoC_MedSAM"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["70.00 / 80.00", "50.00 / 90.00"]
    assert cells[3] == "72.50"                       # (75 + 70) / 2: DSC Avg over parts and columns


def test_labeled_num_replaces_the_presets_ratio(tmp_path):
    import argparse

    from synfoc.sweep import add_arguments, base_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--preset", "busi", "--dataset", str(tmp_path), "--out", "o", "--labeled-num", "3"])
    cfg = base_config(args)
    assert (cfg.labeled_num, cfg.labeled_ratio, cfg.format) == (3, None, "busi")
    args = p.parse_args(["--preset", "fundus", "--dataset", str(tmp_path), "--out", "o", "--labeled-ratio", "0.25"])
    assert (base_config(args).labeled_num, base_config(args).labeled_ratio) == (None, 0.25)


def test_parse_seeds_count_and_list():
    assert parse_seeds(None, 1337) == [1337]
    assert parse_seeds("3", 1337) == [1337, 1338, 1339]
    assert parse_seeds("1337,1338,2024", 5) == [1337, 1338, 2024]
    assert parse_seeds("2024,", 5) == [2024]
    for bad in ("0", "2024", "1,1", "a", "-1,2", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad, 5)


def test_paired_differences_only_where_both_runs_exist():
    def summary(unet=None, foundation=None):
        students = {k: {"mean": {"dice": v, "jaccard": v, "hd95": 1.0, "asd": 1.0}, "per_domain": {}}
                    for k, v in (("unet", unet), ("foundation", foundation)) if v is not None}
        return {"students": students}
    ours, base_u, samed, base_f = (Variant("synfoc"), Variant("base-unet"), Variant("samed"),
                                   Variant("base-foundation"))
    variants = [ours, base_u, samed, Variant("synfoc", "constant", "none"), base_f]
    summaries = {
        (ours, "A", 1): summary(0.6, 0.8), (ours, "B", 1): summary(0.5, 0.7),
        (ours, "A", 2): summary(0.7, 0.9), (ours, "B", 2): None,
        (base_u, "A", 1): summary(0.5), (base_u, "B", 1): summary(0.6),
        (base_u, "A", 2): summary(0.4), (base_u, "B", 2): summary(0.4),
        (samed, "A", 1): summary(foundation=0.75), (samed, "B", 1): summary(foundation=0.6),
        (samed, "A", 2): summary(foundation=0.95), (samed, "B", 2): summary(foundation=0.1),
    }
    got = {(d.synfoc.folder, d.baseline.folder, d.student, d.labeled): d.diffs
           for d in paired_differences(variants, ["A", "B"], summaries, [1, 2])}
    # every SynFoC variant against each baseline of its student's kind, nothing else
    assert {k[:3] for k in got} == {(s, b, st) for s in ("synfoc", "synfoc-constant-none")
                                   for b, st in (("base-unet", "unet"), ("samed", "foundation"),
                                                 ("base-foundation", "foundation"))}
    assert got[("synfoc", "base-unet", "unet", "A")] == pytest.approx({1: 10.0, 2: 30.0})
    assert got[("synfoc", "base-unet", "unet", "B")] == pytest.approx({1: -10.0})      # seed 2: SynFoC missing
    assert got[("synfoc", "base-unet", "unet", "Avg")] == pytest.approx({1: 0.0})      # seed 1 only is complete
    assert got[("synfoc", "samed", "foundation", "A")] == pytest.approx({1: 5.0, 2: -5.0})
    assert got[("synfoc", "base-foundation", "foundation", "Avg")] == {}              # no base-foundation runs
    text = sweep_markdown(variants, ["A", "B"], summaries, TrainConfig(), None, seeds=[1, 2])
    rows = {(r[0], r[1], r[2]): r[3:] for r in section(text, "SynFoC minus baseline")}
    assert rows[("SynFoC_U-Net", "Base_U-Net", "A")] == ["2/2", "+20.00", "14.14", "+10.00 .. +30.00", "2/2"]
    assert rows[("SynFoC_LiteMedSAM", "SAMed_LiteMedSAM", "A")] == ["2/2", "+0.00", "7.07", "-5.00 .. +5.00", "1/2"]
    assert rows[("SynFoC_U-Net", "Base_U-Net", "Avg")] == ["1/2", "+0.00", "-", "+0.00 .. +0.00", "0/1"]
    assert rows[("SynFoC_LiteMedSAM", "Base_LiteMedSAM", "Avg")] == ["0/2", "-", "-", "-", "-"]

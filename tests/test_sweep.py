"""`synfoc sweep`: runs per (method, labeled domain), the paper-style tables, resuming.

One tiny sweep (BUSI layout generated here, 2 iterations, tiny models) is shared by the tests of
this module; each later test works on its own copy where it changes run folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synfoc.cli import main as cli_main
from synfoc.config import TrainConfig
from synfoc.sweep import Variant, main_table, parse_variants, read_summary

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
            if p.is_file() and p.name != "sweep.md"}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sweep")
    dataset = make_tiny_busi(root / "data")
    out = root / "out"
    assert sweep(dataset, out) == 0
    return dataset, out


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
    text = main_table([v], ["A", "B", "C"], {(v, "A"): summary(0.5), (v, "C"): summary(0.7)}, "litemedsam")
    row = text.splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["SupOnly_U-Net", "50.00", "-", "70.00", "60.00*", "30.00*", "6.00*", "0.60*"]


def test_multi_part_dataset_gets_a_per_part_table():
    from synfoc.sweep import sweep_markdown

    def summary(cup, disc):   # two test domains; the run's mean = mean over domains of mean over parts
        per = {d: {"dice": (c + k) / 2, "jaccard": 0.5, "hd95": 1.0, "asd": 1.0,
                   "classes": {"cup": {"dice": c}, "disc": {"dice": k}}} for d, c, k in zip("XY", cup, disc)}
        return {"method": "synfoc", "students": {s: {"per_domain": per, "mean": {
            "dice": sum(p["dice"] for p in per.values()) / 2, "jaccard": 0.5, "hd95": 1.0, "asd": 1.0}}
            for s in ("unet", "foundation")}}
    v = Variant("synfoc")
    text = sweep_markdown([v], ["X", "Y"], {(v, "X"): summary([0.6, 0.8], [0.9, 0.7]),
                                            (v, "Y"): summary([0.5, 0.5], [1.0, 0.8])},
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

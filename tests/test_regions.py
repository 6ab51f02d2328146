"""Nested regions declared in a folder dataset's dataset.json: parsing, bad declarations, metrics per
region against numpy, and a tiny ``synfoc train`` whose tables report the regions.

The data is a generated fundus-like set: masks 0 = background, 1 = rim, 2 = cup (the cup inside the
disc), ``"regions": {"disc": [1, 2], "cup": [2]}``, two "cameras".
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from synfoc.data.base import DataError
from synfoc.data.folder import open_folder

SIZE = 32
FUNDUS_JSON = {"labels": {"background": 0, "rim": 1, "cup": 2}, "regions": {"disc": [1, 2], "cup": [2]}}


def disc_mask(rng: np.random.Generator, cup: bool = True) -> np.ndarray:
    """0 background, 1 rim, 2 cup: a disc of random centre and radius with a cup inside."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(10, SIZE - 10, 2)
    r = rng.integers(6, 9)
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    mask = np.where(d2 <= r * r, 1, 0).astype(np.uint8)
    if cup:
        mask[d2 <= (r // 2) ** 2] = 2
    return mask


def make_fundus_folder(root: Path, description: dict | None = FUNDUS_JSON, train: int = 4, test: int = 3,
                       values: tuple[int, int] = (1, 2)) -> Path:
    """Two cameras; images are 0/100/200 where a prediction says background/rim/cup (a shifted copy
    of the truth, so that a model reading the intensity predicts it). Masks store rim and cup as
    ``values``. The first and last test cases of camB have no cup: the first is predicted one (cup
    Dice 0), the last is not (both empty: 1)."""
    rng = np.random.default_rng(7)
    for domain in ("camA", "camB"):
        for split, count in (("train", train), ("test", test)):
            (root / domain / split / "images").mkdir(parents=True, exist_ok=True)
            (root / domain / split / "masks").mkdir(parents=True, exist_ok=True)
            for k in range(count):
                label = disc_mask(rng, cup=not (domain == "camB" and split == "test" and k in (0, count - 1)))
                shown = np.roll(label, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
                if k == 0:
                    shown[shown == 1] = 2  # a predicted cup over the whole disc
                stored = np.select([label == 1, label == 2], list(values), 0).astype(np.uint8)
                Image.fromarray((shown * 100).astype(np.uint8)).save(root / domain / split / "images" / f"c{k}.png")
                Image.fromarray(stored).save(root / domain / split / "masks" / f"c{k}.png")
    if description is not None:
        (root / "dataset.json").write_text(json.dumps(description))
    return root


# ----------------------------------------------------------------------------- declaration

def test_regions_become_the_reported_parts(tmp_path):
    index = open_folder(make_fundus_folder(tmp_path / "f"))
    assert index.classes == ["rim", "cup"]
    assert index.report_parts == [("disc", (1, 2)), ("cup", (2,))]


def test_region_values_are_mask_values_mapped_to_training_labels(tmp_path):
    # masks store rim as 128 and cup as 255: regions name those values; labels are 1 and 2
    desc = {"labels": {"background": 0, "rim": 128, "cup": 255}, "regions": {"cup": [255], "disc": [255, 128]}}
    index = open_folder(make_fundus_folder(tmp_path / "f", desc, train=1, test=1, values=(128, 255)))
    assert index.report_parts == [("cup", (2,)), ("disc", (1, 2))]
    case = index.cases_of("camA", "test")[0]
    stored = np.asarray(Image.open(case.mask))
    np.testing.assert_array_equal(np.isin(index.read(case).label, (1, 2)), stored > 0)


def test_regions_with_discovered_labels(tmp_path):
    index = open_folder(make_fundus_folder(tmp_path / "f", {"regions": {"disc": [1, 2], "cup": [2]}}, 1, 1))
    assert index.classes == ["class1", "class2"] and index.report_parts == [("disc", (1, 2)), ("cup", (2,))]


def test_without_regions_each_class_is_reported(tmp_path):
    index = open_folder(make_fundus_folder(tmp_path / "f", {"labels": FUNDUS_JSON["labels"]}, 1, 1))
    assert index.report_parts == [("rim", (1,)), ("cup", (2,))]


@pytest.mark.parametrize("regions, words", [
    ({"disc": [1, 3]}, ["'disc'", "3", "not among the classes", "1 (rim), 2 (cup)"]),
    ({"disc": [0, 1]}, ["'disc'", "0", "background"]),
    ({"disc": []}, ["'disc'", "empty"]),
    ({"disc": ["1", 2]}, ["'disc'", "'1'", "not an integer"]),
    ({"disc": [1.5]}, ["'disc'", "1.5", "not an integer"]),
    ({"disc": [True]}, ["'disc'", "True", "not an integer"]),
    ({"disc": 2}, ["'disc'", "must be a list"]),
    ({"disc": [1, 1]}, ["'disc'", "twice"]),
    ([[1, 2]], ["'regions'", "must map region names"]),
    ({}, ["'regions'", "must map region names"]),
])
def test_bad_regions_name_dataset_json_and_the_value(tmp_path, regions, words):
    root = make_fundus_folder(tmp_path / "f", {"labels": FUNDUS_JSON["labels"], "regions": regions}, 1, 1)
    with pytest.raises(DataError) as err:
        open_folder(root)
    message = str(err.value)
    assert message.startswith(str(root / "dataset.json"))
    for word in words:
        assert word in message, (word, message)


def test_data_check_lists_the_regions(tmp_path, capsys):
    from synfoc.data.check import data_check_main
    root = make_fundus_folder(tmp_path / "f", train=1, test=1)
    assert data_check_main(str(root)) == 0
    assert "reported regions: disc = rim + cup; cup = cup" in capsys.readouterr().out
    assert data_check_main(str(root), as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["regions"] == {"disc": [1, 2], "cup": [2]}


# ----------------------------------------------------------------------------- metrics per region

class ReadsIntensity(nn.Module):
    """Predicts label round(255 * x / 100): the image shows the prediction (0, 100, 200)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x[:, :1] * 255 / 100).round().clamp(0, 2).long()[:, 0]
        return nn.functional.one_hot(label, 3).permute(0, 3, 1, 2).float() * 10


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def test_metrics_per_region_match_numpy(tmp_path):
    from synfoc.evaluate import evaluate_students
    root = make_fundus_folder(tmp_path / "f")
    index = open_folder(root)
    cfg = types.SimpleNamespace(unet_size=SIZE, test_domains=None)
    rows = evaluate_students({"unet": ReadsIntensity()}, index, cfg, torch.device("cpu"), contextlib.nullcontext)
    got = {(r["domain"], r["case"], r["class"]): r["dice"] for r in rows}
    assert {c for _, _, c in got} == {"disc", "cup"}
    checked = 0
    for case in index.cases_of(split="test"):
        # independently: the files as stored, the regions as declared (mask values 1, 2)
        mask = np.asarray(Image.open(case.mask))
        pred = np.asarray(Image.open(case.image)) // 100
        for region, values in FUNDUS_JSON["regions"].items():
            want = numpy_dice(np.isin(pred, values), np.isin(mask, values))
            assert got[(case.domain, case.name, region)] == pytest.approx(want, abs=1e-12), (case, region)
            checked += 1
    assert checked == 12
    scores = list(got.values())
    assert min(scores) < 0.9 and 1.0 in scores and 0.0 in scores  # the empty and the wrong cup


# ----------------------------------------------------------------------------- end to end

TINY = ["--unet-size", "32", "--unet-width", "4", "--image-size", "64", "--batch-labeled", "2",
        "--batch-unlabeled", "2", "--labeled-num", "2", "--no-progress", "--device", "cpu",
        "--precision", "fp32"]


def test_tiny_train_reports_the_regions(tmp_path, monkeypatch):
    from synfoc.cli import main
    from synfoc.method.synfoc import SynFoC
    root = make_fundus_folder(tmp_path / "f")
    seen = []
    original = SynFoC.__init__

    def spy(self, *args, **kwargs):
        seen.append(inspect.signature(original).bind(self, *args, **kwargs).arguments["parts"])
        original(self, *args, **kwargs)

    monkeypatch.setattr(SynFoC, "__init__", spy)
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(root), "--labeled-domain", "camA", "--iters", "2",
                 "--out", str(out), *TINY]) == 0
    assert seen == [[(1, 2), (2,)]]  # SMC's parts are the regions
    summary = json.loads((out / "summary.json").read_text())
    for student in ("unet", "foundation"):
        for domain in ("camA", "camB"):
            classes = summary["students"][student]["per_domain"][domain]["classes"]
            assert list(classes) == ["disc", "cup"]
    with (out / "per_case.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["class"] for r in rows} == {"disc", "cup"} and len(rows) == 2 * 2 * 3 * 2
    table = (out / "summary.md").read_text()
    assert "DSC per part" in table and "| disc |" in table and "| cup |" in table
    # the per-region table holds summary.json's numbers
    disc = summary["students"]["unet"]["per_domain"]["camA"]["classes"]["disc"]["dice"]
    line = next(l for l in table.splitlines() if "(U-Net) | disc |" in l)
    assert line.split("|")[3].strip() == f"{100 * disc:.2f}"
    # the report: its per-part table and the gallery's contour legend name the regions
    assert main(["report", str(out), "--output", str(tmp_path / "report.html"), "--cases", "1",
                 "--device", "cpu"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<td>disc</td>" in page and "<td>cup</td>" in page

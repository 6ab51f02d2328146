"""SSMIS and UDA: the ACDC (SSL4MIS) and MS-CMRSeg readers, patient-wise labeled selection, the
unlabeled/test domain options, through ``synfoc train`` and ``synfoc data check``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from synfoc.config import TrainConfig, resolve, validate
from synfoc.data import DataError, check_dataset, data_check_main, open_dataset, split_labeled
from synfoc.data.synthetic import SyntheticDataset

h5py = pytest.importorskip("h5py")

TINY = ["--unet-size", "32", "--unet-width", "4", "--image-size", "64", "--batch-labeled", "2",
        "--batch-unlabeled", "2", "--no-progress", "--device", "cpu", "--method", "suponly-unet"]


def _slice(rng, size=32) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((size, size), np.uint8)
    label[8:24, 8:24] = 1
    label[12:20, 12:20] = 2
    label[14:18, 14:18] = 3
    image = np.clip(label / 3.0 + rng.normal(0, 0.05, label.shape), 0, 1).astype(np.float32)
    return image, label


def make_acdc(root: Path, train: dict[str, int], test: dict[str, int], *, write_lists: bool = True) -> Path:
    """An SSL4MIS ACDC tree: ``train`` maps a frame (patient001_frame01) to its slice count,
    ``test`` a volume to its depth."""
    rng = np.random.default_rng(0)
    acdc = root / "ACDC"
    (acdc / "data" / "slices").mkdir(parents=True)
    names = []
    for frame, count in train.items():
        for k in range(count):
            name = f"{frame}_slice_{k}"
            image, label = _slice(rng)
            with h5py.File(acdc / "data" / "slices" / f"{name}.h5", "w") as f:
                f["image"], f["label"] = image, label
            names.append(name)
    for volume, depth in test.items():
        pairs = [_slice(rng) for _ in range(depth)]
        with h5py.File(acdc / "data" / f"{volume}.h5", "w") as f:
            f["image"] = np.stack([p[0] for p in pairs])
            f["label"] = np.stack([p[1] for p in pairs])
    if write_lists:
        (acdc / "train_slices.list").write_text("".join(n + "\n" for n in names))
        (acdc / "test.list").write_text("".join(v + "\n" for v in test))
        (acdc / "val.list").write_text("")
    return acdc


def make_mscmrseg(root: Path, volumes: dict[str, dict[str, list[str]]], depth: int = 2) -> Path:
    """``volumes[domain][split]`` lists patients; each gets ``<patient>_<domain>.nii.gz`` and its
    ``_manual`` label with MS-CMRSeg's values 200 (MYO), 500 (LV), 600 (RV)."""
    rng = np.random.default_rng(1)
    top = root / "MSCMRSeg"
    for domain, splits in volumes.items():
        for split, patients in splits.items():
            folder = top / domain / split
            folder.mkdir(parents=True)
            for patient in patients:
                label = np.zeros((32, 32, depth), np.int16)
                label[6:26, 6:26] = 200
                label[10:22, 8:18] = 500
                label[10:22, 20:26] = 600
                image = (label + rng.normal(0, 20, label.shape)).astype(np.float32)
                affine = np.diag([1.25, 1.25, 5.0, 1.0])
                nib.save(nib.Nifti1Image(image, affine), folder / f"{patient}_{domain}.nii.gz")
                nib.save(nib.Nifti1Image(label, affine), folder / f"{patient}_{domain}_manual.nii.gz")
    return top


# ----------------------------------------------------------------------------- ACDC

def test_acdc_reader_and_patients_stay_together(tmp_path):
    # patient002 has two frames (ED and ES): both go with the patient
    root = make_acdc(tmp_path, {"patient001_frame01": 2, "patient002_frame01": 3, "patient002_frame12": 2,
                                "patient003_frame01": 2},
                     {"patient081_frame01": 3})
    index = open_dataset(tmp_path)                      # recognised as ACDC from the parent
    assert index.format == "acdc" and index.root == root and index.problems == []
    assert index.domains == ["ACDC"] and index.classes == ["RV", "MYO", "LV"]
    assert len(index.cases_of(split="train")) == 9 and len(index.cases_of(split="test")) == 3

    sample = index.read(index.cases_of(split="train")[0])
    assert sample.image.dtype == np.uint8 and sample.image.shape == (32, 32, 1)
    assert set(np.unique(sample.label)) == {0, 1, 2, 3}
    test_case = index.cases_of(split="test")[2]
    assert test_case.name == "patient081_frame01_002"
    with h5py.File(root / "data" / "patient081_frame01.h5") as f:
        assert np.array_equal(index.read(test_case).label, f["label"][2])

    labeled, unlabeled = split_labeled(index, "ACDC", num=2)
    assert {c.group for c in labeled} == {"patient001", "patient002"}
    assert len(labeled) == 2 + 3 + 2                   # both frames of patient002, every slice
    assert {c.group for c in unlabeled} == {"patient003"}
    assert not {c.name for c in labeled} & {c.name for c in unlabeled}
    # a ratio counts patients too: int(0.34 * 3) = 1 patient
    assert {c.group for c in split_labeled(index, "ACDC", ratio=0.34)[0]} == {"patient001"}
    with pytest.raises(DataError, match="only 3 patients"):
        split_labeled(index, "ACDC", num=4)
    with pytest.raises(DataError, match="no unlabeled"):
        split_labeled(index, "ACDC", num=3)


def test_acdc_problems_are_reported(tmp_path):
    root = make_acdc(tmp_path, {"patient001_frame01": 2}, {"patient081_frame01": 2})
    with (root / "train_slices.list").open("a") as fh:
        fh.write("patient009_frame01_slice_0\n")
    with h5py.File(root / "data" / "slices" / "patient001_frame01_slice_1.h5", "r+") as f:
        f["label"][0, 0] = 7
    index = open_dataset(root, "acdc")
    assert any("patient009_frame01_slice_0" in p.problem for p in index.problems)
    found = {p.file: p.problem for p in check_dataset(index)}
    bad = str(root / "data" / "slices" / "patient001_frame01_slice_1.h5")
    assert "7" in found[bad]


def test_acdc_without_lists_reads_every_slice(tmp_path):
    make_acdc(tmp_path, {"patient001_frame01": 2}, {}, write_lists=False)
    index = open_dataset(tmp_path / "ACDC")
    assert len(index.cases_of(split="train")) == 2
    assert any("test.list" in p.problem for p in index.problems)


# ----------------------------------------------------------------------------- MS-CMRSeg

def test_mscmrseg_reader_labels_and_volume_groups(tmp_path):
    root = make_mscmrseg(tmp_path, {"C0": {"train": ["patient1", "patient2"], "test": ["patient3"]},
                                    "LGE": {"train": ["patient4", "patient5"], "test": ["patient6"]}}, depth=3)
    index = open_dataset(tmp_path)
    assert index.format == "mscmrseg" and index.root == root and index.problems == []
    assert index.domains == ["C0", "LGE"] and index.classes == ["MYO", "LV", "RV"]
    case = index.cases_of("C0", "train")[0]
    assert case.name == "patient1_C0_000" and case.group == "patient1"
    sample = index.read(case)
    # 200 -> 1 (myocardium), 500 -> 2 (LV blood pool), 600 -> 3 (RV blood pool)
    assert sample.label[7, 7] == 1 and sample.label[15, 12] == 2 and sample.label[15, 22] == 3
    assert sample.label[0, 0] == 0 and sample.spacing == (1.25, 1.25)
    labeled, _ = split_labeled(index, "C0", num=1)
    assert [c.name for c in labeled] == ["patient1_C0_000", "patient1_C0_001", "patient1_C0_002"]


def test_mscmrseg_unpaired_and_stray_values(tmp_path):
    root = make_mscmrseg(tmp_path, {"C0": {"train": ["patient1"], "test": ["patient2"]},
                                    "LGE": {"train": ["patient3"], "test": ["patient4"]}})
    lonely = root / "LGE" / "test" / "patient4_LGE_manual.nii.gz"
    lonely.rename(root / "LGE" / "test" / "patient9_LGE_manual.nii.gz")
    manual = root / "C0" / "train" / "patient1_C0_manual.nii.gz"
    label = np.asarray(nib.load(manual).dataobj).copy()
    label[0, 0, 0] = 300
    nib.save(nib.Nifti1Image(label, np.eye(4)), manual)
    index = open_dataset(root, "mscmrseg")
    files = {p.file for p in index.problems}
    assert str(root / "LGE" / "test" / "patient4_LGE.nii.gz") in files
    assert str(root / "LGE" / "test" / "patient9_LGE_manual.nii.gz") in files
    found = {p.file: p.problem for p in check_dataset(index)}
    assert "300" in found[str(manual)]


# ----------------------------------------------------------------------------- split options

def test_default_split_is_unchanged_and_domain_options():
    index = SyntheticDataset(seed=0, train_per_domain=4, test_per_domain=1)
    default = split_labeled(index, "siteA", num=2)
    assert [c.name for c in default[0]] == ["siteA_train_000", "siteA_train_001"]
    assert [c.domain for c in default[1]] == ["siteA"] * 2 + ["siteB"] * 4 + ["siteC"] * 4
    assert split_labeled(index, "siteA", num=2, unlabeled_domains=["siteA", "siteB", "siteC"]) == default
    assert len(split_labeled(index, "siteA", ratio=0.25)[0]) == 3        # of all 12 training cases
    # UDA: all of siteA labeled, only siteB unlabeled; the ratio is of the labeled domain
    labeled, unlabeled = split_labeled(index, "siteA", ratio=1.0, unlabeled_domains=["siteB"])
    assert len(labeled) == 4 and {c.domain for c in unlabeled} == {"siteB"} and len(unlabeled) == 4
    labeled, unlabeled = split_labeled(index, "siteA", num=1, unlabeled_domains=["siteC"])
    assert len(labeled) == 1 and {c.domain for c in unlabeled} == {"siteC"}   # siteA's rest unused
    with pytest.raises(DataError, match="--unlabeled-domains: unknown domain.*siteZ"):
        split_labeled(index, "siteA", num=1, unlabeled_domains=["siteZ"])


@pytest.mark.parametrize("values, message", [
    ({"test_domains": []}, "--test-domains must be a non-empty list"),
    ({"unlabeled_domains": "LGE"}, "--unlabeled-domains must be a non-empty list"),
    ({"unlabeled_domains": ["A", "A"]}, "--unlabeled-domains must be"),
])
def test_domain_settings_are_validated(values, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig().update(values, "test"))


def test_presets_resolve():
    acdc, uda = validate(resolve("acdc")), validate(resolve("mscmrseg"))
    assert acdc.format == "acdc" and acdc.unet_size == 256 and acdc.labeled_num == 7
    assert uda.format == "mscmrseg" and uda.unet_size == 192 and uda.labeled_domain == "C0"
    assert uda.labeled_ratio == 1.0 and uda.unlabeled_domains == ["LGE"] and uda.test_domains == ["LGE"]


# ----------------------------------------------------------------------------- command line

def test_uda_train_end_to_end(tmp_path):
    from synfoc.cli import main
    make_mscmrseg(tmp_path, {"C0": {"train": ["patient1", "patient2"], "test": ["patient3"]},
                             "LGE": {"train": ["patient4"], "test": ["patient5"]}})
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path), "--labeled-domain", "C0", "--labeled-ratio", "1.0",
                 "--unlabeled-domains", "LGE", "--test-domains", "LGE", "--iters", "2", "--out", str(out),
                 *TINY]) == 0
    assert (out / "labeled.txt").read_text().split() == [
        f"C0/patient{p}_C0_{k:03d}" for p in (1, 2) for k in range(2)]
    assert (out / "unlabeled.txt").read_text().split() == ["LGE/patient4_LGE_000", "LGE/patient4_LGE_001"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["unlabeled_domains"] == ["LGE"] and cfg["test_domains"] == ["LGE"]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["students"]["unet"]["per_domain"]) == ["LGE"]
    assert "C0" not in (out / "summary.md").read_text()
    # re-evaluation tests the same domains
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    assert list(json.loads((out / "summary.json").read_text())["students"]["unet"]["per_domain"]) == ["LGE"]


def test_unknown_test_domain_stops_before_training(tmp_path, capsys):
    from synfoc.cli import main
    make_mscmrseg(tmp_path, {"C0": {"train": ["patient1"], "test": ["patient2"]},
                             "LGE": {"train": ["patient3"], "test": ["patient4"]}})
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path), "--labeled-domain", "C0", "--labeled-num", "1",
                 "--test-domains", "T2", "--iters", "1", "--out", str(out), *TINY]) == 2
    assert "--test-domains: unknown domain(s) T2" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


def test_data_check_both_layouts(tmp_path, capsys):
    make_acdc(tmp_path / "a", {"patient001_frame01": 2}, {"patient081_frame01": 2})
    make_mscmrseg(tmp_path / "m", {"C0": {"train": ["patient1"], "test": ["patient2"]},
                                   "LGE": {"train": ["patient3"], "test": ["patient4"]}})
    assert data_check_main(str(tmp_path / "a"), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "acdc" and report["domains"] == {"ACDC": {"train": 2, "test": 2}}
    assert data_check_main(str(tmp_path / "m"), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "mscmrseg" and report["classes"] == ["MYO", "LV", "RV"]
    assert report["domains"] == {"C0": {"train": 2, "test": 2}, "LGE": {"train": 2, "test": 2}}


def test_sweep_passes_the_domains_through_and_tables_show_tested_domains(tmp_path):
    from synfoc.cli import main
    from test_sweep import TINY as SWEEP_TINY, make_tiny_busi
    busi = make_tiny_busi(tmp_path / "data")
    out = tmp_path / "sweep"
    assert main(["sweep", "--preset", "busi", "--dataset", str(busi), "--out", str(out), "--methods", "suponly-unet",
                 "--labeled-domains", "benign", "--unlabeled-domains", "malignant", "--test-domains", "malignant",
                 *SWEEP_TINY]) == 0
    run = out / "suponly-unet" / "benign"
    assert yaml.safe_load((run / "config.yaml").read_text())["test_domains"] == ["malignant"]
    # the ratio is of benign's 8 training cases when the unlabeled domains are given: int(0.125 * 8) = 1
    assert (run / "labeled.txt").read_text().splitlines() == ["benign/benign (1)"]
    assert {line.split("/")[0] for line in (run / "unlabeled.txt").read_text().splitlines()} == {"malignant"}
    text = (out / "sweep.md").read_text()
    assert "test malignant" in text and "test benign" not in text
    assert "test sets of the test domains malignant" in text


def test_volume_metrics_score_the_volume_as_a_whole():
    from synfoc.evaluate import volume_rows
    truth = np.zeros((2, 8, 8), np.uint8)
    truth[:, 2:6, 2:6] = 1
    pred = np.zeros((2, 4, 4), np.uint8)        # at a smaller model size: resized back to 8x8
    pred[0, 1:3, 1:3] = 1                      # slice 0 right, slice 1 missed
    rows = volume_rows("unet", "ACDC", {"vol": ([0, 1], truth)}, pred, [(8, 8), (8, 8)], [("RV", (1,))])
    assert len(rows) == 1 and rows[0]["case"] == "vol"
    # 3D Dice 2 * 16 / (32 + 16); the mean of the two slices' Dice would be 0.5
    assert rows[0]["dice"] == pytest.approx(2 / 3)
    assert rows[0]["truth_present"] == rows[0]["pred_present"] == 1


def test_acdc_train_evaluates_per_volume(tmp_path):
    from synfoc.cli import main
    make_acdc(tmp_path, {"patient001_frame01": 2, "patient002_frame01": 2},
              {"patient081_frame01": 3, "patient082_frame01": 2})
    out = tmp_path / "run"
    assert main(["train", "--preset", "acdc", "--dataset", str(tmp_path), "--labeled-num", "1", "--iters", "2",
                 "--out", str(out), *TINY]) == 0
    assert (out / "labeled.txt").read_text().split() == ["ACDC/patient001_frame01_slice_0",
                                                         "ACDC/patient001_frame01_slice_1"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["students"]["unet"]["per_domain"]["ACDC"]["cases"] == 2      # volumes, not 5 slices
    cases = {line.split(",")[2] for line in (out / "per_case.csv").read_text().splitlines()[1:]}
    assert cases == {"patient081_frame01", "patient082_frame01"}

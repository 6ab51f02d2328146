"""Bad input is reported with the file at fault; ``synfoc data check`` output and exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from synfoc.data import DataError, check_dataset, data_check_main, drop_bad, open_dataset
from builders import (BUSI, make_busi, make_folder, make_nifti, make_prostate, need,
                               save_png)


def problems_by_file(problems) -> dict[str, str]:
    return {p.file: p.problem for p in problems}


def test_truncated_and_unreadable_images(tmp_path):
    root = make_prostate(tmp_path)
    truncated = root / "BMC" / "train" / "image" / "00_01.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = root / "UCL" / "test" / "mask" / "00_00.png"
    garbage.write_bytes(b"this is not a png")
    index = open_dataset(root)
    assert index.problems == []  # structural checks only: names still pair
    found = problems_by_file(check_dataset(index))
    assert set(found) == {str(truncated), str(garbage)}
    assert "truncated" in found[str(truncated)] and "unreadable" in found[str(garbage)]
    assert index.problems == check_dataset(index)
    with pytest.raises(DataError, match="00_01.png"):
        index.read(next(c for c in index.cases if c.image == truncated))


def test_truncated_nifti(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("a.nii", "b.nii.gz"):
            make_nifti(tmp_path / "s" / split / "images" / name,
                       rng.integers(0, 256, (16, 20, 3)).astype(np.uint8), np.eye(4), (1, 1, 1))
            make_nifti(tmp_path / "s" / split / "masks" / name, np.ones((16, 20, 3), np.uint8),
                       np.eye(4), (1, 1, 1))
    broken = [tmp_path / "s" / "test" / "images" / n for n in ("a.nii", "b.nii.gz")]
    for path in broken:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    found = problems_by_file(check_dataset(open_dataset(tmp_path)))
    assert set(found) == {str(p) for p in broken}
    assert all("unreadable" in text for text in found.values())


def test_missing_and_unpaired_masks(tmp_path):
    root = make_folder(tmp_path)
    lonely_image = root / "siteA" / "train" / "images" / "case1.png"
    (root / "siteA" / "train" / "masks" / "case1.png").unlink()
    lonely_mask = save_png(root / "siteB" / "test" / "masks" / "extra.png", np.zeros((16, 20), np.uint8))
    index = open_dataset(root)
    found = problems_by_file(index.problems)
    assert set(found) == {str(lonely_image), str(lonely_mask)}
    assert "no mask" in found[str(lonely_image)] and "no image" in found[str(lonely_mask)]
    assert "case1" not in [c.name for c in index.cases_of("siteA", "train")]


def test_mask_size_differs_from_image(tmp_path):
    root = make_prostate(tmp_path)
    mask = root / "RUNMC" / "test" / "mask" / "00_01.png"
    save_png(mask, np.full((20, 24), 255, np.uint8))
    found = problems_by_file(check_dataset(open_dataset(root)))
    assert list(found) == [str(mask)] and "24x20" in found[str(mask)] and "differs" in found[str(mask)]


def test_label_values_outside_declared_set(tmp_path):
    root = make_prostate(tmp_path)
    mask = root / "HK" / "train" / "mask" / "00_00.png"
    values = np.full((24, 24), 255, np.uint8)
    values[:3, :3] = 128
    save_png(mask, values)
    busi = make_busi(tmp_path / "b")
    busi_mask = busi / "Dataset_BUSI_with_GT" / "benign" / "benign (3)_mask_1.png"
    save_png(busi_mask, np.full((20, 30), 7, np.uint8))
    found = problems_by_file(check_dataset(open_dataset(root)))
    assert list(found) == [str(mask)] and "128" in found[str(mask)]
    found = problems_by_file(check_dataset(open_dataset(busi)))
    assert list(found) == [str(busi_mask)] and "7" in found[str(busi_mask)]
    # a folder dataset with declared labels
    user = make_folder(tmp_path / "u", values=(0, 1, 2))
    (user / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 1}}))
    found = check_dataset(open_dataset(user))
    assert found and all("2" in p.problem and "outside" in p.problem for p in found)


def test_empty_domain_split(tmp_path):
    root = make_prostate(tmp_path)
    for folder in ("image", "mask"):
        for p in (root / "UCL" / "test" / folder).iterdir():
            p.unlink()
    index = open_dataset(root)
    assert [p.file for p in index.problems] == [str(root / "UCL" / "test")]
    assert "UCL" in index.problems[0].problem and "test" in index.problems[0].problem


def test_3d_images_where_2d_expected(tmp_path):
    # an animated PNG in a paper layout
    root = make_prostate(tmp_path / "p")
    animated = root / "BIDMC" / "train" / "image" / "00_00.png"
    frames = [Image.fromarray(np.full((24, 24), v, np.uint8)) for v in (0, 80, 160)]
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    found = problems_by_file(check_dataset(open_dataset(root)))
    assert list(found) == [str(animated)] and "3D" in found[str(animated)]
    # a multi-page TIFF and a 4D NIfTI in the users' layout
    user = make_folder(tmp_path / "u", image_ext=".tif")
    tiff = user / "siteA" / "train" / "images" / "case0.tif"
    pages = [Image.fromarray(np.full((16, 20), v, np.uint8)) for v in (0, 100)]
    pages[0].save(tiff, save_all=True, append_images=pages[1:])
    four_d = make_nifti(user / "siteB" / "train" / "images" / "vol.nii.gz",
                        np.zeros((16, 20, 3, 2), np.uint8), np.eye(4), (1, 1, 1, 1))
    make_nifti(user / "siteB" / "train" / "masks" / "vol.nii.gz",
               np.zeros((16, 20, 3, 2), np.uint8), np.eye(4), (1, 1, 1, 1))
    index = open_dataset(user)
    assert list(problems_by_file(index.problems)) == [str(four_d)]
    found = problems_by_file(check_dataset(index))
    assert set(found) == {str(tiff), str(four_d)} and "3D" in found[str(tiff)]
    assert "4D" in found[str(four_d)]


def test_nifti_shape_mismatch(tmp_path):
    user = tmp_path
    for split in ("train", "test"):
        make_nifti(user / "s" / split / "images" / "v.nii.gz", np.zeros((8, 8, 3), np.uint8), np.eye(4), (1, 1, 1))
        make_nifti(user / "s" / split / "masks" / "v.nii.gz", np.ones((8, 8, 4), np.uint8), np.eye(4), (1, 1, 1))
    index = open_dataset(user)
    mask = str(user / "s" / "train" / "masks" / "v.nii.gz")
    assert mask in problems_by_file(index.problems) and "shape" in problems_by_file(index.problems)[mask]


def test_drop_bad_removes_exactly_the_listed_cases(tmp_path):
    root = make_prostate(tmp_path)
    bad_mask = root / "BMC" / "train" / "mask" / "00_00.png"
    save_png(bad_mask, np.full((10, 10), 255, np.uint8))
    (root / "HK" / "test" / "mask" / "00_01.png").unlink()
    index = open_dataset(root)
    problems = check_dataset(index)
    assert len(problems) == 2
    clean, dropped = drop_bad(index, problems)
    assert dropped == 1 and len(clean.cases) == len(index.cases) - 1
    assert [c for c in index.cases if c not in clean.cases][0].mask == bad_mask
    assert check_dataset(clean) == [p for p in problems if p.file != str(bad_mask)]  # unpaired image stays


def test_data_check_json_and_exit_codes(tmp_path, capsys):
    root = make_prostate(tmp_path)
    assert data_check_main(str(root), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"format": "prostate",
                      "domains": {d: {"train": 2, "test": 2} for d in
                                  ("RUNMC", "BMC", "HCRUDB", "UCL", "BIDMC", "HK")},
                      "classes": ["prostate"], "problems": []}
    (root / "BMC" / "test" / "mask" / "00_01.png").unlink()
    assert data_check_main(str(root), "prostate") == 1
    out = capsys.readouterr().out
    assert str(root / "BMC" / "test" / "image" / "00_01.png") in out and "BMC" in out
    assert data_check_main(str(tmp_path / "nowhere"), as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"][0]["file"] == str(tmp_path / "nowhere")


def test_acceptance_busi_check_json(capsys):
    """The whole real BUSI set: counts, one class, no problems (decodes ~1300 PNGs)."""
    need(BUSI)
    assert data_check_main(str(BUSI), "busi", as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"format": "busi",
                      "domains": {"benign": {"train": 350, "test": 87},
                                  "malignant": {"train": 168, "test": 42}},
                      "classes": ["lesion"], "problems": []}

"""Dataset readers: the real files in ../shared/data and generated files in every layout.

Label mappings are checked against an independent numpy reading of the raw files; the split,
the resize filters and the NIfTI slicing against formulas computed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synfoc.data import (DataError, check_dataset, load_cases, open_dataset, resize_image,
                         resize_label, split_labeled)
from synfoc.data.split import read_split, write_split

from builders import (BUSI, NIFTI_AFFINE, SAMPLES, make_busi, make_folder, make_folder_nifti, make_fundus, make_mnms,
                      make_nifti, make_prostate, need, raw)


# ----------------------------------------------------------------------------- real data

def test_busi_real_split_counts_and_class():
    index = open_dataset(need(BUSI).parent)  # the folder holding Dataset_BUSI_with_GT
    assert index.format == "busi" and index.classes == ["lesion"] and index.channels == 1
    assert index.domains == ["benign", "malignant"]
    counts = {(d, s): len(index.cases_of(d, s)) for d in index.domains for s in ("train", "test")}
    assert counts == {("benign", "train"): 350, ("benign", "test"): 87,
                      ("malignant", "train"): 168, ("malignant", "test"): 42}
    assert index.problems == []
    # independent split: plain string sort of the image file names, last int(0.2 N) to test
    names = sorted(p.name for p in (BUSI / "benign").glob("*.png") if "_mask" not in p.name)
    expected_test = {Path(n).stem for n in names[len(names) - int(0.2 * len(names)):]}
    assert {c.name for c in index.cases_of("benign", "test")} == expected_test


def test_busi_real_multi_mask_merge():
    index = open_dataset(need(BUSI), "busi")
    folder = BUSI / "benign"
    case = next(c for c in index.cases if c.name == "benign (195)")
    assert [p.name for p in case.extra_masks] == ["benign (195)_mask_1.png", "benign (195)_mask_2.png"]
    masks = [raw(folder / n) for n in ("benign (195)_mask.png", "benign (195)_mask_1.png",
                                       "benign (195)_mask_2.png")]
    expected = (np.maximum.reduce(masks) == 255).astype(np.uint8)
    sample = index.read(case)
    np.testing.assert_array_equal(sample.label, expected)
    assert sample.label.sum() > (masks[0] == 255).sum()  # the extra lesions are really added
    assert sample.image.shape == masks[0].shape + (1,) and sample.image.dtype == np.uint8


def test_busi_real_colour_image_becomes_grey():
    index = open_dataset(need(BUSI), "busi")
    colour = next(c for c in index.cases if Image.open(c.image).mode == "RGB")
    sample = index.read(colour)
    expected = np.asarray(Image.open(colour.image).convert("L"))
    np.testing.assert_array_equal(sample.image[..., 0], expected)


def test_fundus_real_label_mapping():
    index = open_dataset(need(SAMPLES / "Fundus"))
    assert index.format == "fundus" and index.channels == 3
    assert index.classes == ["cup", "rim"] and index.report_parts == [("cup", (1,)), ("disc", (1, 2))]
    assert index.domains == ["Domain1", "Domain2", "Domain3", "Domain4"]
    assert all(len(index.cases_of(d, s)) == 3 for d in index.domains for s in ("train", "test"))
    for domain, name in (("Domain1", "gdrishtiGS_002"), ("Domain3", "g0003")):
        case = next(c for c in index.cases_of(domain, "train") if c.name == name)
        sample = index.read(case)
        mask = raw(case.mask)[..., 0]
        assert sample.image.shape == (800, 800, 3)
        np.testing.assert_array_equal(sample.image, raw(case.image))
        assert (sample.label == 1).sum() == (mask == 0).sum() > 0      # cup
        assert (sample.label == 2).sum() == (mask == 128).sum() > 0    # rim
        assert (sample.label == 0).sum() == (mask == 255).sum()


def test_prostate_real_inverted_masks_and_domain_names():
    index = open_dataset(need(SAMPLES / "ProstateSlice"))
    assert index.format == "prostate" and index.classes == ["prostate"] and index.channels == 1
    assert index.domains == ["RUNMC", "BMC", "HCRUDB", "UCL", "BIDMC", "HK"]
    case = next(c for c in index.cases_of("BIDMC", "train") if c.name == "00_01")
    sample = index.read(case)
    mask = raw(case.mask)
    assert sample.label.sum() == (mask == 0).sum() > 0
    np.testing.assert_array_equal(sample.label, (mask == 0).astype(np.uint8))
    np.testing.assert_array_equal(sample.image[..., 0], raw(case.image))


def test_prostate_real_i2cvb_offset_names_reported_not_paired():
    root = need(SAMPLES / "ProstateSlice")
    index = open_dataset(root, "prostate")
    assert sorted(c.name for c in index.cases_of("HCRUDB", "train")) == ["00_01", "00_02"]
    train = root / "I2CVB" / "train"
    files = {p.file: p.problem for p in index.problems}
    assert set(files) == {str(train / "image" / "00_03.png"), str(train / "mask" / "00_00.png")}
    assert "no mask" in files[str(train / "image" / "00_03.png")]
    assert "no image" in files[str(train / "mask" / "00_00.png")]


# ----------------------------------------------------------------------------- generated layouts

def test_generated_fundus_mapping(tmp_path):
    make_fundus(tmp_path / "Fundus")
    index = open_dataset(tmp_path)  # the parent of Fundus is accepted too
    assert index.format == "fundus" and index.problems == []
    case = index.cases_of("Domain2", "test")[1]
    mask = raw(case.mask)[..., 0]
    label = index.read(case).label
    assert set(np.unique(label)) == {0, 1, 2}
    np.testing.assert_array_equal(label == 1, mask == 0)
    np.testing.assert_array_equal(label == 2, mask == 128)


def test_generated_mnms_rgb_masks(tmp_path):
    make_mnms(tmp_path / "mnms")
    index = open_dataset(tmp_path / "mnms")
    assert index.format == "mnms" and index.classes == ["LV", "MYO", "RV"]
    assert index.domains == ["vendorA", "vendorB", "vendorC", "vendorD"] and index.problems == []
    case = index.cases_of("vendorC", "train")[1]
    sample = index.read(case)
    mask = raw(case.mask)
    assert sample.image.shape == (21, 26, 1)
    for value, channel in ((1, 0), (2, 1), (3, 2)):
        np.testing.assert_array_equal(sample.label == value, mask[..., channel] == 255)


def test_generated_prostate(tmp_path):
    make_prostate(tmp_path / "ProstateSlice")
    index = open_dataset(tmp_path / "ProstateSlice")
    assert index.format == "prostate" and index.problems == []
    assert len(index.cases) == 6 * 2 * 2
    case = index.cases_of("HCRUDB", "test")[0]
    assert case.image.parent.parent.parent.name == "I2CVB"
    np.testing.assert_array_equal(index.read(case).label, (raw(case.mask) == 0).astype(np.uint8))


def test_generated_busi_split_and_merge(tmp_path):
    make_busi(tmp_path)
    index = open_dataset(tmp_path / "Dataset_BUSI_with_GT")
    assert index.format == "busi" and index.problems == []
    assert index.domains == ["benign", "malignant"]  # normal ignored
    # 10 benign -> 2 test: string order puts "benign (8)", "benign (9)" last (after "(10)")
    assert [c.name for c in index.cases_of("benign", "test")] == ["benign (8)", "benign (9)"]
    assert len(index.cases_of("malignant", "train")) == 4 and len(index.cases_of("malignant", "test")) == 1
    case = next(c for c in index.cases if c.name == "benign (3)")
    assert index.read(case).label.sum() == 16 + 40


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".bmp"])
def test_folder_2d_binary_masks_discovered(tmp_path, ext):
    make_folder(tmp_path, image_ext=ext)
    index = open_dataset(tmp_path)
    assert index.format == "folder" and index.problems == []
    assert index.classes == ["foreground"] and index.channels == 1
    assert index.domains == ["siteA", "siteB"]
    sample = index.read(index.cases_of("siteB", "train")[0])
    assert sample.label.sum() == 2 * 8 and sample.spacing is None
    if ext in (".png", ".tif", ".bmp"):  # lossless: the pixels themselves
        np.testing.assert_array_equal(sample.image[..., 0], raw(index.cases_of("siteB", "train")[0].image))


def test_folder_multi_class_discovered_in_sorted_order(tmp_path):
    make_folder(tmp_path, values=(0, 7, 3), channels=3)
    index = open_dataset(tmp_path, "folder")
    assert index.classes == ["class3", "class7"] and index.channels == 3
    case = index.cases[0]
    mask, label = raw(case.mask), index.read(case).label
    np.testing.assert_array_equal(label == 1, mask == 3)
    np.testing.assert_array_equal(label == 2, mask == 7)


def test_folder_dataset_json(tmp_path):
    make_folder(tmp_path, domains=("b", "a"), values=(0, 1, 2))
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "tumour": 1, "oedema": 2}, "domains": ["b", "a"], "channels": 3}))
    index = open_dataset(tmp_path)
    assert index.classes == ["tumour", "oedema"] and index.domains == ["b", "a"] and index.channels == 3
    sample = index.read(index.cases[0])
    assert sample.image.shape == (16, 20, 3)
    assert np.array_equal(sample.image[..., 0], sample.image[..., 2])  # grey repeated


def test_folder_dataset_json_malformed(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "dataset.json").write_text('{"labels": {"tumour": 1}}')
    with pytest.raises(DataError, match="background"):
        open_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json"):
        open_dataset(tmp_path)


def test_folder_nifti_slices_keep_spacing_and_affine(tmp_path):
    root, image, mask = make_folder_nifti(tmp_path)
    index = open_dataset(root)
    assert index.classes == ["class1", "class2"] and index.problems == []
    train = index.cases_of("site", "train")
    assert [c.name for c in train] == [f"vol_{k:03d}" for k in range(5)]
    sample = index.read(train[2])
    np.testing.assert_array_equal(sample.image[..., 0], image[:, :, 2])
    np.testing.assert_array_equal(sample.label, mask[:, :, 2])
    assert sample.spacing == pytest.approx((0.5, 0.7))
    np.testing.assert_allclose(sample.affine, NIFTI_AFFINE)
    # another slicing axis, from the open_dataset argument
    index0 = open_dataset(root, slice_axis=0)
    assert len(index0.cases_of("site", "train")) == 12
    sample0 = index0.read(index0.cases_of("site", "train")[4])
    np.testing.assert_array_equal(sample0.label, mask[4])
    assert sample0.spacing == pytest.approx((0.7, 3.0))
    assert not check_dataset(index)


def test_folder_nifti_float_intensities_scaled_per_volume(tmp_path):
    root = tmp_path
    volume = np.linspace(-1000, 3000, 6 * 7 * 4, dtype=np.float32).reshape(6, 7, 4)
    mask = np.zeros((6, 7, 4), np.uint8)
    mask[1:3, 1:3] = 1
    for split in ("train", "test"):
        make_nifti(root / "ct" / split / "images" / "v.nii", volume, np.eye(4), (1, 1, 1))
        make_nifti(root / "ct" / split / "masks" / "v.nii", mask, np.eye(4), (1, 1, 1))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1},
                                                   "intensity_window": [0, 1000]}))
    index = open_dataset(root)
    cases = index.cases_of("ct", "train")
    image = np.stack([index.read(c).image[..., 0] for c in cases], axis=-1)
    expected = np.rint(np.clip(volume, 0, 1000) * 255 / 1000).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)


def test_auto_detection_and_errors(tmp_path):
    layouts = {"fundus": make_fundus(tmp_path / "f" / "Fundus"),
               "prostate": make_prostate(tmp_path / "p"),
               "mnms": make_mnms(tmp_path / "m"),
               "busi": make_busi(tmp_path / "b") / "Dataset_BUSI_with_GT",
               "folder": make_folder(tmp_path / "u")}
    for fmt, path in layouts.items():
        assert open_dataset(path).format == fmt
    with pytest.raises(DataError, match="no such folder"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="'mnms' layout"):
        open_dataset(layouts["prostate"], "mnms")
    with pytest.raises(DataError, match="unknown dataset format"):
        open_dataset(layouts["prostate"], "png")


# ----------------------------------------------------------------------------- split_labeled

def test_split_labeled_first_n_sorted_and_rest_unlabeled(tmp_path):
    make_busi(tmp_path, counts={"benign": 12, "malignant": 8})
    index = open_dataset(tmp_path)
    labeled, unlabeled = split_labeled(index, "benign", num=3)
    train_names = sorted(c.name for c in index.cases_of("benign", "train"))
    assert [c.name for c in labeled] == train_names[:3] == ["benign (1)", "benign (10)", "benign (11)"]
    assert {c.name for c in unlabeled} == (set(train_names[3:])
                                           | {c.name for c in index.cases_of("malignant", "train")})
    assert all(c.split == "train" for c in labeled + unlabeled)
    again = split_labeled(index, "benign", num=3)
    assert (labeled, unlabeled) == again
    # ratio counts ALL domains' training cases: int(0.25 * (10 + 7)) = 4
    assert len(split_labeled(index, "malignant", ratio=0.25)[0]) == 4
    paths = write_split(tmp_path / "run", labeled, unlabeled)
    assert paths[0].read_text().splitlines() == [f"benign/{n}" for n in train_names[:3]]
    assert len(paths[1].read_text().splitlines()) == len(unlabeled)
    # read back in the written order; a run without its unlabeled file gives None for it
    assert read_split(tmp_path / "run") == ([f"benign/{n}" for n in train_names[:3]],
                                            [f"{c.domain}/{c.name}" for c in unlabeled])
    paths[1].unlink()
    assert read_split(tmp_path / "run")[1] is None


def test_split_labeled_errors(tmp_path):
    make_busi(tmp_path)
    index = open_dataset(tmp_path)
    with pytest.raises(DataError, match="benign, malignant"):
        split_labeled(index, "normal", num=2)
    with pytest.raises(DataError, match=r"20.*only 8"):
        split_labeled(index, "benign", num=20)
    with pytest.raises(DataError, match="at least 1"):
        split_labeled(index, "benign", num=0)
    with pytest.raises(DataError, match="exactly one"):
        split_labeled(index, "benign")
    with pytest.raises(DataError, match="at least 1"):
        split_labeled(index, "benign", ratio=0.01)


# ----------------------------------------------------------------------------- resizing and caching

def test_resize_image_area_when_shrinking():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = resize_image(image, (20, 30))
    block_mean = image.reshape(20, 2, 30, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float64) - block_mean).max() <= 1.0


def test_resize_image_bilinear_when_enlarging():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (10, 12, 1), dtype=np.uint8)
    out = resize_image(image, 29)
    ref = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].double(), size=(29, 29),
                        mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    assert out.shape == (29, 29, 1)
    assert np.abs(out.astype(np.float64) - ref).max() <= 1.0


def test_resize_label_nearest_keeps_label_values():
    rng = np.random.default_rng(8)
    label = rng.integers(0, 4, (37, 23), dtype=np.uint8)
    for size in (16, 64, (50, 11)):
        out = resize_label(label, size)
        ref = F.interpolate(torch.from_numpy(label)[None, None].float(),
                            size=(size, size) if isinstance(size, int) else size,
                            mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
        np.testing.assert_array_equal(out, ref)
        assert set(np.unique(out)) <= {0, 1, 2, 3}


def test_load_cases_resizes_from_the_original(tmp_path):
    make_mnms(tmp_path)
    index = open_dataset(tmp_path)
    cases = index.cases_of("vendorA", "train")
    loaded = load_cases(index, cases, [16, 32], progress=False)
    assert loaded.names == ["c0", "c1"] and loaded.domains == ["vendorA", "vendorA"]
    assert loaded.original_sizes == [(20, 26), (21, 26)]
    images, labels = loaded[32]
    assert images.shape == (2, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (2, 32, 32) and labels.dtype == torch.uint8
    sample = index.read(cases[1])
    np.testing.assert_array_equal(loaded[16][0][1].numpy(), resize_image(sample.image, 16).transpose(2, 0, 1))
    np.testing.assert_array_equal(loaded[16][1][1].numpy(), resize_label(sample.label, 16))
    assert set(torch.unique(labels).tolist()) <= {0, 1, 2, 3}

"""``synfoc report``: one self-contained HTML page with curves, the metrics table and a gallery.

Uses a copy of the shared tiny run with an untrained foundation student added (conftest.py), so that
the table and gallery show both students. The page has no JavaScript: what a person sees is its
table and its embedded images, which are decoded here with PIL.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synfoc import report



class Page(HTMLParser):
    """The tags, attributes and table cells of a page, with the standard library's parser."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def images(self) -> list[str]:
        return [a.get("src", "") for t, a in self.tags if t == "img"]


SYNFOC_KEYS = ("loss", "loss_x", "loss_u", "loss_c", "loss_d", "lambda", "alpha", "self_confidence",
               "mutual_confidence", "pseudo_dice_unet", "pseudo_dice_foundation", "pseudo_dice_ensemble",
               "alpha_p10", "alpha_p50", "alpha_p90", "teachers_both_empty", "confident_foreground",
               *(f"{name}/{d}" for name in ("alpha", "confident_foreground", "pseudo_dice_ensemble")
                 for d in ("siteB", "siteC")))


@pytest.fixture(scope="module")
def run(two_student_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with both students and a history as SynFoC logs it (the run itself was
    trained as suponly-unet, which logs losses only), so that every curve panel is drawn."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(two_student_run, run)
    rng = np.random.default_rng(0)
    (run / "history.jsonl").write_text("".join(
        json.dumps({"step": s, "time": s * 0.5, **{k: float(rng.uniform()) for k in SYNFOC_KEYS}}) + "\n"
        for s in range(1, 21)))
    return run


@pytest.fixture(scope="module")
def page(run) -> Path:
    return report.write_report(run, per_domain=2, device="cpu")


def test_report_is_one_self_contained_file(run, page):
    assert page == run / "report.html" and page.is_file()
    text = page.read_text()
    doc = Page(text)
    tags = {t for t, _ in doc.tags}
    assert "table" in tags and "script" not in tags and "link" not in tags
    for _, attrs in doc.tags:  # nothing is fetched: no src or href pointing anywhere
        for name in ("src", "href"):
            assert not attrs.get(name, "data:").lower().startswith(("http:", "https:", "//", "file:"))
    assert "http://" not in text and "https://" not in text
    sources = doc.images()
    # six curve panels, three per unlabeled domain, the training views, and per domain 2 cases x
    # (truth, U-Net, foundation)
    assert len(sources) == 6 + 3 + 1 + 3 * 2 * 3
    assert "confident pixels against the hidden labels" in text
    assert "alpha per unlabeled domain" in text and "confident foreground per unlabeled domain" in text
    assert "What the models train on" in text and "No training views" not in text
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        assert im.format == "PNG"
        im.load()
        assert im.size[0] > 0 and im.size[1] > 0
        assert any(low < high for low, high in im.convert("RGB").getextrema())   # not one flat colour


def test_metrics_table_shows_summary_values(run, page):
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["students"]) == {"unet", "foundation"}
    rows = Page(page.read_text()).rows
    header = rows[1]
    assert header[:3] == ["siteA", "siteB", "siteC"]
    for kind, label in (("unet", "U-Net"), ("foundation", "foundation model")):
        row = next(r for r in rows if r and r[0].endswith(f"({label})"))
        res = summary["students"][kind]
        expected = [f"{100 * res['per_domain'][d]['dice']:.2f}" for d in ("siteA", "siteB", "siteC")]
        expected += [f"{100 * res['mean']['dice']:.2f}", f"{100 * res['mean']['jaccard']:.2f}",
                     f"{res['mean']['hd95']:.2f}", f"{res['mean']['asd']:.2f}"]
        assert row[1:] == expected


def test_metrics_table_layout_and_best_marked():
    summary = {"method": "synfoc", "students": {
        "unet": {"per_domain": {"A": {"dice": 0.5, "jaccard": 0.4, "hd95": 3.0, "asd": 1.0}},
                 "mean": {"dice": 0.5, "jaccard": 0.4, "hd95": 3.0, "asd": 1.0}},
        "foundation": {"per_domain": {"A": {"dice": 0.75, "jaccard": 0.6, "hd95": 5.0, "asd": 1.0}},
                       "mean": {"dice": 0.75, "jaccard": 0.6, "hd95": 5.0, "asd": 1.0}}}}
    table = report.metrics_table(summary, ["A", "B"])
    rows = Page(table).rows
    assert rows[2] == ["synfoc (U-Net)", "50.00", "-", "50.00", "40.00", "3.00", "1.00"]
    assert rows[3] == ["synfoc (foundation model)", "75.00", "-", "75.00", "60.00", "5.00", "1.00"]
    best = re.findall(r'<td class="best">([^<]*)</td>', table)
    assert best == ["3.00", "75.00", "75.00", "60.00"]  # lower HD is better; equal ASD marks none


def test_contours_are_the_region_boundary():
    label = np.zeros((40, 50), np.uint8)
    label[10:30, 5:25] = 1   # inside a disc-like part
    label[15:20, 10:15] = 2
    image = np.full((40, 50), 100, np.uint8)
    parts = [("cup", (2,)), ("disc", (1, 2))]
    rgb = report.overlay_contours(image, label, parts, thickness=1)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    disc = np.zeros((40, 50), bool)
    disc[10:30, 5:25] = True
    ring = disc.copy()
    ring[11:29, 6:24] = False  # independent: the one-pixel ring of the square
    coloured = np.any(rgb != 100, axis=-1)
    assert np.array_equal(coloured & ~np.isin(label, (2,)), ring)
    assert np.all(rgb[ring] == report.PART_COLOURS[1])
    cup_ring = np.zeros_like(ring)
    cup_ring[15:20, 10:15] = True
    cup_ring[16:19, 11:14] = False
    assert np.all(rgb[cup_ring] == report.PART_COLOURS[0])
    assert np.all(rgb[16:19, 11:14] == 100)  # the inside is not painted


def test_progress_png_and_history(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "alpha": 0.5, "pseudo_dice_unet": 0.1 * s}) for s in (1, 2, 3)]
    (tmp_path / "history.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # being written
    assert [h["step"] for h in report.read_history(tmp_path)] == [1, 2, 3]
    report.write_progress_png(tmp_path)
    with Image.open(tmp_path / "progress.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 0
    assert not (tmp_path / "progress.png.tmp.png").exists()
    report.write_progress_png(tmp_path / "missing")  # no history: nothing, no error


def test_report_without_dataset_still_written(run, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("*.safetensors", "report.html", "tensorboard"))
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(re.sub(r"(?m)^dataset: .*$", f"dataset: {tmp_path / 'nowhere'}", cfg))
    out = report.write_report(moved, tmp_path / "r.html", device="cpu")
    text = out.read_text()
    assert "No gallery" in text and "<table" in text
    assert "no gallery" in capsys.readouterr().err


def test_cli_report_verb(page, tmp_path):
    from synfoc.cli import main
    run = page.parent
    assert main(["report", str(run), "--output", str(tmp_path / "x.html"), "--cases", "0"]) == 0
    assert "<table" in (tmp_path / "x.html").read_text()

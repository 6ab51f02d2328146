"""Pictures of a run: ``progress.png`` (kept up to date by training) and ``synfoc report``, one
self-contained HTML page (no external resources, no JavaScript) with the training curves, the
per-domain metrics of both students laid out like the paper's tables, and a gallery of test cases
with ground truth and predictions drawn as coloured contours (the paper's Fig. 5).
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import html
import json
import sys
from pathlib import Path

import numpy as np

from synfoc.config import CHOICES
from synfoc.figures import PART_COLOURS, overlay_contours, png_bytes, pyplot, save_figure

CURVES = [("losses", ("loss", "loss_x", "loss_u", "loss_c", "loss_d")),
          ("ramp and ensemble weight", ("lambda", "alpha", "self_confidence", "mutual_confidence")),
          ("pseudo-label Dice (hidden labels)", ("pseudo_dice_unet", "pseudo_dice_foundation", "pseudo_dice_ensemble")),
          # the confident pixels' foreground share by the pseudo-label and by the hidden labels, and
          # how much of their true foreground the pseudo-label gets right
          ("confident pixels against the hidden labels", ("confident_foreground", "confident_foreground_truth",
                                                          "confident_foreground_recall")),
          # alpha over the instances of each log window (10th, 50th, 90th percentile) and the phases
          # where SMC's alpha = 1 means "both teachers see nothing" (Dice of two empty maps is 1)
          ("alpha over instances; empty teachers", ("alpha_p10", "alpha_p50", "alpha_p90", "teachers_both_empty",
                                                    "confident_foreground"))]

# Per unlabeled domain (``NAME/DOMAIN``, the mean over that domain's instances in a log window):
# a domain whose alpha sits at 0 or whose confident pixels hold no foreground shows here, where the
# batch means above average it away.
DOMAIN_CURVES = [("alpha per unlabeled domain", "alpha"),
                 ("confident foreground per unlabeled domain", "confident_foreground"),
                 ("ensemble pseudo-label Dice per unlabeled domain (hidden labels)", "pseudo_dice_ensemble")]

# The paper's Fig. 6: confidences and alpha dashed, pseudo-label quality solid, on one axis.
FIG6_DASHED = ("self_confidence", "mutual_confidence", "alpha")
FIG6_SOLID = ("pseudo_dice_foundation", "pseudo_dice_unet", "pseudo_dice_ensemble")

STUDENT_NAMES = {"unet": "U-Net", "foundation": "foundation model"}


# ----------------------------------------------------------------------------- history and curves

def read_history(run: Path) -> list[dict]:
    """The log steps of ``RUN/history.jsonl`` (empty when there is none yet). A line being written
    while we read (training runs concurrently) is skipped rather than failing."""
    path = Path(run) / "history.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(h["step"], h[key]) for h in history if key in h and "step" in h and h[key] is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _draw_panel(ax, history: list[dict], title: str, keys: list[str]) -> None:
    for k in keys:
        ax.plot(*_series(history, k), label=k.partition("/")[2] or k)   # NAME/DOMAIN: the title names NAME
    _style(ax, title)


def _style(ax, title: str) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _panels(history: list[dict]) -> list[tuple[str, list[str]]]:
    panels = [(title, [k for k in keys if any(k in h for h in history)]) for title, keys in CURVES]
    logged = sorted({k for h in history for k in h})
    panels += [(title, [k for k in logged if k.startswith(name + "/")]) for title, name in DOMAIN_CURVES]
    return [p for p in panels if p[1]]


def plot_curves(history: list[dict], path: Path, columns: int = 4) -> None:
    """Training curves (losses; lambda, alpha, self and mutual confidence; pseudo-label Dice; the
    same per unlabeled domain), ``columns`` panels to a row."""
    plt = pyplot()
    panels = _panels(history)
    cols = max(1, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        _draw_panel(ax, history, title, keys)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, Path(path))


def write_progress_png(run: Path) -> None:
    """``RUN/progress.png`` from ``RUN/history.jsonl`` (nothing when there is no history yet)."""
    history = read_history(run)
    if history:
        plot_curves(history, Path(run) / "progress.png")


def curve_pngs(history: list[dict]) -> list[tuple[str, bytes]]:
    """One PNG per panel of :data:`CURVES` plus the paper's Fig. 6 view, as (title, bytes)."""
    plt = pyplot()
    out = []
    for title, keys in _panels(history):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        _draw_panel(ax, history, title, keys)
        fig.tight_layout()
        out.append((title, save_figure(fig)))
    dashed = [k for k in FIG6_DASHED if any(k in h for h in history)]
    solid = [k for k in FIG6_SOLID if any(k in h for h in history)]
    if dashed and solid:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for k in dashed:
            ax.plot(*_series(history, k), linestyle="--", label=k)
        for k in solid:
            ax.plot(*_series(history, k), linestyle="-", label=k)
        _style(ax, "alpha and pseudo-label quality (paper Fig. 6)")
        fig.tight_layout()
        out.append(("alpha and pseudo-label quality (paper Fig. 6)", save_figure(fig)))
    return out


# ----------------------------------------------------------------------------- gallery

def pick_cases(cases: list, count: int) -> list[int]:
    """Indices of ``count`` cases spread evenly over a domain's sorted test cases."""
    if count <= 0 or not cases:
        return []
    if count >= len(cases):
        return list(range(len(cases)))
    return sorted(set(np.linspace(0, len(cases) - 1, count).round().astype(int).tolist()))


def gallery(run: Path, per_domain: int, device: str = "auto", dataset: str | None = None) -> dict:
    """Test cases per domain with ground truth and each student's prediction (at the evaluation
    size, as the metrics are computed). Returns {"parts", "students", "domains": {domain: [case
    dicts with name, image (H, W, C) uint8, truth, and one prediction per student]}}.

    Three times as many cases as asked are read and those with foreground in the ground truth are
    preferred, so that slices of a volume outside the organ do not fill the gallery.
    """
    from synfoc.checkpoint import load_domain_statistics, load_run
    from synfoc.data import load_cases
    from synfoc.evaluate import eval_size, predict_domain_labels

    cfg, index, students, rt = load_run(run, dataset=dataset, device=device)
    domain_stats = load_domain_statistics(run)   # as the evaluation used them
    size = eval_size(cfg)
    sizes = {"unet": cfg.unet_size}
    if "foundation" in students:
        sizes["foundation"] = students["foundation"].image_size
    out = {"parts": list(index.report_parts), "students": list(students), "domains": {}}
    for domain in index.domains:
        test = index.cases_of(domain, "test")
        candidates = [test[i] for i in pick_cases(test, 3 * per_domain)]
        if not candidates:
            continue
        loaded = load_cases(index, candidates, sorted(set(sizes.values()) | {size}), progress=False)
        truth = loaded.arrays[size][1].numpy()
        chosen = [i for i in range(len(candidates)) if truth[i].any()]
        chosen += [i for i in range(len(candidates)) if i not in chosen]
        chosen = sorted(chosen[:per_domain], key=lambda i: candidates[i].name)
        predictions = {}
        for kind, model in students.items():
            images = loaded.arrays[sizes[kind]][0][chosen]
            predictions[kind] = predict_domain_labels(kind, model, images, size, rt.device, rt.autocast, domain,
                                                      domain_stats).numpy()
        images = loaded.arrays[size][0][chosen].numpy().transpose(0, 2, 3, 1)
        out["domains"][domain] = [
            {"name": candidates[i].name, "image": images[j], "truth": truth[i],
             "predictions": {k: predictions[k][j] for k in students}}
            for j, i in enumerate(chosen)]
    return out


def read_per_case(run: Path) -> dict[tuple[str, str, str], list[float]]:
    """Dice per (student, domain, case) from per_case.csv, one value per reported part."""
    path = Path(run) / "per_case.csv"
    if not path.is_file():
        return {}
    out: dict[tuple[str, str, str], list[float]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                out.setdefault((row["student"], row["domain"], row["case"]), []).append(float(row["dice"]))
            except (KeyError, ValueError):
                continue
    return out


# ----------------------------------------------------------------------------- HTML

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.meta { color: #555; } .note { color: #666; font-size: 0.9em; }
table.metrics { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td { border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics thead th { background: #f0f0f0; }
td.best { font-weight: bold; }
.curves img { max-width: 49%; height: auto; vertical-align: top; }
.case { display: inline-block; margin: 0 1.2em 1.2em 0; vertical-align: top; }
.case figure { display: inline-block; margin: 0 0.3em 0 0; text-align: center; }
.case img { width: 180px; height: 180px; image-rendering: pixelated; border: 1px solid #999; }
.case figcaption { font-size: 0.8em; }
.casename { font-size: 0.85em; font-weight: bold; margin-bottom: 0.2em; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin: 0 0.3em 0 0.8em;
          border: 1px solid #666; }
"""


def _img(data: bytes, alt: str, cls: str = "") -> str:
    source = base64.b64encode(data).decode("ascii")
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{html.escape(alt)}" src="data:image/png;base64,{source}">'


def _fmt(value: float, percent: bool) -> str:
    return f"{100 * value:.2f}" if percent else f"{value:.2f}"


def metrics_table(summary: dict, domains: list[str]) -> str:
    """The paper's layout: one row per student, per-domain DSC (%), then average DSC (%),
    Jaccard (%), 95HD and ASD (pixels). The best value of each column is bold."""
    students = summary.get("students", {})
    columns = [("dice", d, True) for d in domains] + [("dice", None, True), ("jaccard", None, True),
                                                       ("hd95", None, False), ("asd", None, False)]

    def cell(res: dict, metric: str, domain: str | None) -> float | None:
        block = res.get("per_domain", {}).get(domain) if domain else res.get("mean")
        return None if not block or metric not in block else float(block[metric])

    best = {}
    for c, (metric, domain, _) in enumerate(columns):
        values = [v for res in students.values() if (v := cell(res, metric, domain)) is not None]
        if len(set(values)) > 1:  # bold marks a winner, so not when all are equal
            best[c] = max(values) if metric in ("dice", "jaccard") else min(values)
    head = ("<tr><th rowspan=\"2\">Method</th>"
            f"<th colspan=\"{len(domains)}\">DSC (%) per domain</th><th colspan=\"4\">Avg</th></tr>"
            "<tr>" + "".join(f"<th>{html.escape(d)}</th>" for d in domains)
            + "<th>DSC (%)</th><th>Jaccard (%)</th><th>95HD</th><th>ASD</th></tr>")
    rows = []
    for kind, res in students.items():
        cells = []
        for c, (metric, domain, percent) in enumerate(columns):
            v = cell(res, metric, domain)
            klass = ' class="best"' if v is not None and best.get(c) == v else ""
            cells.append(f"<td{klass}>{'-' if v is None else _fmt(v, percent)}</td>")
        name = f"{summary.get('method', '')} ({STUDENT_NAMES.get(kind, kind)})"
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return (f'<table class="metrics"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>')


def class_table(summary: dict, domains: list[str]) -> str:
    """Per reported part DSC (%) per domain and averaged, when the summary holds several parts."""
    rows = []
    parts: list[str] = []
    for res in summary.get("students", {}).values():
        for d in res.get("per_domain", {}).values():
            for p in d.get("classes", {}):
                if p not in parts:
                    parts.append(p)
    if not parts:
        return ""
    for kind, res in summary["students"].items():
        for part in parts:
            values = [res["per_domain"].get(d, {}).get("classes", {}).get(part, {}).get("dice") for d in domains]
            present = [v for v in values if v is not None]
            cells = "".join(f"<td>{'-' if v is None else _fmt(v, True)}</td>" for v in values)
            avg = _fmt(float(np.mean(present)), True) if present else "-"
            rows.append(f"<tr><td>{html.escape(STUDENT_NAMES.get(kind, kind))}</td><td>{html.escape(part)}</td>"
                        f"{cells}<td>{avg}</td></tr>")
    head = ("<tr><th>Student</th><th>part</th>" + "".join(f"<th>{html.escape(d)}</th>" for d in domains)
            + "<th>Avg</th></tr>")
    return f'<table class="metrics"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _summary_domains(summary: dict) -> list[str]:
    domains: list[str] = []
    for res in summary.get("students", {}).values():
        for d in res.get("per_domain", {}):
            if d not in domains:
                domains.append(d)
    return domains


def _legend(parts: list) -> str:
    return "".join(f'<span class="swatch" style="background: rgb{PART_COLOURS[i % len(PART_COLOURS)]}"></span>'
                   f"{html.escape(name)}" for i, (name, _) in enumerate(parts))


def gallery_html(run: Path, found: dict) -> str:
    dice = read_per_case(run)
    parts = found["parts"]
    blocks = [f'<p class="note">Contours: {_legend(parts)}. Images at the evaluation size (where the '
              "metrics are computed); Dice per case from per_case.csv.</p>"]
    for domain, cases in found["domains"].items():
        blocks.append(f"<h3>{html.escape(domain)}</h3>")
        for case in cases:
            tiles = [("ground truth", case["truth"])] + [
                (STUDENT_NAMES.get(k, k), p) for k, p in case["predictions"].items()]
            figures = []
            for (title, label), kind in zip(tiles, [None, *case["predictions"]]):
                caption = html.escape(title)
                scores = dice.get((kind, domain, case["name"])) if kind else None
                if scores:
                    caption += " (DSC " + ", ".join(f"{100 * s:.1f}" for s in scores) + ")"
                picture = png_bytes(overlay_contours(case["image"], label, parts))
                alt = f"{domain} {case['name']} {title}"
                figures.append(f"<figure>{_img(picture, alt)}"
                               f"<figcaption>{caption}</figcaption></figure>")
            blocks.append(f'<div class="case"><div class="casename">{html.escape(case["name"])}</div>'
                          + "".join(figures) + "</div>")
    return "\n".join(blocks)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _config_lines(run: Path) -> list[str]:
    path = run / "config.yaml"
    if not path.is_file():
        return []
    import yaml
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return []
    keys = ("dataset", "method", "labeled_domain", "labeled_num", "labeled_ratio", "foundation", "image_size",
            "unet_size", "iters", "alpha", "consistency", "seed")
    return [f"{k}: {cfg[k]}" for k in keys if isinstance(cfg, dict) and cfg.get(k) is not None]


def training_views_html(run: Path, device: str = "auto", dataset: str | None = None) -> str:
    """Three labeled/unlabeled pairs as training draws them (weak, strong, intermediate views, at
    both model sizes), with the final students' prediction as the pseudo-label outside the box."""
    from synfoc.checkpoint import load_run
    from synfoc.preview import preview_png
    cfg, index, students, _ = load_run(run, dataset=dataset, device=device)
    png = preview_png(cfg, index, cases=3, students=students)
    return ('<p class="note">The augmentations of the first iteration (<code>synfoc data preview</code> draws '
            "the same before training). U_c: the labeled weak view inside the yellow box M, the strong view "
            "outside; its label: the labeled case's inside the box, outside it the final students' "
            "prediction standing in for the teachers' pseudo-label.</p>" + _img(png, "training views"))


def build_html(run: Path, per_domain: int = 4, device: str = "auto", dataset: str | None = None,
               log=None) -> str:
    """The whole report page as one string (see the module docstring)."""
    run = Path(run)
    log = log or (lambda message: print(message, file=sys.stderr))
    title = f"synfoc report: {run.resolve().name}"
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="meta">{html.escape(str(run.resolve()))} &middot; written '
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>"]
    config = _config_lines(run)
    if config:
        body.append('<p class="meta">' + " &middot; ".join(html.escape(c) for c in config) + "</p>")

    body.append("<h2>Test metrics</h2>")
    summary = _read_json(run / "summary.json")
    if summary and summary.get("students"):
        domains = _summary_domains(summary)
        body.append(f'<p class="note">Final students, labeled domain {html.escape(str(summary.get("labeled_domain")))}, '
                    f"{summary.get('iterations')} iterations. DSC and Jaccard in %, 95HD and ASD in pixels "
                    "at the evaluation size; per domain the mean over its test images, Avg the unweighted "
                    "mean over domains.</p>")
        body.append(metrics_table(summary, domains))
        body.append(class_table(summary, domains))
        optimistic = _read_json(run / "summary_test-selected.json")
        if optimistic and optimistic.get("students"):
            body.append("<h3>Students selected on the test sets (optimistic; the authors' protocol)</h3>")
            body.append(metrics_table(optimistic, domains))
    else:
        body.append('<p class="note">No summary.json: the run has not finished (or was not evaluated); '
                    "run <code>synfoc evaluate RUN</code>.</p>")

    body.append("<h2>Training curves</h2>")
    history = read_history(run)
    if history:
        body.append('<div class="curves">' + "".join(_img(png, t) for t, png in curve_pngs(history)) + "</div>")
    else:
        body.append('<p class="note">No history.jsonl in the run folder.</p>')

    if per_domain > 0:
        body.append("<h2>What the models train on</h2>")
        try:
            body.append(training_views_html(run, device=device, dataset=dataset))
        except Exception as exc:  # the report is still useful without it
            log(f"synfoc report: no training views ({type(exc).__name__}: {exc})")
            body.append(f'<p class="note">No training views: {html.escape(f"{type(exc).__name__}: {exc}")}</p>')
        body.append("<h2>Test cases</h2>")
        try:
            body.append(gallery_html(run, gallery(run, per_domain, device=device, dataset=dataset)))
        except Exception as exc:  # the report is still useful without its gallery
            log(f"synfoc report: no gallery ({type(exc).__name__}: {exc})")
            body.append(f'<p class="note">No gallery: {html.escape(f"{type(exc).__name__}: {exc}")}</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(b for b in body if b) + "\n</body>\n</html>\n")


def write_report(run: Path, output: Path | None = None, per_domain: int = 4, device: str = "auto",
                 dataset: str | None = None) -> Path:
    """Write the report of ``run`` to ``output`` (default ``RUN/report.html``); return its path."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"run folder not found: {run}")
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run} is not a synfoc run folder (no config.yaml)")
    output = Path(output) if output else run / "report.html"
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give the HTML file to write")
    from synfoc.predict import check_writable_folder
    check_writable_folder(output.parent, "--output")  # before the gallery's minutes of inference
    page = build_html(run, per_domain=per_domain, device=device, dataset=dataset)
    tmp = output.with_name(output.name + ".tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(output)
    except OSError as exc:
        from synfoc.errors import os_error_message
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ValueError(f"--output {output}: {os_error_message(exc)}") from None
    return output


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run folder made by 'synfoc train --out RUN'")
    parser.add_argument("--output", "-o", help="the HTML file to write (default: RUN/report.html)")
    parser.add_argument("--cases", type=int, default=4, metavar="N",
                        help="test cases per domain in the gallery (default 4; 0: no gallery)")
    parser.add_argument("--dataset", help="where the run's dataset is now (default: as in its config.yaml)")
    parser.add_argument("--device", choices=CHOICES["device"], default="auto",
                        help="where the students run (default auto: CUDA when available)")


def main(args: argparse.Namespace) -> int:
    path = write_report(Path(args.run), Path(args.output) if args.output else None, per_domain=args.cases,
                        device=args.device, dataset=args.dataset)
    print(f"report: {path}")
    return 0

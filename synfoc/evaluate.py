"""Evaluation of the students on the test split of every domain, or of ``test_domains`` (method-spec
section 5).

The foundation model's logits are upsampled to its input size, soft-maxed and arg-maxed, then
nearest-resized to the U-Net size; metrics are computed at the U-Net size, per 2D image and per
reported part, in pixels. Mean over the images of a domain, then the unweighted mean over domains.
A format whose index sets ``volume_metrics`` (ACDC) is scored per test volume in 3D instead
(:func:`volume_rows`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synfoc.checkpoint import load_domain_statistics, load_run
from synfoc.metrics import METRIC_NAMES, batch_multiclass_metrics


def tested_domains(index, cfg) -> list[str]:
    """The domains whose test splits are evaluated: ``cfg.test_domains``, else every domain."""
    from synfoc.data import check_domains
    return check_domains(index, getattr(cfg, "test_domains", None), "--test-domains")


def eval_size(cfg) -> int:
    """Metrics are computed at the U-Net input size (the paper's protocol)."""
    return cfg.unet_size


@torch.no_grad()
def probability_chunks(model: nn.Module, images: torch.Tensor, device, autocast, batch: int = 8):
    """Soft-max probabilities of a model on uint8 images (N, C, S, S), ``batch`` images at a time on
    ``device``, each chunk (n, C+1, S, S): the logits of SAM ViT decoders, at a quarter of the input
    size, are brought to it bilinearly first."""
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch].to(device).float().div_(255)
            with autocast():
                logits = model(x).float()
            if logits.shape[-1] != x.shape[-1]:
                logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
            yield logits.softmax(dim=1)


def predict_labels(model: nn.Module, images: torch.Tensor, out_size: int, device, autocast,
                   batch: int = 8) -> torch.Tensor:
    """Arg-max labels (N, out_size, out_size) of a model on uint8 images (N, C, S, S)."""
    was_training = model.training
    model.eval()
    preds = []
    for probs in probability_chunks(model, images, device, autocast, batch):
        lab = probs.argmax(dim=1, keepdim=True).float()
        if lab.shape[-1] != out_size:
            lab = F.interpolate(lab, size=(out_size, out_size), mode="nearest")
        preds.append(lab[:, 0].to(torch.uint8).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, out_size, out_size, dtype=torch.uint8)


def predict_domain_labels(kind: str, model: nn.Module, images: torch.Tensor, out_size: int, device, autocast,
                          domain: str, domain_stats: dict | None) -> torch.Tensor:
    """:func:`predict_labels` of a student on one domain's images; the U-Net normalises with that
    domain's BatchNorm statistics where ``domain_stats`` (``unet_domains.safetensors``) has them."""
    from synfoc.method.norm import using_batchnorm_statistics
    stats = (domain_stats or {}).get(domain) if kind == "unet" else None
    with using_batchnorm_statistics(model, stats):
        return predict_labels(model, images, out_size, device, autocast)


def evaluate_students(students: dict[str, nn.Module], index, cfg, device, autocast,
                      progress: bool = False, domain_stats: dict | None = None) -> list[dict]:
    """One row per (student, domain, case, part) with Dice, Jaccard, HD95 and ASD. ``domain_stats``:
    the U-Net's BatchNorm statistics per domain (``unet_domains.safetensors``), used on that domain."""
    from synfoc.data import load_cases
    size = eval_size(cfg)
    rows = []
    for domain in tested_domains(index, cfg):
        cases = index.cases_of(domain, "test")
        if not cases:
            continue
        input_sizes = {"unet": cfg.unet_size}
        if "foundation" in students:
            input_sizes["foundation"] = students["foundation"].image_size
        loaded = load_cases(index, cases, sorted(set(input_sizes.values()) | {size}), progress=progress)
        truth = loaded.arrays[size][1].numpy()
        volumes = test_volumes(index, cases) if getattr(index, "volume_metrics", False) else None
        for kind, model in students.items():
            images = loaded.arrays[input_sizes[kind]][0]
            pred = predict_domain_labels(kind, model, images, size, device, autocast, domain, domain_stats).numpy()
            if volumes is not None:
                rows += volume_rows(kind, domain, volumes, pred, loaded.original_sizes, index.report_parts)
                continue
            per_case = batch_multiclass_metrics(pred, truth, index.report_parts)
            present = {part: (np.isin(truth, values).any(axis=(1, 2)), np.isin(pred, values).any(axis=(1, 2)))
                       for part, values in index.report_parts}
            for i, (case, metrics) in enumerate(zip(cases, per_case)):
                for part, values in metrics.items():
                    rows.append({"student": kind, "domain": domain, "case": case.name, "class": part,
                                 **{m: float(values[m]) for m in METRIC_NAMES},
                                 "truth_present": int(present[part][0][i]), "pred_present": int(present[part][1][i])})
    return rows


def test_volumes(index, cases) -> dict[str, tuple[list[int], np.ndarray]]:
    """The test slices grouped into their volumes (by file, in slice order): volume name ->
    (positions in ``cases``, ground truth (slices, H, W) at the original size)."""
    from synfoc.data.io import file_stem
    members: dict[Path, list[int]] = {}
    for i, case in enumerate(cases):
        members.setdefault(Path(case.image), []).append(i)
    volumes = {}
    for path, positions in members.items():
        positions.sort(key=lambda i: cases[i].slice_index or 0)
        volumes[file_stem(path)] = (positions, np.stack([index.read(cases[i]).label for i in positions]))
    return volumes


def volume_rows(kind: str, domain: str, volumes: dict, pred: np.ndarray, original_sizes: list,
                parts) -> list[dict]:
    """One row per (test volume, part) with 3D metrics: the SSL literature's ACDC protocol, where
    each slice's prediction is resized back to the slice's own size (nearest neighbour) and the
    volume is scored as a whole. Distances are in voxels: the ACDC files carry no spacing."""
    from synfoc.data import resize_label
    from synfoc.metrics import multiclass_metrics
    rows = []
    for name, (positions, truth) in volumes.items():
        volume = np.stack([resize_label(pred[i], original_sizes[i]) for i in positions])
        for part, values in multiclass_metrics(volume, truth, parts).items():
            mask = dict(parts)[part]
            rows.append({"student": kind, "domain": domain, "case": name, "class": part,
                         **{m: float(values[m]) for m in METRIC_NAMES},
                         "truth_present": int(np.isin(truth, mask).any()),
                         "pred_present": int(np.isin(volume, mask).any())})
    return rows


def summarise(rows: list[dict], cfg, index, selection: str = "final") -> dict:
    """The summary.json schema: per student, per-domain means (mean over parts of the mean over
    images) with per-class values inside, and the unweighted mean over domains.

    Each class carries ``truth_cases`` / ``pred_cases``, the test cases it is present in. A class
    absent from both the prediction and the truth of every test case of a domain scores a perfect
    "nothing here" on each of them; it is left out of that domain's mean and listed under
    ``absent_classes`` (unless no class is present at all), so that classes a domain never shows
    cannot lift its mean."""
    students = {}
    for kind in dict.fromkeys(r["student"] for r in rows):
        per_domain = {}
        for domain in index.domains:
            drows = [r for r in rows if r["student"] == kind and r["domain"] == domain]
            if not drows:
                continue
            classes = {}
            for part, _ in index.report_parts:
                prow = [r for r in drows if r["class"] == part]
                classes[part] = {m: float(np.mean([r[m] for r in prow])) for m in METRIC_NAMES}
                classes[part]["truth_cases"] = sum(int(r.get("truth_present", 1)) for r in prow)
                classes[part]["pred_cases"] = sum(int(r.get("pred_present", 1)) for r in prow)
            absent = [p for p, c in classes.items() if c["truth_cases"] == 0 and c["pred_cases"] == 0]
            counted = [c for p, c in classes.items() if p not in absent] or list(classes.values())
            per_domain[domain] = {m: float(np.mean([c[m] for c in counted])) for m in METRIC_NAMES}
            per_domain[domain]["cases"] = len({r["case"] for r in drows})
            if absent and len(counted) < len(classes):
                per_domain[domain]["absent_classes"] = absent
            if len(classes) > 1:
                per_domain[domain]["classes"] = classes
            else:
                per_domain[domain].update({k: v for k, v in classes[part].items() if k.endswith("_cases")})
        mean = {m: float(np.mean([d[m] for d in per_domain.values()])) for m in METRIC_NAMES}
        students[kind] = {"per_domain": per_domain, "mean": mean}
    return {"method": cfg.method, "iterations": cfg.iters, "selection": selection,
            "labeled_domain": cfg.labeled_domain or index.domains[0], "students": students}


def markdown_table(summary: dict, domains: list[str]) -> str:
    """A table laid out like the paper's: per-domain DSC, then average DSC, Jaccard, 95HD, ASD."""
    names = {"unet": "U-Net", "foundation": "foundation"}
    head = "| Method | " + " | ".join(domains) + " | DSC Avg | Jaccard | 95HD | ASD |"
    lines = [head, "|" + "---|" * (len(domains) + 5)]
    for kind, res in summary["students"].items():
        cells = [f"{100 * res['per_domain'][d]['dice']:.2f}" if d in res["per_domain"] else "-" for d in domains]
        m = res["mean"]
        lines.append(f"| {summary['method']} ({names.get(kind, kind)}) | " + " | ".join(cells)
                     + f" | {100 * m['dice']:.2f} | {100 * m['jaccard']:.2f} | {m['hd95']:.2f} | {m['asd']:.2f} |")
    lines += part_lines(summary, domains, names)
    absent = {d: res["per_domain"][d]["absent_classes"] for res in summary["students"].values()
              for d in domains if "absent_classes" in res["per_domain"].get(d, {})}
    if absent:
        lines.append("\nLeft out of the domain means (absent from prediction and truth in every test case): "
                     + "; ".join(f"{d}: {', '.join(c)}" for d, c in absent.items()))
    return "\n".join(lines) + "\n"


def part_lines(summary: dict, domains: list[str], names: dict) -> list[str]:
    """With several reported parts (classes or regions: cup and disc), a second table of DSC per
    part, per domain and averaged over the domains."""
    lines = []
    for kind, res in summary["students"].items():
        parts = [d.get("classes", {}) for d in res["per_domain"].values()]
        for part in dict.fromkeys(p for classes in parts for p in classes):
            dice = {d: c["classes"][part]["dice"] for d, c in res["per_domain"].items() if part in c.get("classes", {})}
            cells = [f"{100 * dice[d]:.2f}" if d in dice else "-" for d in domains]
            lines.append(f"| {summary['method']} ({names.get(kind, kind)}) | {part} | " + " | ".join(cells)
                         + f" | {100 * float(np.mean(list(dice.values()))):.2f} |")
    head = ["", "DSC per part:", "", "| Method | part | " + " | ".join(domains) + " | DSC Avg |",
            "|" + "---|" * (len(domains) + 3)]
    return head + lines if lines else []


def write_evaluation(rows: list[dict], out: Path, cfg, index, selection: str = "final") -> dict:
    """Write summary.json, per_case.csv and summary.md into ``out``; return the summary."""
    summary = summarise(rows, cfg, index, selection)
    suffix = "" if selection == "final" else f"_{selection}"
    (out / f"summary{suffix}.json").write_text(json.dumps(summary, indent=2))
    with (out / f"per_case{suffix}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["student", "domain", "case", "class", *METRIC_NAMES,
                                                "truth_present", "pred_present"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    title = "final students" if selection == "final" else "students selected ON THE TEST SETS (optimistic)"
    (out / f"summary{suffix}.md").write_text(f"# {cfg.method}: {title}\n\n"
                                             + markdown_table(summary, tested_domains(index, cfg)))
    return summary


def evaluate_run(run: Path, dataset: str | None = None, select_on: str = "final", device: str = "auto") -> dict:
    """``synfoc evaluate``: re-evaluate the saved students and rewrite summary, CSV and table."""
    run = Path(run)
    weights = run if select_on == "final" else run / "best_on_test"
    if select_on == "test" and not (weights / "best.json").is_file():
        raise ValueError(f"{run} has no test-selected students: train with --eval-every K to keep them")
    cfg, index, students, rt = load_run(run, dataset, weights, device)
    # the kernels training evaluated with, so that the summary is reproduced, not only within bf16 rounding
    from synfoc.accel import accelerate
    students = {k: accelerate(m, rt.device) for k, m in students.items()}
    rows = evaluate_students(students, index, cfg, rt.device, rt.autocast, progress=True,
                             domain_stats=load_domain_statistics(weights))
    summary = write_evaluation(rows, run, cfg, index, "final" if select_on == "final" else "test-selected")
    print(markdown_table(summary, tested_domains(index, cfg)))
    return summary

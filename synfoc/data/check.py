"""Decode every file of a dataset and report what is wrong (``synfoc data check``)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from synfoc.data.base import Case, DataError, DatasetIndex, Problem
from synfoc.data.formats import open_dataset
from synfoc.data.io import FileDataError


@dataclass
class CheckSummary:
    """What decoding every case found: problems, image sizes (H, W) and label pixel counts."""

    problems: list[Problem] = field(default_factory=list)
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    label_pixels: dict[int, int] = field(default_factory=dict)


def _problem_of(exc: DataError, case: Case) -> Problem:
    if isinstance(exc, FileDataError):
        return exc.as_problem()
    return Problem(str(case.image), str(exc))


def scan_dataset(index: DatasetIndex, progress: bool = False) -> CheckSummary:
    """Read every case; structural problems of ``index`` come first, each problem once."""
    summary = CheckSummary()
    seen: set[Problem] = set()

    def add(problem: Problem) -> None:
        if problem not in seen:
            seen.add(problem)
            summary.problems.append(problem)

    for problem in index.problems:
        add(problem)
    for case in tqdm(index.cases, desc="checking", unit="case", disable=not progress):
        try:
            sample = index.read(case)
        except DataError as exc:
            add(_problem_of(exc, case))
            continue
        h, w = sample.label.shape
        summary.min_size = (h, w) if summary.min_size is None else (min(h, summary.min_size[0]), min(w, summary.min_size[1]))
        summary.max_size = (h, w) if summary.max_size is None else (max(h, summary.max_size[0]), max(w, summary.max_size[1]))
        for v in range(index.num_classes + 1):  # read() only gives labels 0..C
            n = int(np.count_nonzero(sample.label == v))
            if n:
                summary.label_pixels[v] = summary.label_pixels.get(v, 0) + n
    return summary


def check_dataset(index: DatasetIndex, progress: bool = False) -> list[Problem]:
    """Every problem of ``index``: its structural ones plus those found by decoding each file
    (unreadable or truncated files, mask sizes, label values, 3D images). ``index.problems`` is
    updated to this list."""
    problems = scan_dataset(index, progress).problems
    index.problems = list(problems)
    return problems


def drop_bad(index: DatasetIndex, problems: list[Problem]) -> tuple[DatasetIndex, int]:
    """A copy of ``index`` without the cases that use a file named in ``problems``.

    A problem in a NIfTI volume drops all its slices. The returned index keeps the problems that
    named no case (unpaired files, empty domains) so they are still reported.
    """
    bad = {p.file for p in problems}

    def uses_bad_file(case: Case) -> bool:
        return any(str(f) in bad for f in (case.image, case.mask, *case.extra_masks) if f is not None)

    kept = [c for c in index.cases if not uses_bad_file(c)]
    case_files = {str(f) for c in index.cases for f in (c.image, c.mask, *c.extra_masks) if f is not None}
    remaining = [p for p in index.problems if p.file not in case_files]
    return replace(index, cases=kept, problems=remaining), len(index.cases) - len(kept)


def _counts(index: DatasetIndex) -> dict[str, dict[str, int]]:
    return {d: {s: len(index.cases_of(d, s)) for s in ("train", "test")} for d in index.domains}


def regions(index: DatasetIndex) -> dict[str, list[int]]:
    """The reported regions {name: training labels} when they are not simply one per class
    (Fundus disc/cup, a folder dataset's declared ``regions``), else {}."""
    parts = {name: list(values) for name, values in index.report_parts}
    return {} if parts == {c: [i + 1] for i, c in enumerate(index.classes)} else parts


def data_check_main(path: str, format: str = "auto", as_json: bool = False) -> int:
    """``synfoc data check PATH [--format F] [--json]``: exit code 0 when no problems, else 1."""
    try:
        index = open_dataset(path, format)
    except DataError as exc:
        if as_json:
            print(json.dumps({"format": format, "domains": {}, "classes": [],
                              "problems": [{"file": str(path), "problem": str(exc)}]}, indent=2))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = scan_dataset(index, progress=not as_json)
    if as_json:
        print(json.dumps({"format": index.format, "domains": _counts(index), "classes": list(index.classes),
                          **({"regions": regions(index)} if regions(index) else {}),
                          "problems": [{"file": p.file, "problem": p.problem} for p in summary.problems]},
                         indent=2))
    else:
        print(f"dataset {index.root} (format {index.format}, {index.channels} channel(s))")
        print(f"classes: {', '.join(f'{i + 1}={c}' for i, c in enumerate(index.classes)) or 'none'}")
        if regions(index):
            print("reported regions: " + "; ".join(
                f"{name} = {' + '.join(index.classes[v - 1] for v in values)}" for name, values in regions(index).items()))
        for domain, counts in _counts(index).items():
            print(f"  {domain:<12} train {counts['train']:>5}   test {counts['test']:>5}")
        if summary.min_size is not None:
            print(f"image sizes (HxW): min {summary.min_size[0]}x{summary.min_size[1]}, "
                  f"max {summary.max_size[0]}x{summary.max_size[1]}")
        total = sum(summary.label_pixels.values()) or 1
        print("label values found: " + ", ".join(f"{v} ({100 * n / total:.2f}% of pixels)"
                                                 for v, n in sorted(summary.label_pixels.items())))
        if summary.problems:
            print(f"{len(summary.problems)} problem(s):")
            for p in summary.problems:
                print(f"  {p.file}: {p.problem}")
        else:
            print("no problems found")
    return 1 if summary.problems else 0

"""``synfoc sweep``: one run per (method, labeled domain) and the paper's tables (Tables 3-8).

Every column of the paper's tables is a separate run with that domain labeled; its cell is the
mean DSC over the test sets of ALL domains, and "Avg" is the mean of the columns (method-spec
section 1). The runs live in ``OUT/<variant>/<domain>/`` (plain ``synfoc train`` run folders) and
the tables in ``OUT/sweep.md``, the numbers behind them in ``OUT/sweep_seeds.csv``. With several
seeds each run gets its own ``OUT/<variant>/<domain>/seed<N>/`` (so does every run of a sweep
given ``--seeds``, even one seed: sweeps split by seed share one OUT), every cell becomes mean ±
sample std over the seeds, and a table of paired (same seed, same labeled domain)
SynFoC-minus-baseline differences is added. The sweep is resumable: a finished run (valid
``summary.json``) is skipped, an interrupted one (``checkpoint.pt``) continues from its
checkpoint, anything else starts afresh. Cell values are always read back from each run's
``summary.json``, so a sweep that was stopped and started again several times gives the same
tables as one uninterrupted sweep.

A *variant* is a method, and for SynFoC optionally its alpha strategy and consistency term
(``synfoc:constant:cr``): the ablations of Tables 7 and 8 are variants of SynFoC.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from synfoc.config import SHARED, TrainConfig, load_yaml, resolve
from synfoc.method.registry import ALPHA_STRATEGIES, CONSISTENCIES, METHODS, baselines_of, models_of
from synfoc.options import add_setting_options, overrides

DEFAULT_ALPHA, DEFAULT_CONSISTENCY = TrainConfig.alpha, TrainConfig.consistency
FOUNDATION_NAMES = {"litemedsam": "LiteMedSAM", "medsam_vit_b": "MedSAM", "sam_vit_b": "SAM-B",
                    "sam_vit_l": "SAM-L", "sam_vit_h": "SAM-H"}
# Settings that change how a run executes or where its data lie, not what it learns: a finished
# or interrupted run is still "the same run" when only these differ from the request.
RUNTIME_SETTINGS = {"dataset", "device", "precision", "compile", "deterministic", "log_every",
                    "checkpoint_every", "eval_every", "grad_checkpointing"}
METRICS = ("dice", "jaccard", "hd95", "asd")
SUMMARY, CHECKPOINT, CONFIG = "summary.json", "checkpoint.pt", "config.yaml"
TABLES, SEEDS_CSV = "sweep.md", "sweep_seeds.csv"
# The baselines SynFoC's two students are compared with in the paired-difference table.
BASELINES = {student: baselines_of(student) for student in ("unet", "foundation")}
# "--seeds N" is a count; a larger N is almost surely a seed meant as a one-element list.
MAX_SEED_COUNT = 20


# ----------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """A method of the sweep; for SynFoC also its alpha strategy and consistency term."""

    method: str
    alpha: str = DEFAULT_ALPHA
    consistency: str = DEFAULT_CONSISTENCY

    @property
    def options(self) -> list[str]:
        """The non-default SynFoC options, in a fixed order (alpha, then consistency)."""
        return [o for o, d in ((self.alpha, DEFAULT_ALPHA), (self.consistency, DEFAULT_CONSISTENCY)) if o != d]

    @property
    def folder(self) -> str:
        """``synfoc``, ``synfoc-constant-cr``, ``base-unet``: the runs' parent folder."""
        return "-".join([self.method, *self.options])

    @property
    def title(self) -> str:
        """The paper's name: ``SynFoC``, ``SynFoC (constant 0.5, CR)``, ``SupOnly``."""
        names = [ALPHA_STRATEGIES[self.alpha] if self.alpha != DEFAULT_ALPHA else None,
                 CONSISTENCIES[self.consistency] if self.consistency != DEFAULT_CONSISTENCY else None]
        extra = ", ".join(n for n in names if n)
        return METHODS[self.method].title + (f" ({extra})" if extra else "")

    def overrides(self) -> dict:
        return {"method": self.method, "alpha": self.alpha, "consistency": self.consistency}


def parse_variants(methods: str, alphas: str | None = None, consistencies: str | None = None) -> list[Variant]:
    """Variants from ``--methods`` (comma-separated; ``synfoc:ALPHA:CONSISTENCY`` picks SynFoC's
    options) and ``--alpha``/``--consistency`` lists, which expand every plain ``synfoc`` entry
    into their cross product. Duplicates are dropped, the order kept.

    Raises:
        ValueError: an unknown method or option, an option on a method other than synfoc, or
            ``--alpha``/``--consistency`` without a synfoc entry.
    """
    def names(text: str | None, allowed, what: str) -> list[str] | None:
        if text is None:
            return None
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise ValueError(f"--{what}: unknown value(s) {', '.join(bad) or repr(text)}; "
                             f"choose from {', '.join(allowed)}")
        return items

    alpha_list = names(alphas, ALPHA_STRATEGIES, "alpha")
    consistency_list = names(consistencies, CONSISTENCIES, "consistency")
    out: list[Variant] = []
    entries = [s.strip() for s in methods.split(",") if s.strip()]
    if not entries:
        raise ValueError("--methods: give at least one method")
    for entry in entries:
        method, *options = entry.split(":")
        if method not in METHODS:
            raise ValueError(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if options and method != "synfoc":
            raise ValueError(f"--methods: {entry!r}: only synfoc takes alpha/consistency options")
        alpha = [o for o in options if o in ALPHA_STRATEGIES]
        consistency = [o for o in options if o in CONSISTENCIES]
        unknown = [o for o in options if o not in ALPHA_STRATEGIES and o not in CONSISTENCIES]
        if unknown or len(alpha) > 1 or len(consistency) > 1:
            raise ValueError(f"--methods: {entry!r}: write synfoc:ALPHA:CONSISTENCY with at most one of each, "
                             f"ALPHA in {', '.join(ALPHA_STRATEGIES)}, CONSISTENCY in {', '.join(CONSISTENCIES)}")
        if method != "synfoc":
            out.append(Variant(method))
            continue
        for a in alpha or alpha_list or [DEFAULT_ALPHA]:
            for c in consistency or consistency_list or [DEFAULT_CONSISTENCY]:
                out.append(Variant(method, a, c))
    if (alpha_list or consistency_list) and not any(v.method == "synfoc" for v in out):
        raise ValueError("--alpha and --consistency apply to synfoc only; add synfoc to --methods")
    return list(dict.fromkeys(out))


def parse_seeds(text: str | None, base: int) -> list[int]:
    """Seeds from ``--seeds``: a count N (``base``, base+1, ..., base+N-1) or a comma list of seeds
    (``1337,1338,2024``; a single seed as ``2024,``). None gives ``[base]``.

    Raises:
        ValueError: a count outside 1..MAX_SEED_COUNT, a seed that is not a non-negative integer,
            or a seed listed twice (the two runs would share one folder).
    """
    if text is None:
        return [base]
    text = text.strip()
    try:
        numbers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds: give a number of seeds or a comma list of integer seeds, not {text!r}") from None
    if not numbers:
        raise ValueError("--seeds: give a number of seeds or a comma list of integer seeds")
    if "," not in text:
        count = numbers[0]
        if count < 1:
            raise ValueError(f"--seeds {text}: give at least one seed")
        if count > MAX_SEED_COUNT:
            raise ValueError(f"--seeds {text}: a single number is the number of seeds (at most {MAX_SEED_COUNT}); "
                             f"for the one seed {text} write --seed {text} or --seeds {text},")
        return [base + i for i in range(count)]
    if any(x < 0 for x in numbers) or len(set(numbers)) < len(numbers):
        raise ValueError(f"--seeds {text}: give distinct non-negative integer seeds")
    return numbers


# ----------------------------------------------------------------------------- run folders
def run_folder(out: Path, variant: Variant, domain: str, seed: int, per_seed: bool) -> Path:
    """``OUT/<variant>/<domain>/seed<N>/`` when the seeds were given (``--seeds``), else
    ``OUT/<variant>/<domain>/`` (the one seed of the configuration: the layout a sweep without
    ``--seeds`` always had, so its finished runs stay valid)."""
    folder = out / variant.folder / domain
    return folder / f"seed{seed}" if per_seed else folder


@dataclass
class PlannedRun:
    """One (variant, labeled domain, seed) run and what the sweep does with it."""

    variant: Variant
    domain: str
    folder: Path
    cfg: TrainConfig
    state: str            # "done" (skip), "resume" (from checkpoint.pt) or "fresh"

    @property
    def seed(self) -> int:
        return self.cfg.seed


def read_summary(folder: Path) -> dict | None:
    """The run's summary.json, or None when it is missing, truncated or not a summary (a run that
    died while writing it counts as unfinished)."""
    path = folder / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    students = summary.get("students") if isinstance(summary, dict) else None
    if not isinstance(students, dict) or not students:
        return None
    try:
        for res in students.values():
            [float(res["mean"][m]) for m in METRICS]
    except (KeyError, TypeError, ValueError):
        return None
    return summary


def config_differences(stored: dict, wanted: TrainConfig) -> list[str]:
    """Settings (other than RUNTIME_SETTINGS) in which a run folder's config.yaml differs from the
    configuration the sweep asks for, as ``name: stored -> wanted``."""
    from synfoc.build import native_size, with_image_size
    stored = dict(stored)
    if stored.get("image_size") is None and stored.get("foundation"):   # written before config.yaml named it
        stored["image_size"] = native_size(stored["foundation"])
    want = with_image_size(wanted).to_dict()
    diffs = []
    for key in sorted(set(stored) | set(want)):
        if key in RUNTIME_SETTINGS:
            continue
        if stored.get(key) != want.get(key):
            diffs.append(f"{key}: {stored.get(key)!r} -> {want.get(key)!r}")
    return diffs


def stored_config(folder: Path) -> dict | None:
    """The run folder's config.yaml as a mapping, or None when there is none."""
    return load_yaml(folder / CONFIG) if (folder / CONFIG).is_file() else None


def plan_run(variant: Variant, domain: str, folder: Path, cfg: TrainConfig) -> PlannedRun:
    """Decide whether the run in ``folder`` is done, resumes or starts afresh.

    Raises:
        ValueError: the folder holds a run (finished or interrupted) with other settings; the
            sweep never overwrites it silently.
    """
    summary = read_summary(folder)
    has_checkpoint = (folder / CHECKPOINT).is_file()
    if summary is None and not has_checkpoint:
        return PlannedRun(variant, domain, folder, cfg, "fresh")
    stored = stored_config(folder)
    diffs = config_differences(stored, cfg) if stored is not None else []
    if summary is not None:
        got = {"method": summary.get("method"), "labeled_domain": summary.get("labeled_domain"),
               "iterations": summary.get("iterations")}
        want = {"method": cfg.method, "labeled_domain": domain, "iterations": cfg.iters}
        diffs += [f"{k}: {got[k]!r} -> {want[k]!r} (summary.json)" for k in want if got[k] != want[k]]
    if diffs:
        raise ValueError(f"{folder} already holds a run with other settings ({'; '.join(diffs)}); "
                         "use another --out, or delete that folder to redo the run")
    if summary is not None:
        return PlannedRun(variant, domain, folder, cfg, "done")
    # Interrupted: continue exactly as configured (config.yaml), on this machine's device and data path.
    if stored is not None:
        resumed = TrainConfig().update(stored, str(folder / CONFIG))
        cfg = resumed.update({"dataset": cfg.dataset, "device": cfg.device}, "command line")
    return PlannedRun(variant, domain, folder, cfg, "resume")


def clear_stale_logs(folder: Path) -> None:
    """Remove the curves of a run that died before its first checkpoint: a fresh start would
    otherwise append to them."""
    if (folder / "history.jsonl").is_file():
        (folder / "history.jsonl").unlink()
    if (folder / "tensorboard").is_dir():
        shutil.rmtree(folder / "tensorboard")


# ----------------------------------------------------------------------------- tables
# ``summaries`` maps (variant, labeled domain, seed) to that run's summary.json (None: not finished).
def _row_label(variant: Variant, student: str, foundation: str) -> str:
    """``SynFoC_U-Net``, ``SynFoC_MedSAM``, ``SupOnly_U-Net`` (the paper's SynFoC_MedSAM rows)."""
    model = "U-Net" if student == "unet" else FOUNDATION_NAMES.get(foundation, foundation)
    return f"{variant.title}_{model}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _seeds(summaries: dict, seeds: list[int] | None) -> list[int]:
    return list(seeds) if seeds is not None else sorted({key[2] for key in summaries})


def _result(summaries: dict, variant: Variant, domain: str, seed: int, student: str) -> dict | None:
    summary = summaries.get((variant, domain, seed))
    return summary["students"].get(student) if summary else None


def _stat(values: list[float], scale: float, multi: bool, partial: bool) -> str:
    """``84.26`` (one seed) or ``84.26 ± 1.20`` (mean ± sample std over seeds), ``*`` when fewer
    runs than asked for went into it. A multi-seed cell with one finished seed has no std yet."""
    text = f"{scale * _mean(values):.2f}"
    if multi and len(values) > 1:
        text += f" ± {scale * statistics.stdev(values):.2f}"
    return text + ("*" if partial else "")


def _scale(metric: str) -> float:
    return 100.0 if metric in ("dice", "jaccard") else 1.0


def _class_names(summaries: dict) -> list[str]:
    """The reported parts (cup, disc; LV, MYO, RV) when the dataset has several, else []."""
    for summary in summaries.values():
        if summary is None:
            continue
        for res in summary["students"].values():
            for dom in res.get("per_domain", {}).values():
                if "classes" in dom:
                    return list(dom["classes"])
    return []


def _class_means(res: dict, classes: list[str]) -> list[float] | None:
    """Per reported part, the DSC averaged over the test domains (the paper's "cup / disc" cells)."""
    try:
        return [_mean([d["classes"][c]["dice"] for d in res["per_domain"].values()]) for c in classes]
    except (KeyError, ZeroDivisionError):
        return None


def main_table(variants: list[Variant], domains: list[str], summaries: dict, foundation: str,
               classes: list[str] | None = None, seeds: list[int] | None = None) -> str:
    """The paper's layout (Tables 3-7): one row per (variant, student), one column per labeled
    domain with the run's mean DSC over all test domains (%), then DSC Avg (mean of the columns)
    and Jaccard (%), 95HD and ASD (pixels) averaged over the columns likewise. With ``classes``
    each domain cell lists the per-part DSC ("cup / disc").

    With several seeds a column cell is mean ± sample std over the seeds' runs, and an average is
    mean ± std over seeds of each seed's average over the columns (the spread of DSC Avg itself,
    not an average of the columns' spreads). A "*" marks a value over the runs finished so far."""
    seeds = _seeds(summaries, seeds)
    multi = len(seeds) > 1
    head = "| Method | " + " | ".join(domains) + " | DSC Avg | Jaccard | 95HD | ASD |"
    lines = [head, "|---" * (len(domains) + 5) + "|"]
    for variant in variants:
        for student in models_of(variant.method):
            cells: list[str] = []
            per_seed = {s: {m: [] for m in METRICS} for s in seeds}
            for domain in domains:
                results = []
                for seed in seeds:
                    res = _result(summaries, variant, domain, seed, student)
                    if res is None:
                        continue
                    results.append(res)
                    for m in METRICS:
                        per_seed[seed][m].append(float(res["mean"][m]))
                if not results:
                    cells.append("-")
                    continue
                partial = len(results) < len(seeds)
                parts = [_class_means(r, classes) for r in results] if classes else []
                if parts and all(p is not None for p in parts):
                    cells.append(" / ".join(_stat([p[i] for p in parts], 100, multi, partial)
                                            for i in range(len(classes))))
                else:
                    cells.append(_stat([float(r["mean"]["dice"]) for r in results], 100, multi, partial))
            averages = {m: [_mean(per_seed[s][m]) for s in seeds if per_seed[s][m]] for m in METRICS}
            if averages["dice"]:
                missing = sum(len(per_seed[s]["dice"]) for s in seeds) < len(domains) * len(seeds)
                avg = [_stat(averages[m], _scale(m), multi, missing) for m in METRICS]
            else:
                avg = ["-"] * 4
            lines.append(f"| {_row_label(variant, student, foundation)} | " + " | ".join(cells + avg) + " |")
    return "\n".join(lines) + "\n"


def run_table(variant: Variant, domains: list[str], summaries: dict, foundation: str,
              seeds: list[int] | None = None) -> str:
    """One method's runs: per (student, labeled domain) the DSC on each test domain (%), then the
    run's means over test domains (the source -> target view behind each cell of the main table);
    mean ± std over seeds when there are several."""
    seeds = _seeds(summaries, seeds)
    multi = len(seeds) > 1
    tests: list[str] = []
    for domain in domains:
        for seed in seeds:
            summary = summaries.get((variant, domain, seed))
            for res in (summary or {}).get("students", {}).values():
                tests += [d for d in res.get("per_domain", {}) if d not in tests]
    head = ("| Student | labeled | " + " | ".join(f"test {d}" for d in tests)
            + " | DSC | Jaccard | 95HD | ASD |")
    lines = [head, "|---" * (len(tests) + 6) + "|"]
    for student in models_of(variant.method):
        for domain in domains:
            results = [r for r in (_result(summaries, variant, domain, s, student) for s in seeds) if r is not None]
            label = f"| {_row_label(variant, student, foundation)} | {domain} | "
            if not results:
                lines.append(label + " | ".join(["-"] * (len(tests) + 4)) + " |")
                continue
            cells = []
            for t in tests:
                values = [r["per_domain"][t]["dice"] for r in results if t in r.get("per_domain", {})]
                cells.append(_stat(values, 100, multi, len(values) < len(seeds)) if values else "-")
            partial = len(results) < len(seeds)
            cells += [_stat([float(r["mean"][m]) for r in results], _scale(m), multi, partial) for m in METRICS]
            lines.append(label + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class Difference:
    """SynFoC's student minus a baseline's, paired by seed: DSC in percentage points per seed."""

    synfoc: Variant
    baseline: Variant
    student: str          # "unet" or "foundation": the model both rows are
    labeled: str          # a labeled domain, or "Avg" (the difference of DSC Avg, per seed)
    diffs: dict[int, float]


def paired_differences(variants: list[Variant], domains: list[str], summaries: dict,
                       seeds: list[int] | None = None) -> list[Difference]:
    """Every SynFoC variant's U-Net minus each U-Net baseline of the sweep (base-unet, suponly-unet,
    fixmatch) and its foundation student minus each foundation baseline (base-foundation, samed,
    suponly-foundation): per labeled domain, the difference of the two runs' mean DSC for every seed
    where both runs finished; then "Avg", per seed the difference of DSC Avg (the mean over the
    labeled domains), only for seeds where both have every labeled domain."""
    seeds = _seeds(summaries, seeds)
    out: list[Difference] = []

    def dice(variant: Variant, domain: str, seed: int, student: str) -> float | None:
        res = _result(summaries, variant, domain, seed, student)
        return None if res is None else 100 * float(res["mean"]["dice"])

    for ours in (v for v in variants if v.method == "synfoc"):
        for student, names in BASELINES.items():
            for base in (v for v in variants if v.method in names):
                per_domain = {}
                for domain in domains:
                    pairs = {s: (dice(ours, domain, s, student), dice(base, domain, s, student)) for s in seeds}
                    per_domain[domain] = {s: a - b for s, (a, b) in pairs.items() if a is not None and b is not None}
                    out.append(Difference(ours, base, student, domain, per_domain[domain]))
                complete = [s for s in seeds if all(s in per_domain[d] for d in domains)]
                out.append(Difference(ours, base, student, "Avg",
                                      {s: _mean([per_domain[d][s] for d in domains]) for s in complete}))
    return out


def difference_table(differences: list[Difference], foundation: str, seeds: list[int]) -> str:
    """One row per (comparison, labeled domain or Avg): pairs used of the seeds, mean, sample std and
    range of the per-seed differences, and on how many seeds SynFoC was ahead."""
    lines = ["| SynFoC | minus | labeled | pairs | mean ΔDSC | std | min .. max | positive |",
             "|---" * 8 + "|"]
    for d in differences:
        values = [d.diffs[s] for s in seeds if s in d.diffs]
        n = len(values)
        if n:
            cells = [f"{_mean(values):+.2f}", f"{statistics.stdev(values):.2f}" if n > 1 else "-",
                     f"{min(values):+.2f} .. {max(values):+.2f}", f"{sum(v > 0 for v in values)}/{n}"]
        else:
            cells = ["-"] * 4
        names = [_row_label(d.synfoc, d.student, foundation), _row_label(d.baseline, d.student, foundation)]
        lines.append("| " + " | ".join([*names, d.labeled, f"{n}/{len(seeds)}", *cells]) + " |")
    return "\n".join(lines) + "\n"


def sweep_markdown(variants: list[Variant], domains: list[str], summaries: dict, cfg: TrainConfig,
                   preset_name: str | None, failed: list[str] | None = None, seeds: list[int] | None = None) -> str:
    """The whole DIR/sweep.md: settings, the main table, per-part table, with several seeds the
    paired differences, then one table per method."""
    seeds = _seeds(summaries, seeds)
    multi = len(seeds) > 1
    of = "all training cases" if cfg.unlabeled_domains is None else "the labeled domain's training cases"
    labeled = f"{cfg.labeled_num} labeled cases" if cfg.labeled_num is not None else \
        f"labeled ratio {cfg.labeled_ratio} (int(ratio x {of}) labeled)"
    done = sum(s is not None for s in summaries.values())
    tested = "ALL domains" if cfg.test_domains is None else "the test domains " + ", ".join(cfg.test_domains)
    unlabeled = ("" if cfg.unlabeled_domains is None
                 else f" (unlabeled cases from {', '.join(cfg.unlabeled_domains)})")
    seed_text = (f"seeds {', '.join(map(str, seeds))} (one run each); " if multi else "")
    parts = [
        f"# SynFoC sweep{f' ({preset_name})' if preset_name else ''}\n",
        f"Dataset `{cfg.dataset}`; {labeled} from one domain per column{unlabeled}; {seed_text}"
        f"{cfg.iters} iterations; "
        f"foundation model {cfg.foundation} at {cfg.image_size or 'its native size'}, U-Net at {cfg.unet_size}. "
        f"{done} of {len(variants) * len(domains) * len(seeds)} runs finished.\n",
        "Each column is the run whose labeled data come from that domain; its cell is the mean DSC (%) "
        f"over the test sets of {tested}. DSC Avg is the mean of the columns; Jaccard (%), 95HD and "
        "ASD (pixels at the U-Net size) are averaged over the columns likewise. Final students (not "
        "selected on the test sets). A `*` marks an average over the runs finished so far.\n",
    ]
    if multi:
        parts.append(f"Every cell is mean ± sample std (ddof=1) over the {len(seeds)} seeds; an average's "
                     "± is the std over seeds of each seed's average over the columns; a `*` also marks a cell over "
                     f"fewer seeds than that. The per-seed numbers are in `{SEEDS_CSV}`.\n")
    parts += ["## DSC by labeled domain\n", main_table(variants, domains, summaries, cfg.foundation, seeds=seeds)]
    classes = _class_names(summaries)
    if classes:
        parts += [f"## DSC per part ({' / '.join(classes)}) by labeled domain\n",
                  main_table(variants, domains, summaries, cfg.foundation, classes, seeds=seeds)]
    differences = paired_differences(variants, domains, summaries, seeds) if multi else []
    if differences:
        parts += ["## SynFoC minus baseline (paired by seed)\n",
                  "Per labeled domain, SynFoC's student minus the baseline's, mean DSC in percentage points, "
                  "for each seed where both runs finished (pairs: how many seeds); Avg: the difference of "
                  "DSC Avg per seed, for seeds where both have every labeled domain. positive: on how many "
                  "of those seeds SynFoC was ahead.\n",
                  difference_table(differences, cfg.foundation, seeds)]
    parts.append("## Runs (DSC on each test domain)\n")
    layout = "<domain>/seed<N>/" if multi else ""
    for variant in variants:
        parts += [f"### {variant.title} (`{variant.folder}/{layout}`)\n",
                  run_table(variant, domains, summaries, cfg.foundation, seeds)]
    if failed:
        parts += ["## Failed runs\n", "\n".join(f"- {f}" for f in failed) + "\n"]
    return "\n".join(parts)


SEED_COLUMNS = ("variant", "student", "labeled_domain", "seed", "test_domain", *METRICS)


def seed_rows(variants: list[Variant], domains: list[str], summaries: dict,
              seeds: list[int] | None = None) -> list[dict]:
    """One row per finished run, student and test domain, then the run's "mean" row: the numbers
    each cell of sweep.md is computed from, as summary.json holds them (fractions, pixels)."""
    rows = []
    for variant in variants:
        for domain in domains:
            for seed in _seeds(summaries, seeds):
                for student in models_of(variant.method):
                    res = _result(summaries, variant, domain, seed, student)
                    if res is None:
                        continue
                    for test, values in [*res.get("per_domain", {}).items(), ("mean", res["mean"])]:
                        rows.append({"variant": variant.folder, "student": student, "labeled_domain": domain,
                                     "seed": seed, "test_domain": test, **{m: float(values[m]) for m in METRICS}})
    return rows


def seeds_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, SEED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def collect_summaries(out: Path, variants: list[Variant], domains: list[str], seeds: list[int],
                      per_seed: bool) -> dict:
    """Every run's summary.json (None where it is missing or truncated)."""
    return {(v, d, s): read_summary(run_folder(out, v, d, s, per_seed))
            for v in variants for d in domains for s in seeds}


def sweep_tables(out: Path, variants: list[Variant], domains: list[str], seeds: list[int], cfg: TrainConfig,
                 preset_name: str | None = None, failed: list[str] | None = None,
                 per_seed: bool = True) -> tuple[str, str]:
    """(sweep.md, sweep_seeds.csv) from the run folders' summary.json files alone; nothing trains."""
    summaries = collect_summaries(out, variants, domains, seeds, per_seed)
    return (sweep_markdown(variants, domains, summaries, cfg, preset_name, failed, seeds),
            seeds_csv(seed_rows(variants, domains, summaries, seeds)))


def write_tables(out: Path, variants: list[Variant], domains: list[str], seeds: list[int], cfg: TrainConfig,
                 preset_name: str | None = None, failed: list[str] | None = None, per_seed: bool = True) -> str:
    """Write OUT/sweep.md and OUT/sweep_seeds.csv; returns the Markdown."""
    text, table = sweep_tables(out, variants, domains, seeds, cfg, preset_name, failed, per_seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLES).write_text(text)
    (out / SEEDS_CSV).write_text(table)
    return text


# ----------------------------------------------------------------------------- the verb
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_setting_options(p, (SHARED,), dataset_required=True)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="sweep folder: runs in OUT/<method>/<domain>/ (OUT/<method>/<domain>/"
                                                "seed<N>/ with several seeds), tables in OUT/sweep.md")
    p.add_argument("--methods", default="synfoc",
                   help=f"comma-separated: {', '.join(METHODS)}; synfoc:ALPHA:CONSISTENCY picks SynFoC's options "
                        "(default: synfoc)")
    p.add_argument("--alpha", help="comma-separated alpha strategies for every plain synfoc entry "
                                   f"({', '.join(ALPHA_STRATEGIES)})")
    p.add_argument("--consistency", help="comma-separated consistency terms for every plain synfoc entry "
                                         f"({', '.join(CONSISTENCIES)})")
    p.add_argument("--labeled-domains", help="comma-separated columns (default: every domain of the dataset)")
    p.add_argument("--seeds", help="N: the seeds S..S+N-1 where S is --seed (or the preset's); or a comma list "
                                   "of seeds (1337,1338,2024; one seed as 2024,). Cells become mean ± std")
    p.add_argument("--tables-only", action="store_true",
                   help="train nothing: rewrite OUT/sweep.md and OUT/sweep_seeds.csv from the finished runs")


def base_config(args: argparse.Namespace) -> TrainConfig:
    """The preset, config file and command-line settings shared by every run of the sweep."""
    cfg = resolve(args.preset, args.config, overrides(args, (SHARED,)))
    if cfg.dataset != "synthetic" and not Path(cfg.dataset).exists():
        raise ValueError(f"dataset path does not exist: {cfg.dataset}")
    return cfg


def plan_sweep(cfg: TrainConfig, variants: list[Variant], domains: list[str] | None, out: Path,
               seeds: list[int], per_seed: bool):
    """(labeled domains, planned runs): checks the dataset and every run's split before anything
    trains, so a mistake costs seconds, not the first run's hours. Seeds are the outer loop, so a
    multi-seed sweep has a complete table for its first seed before it starts the second;
    ``per_seed``: every run in a ``seed<N>/`` folder (:func:`run_folder`)."""
    from synfoc.data import check_domains, split_labeled
    from synfoc.data.base import DataError
    from synfoc.data.source import open_index

    index = open_index(cfg)
    if index.problems and not (cfg.skip_bad and cfg.dataset != "synthetic"):
        raise DataError(f"the dataset has {len(index.problems)} problem(s) (first: {index.problems[0].file}: "
                        f"{index.problems[0].problem}); see `synfoc data check {cfg.dataset}`, or pass --skip-bad")
    domains = domains or list(index.domains)
    unknown = [d for d in domains if d not in index.domains]
    if unknown:
        raise ValueError(f"--labeled-domains: unknown domain(s) {', '.join(unknown)}; "
                         f"this dataset has {', '.join(index.domains)}")
    check_domains(index, cfg.test_domains, "--test-domains")
    for domain in domains:   # raises DataError early
        split_labeled(index, domain, cfg.labeled_num, cfg.labeled_ratio, cfg.unlabeled_domains)
    runs = [plan_run(v, d, run_folder(out, v, d, s, per_seed),
                     cfg.update({"labeled_domain": d, "seed": s, **v.overrides()}, "sweep"))
            for s in seeds for v in variants for d in domains]
    return domains, runs


def single_seed_leftovers(out: Path, variants: list[Variant], domains: list[str], per_seed: bool) -> list[Path]:
    """Runs of a sweep without ``--seeds`` (OUT/<variant>/<domain>/summary.json) in the folder of one
    with seed folders: they are not counted, but moving one into seed<N>/ (N its seed) makes the
    sweep reuse it."""
    if not per_seed:
        return []
    return [out / v.folder / d for v in variants for d in domains
            if (out / v.folder / d / SUMMARY).is_file() or (out / v.folder / d / CHECKPOINT).is_file()]


def run_sweep(cfg: TrainConfig, variants: list[Variant], domains: list[str] | None, out: Path,
              preset_name: str | None = None, progress: bool = True, seeds: list[int] | None = None,
              tables_only: bool = False) -> tuple[str, list[str]]:
    """Train every missing run (none with ``tables_only``), then write OUT/sweep.md and
    OUT/sweep_seeds.csv; returns (the Markdown, failed runs). ``seeds``: those given with ``--seeds``
    (each run in a seed<N>/ folder), or None for the configured seed alone."""
    from synfoc.data.base import DataError
    from synfoc.errors import TrainingError
    from synfoc.train import train

    per_seed, seeds = seeds is not None, seeds or [cfg.seed]
    domains, runs = plan_sweep(cfg, variants, domains, out, seeds, per_seed)
    master = int(os.environ.get("RANK", 0)) == 0
    say = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    counts = {s: sum(r.state == s for r in runs) for s in ("done", "resume", "fresh")}
    seed_text = f" x {len(seeds)} seeds" if len(seeds) > 1 else ""
    todo = (f"{len(runs) - counts['done']} not trained (--tables-only)" if tables_only
            else f"{counts['resume']} to resume, {counts['fresh']} to train")
    say(f"sweep: {len(runs)} runs ({len(variants)} method(s) x {len(domains)} labeled domain(s){seed_text}): "
        f"{counts['done']} done, {todo}")
    for folder in single_seed_leftovers(out, variants, domains, per_seed):
        say(f"note: {folder} holds a run of a sweep without --seeds, which this sweep does not count; "
            f"move it into {folder}/seed<N>/ (N: the seed in its config.yaml) to reuse it")
    failed: list[str] = []

    def tables() -> str:
        if not master:
            return ""
        return write_tables(out, variants, domains, seeds, cfg, preset_name, failed, per_seed)

    if tables_only:
        return tables(), failed
    for i, run in enumerate(runs, 1):
        where = f"{run.variant.folder} / {run.domain}" + (f" / seed {run.seed}" if per_seed else "")
        name = f"[{i}/{len(runs)}] {where}"
        if run.state == "done":
            say(f"{name}: done, skipping ({run.folder / SUMMARY})")
        else:
            if run.state == "resume":
                say(f"{name}: resuming from {run.folder / CHECKPOINT}")
            else:
                say(f"{name}: training in {run.folder}")
                if master:
                    clear_stale_logs(run.folder)
            try:
                train(run.cfg, run.folder, resume=run.state == "resume", progress=progress)
            except (TrainingError, DataError) as exc:   # one diverged run must not stop the others
                failed.append(f"{run.folder.relative_to(out)}: {exc}")
                say(f"{name}: FAILED: {exc}")
        tables()
    return tables(), failed


def main(args: argparse.Namespace) -> int:
    from synfoc.runtime import prepare_process
    cfg = base_config(args)
    prepare_process(cfg)
    variants = parse_variants(args.methods, args.alpha, args.consistency)
    seeds = parse_seeds(args.seeds, cfg.seed) if args.seeds is not None else None
    domains = [d.strip() for d in args.labeled_domains.split(",") if d.strip()] if args.labeled_domains else None
    out = Path(args.out)
    text, failed = run_sweep(cfg, variants, domains, out, args.preset, progress=not args.no_progress,
                             seeds=seeds, tables_only=args.tables_only)
    if int(os.environ.get("RANK", 0)) == 0:
        print(text)
        print(f"tables: {out / TABLES}, per-seed numbers: {out / SEEDS_CSV}")
        if failed:
            print(f"{len(failed)} run(s) failed; run the same command again to retry them")
    return 1 if failed else 0

"""``synfoc sweep``: one run per (method, labeled domain) and the paper's tables (Tables 3-8).

Every column of the paper's tables is a separate run with that domain labeled; its cell is the
mean DSC over the test sets of ALL domains, and "Avg" is the mean of the columns (method-spec
section 1). The runs live in ``OUT/<variant>/<domain>/`` (plain ``synfoc train`` run folders) and
the tables in ``OUT/sweep.md``. The sweep is resumable: a finished run (valid ``summary.json``) is
skipped, an interrupted one (``checkpoint.pt``) continues from its checkpoint, anything else starts
afresh. Cell values are always read back from each run's ``summary.json``, so a sweep that was
stopped and started again several times gives the same tables as one uninterrupted sweep.

A *variant* is a method, and for SynFoC optionally its alpha strategy and consistency term
(``synfoc:constant:cr``): the ablations of Tables 7 and 8 are variants of SynFoC.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from synfoc.config import TrainConfig, load_yaml, resolve

# Kept here (not imported from synfoc.method) so that building the CLI parser does not import torch.
METHOD_NAMES = {"synfoc": "SynFoC", "base-unet": "Base", "base-foundation": "Base",
                "suponly-unet": "SupOnly", "suponly-foundation": "SupOnly", "samed": "SAMed",
                "fixmatch": "FixMatch"}
ALPHA_NAMES = {"smc": "SMC", "self": "self-only", "mutual": "mutual-only", "constant": "constant 0.5",
               "linear": "linear", "cps": "CPS"}
CONSISTENCY_NAMES = {"cdcr": "CDCR", "cr": "CR", "none": "no CDCR"}
DEFAULT_ALPHA, DEFAULT_CONSISTENCY = "smc", "cdcr"
FOUNDATION_NAMES = {"litemedsam": "LiteMedSAM", "medsam_vit_b": "MedSAM", "sam_vit_b": "SAM-B",
                    "sam_vit_l": "SAM-L", "sam_vit_h": "SAM-H"}
# Settings that change how a run executes or where its data lie, not what it learns: a finished
# or interrupted run is still "the same run" when only these differ from the request.
RUNTIME_SETTINGS = {"dataset", "device", "precision", "compile", "deterministic", "log_every",
                    "checkpoint_every", "eval_every", "grad_checkpointing"}
METRICS = ("dice", "jaccard", "hd95", "asd")
SUMMARY, CHECKPOINT, CONFIG = "summary.json", "checkpoint.pt", "config.yaml"


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
        names = [ALPHA_NAMES[self.alpha] if self.alpha != DEFAULT_ALPHA else None,
                 CONSISTENCY_NAMES[self.consistency] if self.consistency != DEFAULT_CONSISTENCY else None]
        extra = ", ".join(n for n in names if n)
        return METHOD_NAMES[self.method] + (f" ({extra})" if extra else "")

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
    from synfoc.method.baselines import METHODS
    from synfoc.method.synfoc import ALPHA_STRATEGIES, CONSISTENCIES

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


# ----------------------------------------------------------------------------- run folders
@dataclass
class PlannedRun:
    """One (variant, labeled domain) run and what the sweep does with it."""

    variant: Variant
    domain: str
    folder: Path
    cfg: TrainConfig
    state: str            # "done" (skip), "resume" (from checkpoint.pt) or "fresh"


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
    want = wanted.to_dict()
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
def _row_label(variant: Variant, student: str, foundation: str) -> str:
    """``SynFoC_U-Net``, ``SynFoC_MedSAM``, ``SupOnly_U-Net`` (the paper's SynFoC_MedSAM rows)."""
    model = "U-Net" if student == "unet" else FOUNDATION_NAMES.get(foundation, foundation)
    return f"{variant.title}_{model}"


def _students_of(method: str) -> tuple[str, ...]:
    from synfoc.method.baselines import models_of
    return models_of(method)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


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
               classes: list[str] | None = None) -> str:
    """The paper's layout (Tables 3-7): one row per (variant, student), one column per labeled
    domain with the run's mean DSC over all test domains (%), then DSC Avg (mean of the columns)
    and Jaccard (%), 95HD and ASD (pixels) averaged over the columns likewise. With ``classes``
    each domain cell lists the per-part DSC ("cup / disc"). A "*" marks averages over the runs
    finished so far when some are missing."""
    head = "| Method | " + " | ".join(domains) + " | DSC Avg | Jaccard | 95HD | ASD |"
    lines = [head, "|---" * (len(domains) + 5) + "|"]
    for variant in variants:
        for student in _students_of(variant.method):
            cells, means = [], {m: [] for m in METRICS}
            for domain in domains:
                summary = summaries.get((variant, domain))
                res = summary["students"].get(student) if summary else None
                if res is None:
                    cells.append("-")
                    continue
                for m in METRICS:
                    means[m].append(float(res["mean"][m]))
                per_class = _class_means(res, classes) if classes else None
                cells.append(" / ".join(f"{100 * v:.2f}" for v in per_class) if per_class
                             else f"{100 * float(res['mean']['dice']):.2f}")
            if means["dice"]:
                star = "*" if len(means["dice"]) < len(domains) else ""
                avg = [f"{100 * _mean(means['dice']):.2f}{star}", f"{100 * _mean(means['jaccard']):.2f}{star}",
                       f"{_mean(means['hd95']):.2f}{star}", f"{_mean(means['asd']):.2f}{star}"]
            else:
                avg = ["-"] * 4
            lines.append(f"| {_row_label(variant, student, foundation)} | " + " | ".join(cells + avg) + " |")
    return "\n".join(lines) + "\n"


def run_table(variant: Variant, domains: list[str], summaries: dict, foundation: str) -> str:
    """One method's runs: per (student, labeled domain) the DSC on each test domain (%), then the
    run's means over test domains (the source -> target view behind each cell of the main table)."""
    tests: list[str] = []
    for domain in domains:
        summary = summaries.get((variant, domain))
        for res in (summary or {}).get("students", {}).values():
            tests += [d for d in res.get("per_domain", {}) if d not in tests]
    head = ("| Student | labeled | " + " | ".join(f"test {d}" for d in tests)
            + " | DSC | Jaccard | 95HD | ASD |")
    lines = [head, "|---" * (len(tests) + 6) + "|"]
    for student in _students_of(variant.method):
        for domain in domains:
            summary = summaries.get((variant, domain))
            res = summary["students"].get(student) if summary else None
            if res is None:
                lines.append(f"| {_row_label(variant, student, foundation)} | {domain} | "
                             + " | ".join(["-"] * (len(tests) + 4)) + " |")
                continue
            per = res.get("per_domain", {})
            cells = [f"{100 * per[t]['dice']:.2f}" if t in per else "-" for t in tests]
            m = res["mean"]
            cells += [f"{100 * m['dice']:.2f}", f"{100 * m['jaccard']:.2f}", f"{m['hd95']:.2f}", f"{m['asd']:.2f}"]
            lines.append(f"| {_row_label(variant, student, foundation)} | {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_markdown(variants: list[Variant], domains: list[str], summaries: dict, cfg: TrainConfig,
                   preset_name: str | None, failed: list[str] | None = None) -> str:
    """The whole DIR/sweep.md: settings, the main table, per-part table, one table per method."""
    labeled = f"{cfg.labeled_num} labeled cases" if cfg.labeled_num is not None else \
        f"labeled ratio {cfg.labeled_ratio} (int(ratio x all training cases) labeled)"
    done = sum(s is not None for s in summaries.values())
    parts = [
        f"# SynFoC sweep{f' ({preset_name})' if preset_name else ''}\n",
        f"Dataset `{cfg.dataset}`; {labeled} from one domain per column; {cfg.iters} iterations; "
        f"foundation model {cfg.foundation} at {cfg.image_size or 'its native size'}, U-Net at {cfg.unet_size}. "
        f"{done} of {len(variants) * len(domains)} runs finished.\n",
        "Each column is the run whose labeled data come from that domain; its cell is the mean DSC (%) "
        "over the test sets of ALL domains. DSC Avg is the mean of the columns; Jaccard (%), 95HD and "
        "ASD (pixels at the U-Net size) are averaged over the columns likewise. Final students (not "
        "selected on the test sets). A `*` marks an average over the runs finished so far.\n",
        "## DSC by labeled domain\n",
        main_table(variants, domains, summaries, cfg.foundation),
    ]
    classes = _class_names(summaries)
    if classes:
        parts += [f"## DSC per part ({' / '.join(classes)}) by labeled domain\n",
                  main_table(variants, domains, summaries, cfg.foundation, classes)]
    parts.append("## Runs (DSC on each test domain)\n")
    for variant in variants:
        parts += [f"### {variant.title} (`{variant.folder}/`)\n",
                  run_table(variant, domains, summaries, cfg.foundation)]
    if failed:
        parts += ["## Failed runs\n", "\n".join(f"- {f}" for f in failed) + "\n"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the verb
def add_arguments(p: argparse.ArgumentParser) -> None:
    from synfoc.cli import add_setting_options
    add_setting_options(p, dataset_required=True)
    p.add_argument("--out", required=True, help="sweep folder: runs in OUT/<method>/<domain>/, tables in OUT/sweep.md")
    p.add_argument("--methods", default="synfoc",
                   help="comma-separated: synfoc, base-unet, base-foundation, suponly-unet, suponly-foundation, "
                        "samed, fixmatch; synfoc:ALPHA:CONSISTENCY picks SynFoC's options (default: synfoc)")
    p.add_argument("--alpha", help="comma-separated alpha strategies for every plain synfoc entry "
                                   "(smc, self, mutual, constant, linear, cps)")
    p.add_argument("--consistency", help="comma-separated consistency terms for every plain synfoc entry "
                                         "(cdcr, cr, none)")
    p.add_argument("--labeled-domains", help="comma-separated columns (default: every domain of the dataset)")


def base_config(args: argparse.Namespace) -> TrainConfig:
    """The preset, config file and command-line settings shared by every run of the sweep."""
    overrides = {k: getattr(args, k) for k in (
        "dataset", "format", "labeled_num", "labeled_ratio", "iters", "foundation", "checkpoint", "image_size",
        "unet_size", "unet_width", "batch_labeled", "batch_unlabeled", "seed", "device", "precision",
        "grad_checkpointing", "skip_bad")}
    cfg = resolve(args.preset, args.config, overrides)
    # A number on the command line replaces the preset's ratio and vice versa (the split takes one).
    if args.labeled_num is not None:
        cfg = cfg.update({"labeled_ratio": None}, "command line")
    if args.labeled_ratio is not None:
        cfg = cfg.update({"labeled_num": None}, "command line")
    if cfg.dataset != "synthetic" and not Path(cfg.dataset).exists():
        raise ValueError(f"dataset path does not exist: {cfg.dataset}")
    return cfg


def plan_sweep(cfg: TrainConfig, variants: list[Variant], domains: list[str] | None, out: Path):
    """(labeled domains, planned runs): checks the dataset and every run's split before anything
    trains, so a mistake costs seconds, not the first run's hours."""
    from synfoc.data import split_labeled
    from synfoc.data.base import DataError
    from synfoc.train import open_index

    index = open_index(cfg)
    if index.problems and not (cfg.skip_bad and cfg.dataset != "synthetic"):
        raise DataError(f"the dataset has {len(index.problems)} problem(s) (first: {index.problems[0].file}: "
                        f"{index.problems[0].problem}); see `synfoc data check {cfg.dataset}`, or pass --skip-bad")
    domains = domains or list(index.domains)
    unknown = [d for d in domains if d not in index.domains]
    if unknown:
        raise ValueError(f"--labeled-domains: unknown domain(s) {', '.join(unknown)}; "
                         f"this dataset has {', '.join(index.domains)}")
    for domain in domains:
        split_labeled(index, domain, cfg.labeled_num, cfg.labeled_ratio)   # raises DataError early
    runs = [plan_run(v, d, out / v.folder / d, cfg.update({"labeled_domain": d, **v.overrides()}, "sweep"))
            for v in variants for d in domains]
    return domains, runs


def run_sweep(cfg: TrainConfig, variants: list[Variant], domains: list[str] | None, out: Path,
              preset_name: str | None = None, progress: bool = True) -> tuple[str, list[str]]:
    """Train every missing run, then write OUT/sweep.md; returns (its text, failed runs)."""
    from synfoc.data.base import DataError
    from synfoc.train import TrainingError, train

    master = int(os.environ.get("RANK", 0)) == 0
    say = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    domains, runs = plan_sweep(cfg, variants, domains, out)
    counts = {s: sum(r.state == s for r in runs) for s in ("done", "resume", "fresh")}
    say(f"sweep: {len(runs)} runs ({len(variants)} method(s) x {len(domains)} labeled domain(s)): "
        f"{counts['done']} done, {counts['resume']} to resume, {counts['fresh']} to train")
    failed: list[str] = []
    summaries: dict = {}

    def write_tables() -> str:
        text = sweep_markdown(variants, domains, summaries, cfg, preset_name, failed)
        if master:
            out.mkdir(parents=True, exist_ok=True)
            (out / "sweep.md").write_text(text)
        return text

    for i, run in enumerate(runs, 1):
        name = f"[{i}/{len(runs)}] {run.variant.folder} / {run.domain}"
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
                failed.append(f"{run.variant.folder}/{run.domain}: {exc}")
                say(f"{name}: FAILED: {exc}")
        summaries[(run.variant, run.domain)] = read_summary(run.folder) if master else None
        write_tables()
    return write_tables(), failed


def main(args: argparse.Namespace) -> int:
    cfg = base_config(args)
    variants = parse_variants(args.methods, args.alpha, args.consistency)
    domains = [d.strip() for d in args.labeled_domains.split(",") if d.strip()] if args.labeled_domains else None
    out = Path(args.out)
    text, failed = run_sweep(cfg, variants, domains, out, args.preset, progress=not args.no_progress)
    if int(os.environ.get("RANK", 0)) == 0:
        print(text)
        print(f"tables: {out / 'sweep.md'}")
        if failed:
            print(f"{len(failed)} run(s) failed; run the same command again to retry them")
    return 1 if failed else 0

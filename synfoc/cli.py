"""The ``synfoc`` command line: train, evaluate, predict, report, sweep, data check, models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from synfoc.config import CHOICES, SHARED, TRAIN
from synfoc.options import add_setting_options, overrides


def _add_train_options(p: argparse.ArgumentParser) -> None:
    add_setting_options(p, (SHARED, TRAIN))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", help="run folder (default: runs/<method>-<time>); must not hold another run")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its last checkpoint, "
                   "as configured; only --iters, --dataset (the same cases, moved), --device, --precision and "
                   "--checkpoint-every may change")


DESCRIPTION = ("SynFoC semi-supervised medical image segmentation: train, evaluate, predict, report, "
               "sweep, data check and preview, models. 'synfoc COMMAND --help' lists a command's options.")

VERB_MODULES = [
    ("predict", "synfoc.predict", "segment new images or NIfTI volumes with a trained run"),
    ("report", "synfoc.report", "write a self-contained HTML report of a run"),
    ("sweep", "synfoc.sweep", "one run per (method, labeled domain) and the paper's tables"),
]


# The settings `synfoc data preview` draws with (the split, the sizes, the augmentation's seed).
PREVIEW_SETTINGS = {"format", "labeled_domain", "labeled_num", "labeled_ratio", "foundation", "image_size",
                    "unet_size", "seed"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synfoc", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_train_options(sub.add_parser("train", help="train SynFoC (default: the embedded synthetic demo)"))

    p = sub.add_parser("evaluate", help="evaluate a run's students on every domain's test split")
    p.add_argument("run", help="a run folder made by 'synfoc train --out RUN'")
    p.add_argument("--dataset", help="where the run's dataset is now (default: as in its config.yaml); "
                   "must hold the run's training cases")
    p.add_argument("--select-on", choices=["final", "test"], default="final",
                   help="'test': the students kept by --eval-every (selected on the test sets: optimistic)")
    p.add_argument("--device", choices=CHOICES["device"], default="auto",
                   help="where to evaluate (default auto: CUDA when available)")

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="count cases, list label values and every problem")
    c.add_argument("path", help="the dataset folder")
    c.add_argument("--format", default="auto", choices=CHOICES["format"],
                   help="dataset layout (default: auto, recognised from the folder)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c = dsub.add_parser("preview", help="draw what the models train on (weak, strong and intermediate views) as a PNG")
    c.add_argument("path", help="dataset folder, or 'synthetic'")
    c.add_argument("--out", required=True, help="the PNG file to write")
    c.add_argument("--cases", type=int, default=4, help="labeled/unlabeled pairs to draw (default 4)")
    add_setting_options(c, (SHARED, TRAIN), names=PREVIEW_SETTINGS)

    sub.add_parser("models", help="list the foundation models")

    # verbs whose options live beside their code: each module has add_arguments(parser) and main(args)
    for verb, module, text in VERB_MODULES:
        __import__(module, fromlist=["add_arguments"]).add_arguments(sub.add_parser(verb, help=text))
    return parser


# What --resume may change: where the data is now, where and how it runs, and how long.
RESUME_MAY_CHANGE = ("iters", "dataset", "device", "precision", "checkpoint_every")


def absolute_paths(cfg):
    """The dataset and weight files as absolute paths, so that a run folder works from anywhere."""
    paths = {k: str(Path(getattr(cfg, k)).expanduser().resolve()) for k in ("dataset", "checkpoint")
             if getattr(cfg, k) not in (None, "synthetic")}
    return cfg.update(paths, "command line") if paths else cfg


def check_dataset_path(cfg, where: str) -> None:
    if cfg.dataset != "synthetic" and not Path(cfg.dataset).exists():
        raise ValueError(f"dataset path does not exist: {cfg.dataset} ({where}; pass --dataset PATH "
                         "to say where the data is now)" if where else f"dataset path does not exist: {cfg.dataset}")


def prepare_out(out: Path) -> bool:
    """Check that ``out`` can become a new run folder; True when it was created here.

    Refuses a file, a folder that holds a run (finished, resumable, or started without a
    checkpoint: its history and events would mix with the new run's) and a place that cannot
    be written.
    """
    from synfoc.errors import os_error_message, probe_write
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if (out / "checkpoint.pt").exists():
        raise ValueError(f"{out} already holds a run; use --resume {out} to continue it, or another --out")
    leftovers = [n for n in ("config.yaml", "history.jsonl", "tensorboard", "summary.json") if (out / n).exists()]
    if leftovers:
        raise ValueError(f"--out {out} holds another run without a checkpoint ({', '.join(leftovers)}): "
                         "nothing to resume there; choose another --out or delete that folder")
    created = not out.exists()
    try:
        probe_write(out)
    except OSError as exc:
        raise ValueError(f"--out {out}: {os_error_message(exc)}") from None
    return created


def _train(args) -> int:
    from synfoc.config import resolve, validate
    given = overrides(args)
    created = was_empty = False
    if args.resume:
        from synfoc.config import run_config
        out = Path(args.resume)
        if args.out and Path(args.out) != out:
            raise ValueError("--resume continues the run in its own folder; leave out --out")
        cfg = run_config(out)
        extra = [k for k, v in given.items() if v is not None and k not in RESUME_MAY_CHANGE]
        if extra or args.preset or args.config:
            given = [f"--{k.replace('_', '-')}" for k in extra] + ["--preset"] * bool(args.preset) \
                + ["--config"] * bool(args.config)
            raise ValueError(f"--resume continues a run as configured; only "
                             f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may change "
                             f"(got {', '.join(given)})")
        cfg = absolute_paths(cfg.update({k: given[k] for k in RESUME_MAY_CHANGE if given[k] is not None},
                                        "command line"))
        validate(cfg)
        check_dataset_path(cfg, "" if args.dataset else f"as stored in {out / 'config.yaml'}")
    else:
        preset = args.preset or ("demo" if args.dataset in (None, "synthetic") and not args.config else None)
        cfg = validate(absolute_paths(resolve(preset, args.config, given)))
        check_dataset_path(cfg, "")
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.method}-{__import__('time').strftime('%Y%m%d-%H%M%S')}"
        created = prepare_out(out)
        was_empty = not any(out.iterdir())
    from synfoc.runtime import prepare_process
    from synfoc.train import train
    prepare_process(cfg)
    try:
        summary = train(cfg, out, resume=bool(args.resume), progress=not args.no_progress)
    except BaseException:
        # a run that never wrote a checkpoint cannot be resumed: leave no half-written folder
        if was_empty and not (out / "checkpoint.pt").exists():
            import shutil
            for child in ([out] if created else list(out.iterdir())):
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    if summary is not None:
        from synfoc.evaluate import markdown_table
        domains = list(next(iter(summary["students"].values()))["per_domain"])
        table = markdown_table(summary, domains)
        if cfg.baseline and cfg.baseline != cfg.method:  # the same data, sizes, iterations and seed: its rows show what the method adds
            base_out = out / cfg.baseline
            print(f"training the baseline {cfg.baseline} with the same settings into {base_out}", flush=True)
            base = train(cfg.update({"method": cfg.baseline, "baseline": None}, "baseline"), base_out,
                         resume=(base_out / "checkpoint.pt").is_file(), progress=not args.no_progress)
            if base is not None:
                table += "".join(line + "\n" for line in markdown_table(base, domains).splitlines()[2:])
        print(table)
        print(f"run folder: {out}")
    return 0


def _evaluate(args) -> int:
    from synfoc.evaluate import evaluate_run
    evaluate_run(Path(args.run), dataset=args.dataset, select_on=args.select_on, device=args.device)
    return 0


def _models(args) -> int:
    from synfoc.models import list_foundation_models
    rows = list_foundation_models()
    print(f"{'name':<14} {'parameters':>12} {'trainable (r=4)':>16} {'native input':>13}  weights")
    for r in rows:
        print(f"{r['name']:<14} {r['total_params'] / 1e6:>11.1f}M {r['trainable_params'] / 1e6:>15.2f}M "
              f"{r['native_size']:>13}  {r['weights']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Process-wide settings belong to the program, not to `import synfoc`. OpenMP threads that spin
    # while waiting (libgomp's default) make every PyTorch CPU op up to 20x slower as soon as another
    # process shares the cores; passive waiting costs nothing measurable on an idle machine. It must
    # be set before torch starts its thread pool; an explicit OMP_WAIT_POLICY from the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from synfoc.data.base import DataError
    from synfoc.errors import Interrupted, TrainingError, clean_message, os_error_message
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "data":
            from synfoc.data.check import data_check_main
            if args.data_command == "preview":
                from synfoc.preview import preview_main
                return preview_main(args)
            return data_check_main(args.path, args.format, as_json=args.json)
        if args.command == "models":
            return _models(args)
        for verb, module, _ in VERB_MODULES:
            if args.command == verb:
                return __import__(module, fromlist=["main"]).main(args)
    except Interrupted as exc:
        print(f"synfoc: {exc}", file=sys.stderr)
        return 130
    except (DataError, TrainingError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("SYNFOC_DEBUG"):
            raise
        print(f"synfoc: error: {clean_message(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, full disk: name the file instead of a traceback
        if os.environ.get("SYNFOC_DEBUG"):
            raise
        print(f"synfoc: error: {os_error_message(exc, 'cannot use')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"synfoc: interrupted{_kept_after_interrupt(args)}", file=sys.stderr)
        return 130
    return 1


def _kept_after_interrupt(args) -> str:
    """What a Ctrl-C outside the training loop leaves: only ``train`` keeps anything."""
    if args.command != "train":
        return ""
    run = Path(args.resume) if args.resume else (Path(args.out) if args.out else None)
    if run is not None and (run / "checkpoint.pt").is_file():
        return f"; {run / 'checkpoint.pt'} is kept: continue with `synfoc train --resume {run}`"
    return "; no checkpoint was written, so there is nothing to resume"

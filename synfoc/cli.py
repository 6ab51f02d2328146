"""The ``synfoc`` command line: train, evaluate, predict, report, sweep, data check, models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from synfoc.config import PRESETS


def add_setting_options(p: argparse.ArgumentParser, dataset_required: bool = False) -> None:
    """The settings that ``train`` and ``sweep`` share (fields of :class:`synfoc.config.TrainConfig`)."""
    p.add_argument("--preset", choices=PRESETS, help="the paper's settings for a dataset (YAML inside the package)")
    p.add_argument("--config", help="a YAML file of settings (overrides the preset)")
    p.add_argument("--dataset", required=dataset_required, help="dataset folder, or 'synthetic' (the embedded default)")
    p.add_argument("--format", choices=["auto", "fundus", "prostate", "mnms", "busi", "folder"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labeled-num", type=int, help="the first N sorted training cases of the labeled domain")
    g.add_argument("--labeled-ratio", type=float, help="int(ratio * all training cases) labeled cases (BUSI: 0.125, 0.25)")
    p.add_argument("--iters", type=int)
    p.add_argument("--batch-labeled", type=int)
    p.add_argument("--batch-unlabeled", type=int)
    p.add_argument("--foundation", help="litemedsam, medsam_vit_b, sam_vit_b, sam_vit_l, sam_vit_h")
    p.add_argument("--checkpoint", help="foundation-model weights (.pth, segment_anything format)")
    p.add_argument("--image-size", type=int, help="foundation-model input size")
    p.add_argument("--unet-size", type=int, help="U-Net input (patch) size")
    p.add_argument("--unet-width", type=int, help="U-Net base width (paper: 64)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute foundation-encoder activations in the backward pass (less memory)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="train without the cases `synfoc data check` reports problems for")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    add_setting_options(p)
    p.add_argument("--out", help="run folder (default: runs/<method>-<time>)")
    p.add_argument("--labeled-domain")
    p.add_argument("--method", help="synfoc, base-unet, base-foundation, suponly-unet, suponly-foundation, samed, fixmatch")
    p.add_argument("--alpha", choices=["smc", "self", "mutual", "constant", "linear", "cps"])
    p.add_argument("--consistency", choices=["cdcr", "cr", "none"])
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--deterministic", action="store_true", default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the students")
    p.add_argument("--eval-every", type=int, help="also evaluate on the test sets every K iterations "
                   "and keep the best (the authors' optimistic protocol; see evaluate --select-on test)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its last checkpoint")


VERB_MODULES = [
    ("predict", "synfoc.predict", "segment new images or NIfTI volumes with a trained run"),
    ("report", "synfoc.report", "write a self-contained HTML report of a run"),
    ("sweep", "synfoc.sweep", "one run per (method, labeled domain) and the paper's tables"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synfoc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_train_options(sub.add_parser("train", help="train SynFoC (default: the embedded synthetic demo)"))

    p = sub.add_parser("evaluate", help="evaluate a run's students on every domain's test split")
    p.add_argument("run")
    p.add_argument("--dataset", help="dataset folder (default: the run's)")
    p.add_argument("--select-on", choices=["final", "test"], default="final",
                   help="'test': the students kept by --eval-every (selected on the test sets: optimistic)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="count cases, list label values and every problem")
    c.add_argument("path")
    c.add_argument("--format", default="auto", choices=["auto", "fundus", "prostate", "mnms", "busi", "folder"])
    c.add_argument("--json", action="store_true")
    c = dsub.add_parser("preview", help="draw what the models train on (weak, strong and intermediate views) as a PNG")
    c.add_argument("path", help="dataset folder, or 'synthetic'")
    c.add_argument("--out", required=True, help="the PNG file to write")
    c.add_argument("--cases", type=int, default=4, help="labeled/unlabeled pairs to draw (default 4)")
    c.add_argument("--preset", choices=PRESETS, help="the paper's settings for a dataset (sizes, augmentation)")
    c.add_argument("--config", help="a YAML file of settings (overrides the preset)")
    c.add_argument("--format", choices=["auto", "fundus", "prostate", "mnms", "busi", "folder"])
    c.add_argument("--labeled-domain")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--labeled-num", type=int)
    g.add_argument("--labeled-ratio", type=float)
    c.add_argument("--foundation", help="foundation model (its native input size unless --image-size)")
    c.add_argument("--image-size", type=int, help="foundation-model input size")
    c.add_argument("--unet-size", type=int, help="U-Net input size")
    c.add_argument("--seed", type=int, help="seed of the augmentation draws")

    sub.add_parser("models", help="list the foundation models")

    # verbs whose options live beside their code: each module has add_arguments(parser) and main(args)
    for verb, module, text in VERB_MODULES:
        __import__(module, fromlist=["add_arguments"]).add_arguments(sub.add_parser(verb, help=text))
    return parser


def _train(args) -> int:
    from synfoc.config import resolve
    from synfoc.train import train
    overrides = {k: getattr(args, k) for k in (
        "dataset", "format", "labeled_domain", "labeled_num", "labeled_ratio", "method", "alpha", "consistency",
        "iters", "batch_labeled", "batch_unlabeled", "foundation", "checkpoint", "image_size", "unet_size",
        "unet_width", "lora_rank", "grad_checkpointing", "seed", "device", "precision", "deterministic", "compile",
        "eval_every", "skip_bad")}
    if args.resume:
        from synfoc.config import run_config
        out = Path(args.resume)
        cfg = run_config(out)
        extra = {k: v for k, v in overrides.items() if v is not None and k != "iters"}
        if extra:
            raise ValueError(f"--resume continues a run as configured; only --iters may change (got {', '.join(extra)})")
        if args.iters:
            cfg = cfg.update({"iters": args.iters}, "command line")
    else:
        preset = args.preset or ("demo" if args.dataset in (None, "synthetic") and not args.config else None)
        cfg = resolve(preset, args.config, overrides)
        if cfg.dataset != "synthetic" and not Path(cfg.dataset).exists():
            raise ValueError(f"dataset path does not exist: {cfg.dataset}")
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.method}-{__import__('time').strftime('%Y%m%d-%H%M%S')}"
        if (out / "checkpoint.pt").exists():
            raise ValueError(f"{out} already holds a run; use --resume {out} to continue it, or another --out")
    summary = train(cfg, out, resume=bool(args.resume), progress=not args.no_progress)
    if summary is not None:
        from synfoc.evaluate import markdown_table
        domains = list(next(iter(summary["students"].values()))["per_domain"])
        print(markdown_table(summary, domains))
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
    args = build_parser().parse_args(argv)
    from synfoc.data.base import DataError
    from synfoc.train import TrainingError
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
    except (DataError, TrainingError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("SYNFOC_DEBUG"):
            raise
        print(f"synfoc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synfoc: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    return 1

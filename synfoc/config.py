"""Typed training configuration with the paper's defaults; presets per dataset as YAML files.

Precedence: dataclass defaults < preset (``--preset``) < ``--config FILE.yaml`` < command line.
The resolved configuration is written into every run folder as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

PRESETS = ("prostate", "fundus", "mnms", "busi", "acdc", "mscmrseg", "demo")


@dataclass
class TrainConfig:
    # data
    dataset: str = "synthetic"            # a path, or "synthetic" (the embedded default)
    format: str = "auto"
    labeled_domain: str | None = None     # default: the first domain
    labeled_num: int | None = None
    labeled_ratio: float | None = None
    unlabeled_domains: list[str] | None = None   # None: the rest of the labeled domain and every other domain
    test_domains: list[str] | None = None        # None: every domain
    skip_bad: bool = False
    # method
    method: str = "synfoc"
    alpha: str = "smc"
    consistency: str = "cdcr"
    threshold: float = 0.95
    ema_decay: float = 0.99
    teacher_mode: str = "train"           # the published script keeps both teachers in train mode
    recalibrate_bn: bool = True           # U-Net BatchNorm statistics from weak training views at the end
    baseline: str | None = None           # also train this method (if not --method) with the same settings into RUN/<method>/
    # models
    foundation: str = "litemedsam"
    checkpoint: str | None = None
    image_size: int | None = None         # foundation input size (None: the model's native size)
    lora_rank: int = 4
    grad_checkpointing: bool = False
    unet_size: int = 256                  # U-Net patch size
    unet_width: int = 64
    # optimisation
    iters: int = 30000
    batch_labeled: int = 4
    batch_unlabeled: int = 4
    lr_unet: float = 0.03
    momentum_unet: float = 0.9
    weight_decay_unet: float = 1e-4
    lr_foundation: float = 1e-4
    weight_decay_foundation: float = 0.1
    # augmentation
    brightness: list[float] = field(default_factory=lambda: [0.1, 2.0])
    contrast: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # run
    seed: int = 1337
    device: str = "auto"                  # cpu | cuda | auto
    precision: str = "auto"               # auto | bf16 | fp32
    compile: bool = False
    deterministic: bool = False
    log_every: int = 10
    checkpoint_every: int | None = None   # None: about 20 per run (see checkpoint_interval), and every 10 minutes
    eval_every: int = 0                   # >0: evaluate on the test sets every K iterations (--select-on test)
    synthetic_train: int = 40             # cases per domain of the embedded default
    synthetic_test: int = 12
    synthetic_classes: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def update(self, values: dict, source: str) -> "TrainConfig":
        unknown = set(values) - self.field_names()
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
        values = dict(values)
        for f in dataclasses.fields(self):
            v, kind = values.get(f.name), str(f.type).replace(" | None", "")
            if v is None or kind not in ("float", "int", "bool"):
                continue
            try:
                if kind == "bool" and isinstance(v, str):
                    values[f.name] = {"true": True, "false": False}[v.lower()]
                elif kind != "bool":
                    values[f.name] = int(v) if kind == "int" else float(v)
            except (KeyError, ValueError):
                raise ValueError(f"{source}: {f.name} must be a {kind}, got {v!r}") from None
        if values.get("labeled_num") is not None:   # the last one given wins
            values.setdefault("labeled_ratio", None)
        elif values.get("labeled_ratio") is not None:
            values.setdefault("labeled_num", None)
        return dataclasses.replace(self, **values)


# Choices of the string settings (also the command line's choices).
METHODS = ("synfoc", "base-unet", "base-foundation", "suponly-unet", "suponly-foundation", "samed", "fixmatch")
CHOICES = {
    "method": METHODS,
    "format": ("auto", "fundus", "prostate", "mnms", "busi", "acdc", "mscmrseg", "folder"),
    "alpha": ("smc", "self", "mutual", "constant", "linear", "cps"),
    "consistency": ("cdcr", "cr", "none"),
    "teacher_mode": ("train", "eval"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "bf16", "fp32"),
}
# Settings that are command-line options (named as such in messages); the rest are YAML settings.
COMMAND_LINE = {"dataset", "format", "labeled_domain", "labeled_num", "labeled_ratio", "unlabeled_domains",
                "test_domains", "skip_bad", "method",
                "alpha", "consistency", "foundation", "checkpoint", "image_size", "lora_rank",
                "grad_checkpointing", "unet_size", "unet_width", "iters", "batch_labeled", "batch_unlabeled",
                "seed", "device", "precision", "compile", "deterministic", "checkpoint_every", "eval_every"}


def option_name(name: str) -> str:
    """How a setting is spelled where users give it: ``--batch-labeled`` or ``lr_unet (setting)``."""
    return "--" + name.replace("_", "-") if name in COMMAND_LINE else f"{name} (setting)"


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse settings that would fail later or silently train nonsense, naming the option.

    Raises ValueError listing every bad setting; returns ``cfg`` unchanged otherwise.
    """
    bad: list[str] = []

    def need(name: str, ok: bool, rule: str) -> None:
        if not ok:
            bad.append(f"{option_name(name)} must be {rule}, not {getattr(cfg, name)!r}")

    for name in ("iters", "batch_labeled", "batch_unlabeled", "unet_width", "log_every",
                 "synthetic_train", "synthetic_test", "synthetic_classes"):
        need(name, isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1, "an integer >= 1")
    if cfg.method in ("synfoc", "fixmatch") or cfg.method.endswith("unet"):
        need("unet_size", isinstance(cfg.unet_size, int) and cfg.unet_size >= 16 and cfg.unet_size % 16 == 0,
             "a multiple of 16 (the U-Net halves it four times)")
    else:  # metrics are still computed at this size
        need("unet_size", isinstance(cfg.unet_size, int) and cfg.unet_size >= 1, "an integer >= 1")
    if cfg.image_size is not None:
        need("image_size", isinstance(cfg.image_size, int) and cfg.image_size >= 32, "an integer >= 32")
    need("lora_rank", isinstance(cfg.lora_rank, int) and cfg.lora_rank >= 0, "an integer >= 0")
    need("eval_every", isinstance(cfg.eval_every, int) and cfg.eval_every >= 0, "an integer >= 0 (0: never)")
    if cfg.checkpoint_every is not None:
        need("checkpoint_every", isinstance(cfg.checkpoint_every, int) and cfg.checkpoint_every >= 1,
             "an integer >= 1")
    if cfg.labeled_num is not None:
        need("labeled_num", cfg.labeled_num >= 1, "at least 1")
    if cfg.labeled_ratio is not None:
        need("labeled_ratio", 0 < cfg.labeled_ratio <= 1, "in (0, 1]")
    for name in ("threshold", "ema_decay"):
        need(name, 0 <= getattr(cfg, name) <= 1, "in [0, 1]")
    need("momentum_unet", 0 <= cfg.momentum_unet < 1, "in [0, 1)")
    for name in ("lr_unet", "lr_foundation"):
        need(name, getattr(cfg, name) > 0, "> 0")
    for name in ("weight_decay_unet", "weight_decay_foundation"):
        need(name, getattr(cfg, name) >= 0, ">= 0")
    for name in ("brightness", "contrast"):
        v = getattr(cfg, name)
        need(name, isinstance(v, (list, tuple)) and len(v) == 2
             and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and 0 < v[0] <= v[1],
             "[low, high] with 0 < low <= high")
    for name, choices in CHOICES.items():
        need(name, getattr(cfg, name) in choices, f"one of {', '.join(choices)}")
    if cfg.baseline is not None:
        need("baseline", cfg.baseline in METHODS, f"one of {', '.join(METHODS)}")
    need("dataset", isinstance(cfg.dataset, str) and cfg.dataset.strip() != "", "a folder or 'synthetic'")
    for name in ("unlabeled_domains", "test_domains"):   # checked against the dataset when it is opened
        v = getattr(cfg, name)
        if v is not None:
            need(name, isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v)
                 and all(isinstance(d, str) and d.strip() for d in v),
                 "a non-empty list of distinct domain names (comma-separated on the command line)")
    if bad:
        raise ValueError("; ".join(bad))
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of setting: value")
    return data


def run_config(run: str | Path) -> TrainConfig:
    """The resolved settings a run folder was trained with (its ``config.yaml``)."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run} is not a synfoc run folder (no config.yaml)")
    return TrainConfig().update(load_yaml(path), str(path))


def preset(name: str) -> dict:
    """The settings the paper fixes for a dataset (``synfoc/presets/NAME.yaml``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    text = resources.files("synfoc.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def resolve(preset_name: str | None = None, config_file: str | None = None,
            overrides: dict | None = None) -> TrainConfig:
    cfg = TrainConfig()
    if preset_name:
        cfg = cfg.update(preset(preset_name), f"preset {preset_name}")
    if config_file:
        cfg = cfg.update(load_yaml(config_file), config_file)
    if overrides:
        cfg = cfg.update({k: v for k, v in overrides.items() if v is not None}, "command line")
    return cfg

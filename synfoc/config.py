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

# Where a setting is a command-line option: "shared" by ``synfoc train`` and ``synfoc sweep``,
# "train" (the sweep sets these per run: method, labeled domain, ...); unmarked settings are YAML only.
SHARED, TRAIN = "shared", "train"


def option(default=None, help: str = "", *, scope: str = SHARED, metavar: str | None = None,
           exclusive: str | None = None, listed: bool = False, factory=None):
    """A setting that is also the command-line option ``--NAME-WITH-DASHES`` (see synfoc.options).
    ``exclusive``: options of one group may not be given together. ``listed``: its CHOICES are
    listed in the help and checked by :func:`validate` (one line), not by argparse (usage text)."""
    meta = {"help": help, "scope": scope, "metavar": metavar, "exclusive": exclusive, "listed": listed}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # data
    dataset: str = option("synthetic", "dataset folder, or 'synthetic' (the embedded default)")
    format: str = option("auto", "dataset layout (default: auto, recognised from the folder)")
    labeled_domain: str | None = option(None, "the domain (site) whose first training cases are labeled "
                                        "(default: the dataset's first domain)", scope=TRAIN)
    labeled_num: int | None = option(None, "the first N sorted training cases of the labeled domain",
                                     exclusive="labeled")
    labeled_ratio: float | None = option(None, "int(ratio * all training cases) labeled cases (BUSI: 0.125, 0.25)",
                                         exclusive="labeled")
    # None: the rest of the labeled domain and every other domain
    unlabeled_domains: list[str] | None = option(
        None, "domains whose training cases are used unlabeled (default: the rest of the labeled domain and "
        "every other domain). UDA: --labeled-ratio 1.0 --unlabeled-domains LGE", metavar="D1,D2")
    test_domains: list[str] | None = option(None, "domains whose test cases are evaluated (default: every domain)",
                                            metavar="D1,D2")
    skip_bad: bool = option(False, "train without the cases `synfoc data check` reports problems for")
    # method
    method: str = option("synfoc", "the method, SynFoC or a baseline", scope=TRAIN, listed=True)
    alpha: str = option("smc", "SynFoC's per-image mixing weight of the two teachers (default smc; the rest "
                        "are ablations)", scope=TRAIN)
    consistency: str = option("cdcr", "SynFoC's consistency regulariser (default cdcr; the rest are ablations)",
                              scope=TRAIN)
    threshold: float = 0.95
    ema_decay: float = 0.99
    teacher_mode: str = "train"           # the published script keeps both teachers in train mode
    recalibrate_bn: bool = True           # U-Net BatchNorm statistics from weak training views at the end: pooled, and per domain for evaluating each
    baseline: str | None = None           # also train this method (if not --method) with the same settings into RUN/<method>/
    # models
    foundation: str = option("litemedsam", "the foundation model (`synfoc models` lists them; default litemedsam)")
    checkpoint: str | None = option(None, "foundation-model weights (.pth, segment_anything format)")
    image_size: int | None = option(None, "foundation-model input size (default: the model's native size)")
    lora_rank: int = option(4, "rank of the foundation encoder's LoRA adapters (default 4; 0: none)", scope=TRAIN)
    grad_checkpointing: bool = option(False, "recompute foundation-encoder activations in the backward pass "
                                      "(less memory)")
    unet_size: int = option(256, "U-Net input (patch) size")
    unet_width: int = option(64, "U-Net base width (paper: 64)")
    # optimisation
    iters: int = option(30000, "training iterations (>= 1; default 30000, presets set the paper's)")
    batch_labeled: int = option(4, "labeled images per iteration and process (>= 1; default 4)")
    batch_unlabeled: int = option(4, "unlabeled images per iteration and process (>= 1; default 4)")
    lr_unet: float = 0.03
    momentum_unet: float = 0.9
    weight_decay_unet: float = 1e-4
    lr_foundation: float = 1e-4
    weight_decay_foundation: float = 0.1
    # augmentation
    brightness: list[float] = field(default_factory=lambda: [0.1, 2.0])
    contrast: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # run
    seed: int = option(1337, "seed of the initialisation, data order and augmentation (default 1337)")
    device: str = option("auto", "where to train (default auto: CUDA when available)")
    precision: str = option("auto", "auto (default): bf16 autocast on CUDA and on CPUs with bf16 support, else fp32")
    compile: bool = option(False, "torch.compile the students", scope=TRAIN)
    deterministic: bool = option(False, "deterministic PyTorch kernels (slower; same results run to run on one "
                                 "machine)", scope=TRAIN)
    log_every: int = 10
    # None: about 20 per run (see checkpoint_interval), and every 10 minutes
    checkpoint_every: int | None = option(None, "write checkpoint.pt every K iterations (default: about 20 per "
                                          "run); one is also written after every 10 minutes of training and on "
                                          "Ctrl-C", metavar="K")
    # >0: evaluate on the test sets every K iterations (--select-on test)
    eval_every: int = option(0, "also evaluate on the test sets every K iterations and keep the best (the authors' "
                             "optimistic protocol; see evaluate --select-on test)", scope=TRAIN)
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


def _choices() -> dict[str, tuple[str, ...]]:
    from synfoc.data.formats import FORMATS
    from synfoc.method.registry import ALPHA_STRATEGIES, CONSISTENCIES, METHODS
    return {"method": tuple(METHODS), "format": ("auto", *FORMATS), "alpha": tuple(ALPHA_STRATEGIES),
            "consistency": tuple(CONSISTENCIES), "teacher_mode": ("train", "eval"),
            "device": ("auto", "cpu", "cuda"), "precision": ("auto", "bf16", "fp32")}


# Choices of the string settings (also the command line's choices), from the registries.
CHOICES = _choices()
METHODS = CHOICES["method"]
# Settings that are command-line options (named as such in messages); the rest are YAML settings.
COMMAND_LINE = {f.name for f in dataclasses.fields(TrainConfig) if "scope" in f.metadata}


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

"""Command-line options made from the settings: every field of :class:`synfoc.config.TrainConfig`
marked with :func:`synfoc.config.option` becomes ``--name-with-dashes``, with its type, help and
the choices of :data:`synfoc.config.CHOICES` (the registries). ``synfoc train``, ``synfoc sweep`` and
``synfoc data preview`` read their settings from the parsed arguments by the same names."""

from __future__ import annotations

import argparse
import dataclasses

from synfoc.config import CHOICES, PRESETS, SHARED, TRAIN, TrainConfig


def domain_list(text: str) -> list[str]:
    """``A,B`` -> ["A", "B"] (empty names dropped; an empty list is refused by validate)."""
    return [d.strip() for d in text.split(",") if d.strip()]


def setting_options(scopes: tuple[str, ...] = (SHARED, TRAIN)) -> list[dataclasses.Field]:
    """The settings that are command-line options in one of ``scopes``, in the config's order."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("scope") in scopes]


def overrides(args: argparse.Namespace, scopes: tuple[str, ...] = (SHARED, TRAIN)) -> dict:
    """The settings given on the command line (None: not given) of the options of ``scopes``."""
    return {f.name: getattr(args, f.name, None) for f in setting_options(scopes)}


def add_option(p, f: dataclasses.Field) -> None:
    """``--NAME`` for the setting ``f``: None when not given, so that presets and files stay in force."""
    kind = str(f.type).replace(" | None", "")
    name = "--" + f.name.replace("_", "-")
    extra = {"metavar": f.metadata["metavar"]} if f.metadata.get("metavar") else {}
    if kind == "bool":
        p.add_argument(name, action="store_true", default=None, help=f.metadata["help"])
    elif kind == "list[str]":
        p.add_argument(name, type=domain_list, help=f.metadata["help"], **extra)
    elif f.metadata.get("listed"):
        p.add_argument(name, help=f"{f.metadata['help']}: {', '.join(CHOICES[f.name])}", **extra)
    else:
        convert = {"int": int, "float": float}.get(kind)
        p.add_argument(name, **({"type": convert} if convert else {}), choices=CHOICES.get(f.name),
                       help=f.metadata["help"], **extra)


def add_setting_options(p: argparse.ArgumentParser, scopes: tuple[str, ...] = (SHARED,),
                        dataset_required: bool = False, names: set[str] | None = None) -> None:
    """``--preset``, ``--config`` and the options of the settings of ``scopes`` (only ``names``
    when given); options of one ``exclusive`` group exclude each other."""
    p.add_argument("--preset", choices=PRESETS, help="the paper's settings for a dataset (YAML inside the package)")
    p.add_argument("--config", help="a YAML file of settings (overrides the preset)")
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in setting_options(scopes):
        if names is not None and f.name not in names:
            continue
        group = f.metadata.get("exclusive")
        if group and group not in groups:
            groups[group] = p.add_mutually_exclusive_group()
        target = groups[group] if group else p
        if f.name == "dataset":
            target.add_argument("--dataset", required=dataset_required, help=f.metadata["help"])
        else:
            add_option(target, f)

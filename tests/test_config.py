"""Settings have one source: TrainConfig's fields and the registries make the command-line options,
their choices and the sweep's names; config.yaml records what a run resolved."""

from __future__ import annotations

import yaml

from synfoc.cli import build_parser
from synfoc.config import CHOICES, COMMAND_LINE, SHARED, TrainConfig, resolve
from synfoc.method.registry import ALPHA_STRATEGIES, CONSISTENCIES, METHODS
from synfoc.options import overrides, setting_options


def subparser(name: str):
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[name]


def option_dests(parser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings}


def test_command_line_options_are_the_settings_marked_as_options():
    train, sweep = subparser("train"), subparser("sweep")
    assert COMMAND_LINE <= option_dests(train)
    assert {f.name for f in setting_options((SHARED,))} <= option_dests(sweep)
    args = train.parse_args(["--method", "fixmatch", "--labeled-num", "3", "--test-domains", "a,b", "--compile"])
    given = {k: v for k, v in overrides(args).items() if v is not None}
    assert set(overrides(args)) == COMMAND_LINE
    assert given == {"method": "fixmatch", "labeled_num": 3, "test_domains": ["a", "b"], "compile": True}
    assert resolve(None, None, given).labeled_num == 3


def test_choices_come_from_the_registries():
    train = subparser("train")
    choices = {a.dest: tuple(a.choices) for a in train._actions if a.choices}
    assert choices["alpha"] == tuple(ALPHA_STRATEGIES) and choices["consistency"] == tuple(CONSISTENCIES)
    # --method is checked by validate (one line naming the option); its help lists the registry
    assert CHOICES["method"] == tuple(METHODS)
    assert all(name in " ".join(train.format_help().split()) for name in METHODS)
    assert all(name in " ".join(subparser("sweep").format_help().split()) for name in METHODS)


def test_labeled_num_and_ratio_exclude_each_other_and_the_last_given_wins(capsys):
    import pytest
    with pytest.raises(SystemExit):
        subparser("train").parse_args(["--labeled-num", "3", "--labeled-ratio", "0.5"])
    assert "not allowed with argument" in capsys.readouterr().err
    busi = resolve("busi")
    assert busi.labeled_ratio is not None
    assert (resolve("busi", overrides={"labeled_num": 5}).labeled_num,
            resolve("busi", overrides={"labeled_num": 5}).labeled_ratio) == (5, None)


def test_config_yaml_names_the_foundation_input_size_trained_at(tmp_path):
    """A run at the foundation model's native size records that size, not ``image_size: null``;
    a sweep still recognises a folder written before (null) as the same run."""
    from synfoc.sweep import config_differences
    from synfoc.train import train
    cfg = TrainConfig(method="suponly-unet", iters=1, unet_size=32, unet_width=4, batch_labeled=2, batch_unlabeled=2,
                      synthetic_train=2, synthetic_test=1, labeled_num=2, device="cpu", precision="fp32")
    train(cfg, tmp_path / "run", progress=False)
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["image_size"] == 256   # LiteMedSAM's native size
    assert config_differences({**stored, "image_size": None}, cfg) == []
    assert config_differences(stored, cfg.update({"image_size": 128}, "test")) == ["image_size: 256 -> 128"]

"""vlmlab.config: YAML, flags and key=value overrides fill one frozen dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from vlmlab.config import ConfigError, add_config_arguments, build_config, config_from_args


@dataclass(frozen=True)
class Example:
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    epochs: int = field(default=10, metadata={"help": "epochs"})
    use_gpu: bool = field(default=False, metadata={"help": "train on GPUs"})
    targets: tuple[str, ...] = field(default=("q_proj",), metadata={"help": "module names"})
    adapter: str | None = field(default=None, metadata={"help": "adapter dir"})


def test_precedence_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nepochs: 3\ntargets: [a, b]\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example)
    args = parser.parse_args(["--epochs", "5", "--use-gpu"])
    cfg = config_from_args(Example, args, path, ["lr=0.5", "adapter=x"])
    assert cfg == Example(lr=0.5, epochs=5, use_gpu=True, targets=("a", "b"), adapter="x")


def test_unknown_keys_and_bad_values_fail_loudly():
    with pytest.raises(ConfigError, match="no field 'lrr'"):
        build_config(Example, {"lrr": 1})
    with pytest.raises(ConfigError, match="expected int"):
        build_config(Example, {"epochs": "many"})
    with pytest.raises(ConfigError, match="not key=value"):
        config_from_args(Example, argparse.Namespace(), None, ["epochs"])


def test_comma_lists_and_booleans():
    cfg = build_config(Example, {"targets": "q,k,v", "use_gpu": "yes"})
    assert cfg.targets == ("q", "k", "v") and cfg.use_gpu is True


@dataclass(frozen=True)
class Inner:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    name: str = field(default="inner", metadata={"help": "run name"})


@dataclass(frozen=True)
class Outer:
    name: str = field(default="outer", metadata={"help": "search name"})
    trials: int = field(default=2, metadata={"help": "trials"})
    trial: Inner = field(default_factory=lambda: Inner(lr=5e-4), metadata={"help": "the trainer's config"})


def test_sections_take_nested_yaml_dotted_and_short_keys(tmp_path):
    assert build_config(Outer).trial == Inner(lr=5e-4)  # the section's declared default, not Inner()'s
    path = tmp_path / "s.yaml"
    path.write_text("trials: 3\ntrial:\n  lr: 0.01\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Outer)
    assert not any(a.dest == "trial" for a in parser._actions)  # a section has no flag of its own
    cfg = config_from_args(Outer, parser.parse_args(["--trials", "4"]), path, ["trial.name=t1"])
    assert cfg == Outer(trials=4, trial=Inner(lr=0.01, name="t1"))
    # a short key reaches the one section that has it; the top level wins where both have it
    assert build_config(Outer, {"lr": "0.2", "name": "s"}) == Outer(name="s", trial=Inner(lr=0.2))
    with pytest.raises(ConfigError, match="no field 'trial.lrr'"):
        build_config(Outer, {"trial.lrr": 1})
    with pytest.raises(ConfigError, match="trial.lr"):  # the valid names list the section's fields by path
        build_config(Outer, {"epochs": 1})

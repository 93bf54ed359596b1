"""One way to configure a job: a frozen dataclass filled from defaults, a YAML file, flags and
``key=value`` overrides, in that order of precedence (later wins).

Each job declares ``SomethingConfig`` with ``field(default=..., metadata={"help": ...})``; the
command line is generated from those fields, so a flag, a YAML key and an override all name the
same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file, flag or override names an unknown field or holds a value of the wrong type."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_sequence) of an annotation, unwrapping ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    inner, is_seq = _base_type(tp)
    if value is None:
        return None
    if is_seq:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        items = [_coerce(name, inner, v) for v in value]
        return tuple(items) if typing.get_origin(tp) is tuple or _is_tuple(tp) else list(items)
    if inner is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if inner in (int, float, str, bool):
        try:
            return inner(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: expected {inner.__name__}, got {value!r}") from exc
    return value


def _is_tuple(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(tp))
    return origin is tuple


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Turn ``["lr=1e-4", "epochs=3"]`` into a dict; a pair without ``=`` is an error."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out


def build_config(cls: type[C], *sources: dict[str, Any] | None) -> C:
    """Instantiate ``cls`` from its defaults updated by each source dict in turn.

    Unknown keys raise ``ConfigError`` naming the valid ones, so a typo never passes silently.
    """
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    for source in sources:
        for key, value in (source or {}).items():
            if key not in types_:
                raise ConfigError(f"{cls.__name__} has no field {key!r}; fields: {', '.join(types_)}")
            values[key] = _coerce(key, types_[key], value)
    return cls(**values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field (help from the field's metadata); defaults stay unset
    so that only flags the user typed override the YAML file."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and not isinstance(default, (list, tuple)):
            help_ = f"{help_} (default: {default})"
        inner, is_seq = _base_type(_field_types(cls)[f.name])
        if inner is bool and not is_seq:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif is_seq:
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_)


def config_from_args(cls: type[C], args: argparse.Namespace, config_file: str | Path | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Fill ``cls`` from a YAML file, then the flags the user typed, then ``key=value`` overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return build_config(cls, load_yaml(config_file) if config_file else None, flags, parse_overrides(overrides))

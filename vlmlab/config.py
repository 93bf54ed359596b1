"""One way to configure a job: a frozen dataclass filled from defaults, a YAML file, flags and
``key=value`` overrides, in that order of precedence (later wins).

Each job declares ``SomethingConfig`` with ``field(default=..., metadata={"help": ...})``; the
command line is generated from those fields, so a flag, a YAML key and an override all name the
same thing.

A field whose type is itself a config dataclass is a *section* (a Tune search holds its trainer's
whole config as ``trial``): in YAML a nested mapping, as an override ``trial.lr=1e-4``, or just
``lr=1e-4`` when exactly one place has that name (the top level wins over sections).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file, flag or override names an unknown field or holds a value of the wrong type."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _sections(cls: type) -> dict[str, type]:
    """The section fields of ``cls``: name -> config dataclass."""
    return {name: tp for name, tp in _field_types(cls).items() if dataclasses.is_dataclass(tp)}


def _resolve(cls: type, key: str) -> list[str] | None:
    """The field path a key names in ``cls`` (``"trial.lr"``, or ``"lr"`` found in one section), None if none."""
    head, _, rest = key.partition(".")
    types_ = _field_types(cls)
    if rest:
        section = _sections(cls).get(head)
        sub = _resolve(section, rest) if section else None
        return [head, *sub] if sub else None
    if key in types_:
        return [key]
    found = [[name, *sub] for name, section in _sections(cls).items() if (sub := _resolve(section, key))]
    if len(found) > 1:
        raise ConfigError(f"{cls.__name__}: {key!r} is in several sections; write "
                          f"{' or '.join('.'.join(f) for f in found)}")
    return found[0] if found else None


def _field_names(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _field_types(cls).items():
        out += _field_names(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return out


def _flatten(cls: type, source: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(key, value)`` pairs of a source mapping; a nested mapping under a section name is opened up."""
    out = []
    sections = _sections(cls)
    for key, value in source.items():
        if key in sections and isinstance(value, dict):
            out += _flatten(sections[key], value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def _instantiate(cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """``cls`` from nested ``values`` on top of ``base`` (an instance) or the declared defaults."""
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(types_[name]):
            section_base = getattr(base, name) if base is not None else _default(cls, name)
            kwargs[name] = _instantiate(types_[name], value, section_base)
        else:
            kwargs[name] = _coerce(name, types_[name], value)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


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

    Keys may name section fields by path (``trial.lr``) or alone when unambiguous (``lr``); a source
    may also hold a nested mapping per section. Unknown keys raise ``ConfigError`` naming the valid
    ones, so a typo never passes silently.
    """
    values: dict[str, Any] = {}
    for source in sources:
        for key, value in _flatten(cls, source or {}):
            path = _resolve(cls, key)
            if path is None:
                raise ConfigError(f"{cls.__name__} has no field {key!r}; fields: {', '.join(_field_names(cls))}")
            node = values
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    return _instantiate(cls, values)


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
        if f.name in skip or dataclasses.is_dataclass(_field_types(cls)[f.name]):
            continue  # sections are set in the YAML file or by key=value overrides
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


def absolute_paths(cfg: C, names: Sequence[str], specs: Sequence[str] = ("model",)) -> C:
    """``cfg`` with the path fields ``names`` resolved against the driver's working directory.

    Ray workers and actors run in another directory, so a relative ``--pairs`` or ``--model DIR`` would
    name nothing there. Fields in ``specs`` are model specs: one naming a local directory is made
    absolute (:func:`vlmlab.models.canonical_spec`), a hub id or open_clip name is left as it is. An empty
    field stays empty.
    """
    from vlmlab.models import canonical_spec

    changes = {}
    for name in names:
        value = getattr(cfg, name)
        if not value:
            continue
        changes[name] = canonical_spec(value) if name in specs else str(Path(value).expanduser().resolve())
    return dataclasses.replace(cfg, **changes)

"""Experiment configs: YAML files mapped onto frozen dataclasses, overridable, validated on load.

A config class declares each field with a type annotation and, where a range applies,
``field(metadata={"range": (lo, hi)})`` or ``{"choices": (...)}``. Loading checks every key, type
and range and stops with one :class:`ConfigError` line naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key, type or value is not allowed."""


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 integers, so ``pattern: 2:4`` stays the string "2:4"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def yaml_value(text: str):
    """Parses one YAML scalar or collection (``"0.5"`` -> 0.5, ``"2:4"`` -> "2:4")."""
    return yaml.load(text, Loader=_Loader)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}={value!r}: expected {' or '.join(map(_type_name, args))}.")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]
        item = typing.get_args(tp)[0]
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping of key: value.")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r}: expected a number.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string.")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}.")


def _check_range(key: str, value: Any, meta: typing.Mapping) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if v is None:
            continue
        if "choices" in meta and v not in meta["choices"]:
            raise ConfigError(f"{key}={v!r} is not allowed; choose one of {list(meta['choices'])}.")
        if "range" in meta:
            lo, hi = meta["range"]
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ConfigError(f"{key}={v!r} is out of range; allowed: [{lo}, {hi}].")
    if meta.get("nonempty") and isinstance(value, tuple) and not value:
        raise ConfigError(f"{key} must not be empty.")


def from_dict(cls, raw: dict[str, Any], source: str = "config"):
    """Builds and validates ``cls`` from a plain mapping.

    Raises:
      ConfigError: unknown key, wrong type or value out of range (one line, naming the key).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {source}; allowed keys: {', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        coerced = _coerce(name, value, hints[name])
        _check_range(name, coerced, fields[name].metadata)
        values[name] = coerced
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from err


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["steps=100", "lams=[0, 0.1]"]`` -> ``{"steps": 100, "lams": [0, 0.1]}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write it as key=value, e.g. --set steps=100.")
        out[key.strip()] = yaml_value(text)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with a clear error for a missing file or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; see experiments/configs/ for examples."
        )
    try:
        raw = yaml_value(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value lines.")
    return raw


def to_dict(config) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }

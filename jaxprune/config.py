"""Experiment configs: YAML files mapped onto frozen dataclasses, overridable, validated on load.

A config class declares each field with a type annotation and, where a range applies,
``field(metadata={"range": (lo, hi)})`` or ``{"choices": (...)}``, under a one-line comment that
says what the field is (:func:`field_help` reads it for ``--help``). A field whose type is itself
a dataclass is a section: its keys are written nested (``softmax: {lam: 0.1}``) or dotted
(``softmax.lam: 0.1``, ``--softmax.lam 0.1``). Loading checks every key, type and range and stops
with one :class:`ConfigError` line naming the key, the value and what is allowed (for an unknown
key, the nearest valid one; for a key listed in the class's ``MOVED_KEYS``, its new place).
Numbers may be written as Python writes them (``1e-3``, ``5e-1``, ``.5``).

We keep this small parser rather than tyro or draccus: neither keeps an error to one line (tyro
draws a multi-line box, draccus prints argparse's usage block, or a traceback for a bad value),
and both would still need the ranges, choices, moved keys and YAML rules below on top.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxprune.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key, type or value is not allowed."""


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 numbers, so ``pattern: 2:4`` stays the string "2:4", and
    with the floats Python reads (``1e-3``; YAML 1.1 wants ``1.0e-3``)."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def yaml_value(text: str, what: str | None = None):
    """Parses one YAML scalar or collection (``"0.5"`` -> 0.5, ``"2:4"`` -> "2:4", ``"1e-3"`` ->
    0.001).

    Args:
      text: the value as written.
      what: the flag or key it was given for; with it, a YAML syntax error becomes a
        :class:`ConfigError` naming it.
    """
    if what is None:
        return yaml.load(text, Loader=_Loader)
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        problem = " ".join(str(getattr(err, "problem", "") or err).split())
        raise ConfigError(
            f"{what}: {text!r} is not a value YAML reads ({problem}); write lists as [1, 2] and "
            "quote text with special characters."
        ) from err


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
            raise ConfigError(f"{key}={value!r}: expected a number (such as 0.5 or 1e-3).")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: expected a finite number.")
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


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def leaf_fields(cls, prefix: str = ""):
    """Every settable field of ``cls``, sections entered: ``(dotted name, field, type, owner)``
    with ``owner`` the dataclass that declares the field (for its comment)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name], declaring_class(cls, f.name)


def declaring_class(cls, name: str) -> type:
    """The class in ``cls``'s hierarchy that declares the field ``name`` (whose source holds
    its comment): ``PruneConfig`` is built from ``RunConfig`` plus the methods' sections."""
    for klass in cls.__mro__:
        if name in inspect.get_annotations(klass):
            return klass
    return cls


def nearest(name: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate most like ``name``, comparing whole dotted names and their last parts (so
    ``lamb`` finds ``softmax.lam``); None when nothing is close."""

    def leaf(text: str) -> str:
        return text.lstrip("-").rsplit(".", 1)[-1]

    def score(candidate: str) -> tuple[float, float]:
        whole = difflib.SequenceMatcher(None, name, candidate).ratio()
        part = difflib.SequenceMatcher(None, leaf(name), leaf(candidate)).ratio()
        return max(whole, part), whole

    best = max(candidates, key=score, default=None)
    return best if best is not None and score(best)[0] >= cutoff else None


def flatten(cls, raw: typing.Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """A mapping of ``cls`` keys, with sections as nested mappings (``softmax: {lam: 0.1}``) or
    dotted keys (``softmax.lam: 0.1``), as one flat mapping of dotted keys. A later key wins over
    an earlier one. A dotted key under a ``dict`` field (``base.softmax.lam``) sets that key of
    the dict.

    Raises:
      ConfigError: an unknown key (naming the nearest valid one), a key that moved
        (``cls.MOVED_KEYS``, naming its new place), or a section given a non-mapping.
    """
    out: dict[str, Any] = {}
    _flatten_into(out, cls, cls, raw, "", source)
    return out


def _flatten_into(out: dict, root, cls, raw, prefix: str, source: str) -> None:
    if not isinstance(raw, typing.Mapping):
        raise ConfigError(f"{prefix.rstrip('.')}={raw!r} in {source}: expected a mapping of keys.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        head, dot, rest = str(key).partition(".")
        if head not in fields:
            _unknown_key(root, prefix + str(key), value, source)
        tp = hints[head]
        if _is_section(tp):
            _flatten_into(
                out, root, tp, {rest: value} if dot else value, f"{prefix}{head}.", source
            )
        elif dot and tp is dict:
            out[prefix + head] = {**out.get(prefix + head, {}), rest: value}
        elif dot:
            _unknown_key(root, prefix + str(key), value, source)
        else:
            out[prefix + head] = value


def _unknown_key(root, key: str, value: Any, source: str):
    moved = getattr(root, "MOVED_KEYS", {}).get(key)
    if moved is not None:
        raise ConfigError(
            f"{source}: {key!r} moved to {moved!r}; write {moved}: {yaml_text(value)} (or nest "
            f"it: {moved.split('.')[0]}: {{{moved.split('.', 1)[1]}: {yaml_text(value)}}})."
        )
    names = [name for name, *_ in leaf_fields(root)]
    near = nearest(key, names)
    hint = f"did you mean {near!r}? " if near else ""
    sections = {n.split(".")[0] + ".*" for n in names if "." in n}
    allowed = sorted({n for n in names if "." not in n} | sections)
    raise ConfigError(f"unknown key {key!r} in {source}; {hint}allowed keys: {', '.join(allowed)}.")


def from_dict(cls, raw: typing.Mapping[str, Any], source: str = "config"):
    """Builds and validates ``cls`` from a plain mapping (sections nested or as dotted keys).

    Raises:
      ConfigError: unknown key, wrong type or value out of range (one line, naming the key).
    """
    return _build(cls, flatten(cls, raw, source), "", source)


def _build(cls, flat: dict[str, Any], prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        name, tp = prefix + f.name, hints[f.name]
        if _is_section(tp):
            if any(k.startswith(name + ".") for k in flat):
                values[f.name] = _build(tp, flat, name + ".", source)
        elif name in flat:
            values[f.name] = _coerce(name, flat[name], tp)
            _check_range(name, values[f.name], f.metadata)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from err


def replace(obj, changes: typing.Mapping[str, Any] | None = None, /, **kwargs):
    """A copy of the config ``obj`` with some keys changed, validated like a config file.

    ``replace(cfg, method="softmax", softmax={"lam": 0.05})`` changes ``softmax.lam`` and keeps
    the section's other keys; ``changes`` takes dotted keys (``{"softmax.lam": 0.05}``).
    """
    cls = type(obj)
    flat = flatten(cls, to_dict(obj))
    # Key by key: a section in kwargs changes only its own keys of a section in changes too.
    flat.update(flatten(cls, changes or {}, source="replace"))
    flat.update(flatten(cls, kwargs, source="replace"))
    return from_dict(cls, flat, source="replace")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["steps=100", "lams=[0, 0.1]"]`` -> ``{"steps": 100, "lams": [0, 0.1]}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write it as key=value, e.g. --set steps=100.")
        out[key.strip()] = yaml_value(text, what=f"--set {key.strip()}")
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


def field_help(cls) -> dict[str, str]:
    """Each field's description: the comment lines right above its declaration in the class.

    Returns:
      Field name -> the comment text joined into one line (fields without a comment are absent).
    """
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):  # no source (e.g. a frozen build): no descriptions
        return {}
    out, previous = {}, None
    for node in ast.parse("\n".join(lines)).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous = None
            continue
        comments = []
        row = node.lineno - 2  # the line above, 0-based
        while row >= 0 and lines[row].strip().startswith("#"):
            comments.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        if comments:
            out[node.target.id] = " ".join(comments)
        elif (
            previous is not None
            and previous.end_lineno == node.lineno - 1
            and previous.target.id in out
        ):
            # A field right under another shares its comment ("block size and dampening").
            out[node.target.id] = out[previous.target.id]
        previous = node
    return out


def yaml_text(value: Any) -> str:
    """A value as one line of YAML, as a flag or a config file takes it (``[wikitext2, c4]``)."""
    if isinstance(value, str) and yaml_value(value) == value:
        return value  # "2:4", "unstructured": no quotes needed
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.strip().removesuffix("...").strip()


def to_dict(config) -> dict[str, Any]:
    """The config as plain JSON-able data (sections become mappings, tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value

"""MkDocs hook: the configuration reference, generated from the config dataclasses.

``docs/configuration.md`` holds two markers that this hook replaces at build time:

- ``<!-- config-reference:prune -->``: every key of ``jaxprune.prune_config.PruneConfig``, its
  sections entered recursively (whatever sections the class has), with its flag, type, default,
  allowed values and the comment above its declaration, read by ``jaxprune.config.field_help``:
  the same source as ``jaxprune prune --help``;
- ``<!-- config-reference:experiments -->``: the keys of each experiment config that
  ``jaxprune run`` knows (``experiment:`` in a YAML file picks its class).

The functions are plain Python so that ``tests/test_docs.py`` can call them on any dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Callable

PRUNE_MARKER = "<!-- config-reference:prune -->"
EXPERIMENTS_MARKER = "<!-- config-reference:experiments -->"


def cell(text: str) -> str:
    """Text made safe for one Markdown table cell (a ``|`` would end the cell)."""
    return " ".join(text.split()).replace("|", r"\|")


def type_text(hint) -> str:
    """A field's type as a config file writes it: ``int or null``, ``list of float``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return " or ".join("null" if a is type(None) else type_text(a) for a in args)
    if origin is tuple:
        return f"list of {type_text(typing.get_args(hint)[0])}"
    if hint is dict or origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def default_text(f: dataclasses.Field) -> str:
    """A field's default as a config file or flag takes it (``yaml_text``, as ``--help``)."""
    from jaxprune.config import yaml_text

    if f.default is not dataclasses.MISSING:
        return yaml_text(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return yaml_text(f.default_factory())
    return "(required)"


def _bound(value) -> str:
    return "∞" if value is None else str(value)


def allowed_text(f: dataclasses.Field) -> str:
    """The values a field takes, from its ``choices``/``range``/``nonempty`` metadata."""
    parts = []
    if "choices" in f.metadata:
        # As YAML and the flags write them (true, not True).
        shown = [str(c).lower() if isinstance(c, bool) else c for c in f.metadata["choices"]]
        parts.append("one of " + ", ".join(f"`{c}`" for c in shown))
    if "range" in f.metadata:
        lo, hi = f.metadata["range"]
        left = "(-∞" if lo is None else f"[{lo}"
        right = "∞)" if hi is None else f"{hi}]"
        parts.append(f"{left}, {right}")
    if f.metadata.get("nonempty"):
        parts.append("not empty")
    return "; ".join(parts)


def declaring_class(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO whose body declares the field ``name``: its source holds the
    field's comment (a class made by ``dataclasses.make_dataclass`` on a base has no source)."""
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return klass
    return cls


def field_comment(cls: type, name: str, _cache: dict | None = None) -> str:
    """The comment above the declaration of ``cls``'s field ``name`` (``field_help``), or ""."""
    from jaxprune.config import field_help

    klass = declaring_class(cls, name)
    if _cache is None:
        return field_help(klass).get(name, "")
    if klass not in _cache:
        _cache[klass] = field_help(klass)
    return _cache[klass].get(name, "")


def class_intro(cls) -> str:
    """The class docstring's text, or "" when the class has none (a dataclass then carries its
    generated signature as ``__doc__``, which is no description)."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return "\n\n".join(" ".join(p.split()) for p in doc.split("\n\n"))


def config_reference(
    cls,
    *,
    flag: Callable[[str], str] | None = None,
    heading: str = "##",
    root_title: str | None = None,
) -> str:
    """The Markdown reference of a config dataclass: one table per section.

    Args:
      cls: the config dataclass; a field whose type is a dataclass is a section, entered
        recursively (``jaxprune.config.leaf_fields``).
      flag: the command-line flag of a dotted key (``jaxprune.commands.prune.flag``); None
        leaves the flag out (experiment configs are overridden with ``--set key=value``).
      heading: the Markdown heading of each section (``##``, ``###``).
      root_title: the title of the top-level keys' section (default: the class name).

    Returns:
      Markdown: per section a heading, the section class's docstring and a table of its keys
      (key and flag, type, default, allowed values, description); then the class's
      ``MOVED_KEYS``, if any.
    """
    from jaxprune.config import leaf_fields

    sections: dict[str, list] = {}
    owners: dict[str, type] = {}
    for key, f, hint, owner in leaf_fields(cls):
        section = key.rpartition(".")[0]
        sections.setdefault(section, []).append((key, f, hint, owner))
        owners.setdefault(section, owner)

    helps: dict[type, dict[str, str]] = {}
    out = []
    for section, rows in sections.items():
        owner = owners[section]
        title = f"`{section}` ({owner.__name__})" if section else root_title or cls.__name__
        out += [f"{heading} {title}", ""]
        intro = class_intro(owner)
        if section:
            key_hint = f"Keys `{section}.KEY`"
            if flag is not None:
                key_hint += f", flags `{flag(section + '.KEY')}`"
            key_hint += f"; in YAML also nested: `{section}: {{KEY: VALUE}}`."
            intro = f"{intro}\n\n{key_hint}" if intro else key_hint
        if intro:
            out += [intro, ""]
        out += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for key, f, hint, owner in rows:
            name = f"`{key}`"
            if flag is not None:
                name += f"<br>`{flag(key)}`"
            default = cell(default_text(f))
            out.append(
                f"| {name} | {cell(type_text(hint))} | `{default}` | {cell(allowed_text(f))} "
                f"| {cell(field_comment(owner, f.name, helps))} |"
            )
        out.append("")

    moved = getattr(cls, "MOVED_KEYS", None)
    if moved:
        out += [
            f"{heading} Keys that moved",
            "",
            "Keys of earlier versions. A config or flag that uses one is refused with one line "
            "naming its new place; runs stored with them are still read.",
            "",
            "| old key | new key |",
            "|---|---|",
        ]
        out += [f"| `{old}` | `{new}` |" for old, new in moved.items()]
        out.append("")
    return "\n".join(out)


def prune_reference() -> str:
    """The reference of ``jaxprune prune``'s settings (``PruneConfig``), with its flags."""
    from jaxprune.commands.prune import flag
    from jaxprune.prune_config import PruneConfig

    return config_reference(PruneConfig, flag=flag, heading="###", root_title="Top-level keys")


def experiment_classes() -> dict[str, type]:
    """``experiment:`` value -> config class, from ``jaxprune run``'s table of experiments."""
    from jaxprune.commands.run import EXPERIMENTS

    classes = {}
    for name, (module_name, class_name, *_) in EXPERIMENTS.items():
        classes[name] = getattr(importlib.import_module(module_name), class_name)
    return classes


def experiments_reference() -> str:
    """The reference of every experiment config ``jaxprune run`` reads."""
    from jaxprune.prune_config import PruneConfig

    out = []
    for name, cls in experiment_classes().items():
        out += [f"### `experiment: {name}` ({cls.__module__}.{cls.__name__})", ""]
        if cls is PruneConfig:
            out += [
                f"The keys of [`jaxprune prune`](#top-level-keys) above, sections included "
                f"(`{name}` runs one pruning run).",
                "",
            ]
            continue
        out.append(config_reference(cls, heading="####", root_title=f"{cls.__name__} keys"))
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs hook: fills the markers of the configuration page."""
    if PRUNE_MARKER in markdown:
        markdown = markdown.replace(PRUNE_MARKER, prune_reference())
    if EXPERIMENTS_MARKER in markdown:
        markdown = markdown.replace(EXPERIMENTS_MARKER, experiments_reference())
    return markdown

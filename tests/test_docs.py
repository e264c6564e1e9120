"""The docs site's configuration reference (docs/hooks/config_reference.py), generated at build
time from the config dataclasses' field comments, the same source as ``jaxprune prune --help``."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import field
from pathlib import Path

import pytest

from jaxprune.commands.prune import flag
from jaxprune.config import field_help, leaf_fields
from jaxprune.prune_config import PruneConfig

ROOT = Path(__file__).resolve().parents[1]


def _load_hook():
    path = ROOT / "docs" / "hooks" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_hook()


@dataclasses.dataclass(frozen=True)
class _Inner:
    """An inner section."""

    # Depth of the thing.
    depth: int = field(default=3, metadata={"range": (1, 9)})


@dataclasses.dataclass(frozen=True)
class _Small:
    """A small config."""

    # How the thing is done | with a pipe.
    how: str = field(default="fast", metadata={"choices": ("fast", "slow")})
    # The inner section.
    inner: _Inner = field(default_factory=_Inner)


@dataclasses.dataclass(frozen=True)
class _Grown:
    """The same config, one field added."""

    # How the thing is done | with a pipe.
    how: str = field(default="fast", metadata={"choices": ("fast", "slow")})
    # A field added later, with a default.
    added_later: float | None = field(default=0.25, metadata={"range": (0.0, None)})
    # The inner section.
    inner: _Inner = field(default_factory=_Inner)


def test_every_prune_config_key_has_its_flag_and_comment():
    text = ref.prune_reference()
    keys = list(leaf_fields(PruneConfig))
    assert len(keys) > 20
    for key, f, _, owner in keys:
        comment = field_help(ref.declaring_class(owner, f.name)).get(f.name)
        assert comment, f"{key} has no comment above its declaration"
        assert f"`{key}`<br>`{flag(key)}`" in text
        assert ref.cell(comment) in text, key


def test_every_section_is_a_heading_with_its_docstring():
    text = ref.prune_reference()
    sections = {key.rpartition(".")[0]: owner for key, _, _, owner in leaf_fields(PruneConfig)}
    for section, owner in sections.items():
        if section:
            assert f"## `{section}` ({owner.__name__})" in text
            assert " ".join(owner.__doc__.split()) in text


def test_moved_keys_are_listed():
    text = ref.prune_reference()
    for old, new in PruneConfig.MOVED_KEYS.items():
        assert f"| `{old}` | `{new}` |" in text


def test_a_small_dataclass_and_an_added_field():
    text = ref.config_reference(_Small, flag=flag)
    assert "## `inner` (_Inner)" in text
    assert "An inner section." in text
    assert "| `how`<br>`--how` | str | `fast` | one of `fast`, `slow` |" in text
    assert r"How the thing is done \| with a pipe." in text
    assert "| `inner.depth`<br>`--inner.depth` | int | `3` | [1, 9] | Depth of the thing. |" in text
    assert "added_later" not in text

    grown = ref.config_reference(_Grown, flag=flag)
    row = (
        "| `added_later`<br>`--added-later` | float or null | `0.25` | [0.0, ∞) "
        "| A field added later, with a default. |"
    )
    assert row in grown


def test_without_flags():
    text = ref.config_reference(_Small)
    assert "| `inner.depth` | int | `3` |" in text
    assert "`--" not in text and "flags" not in text


def test_a_field_inherited_by_a_generated_class_keeps_its_comment():
    # PruneConfig may be made by dataclasses.make_dataclass on a base that declares the fields.
    made = dataclasses.make_dataclass(
        "Made", [("extra", _Inner, field(default_factory=_Inner))], bases=(_Small,), frozen=True
    )
    assert ref.declaring_class(made, "how") is _Small
    text = ref.config_reference(made, flag=flag)
    assert r"How the thing is done \| with a pipe." in text
    assert "| `extra.depth`<br>`--extra.depth` | int | `3` | [1, 9] | Depth of the thing. |" in text


@pytest.mark.parametrize("name", ["synthetic", "table"])
def test_experiment_configs(name):
    classes = ref.experiment_classes()
    assert name in classes
    text = ref.experiments_reference()
    assert f"## `experiment: {name}`" in text
    cls = classes[name]
    helps = field_help(cls)
    for key, f, *_ in leaf_fields(cls):
        assert f"| `{key}` |" in text
        assert ref.cell(helps[f.name]) in text


def test_the_page_uses_the_generator():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert ref.PRUNE_MARKER in page
    assert ref.EXPERIMENTS_MARKER in page
    filled = ref.on_page_markdown(page, None, None, None)
    assert ref.PRUNE_MARKER not in filled
    assert "`softmax.lam`" in filled

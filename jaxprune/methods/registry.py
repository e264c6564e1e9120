"""Method name -> :class:`~jaxprune.methods.base.Method`: the pipeline's only door to a method.

The built-in methods register when this module is imported; another method registers with
:func:`register` before the run's config class is built (``jaxprune.prune_config`` builds
``PruneConfig`` from the registry when it is first imported, so that ``--method NAME`` and the
method's ``--NAME.FIELD`` flags exist).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from jaxprune.methods.base import Method, Request

# The built-in methods, in the order --help lists them (and PruneConfig holds their sections).
BUILTIN = ("dense", "magnitude", "wanda", "softmax", "sparsegpt", "admm", "alps", "d2prune")
_METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Adds ``method`` under ``method.name``.

    Raises:
      ValueError: the name is taken (unless ``replace``), or the method has a config section
        and the run's config class was already built without it.
    """
    _load_builtins()
    if method.name in _METHODS and not replace:
        raise ValueError(f"a method named {method.name!r} is registered already.")
    built = getattr(sys.modules.get("jaxprune.prune_config"), "PruneConfig", None)
    if built is not None and method.section is not None and method.name not in _METHODS:
        raise ValueError(
            f"method {method.name!r} has a config section, but PruneConfig was built before it "
            "registered; register it before importing jaxprune.prune_config (or anything that "
            "imports it, such as jaxprune.cli)."
        )
    _METHODS[method.name] = method
    return method


def _load_builtins() -> None:
    for name in BUILTIN:
        if name not in _METHODS:
            _METHODS[name] = importlib.import_module(f"jaxprune.methods.{name}").METHOD


def get(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
      ValueError: no such method, naming the registered ones.
    """
    _load_builtins()
    if name not in _METHODS:
        raise ValueError(f"method={name!r} is unknown: use one of {names()}.")
    return _METHODS[name]


def names() -> tuple[str, ...]:
    """Every registered method's name, built-ins first."""
    _load_builtins()
    return tuple(_METHODS)


def methods() -> tuple[Method, ...]:
    """Every registered method."""
    _load_builtins()
    return tuple(_METHODS.values())


def prune_matrix(
    name: str,
    w,
    stats,
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    group: str | None = None,
    **options: Any,
):
    """Prunes one matrix with a per-matrix method (``magnitude``, ``wanda``, ``sparsegpt``): a
    shortcut for notebooks, tests and benchmarks.

    Args:
      name: the method.
      w: weight, input-major ``(d_in, d_out)``.
      stats: the calibration statistics of its inputs (``None`` for magnitude).
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"`` or ``"N:M"``.
      group: the comparison group (``None``: the method's default).
      **options: fields of the method's section (``blocksize``, ``percdamp`` for sparsegpt).

    Returns:
      ``(w_pruned, keep)``.

    Raises:
      ValueError: a method that does not prune matrices one by one, or an unknown option.
    """
    method = get(name)
    if method.prune_matrix is None:
        raise ValueError(f"method {name!r} does not prune one matrix at a time.")
    if options and method.section is None:
        raise ValueError(f"options {sorted(options)} do not apply to method {name!r}.")
    try:
        section = method.section(**options) if method.section is not None else None
    except TypeError as err:
        raise ValueError(f"options {sorted(options)} do not all apply to {name!r}: {err}") from err
    request = Request(targets=(), sparsity=sparsity, pattern=pattern, group=group)
    return method.prune_matrix(w, stats, request, section)

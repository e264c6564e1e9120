"""Linear pruning baselines, one weight matrix at a time: magnitude, Wanda and SparseGPT.

Every matrix is in the input-major layout of ``x @ w``: shape ``(d_in, d_out)``. PyTorch's "output
row" (the group Wanda compares within, and the row SparseGPT prunes) is a column here.

Each method selects within its authors' comparison group by default (``DEFAULT_GROUP``): Wanda
within each output (``int(sparsity * d_in)`` zeros per output), SparseGPT with one threshold per
block of inputs across all outputs (about ``sparsity``), magnitude per matrix (``round(sparsity *
size)`` zeros); the other groups are explicit ablations (``group=``). ``N:M`` gives ``M - N`` zeros
in every group of ``M`` consecutive inputs of an output for every method. Impossible requests raise
``jaxprune.masks.binarize``'s errors. Every function is pure and jit-able with ``sparsity``,
``pattern`` and the options static; ``prune_matrix`` is the jit boundary.
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Bool, Float

from jaxprune.baselines import magnitude, sparsegpt, wanda
from jaxprune.baselines.magnitude import magnitude_prune
from jaxprune.baselines.sparsegpt import sparsegpt_prune, sparsegpt_reconstruct
from jaxprune.baselines.stats import InputStats, init_stats, update_stats
from jaxprune.baselines.wanda import wanda_prune, wanda_scores

METHODS = ("magnitude", "wanda", "sparsegpt")
_OPTIONS = {"magnitude": (), "wanda": (), "sparsegpt": ("blocksize", "percdamp")}
# The unstructured comparison groups each method accepts; the first is its authors' default.
GROUPS = {"magnitude": magnitude.GROUPS, "wanda": wanda.GROUPS, "sparsegpt": sparsegpt.GROUPS}
DEFAULT_GROUP = {name: groups[0] for name, groups in GROUPS.items()}


def _magnitude(w, stats, *, sparsity, pattern, group):
    del stats  # one signature for all methods
    return magnitude_prune(w, sparsity=sparsity, pattern=pattern, group=group)


_STATIC = ("sparsity", "pattern", "group")
_JITTED = {
    "magnitude": jax.jit(_magnitude, static_argnames=_STATIC),
    "wanda": jax.jit(wanda_prune, static_argnames=_STATIC),
    "sparsegpt": jax.jit(sparsegpt_prune, static_argnames=(*_STATIC, *_OPTIONS["sparsegpt"])),
}


def prune_matrix(
    method: str,
    w: Float[Array, "d_in d_out"],
    stats: InputStats | None,
    *,
    sparsity: float | None = None,
    pattern: str,
    group: str | None = None,
    **opts,
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """Prunes one matrix with a named baseline (compiled once per shape and setting).

    Args:
      method: one of ``METHODS``.
      w: weight, input-major ``(d_in, d_out)``.
      stats: calibration statistics of the inputs of ``w`` (unused by ``"magnitude"``, which
        accepts ``None``).
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"``, ``"row"`` or ``"N:M"`` such as ``"2:4"``.
      group: the unstructured comparison group (``GROUPS[method]``); ``None`` for the authors'
        default, ``DEFAULT_GROUP[method]``.
      **opts: method options: ``blocksize`` and ``percdamp`` for ``"sparsegpt"``.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``keep`` is boolean, ``True`` = kept.

    Raises:
      ValueError: unknown method or option, missing statistics, or an impossible request.
    """
    if method not in _JITTED:
        raise ValueError(f"method={method!r} is unknown: use one of {METHODS}.")
    unknown = sorted(set(opts) - set(_OPTIONS[method]))
    if unknown:
        raise ValueError(
            f"options {unknown} do not apply to method {method!r}; allowed: {_OPTIONS[method]}."
        )
    if stats is None and method != "magnitude":
        raise ValueError(f"method {method!r} needs calibration statistics (see update_stats).")
    group = DEFAULT_GROUP[method] if group is None else group
    if group not in GROUPS[method]:
        raise ValueError(
            f"group={group!r} does not apply to {method}: use one of {GROUPS[method]}."
        )
    return _JITTED[method](w, stats, sparsity=sparsity, pattern=pattern, group=group, **opts)


__all__ = [
    "DEFAULT_GROUP",
    "GROUPS",
    "METHODS",
    "InputStats",
    "init_stats",
    "magnitude_prune",
    "prune_matrix",
    "sparsegpt_prune",
    "sparsegpt_reconstruct",
    "update_stats",
    "wanda_prune",
    "wanda_scores",
]

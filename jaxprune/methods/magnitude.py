"""Magnitude pruning: the entries with the smallest ``|W|`` go."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxprune.masks import binarize
from jaxprune.methods.base import Method, Request, per_matrix
from jaxprune.methods.stats import check_matrix

# Comparison groups for unstructured sparsity; the first is the default (one threshold per
# matrix, as in the magnitude baseline of locuslab/wanda).
GROUPS = ("matrix", "output")


def magnitude_prune(
    w: Float[Array, "d_in d_out"],
    *,
    sparsity: float | None = None,
    pattern: str,
    group: str = "matrix",
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """Magnitude pruning: the entries with the smallest ``|W|`` are set to zero.

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"``, ``"row"`` (the same as ``group="output"``) or ``"N:M"``.
      group: unstructured comparison group, ``"matrix"`` or ``"output"``.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned = w * keep``.
    """
    check_matrix(w, None)
    if group not in GROUPS:
        raise ValueError(f"magnitude group={group!r}: use one of {GROUPS}.")
    keep = binarize(jnp.abs(w), sparsity, pattern, group=group)
    return jnp.where(keep, w, jnp.zeros_like(w)), keep


_jitted = jax.jit(magnitude_prune, static_argnames=("sparsity", "pattern", "group"))


def prune_matrix(w, stats, request: Request, options=None):
    """The plug-in's one-matrix rule (no statistics needed)."""
    del stats, options
    group = request.group or GROUPS[0]
    return _jitted(w, sparsity=request.sparsity, pattern=request.pattern, group=group)


METHOD = Method(
    name="magnitude",
    prune=per_matrix(prune_matrix),
    description="smallest |W| pruned, one threshold per matrix (the magnitude baseline)",
    groups=GROUPS,
    prune_matrix=prune_matrix,
)

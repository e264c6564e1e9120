"""Wanda (Sun et al. 2024): pruning by weight magnitude times input norm, per output."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxprune.masks import binarize, parse_nm
from jaxprune.methods.base import Method, Request, per_matrix
from jaxprune.methods.stats import InputStats, check_matrix

# Comparison groups for unstructured sparsity; the first is the authors' default.
GROUPS = ("output", "matrix")


def wanda_scores(w: Float[Array, "d_in d_out"], stats: InputStats) -> Float[Array, "d_in d_out"]:
    """Wanda's importance ``|W_jk| * ||X_j||_2`` (float32), input-major like ``w``."""
    return jnp.abs(w).astype(jnp.float32) * jnp.sqrt(stats.sq_norm).reshape(-1, 1)


def wanda_prune(
    w: Float[Array, "d_in d_out"],
    stats: InputStats,
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    group: str = "output",
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """Wanda (Sun et al. 2024): score ``|W_jk| * ||X_j||_2``, lowest pruned within each output.

    By default this is the authors' rule (locuslab/wanda ``prune_wanda``): within each output,
    a stable sort of the scores and the lowest ``int(sparsity * d_in)`` pruned; for N:M, the
    ``M - N`` lowest of every ``M`` consecutive inputs of an output.

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      stats: calibration statistics of the inputs of ``w``.
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"``, ``"row"`` (the same as ``group="output"``) or ``"N:M"``.
      group: unstructured comparison group: ``"output"`` (the authors') or ``"matrix"`` (one
        threshold per matrix, an ablation; ``round(sparsity * size)`` pruned).

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned = w * keep``.
    """
    check_matrix(w, stats)
    if group not in GROUPS:
        raise ValueError(f"Wanda group={group!r}: use one of {GROUPS}.")
    if pattern == "row":
        pattern, group = "unstructured", "output"
    if group == "output" and parse_nm(pattern) is None and sparsity is not None:
        # The authors prune int(sparsity * d_in) per output; binarize rounds, so hand it the
        # fraction whose rounded count is that floor (impossible values reach binarize's error).
        d_in = w.shape[0]
        sparsity = math.floor(sparsity * d_in) / d_in if 0.0 <= sparsity < 1.0 else sparsity
    keep = binarize(wanda_scores(w, stats), sparsity, pattern, group=group)
    return jnp.where(keep, w, jnp.zeros_like(w)), keep


_jitted = jax.jit(wanda_prune, static_argnames=("sparsity", "pattern", "group"))


def prune_matrix(w, stats: InputStats | None, request: Request, options=None):
    """The plug-in's one-matrix rule: :func:`wanda_prune` in the request's group."""
    del options
    if stats is None:
        raise ValueError("method 'wanda' needs calibration statistics (see update_stats).")
    group = request.group or GROUPS[0]
    return _jitted(w, stats, sparsity=request.sparsity, pattern=request.pattern, group=group)


METHOD = Method(
    name="wanda",
    prune=per_matrix(prune_matrix),
    description="Wanda (Sun et al. 2024): |W| times the input norm, lowest pruned per output",
    groups=GROUPS,
    prune_matrix=prune_matrix,
)

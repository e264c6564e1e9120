"""Wanda (Sun et al. 2024): pruning by weight magnitude times input norm, per output."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxprune.baselines.stats import InputStats, check_matrix
from jaxprune.masks import binarize


def wanda_prune(
    w: Float[Array, "d_in d_out"],
    stats: InputStats,
    *,
    sparsity: float | None = None,
    pattern: str = "row",
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """Wanda (Sun et al. 2024): score ``|W_jk| * ||X_j||_2``, lowest pruned within each output.

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      stats: calibration statistics of the inputs of ``w``.
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"row"`` (Wanda's default: per output ``k``, i.e. per column here),
        ``"unstructured"`` or ``"N:M"``.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned = w * keep``.
    """
    check_matrix(w, stats)
    norm = jnp.sqrt(stats.sq_norm).reshape(-1, 1)  # one norm per input feature = per row here
    keep = binarize(jnp.abs(w).astype(jnp.float32) * norm, sparsity, pattern)
    return jnp.where(keep, w, jnp.zeros_like(w)), keep

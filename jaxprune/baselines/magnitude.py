"""Magnitude pruning: the entries with the smallest ``|W|`` go."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxprune.baselines.stats import check_matrix
from jaxprune.masks import binarize


def magnitude_prune(
    w: Float[Array, "d_in d_out"], *, sparsity: float | None = None, pattern: str
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """Magnitude pruning: the entries with the smallest ``|W|`` are set to zero.

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"`` (one threshold per matrix), ``"row"`` (per output) or ``"N:M"``.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned = w * keep``.
    """
    check_matrix(w, None)
    keep = binarize(jnp.abs(w), sparsity, pattern)
    return jnp.where(keep, w, jnp.zeros_like(w)), keep

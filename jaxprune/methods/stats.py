"""Calibration statistics of a layer's inputs, accumulated batch by batch.

Activations are never kept: ``H = sum_t x_t x_t^T`` (SparseGPT's Hessian, up to scale) and the
per-feature squared norm ``sum_t x_tj^2`` (Wanda's ``||X_j||_2`` is its square root) are summed
over tokens as batches arrive.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

# Calibration sums must not lose digits to TF32/bf16 matmul passes on accelerators.
HIGHEST = lax.Precision.HIGHEST


class InputStats(NamedTuple):
    """Sufficient statistics of a layer's calibration inputs (a pytree).

    Attributes:
      hessian: ``sum_t x_t x_t^T``, shape ``(d_in, d_in)``, float32.
      sq_norm: ``sum_t x_tj^2`` per input feature ``j``, shape ``(d_in,)``, float32.
      count: number of tokens seen, int32 scalar.
    """

    hessian: Float[Array, "d_in d_in"]
    sq_norm: Float[Array, " d_in"]
    count: Int[Array, ""]


def init_stats(d_in: int) -> InputStats:
    """Empty statistics for inputs of dimension ``d_in``."""
    if d_in < 1:
        raise ValueError(f"d_in={d_in}: the input dimension must be a positive integer.")
    return InputStats(
        hessian=jnp.zeros((d_in, d_in), jnp.float32),
        sq_norm=jnp.zeros((d_in,), jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )


def update_stats(stats: InputStats, x: Float[Array, "*batch d_in"]) -> InputStats:
    """Adds a batch of inputs to the statistics.

    Args:
      stats: the statistics so far.
      x: inputs of any leading shape, last axis ``d_in``; every leading position is one token.

    Returns:
      The updated statistics.
    """
    d_in = stats.sq_norm.shape[0]
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x has shape {x.shape}; its last axis must be d_in={d_in}.")
    x = x.reshape(-1, d_in).astype(jnp.float32)
    return InputStats(
        hessian=stats.hessian + jnp.einsum("ti,tj->ij", x, x, precision=HIGHEST),
        sq_norm=stats.sq_norm + jnp.sum(x * x, axis=0),
        count=stats.count + x.shape[0],
    )


def check_matrix(w: jax.Array, stats: InputStats | None) -> None:
    """Raises ``ValueError`` unless ``w`` is one ``(d_in, d_out)`` matrix matching ``stats``."""
    if w.ndim != 2:
        raise ValueError(f"w must be one (d_in, d_out) matrix, got shape {w.shape}.")
    if stats is not None and (
        stats.sq_norm.shape != (w.shape[0],) or stats.hessian.shape != (w.shape[0],) * 2
    ):
        raise ValueError(
            f"stats are for d_in={stats.sq_norm.shape[0]} but w has shape {w.shape} "
            "(input-major: d_in is axis 0; pass w as used by x @ w)."
        )

"""Rounding relaxed masks to binary keep-masks at a requested sparsity.

Every matrix here is in the input-major layout of ``x @ w``: shape ``(d_in, d_out)``. An "output
row" of the PyTorch layout (Wanda's comparison group) is a column here, and N:M groups run along
the input axis (axis 0). The lowest scores are pruned; ties go to the earlier flat index (a stable
sort), so the result is deterministic.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

PATTERNS = ("unstructured", "row")
SCORES = ("mask", "mask_times_weight")
# Comparison groups of unstructured pruning: one threshold per matrix, or per output (Wanda's).
GROUPS = ("matrix", "output")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None`` for the named patterns.

    Raises:
      ValueError: not a known pattern, or ``N > M`` / ``M < 1``.
    """
    if pattern in PATTERNS:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not match:
        raise ValueError(f"pattern={pattern!r}: use one of {PATTERNS} or 'N:M' such as '2:4'.")
    n, m = int(match[1]), int(match[2])
    if m < 1 or n > m:
        raise ValueError(f"pattern={pattern!r}: N:M needs 0 <= N <= M and M >= 1.")
    return n, m


def mask_scores(mask: jax.Array, weight: jax.Array | None = None, score: str = "mask") -> jax.Array:
    """Scores to round: the relaxed mask itself, or ``|M ∘ W|``."""
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not one of {SCORES}.")
    if score == "mask":
        return mask
    if weight is None:
        raise ValueError("score='mask_times_weight' needs the weight.")
    return jnp.abs(mask * weight)


def _keep_lowest_pruned(
    scores: jax.Array, n_prune: int, axis: int, tiebreak: jax.Array | None = None
) -> jax.Array:
    # Rank along `axis` by (scores, tiebreak) with a stable sort; the n_prune lowest are pruned.
    if tiebreak is None:
        order = jnp.argsort(scores, axis=axis, stable=True)
    else:
        # Two sort keys, not scores + eps * tiebreak: in float32 a small eps vanishes next to a
        # score of 1 (1 + 1e-6 * 0.03 == 1), and the ties would fall back to index order.
        # The index is the third key, so equal pairs keep their flat order.
        iota = lax.broadcasted_iota(jnp.int32, scores.shape, axis)
        order = lax.sort((scores, tiebreak.astype(scores.dtype), iota), dimension=axis, num_keys=3)[
            -1
        ]
    ranks = jnp.argsort(order, axis=axis, stable=True)
    return ranks >= n_prune


def binarize(
    scores: Float[Array, "d_in d_out"],
    sparsity: float | None = None,
    pattern: str = "unstructured",
    *,
    group: str = "matrix",
    tiebreak: Float[Array, "d_in d_out"] | None = None,
) -> Bool[Array, "d_in d_out"]:
    """Boolean keep-mask with exactly the requested number of zeros.

    Args:
      scores: importance scores, input-major ``(d_in, d_out)`` (higher = keep).
      sparsity: fraction pruned, in ``[0, 1)``; for ``unstructured`` ``round(sparsity * size)``
        zeros, for ``row`` ``round(sparsity * d_in)`` zeros in every output column. For ``"N:M"``
        it may be omitted; if given it must equal ``1 - N/M``.
      pattern: ``"unstructured"``, ``"row"`` (``"unstructured"`` with ``group="output"``) or
        ``"N:M"`` (at most N kept in every M consecutive inputs of an output).
      group: for unstructured patterns, ``"matrix"`` (one threshold per matrix) or ``"output"``
        (``round(sparsity * d_in)`` pruned in every output column, Wanda's comparison group).
        N:M groups are always within one output.
      tiebreak: optional second sort key (same shape): entries with equal scores are ordered by
        it, and only entries equal in both fall back to the flat index order.

    Returns:
      A boolean array shaped like ``scores``, ``True`` = keep.

    Raises:
      ValueError: impossible request (sparsity out of range, N > M, d_in not divisible by M), or
        an unknown group.
    """
    if group not in GROUPS:
        raise ValueError(f"group={group!r} is not one of {GROUPS}.")
    if tiebreak is not None and tiebreak.shape != scores.shape:
        raise ValueError(f"tiebreak has shape {tiebreak.shape}, scores {scores.shape}.")
    if scores.ndim != 2:
        raise ValueError(f"binarize takes one (d_in, d_out) matrix, got shape {scores.shape}.")
    nm = parse_nm(pattern)
    d_in, d_out = scores.shape
    if nm is not None:
        n, m = nm
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"sparsity={sparsity} contradicts pattern {pattern} (= {1 - n / m}).")
        if d_in % m:
            raise ValueError(f"pattern {pattern}: input dimension {d_in} is not divisible by {m}.")
        groups = scores.reshape(d_in // m, m, d_out)
        tb = None if tiebreak is None else tiebreak.reshape(d_in // m, m, d_out)
        return _keep_lowest_pruned(groups, m - n, axis=1, tiebreak=tb).reshape(d_in, d_out)
    if sparsity is None or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is impossible: give a fraction in [0, 1).")
    if pattern == "row" or group == "output":
        return _keep_lowest_pruned(scores, round(sparsity * d_in), axis=0, tiebreak=tiebreak)
    tb = None if tiebreak is None else tiebreak.reshape(-1)
    flat = _keep_lowest_pruned(
        scores.reshape(-1), round(sparsity * scores.size), axis=0, tiebreak=tb
    )
    return flat.reshape(d_in, d_out)


def measured_sparsity(keep: jax.Array) -> float:
    """Fraction of ``False`` entries."""
    return float(1.0 - jnp.mean(keep.astype(jnp.float32)))

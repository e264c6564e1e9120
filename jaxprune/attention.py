"""The attention matrix ``f = D^-1 (C ∘ exp(S))`` computed stably from logits ``S``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def causal_mask(n: int) -> jax.Array:
    """Boolean ``(n, n)`` lower-triangular mask ``C`` (a token attends to itself and the past)."""
    return jnp.tril(jnp.ones((n, n), dtype=bool))


def causal_allowed(
    n: int, m: int, query_positions: Int[Array, " n"] | None = None, window: int | None = None
) -> jax.Array:
    """Boolean ``(n, m)``: which of ``m`` keys each of ``n`` queries may see (causal, and within
    ``window`` keys when given). Queries sit at ``query_positions``, default the last ``n``."""
    if query_positions is None and window is None:
        return jnp.tril(jnp.ones((n, m), dtype=bool), k=m - n)
    pos = jnp.arange(m - n, m) if query_positions is None else query_positions
    delta = pos[:, None] - jnp.arange(m)[None, :]
    allowed = delta >= 0
    return allowed if window is None else allowed & (delta < window)


def attention_probs(
    logits: Float[Array, "... n m"],
    causal: bool = True,
    query_positions: Int[Array, " n"] | None = None,
    window: int | None = None,
) -> Float[Array, "... n m"]:
    """Row-normalised attention ``D^-1 (C ∘ exp(logits))``.

    The row maximum over allowed entries is subtracted before ``exp`` so large logits never
    overflow; masked entries are exactly zero and contribute no gradient.

    Args:
      logits: attention logits, shape ``(..., n, m)``; with ``causal`` the last ``n`` key positions
        align with the ``n`` queries (``m >= n``).
      causal: apply the causal mask ``C``; ``False`` means ``C`` is all ones.
      query_positions: with ``causal``, the key position of each query row (for a subset of
        query rows); default: the last ``n`` of the ``m`` positions.
      window: with ``causal``, the most keys a query sees, itself included (a sliding window:
        query ``i`` sees keys ``i - window < j <= i``); ``None`` for all of the past.

    Returns:
      Probabilities of the same shape; each row sums to one.
    """
    if causal:
        n, m = logits.shape[-2:]
        allowed = causal_allowed(n, m, query_positions, window)
        allowed = allowed.reshape((1,) * (logits.ndim - 2) + (n, m))
        logits = jnp.where(allowed, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnorm = jnp.exp(logits - row_max)
    return unnorm / jnp.sum(unnorm, axis=-1, keepdims=True)

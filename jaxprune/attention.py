"""The attention matrix ``f = D^-1 (C ∘ exp(S))`` computed stably from logits ``S``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxprune.kernels import causal_attention as fused


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


def _batched_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """``a @ b`` over a shared leading batch axis, contracting axis ``contract[0]`` of ``a`` with
    axis ``contract[1]`` of ``b``."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))))


def _block_float32(q, k, v, scale_logits, positions, window):
    """One query block in float32: ``(b, g, r, n, dh)``, each row normalised after the second
    matmul (``n x dh`` divisions instead of ``n x m``), with a group's query heads and rows on
    one matmul axis."""
    b, g, r, n, dh = q.shape
    m = k.shape[2]
    rows = q.reshape(b * g, r * n, dh)
    logits = scale_logits(_batched_dot(rows, k.reshape(b * g, m, dh), (2, 2)))
    logits = jnp.where(
        causal_allowed(n, m, positions, window), logits.reshape(b, g, r, n, m), -jnp.inf
    )
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnorm = jnp.exp(logits - row_max)
    out = _batched_dot(unnorm.reshape(b * g, r * n, m), v.reshape(b * g, m, dh), (2, 1))
    return out.reshape(b, g, r, n, dh) / jnp.sum(unnorm, axis=-1, keepdims=True)


def grouped_probs(
    q: Float[Array, "b g r n dh"],
    k: Float[Array, "b g m dh"],
    scale_logits: Callable[[jax.Array], jax.Array],
    query_positions: Int[Array, " n"] | None = None,
    window: int | None = None,
) -> Float[Array, "b g r n m"]:
    """Causal (windowed) attention probabilities of grouped query heads, in float32, as the
    families' references compute them: the logits ``q k^T`` scaled by ``scale_logits`` in the
    inputs' dtype, then the softmax in float32. Queries and window as in
    :func:`attention_probs`."""
    logits = scale_logits(jnp.einsum("bgrtd,bgsd->bgrts", q, k))
    return attention_probs(
        logits.astype(jnp.float32), query_positions=query_positions, window=window
    )


def _block_low_precision(q, k, v, scale_logits, positions, window):
    """One query block in a lower precision, as transformers computes it: the probabilities of
    :func:`grouped_probs` cast back to the inputs' dtype before the second matmul."""
    probs = grouped_probs(q, k, scale_logits, positions, window)
    return jnp.einsum("bgrts,bgsd->bgrtd", probs.astype(q.dtype), v)


def blocked_causal_attention(
    q: Float[Array, "b g r t dh"],
    k: Float[Array, "b g t dh"],
    v: Float[Array, "b g t dh"],
    *,
    scale_logits: Callable[[jax.Array], jax.Array],
    window: int | None = None,
    block: int = 512,
    logit_scale: float | None = None,
) -> Float[Array, "b t hdh"]:
    """Causal attention of grouped query heads, ``(b, t, g * r * dh)`` (query head ``i`` of key
    group ``i // r``, group-major, as ``o_proj`` reads them). ``scale_logits`` scales the
    logits ``q k^T`` in the inputs' dtype, as the family's reference does (it is part of what a
    low precision rounds).

    Query rows go in blocks of ``block``, each against only the keys it can see: those up to its
    last row and, with a ``window``, from ``window - 1`` before its first row. The masked upper
    triangle is never computed, no ``(t, t)`` matrix is kept, and a windowed layer's cost is linear
    in ``t``. In float32 each block is two batched matmuls over the ``b * g`` key groups (a
    group's query heads and the block's rows on one axis), normalised after the second; in lower
    precisions it follows transformers' order of roundings.

    On a CPU, float32 attention whose ``scale_logits`` is a plain multiplication by
    ``logit_scale`` runs in the fused kernel of :mod:`jaxprune.kernels.causal_attention` (one
    tile's scores stay in cache between the two matmuls), unless ``JAXPRUNE_CPU_KERNELS=xla``.
    Its derivatives are this function's.
    """
    if logit_scale is not None and fused.applies(q, window):
        return fused.causal_attention(
            q,
            k,
            v,
            logit_scale,
            window,
            lambda q, k, v: _dispatch(q, k, v, scale_logits, window, block),
        )
    return _dispatch(q, k, v, scale_logits, window, block)


def _dispatch(q, k, v, scale_logits, window, block):
    """The pure-JAX blocked attention, one sequence at a time on a CPU."""
    if q.shape[0] > 1 and jax.default_backend() == "cpu":
        # On a CPU the scores of one sequence's block stay cache-sized; a batch in one matmul
        # spills them (4 x 2048 tokens: 1.13x faster one sequence at a time). Accelerators keep
        # the batch on one matmul.
        return jax.lax.map(
            lambda qkv: _blocked(*(a[None] for a in qkv), scale_logits, window, block)[0],
            (q, k, v),
        )
    return _blocked(q, k, v, scale_logits, window, block)


def _blocked(q, k, v, scale_logits, window, block):
    """:func:`blocked_causal_attention` over the whole batch at once."""
    t = q.shape[3]
    one_block = _block_float32 if q.dtype == jnp.float32 else _block_low_precision
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        first = 0 if window is None else max(0, start - window + 1)
        # Rows start..end-1 sit at key positions start-first.. of the slice first..end-1
        # (without a window: the last rows of a causal block).
        positions = None if window is None else jnp.arange(start, end) - first
        outs.append(
            one_block(
                q[:, :, :, start:end],
                k[:, :, first:end],
                v[:, :, first:end],
                scale_logits,
                positions,
                window,
            )
        )
    b, g, r, _, dh = q.shape
    return jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, g * r * dh)

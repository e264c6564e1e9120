"""The softmax-aware pruning objective of Liang et al. (ICLR 2025), merged and factored forms.

Merged form (the paper's): one matrix ``W`` (d x d) acts as ``S = X W X^T`` and a relaxed mask ``M``
of the same shape gives

    L(M) = 1/2 ||f(M ∘ W) - f(W)||_F^2 + lam/2 ||M||_F^2,   f(W) = D^-1 (C ∘ exp(X W X^T)).

Factored form (real models): masks on the query and key projections of one layer,
``W_Q: d x (h*dh)`` and ``W_K: d x (g*dh)``, grouped-query attention (query head ``i`` uses key head
``i // (h/g)``), rotary embeddings on the projected queries and keys and the ``1/sqrt(dh)`` scale.
Each head has its own attention matrix; the attention term is summed over heads. The single-head
function is written once and batched with ``vmap`` over heads, and over layers.

With a leading batch axis on ``x`` (several calibration sequences) the attention term is the mean
over sequences. All functions are pure and jit-able.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxprune.attention import attention_probs
from jaxprune.models.spec import AttentionSpec, QKExtras
from jaxprune.rope import apply_rope, rope_tables


def _batched(x: jax.Array) -> jax.Array:
    if x.ndim == 2:
        return x[None]
    if x.ndim != 3:
        raise ValueError(f"x must have shape (n, d) or (b, n, d), got {x.shape}.")
    return x


def merged_attention(
    weight: Float[Array, "d d"], x: Float[Array, "*b n d"], causal: bool = True
) -> Float[Array, "*b n n"]:
    """``f(W) = D^-1 (C ∘ exp(X W X^T))`` for one or several sequences."""
    logits = jnp.einsum("...nd,de,...me->...nm", x, weight, x)
    return attention_probs(logits, causal=causal)


def attention_pruning_loss(
    mask: Float[Array, "d d"],
    weight: Float[Array, "d d"],
    x: Float[Array, "*b n d"],
    *,
    lam: float,
    causal: bool = True,
) -> Float[Array, ""]:
    """The paper's loss ``1/2 ||f(M∘W) - f(W)||_F^2 + lam/2 ||M||_F^2``.

    Args:
      mask: relaxed mask ``M``, shape ``(d, d)``.
      weight: the merged attention weight ``W``, shape ``(d, d)``.
      x: inputs ``(n, d)``, or ``(b, n, d)`` for ``b`` sequences (attention term averaged).
      lam: weight ``lambda`` of the ``||M||_F^2`` regulariser.
      causal: use the causal mask ``C``.

    Returns:
      The scalar loss.
    """
    return _merged_terms(mask, weight, x, causal)[0] + 0.5 * lam * jnp.sum(mask * mask)


def _merged_terms(mask, weight, x, causal):
    x = _batched(x)
    diff = merged_attention(mask * weight, x, causal) - merged_attention(weight, x, causal)
    return 0.5 * jnp.mean(jnp.sum(diff * diff, axis=(-2, -1))), diff


def attention_pruning_grad(
    mask: Float[Array, "d d"],
    weight: Float[Array, "d d"],
    x: Float[Array, "*b n d"],
    *,
    lam: float,
    causal: bool = True,
) -> Float[Array, "d d"]:
    """Closed-form gradient ``W ∘ (X^T p X) + lam M`` of :func:`attention_pruning_loss`.

    ``c = f(M∘W) - f(W)`` and ``p = f∘c - diag((f∘c) 1) f`` (``f = f(M∘W)``): ``p`` is ``c`` pulled
    back through the row-wise softmax Jacobian. Same arguments as the loss.

    Returns:
      The gradient, shape ``(d, d)``.
    """
    x = _batched(x)
    f = merged_attention(mask * weight, x, causal)
    c = f - merged_attention(weight, x, causal)
    fc = f * c
    p = fc - jnp.sum(fc, axis=-1, keepdims=True) * f
    xtpx = jnp.einsum("bna,bnm,bmc->ac", x, p, x) / x.shape[0]
    return weight * xtpx + lam * mask


# ----------------------------------------------------------------------------- factored form


def qk_head_probs(
    wq: Float[Array, "d dh"],
    k: Float[Array, "b n dh"],
    x: Float[Array, "b n d"],
    rope: tuple[Float[Array, "n dh"], Float[Array, "n dh"]] | None,
    causal: bool = True,
    query_idx: Int[Array, " r"] | None = None,
    query_scale: float | None = None,
    *,
    window: int | None = None,
    bias: Float[Array, " dh"] | None = None,
    norm: Float[Array, " dh"] | None = None,
    norm_eps: float | None = None,
) -> Float[Array, "b r n"]:
    """Attention probabilities of one query head.

    Args:
      wq: the head's query projection ``(d, dh)`` (already masked, if masked).
      k: the keys of the head's key/value group, projected and rotated, ``(b, n, dh)``.
      x: the layer's attention input (after the norm), ``(b, n, d)``.
      rope: ``(cos, sin)`` tables ``(n, dh)``, or ``None`` for no rotary embedding.
      causal: apply the causal mask.
      query_idx: optional subset of query rows (sorted positions); default all ``n``.
      query_scale: multiplier of the scores (``AttentionSpec.query_scale``); ``None`` divides
        them by ``sqrt(dh)``.
      window: a query sees at most this many keys, itself included (``AttentionSpec.window``).
      bias, norm, norm_eps: the head's query bias, q-norm multiplier and the norm's epsilon
        (:func:`qk_transform`).

    Returns:
      Probabilities ``(b, r, n)`` with ``r = len(query_idx)`` or ``n``.
    """
    dh = wq.shape[-1]
    xq = x if query_idx is None else x[:, query_idx]
    q = qk_transform(jnp.einsum("bnd,dh->bnh", xq, wq), bias, norm, norm_eps)
    if rope is not None:
        cos, sin = rope
        q = apply_rope(q, *((cos, sin) if query_idx is None else (cos[query_idx], sin[query_idx])))
    logits = scale_scores(jnp.einsum("brh,bnh->brn", q, k), dh, query_scale)
    return attention_probs(logits, causal=causal, query_positions=query_idx, window=window)


def qk_transform(
    a: Float[Array, "... dh"],
    bias: Float[Array, " dh"] | None,
    norm: Float[Array, " dh"] | None,
    eps: float | None,
) -> Float[Array, "... dh"]:
    """What a model does to a head's projected queries or keys before RoPE: adds the bias, then
    (with ``eps``) the per-head RMSNorm in at least float32 times ``norm``. The identity for
    Llama."""
    if bias is not None:
        a = a + _lead(bias, a.ndim)
    if eps is None:
        return a
    wide = jnp.promote_types(a.dtype, jnp.float32)  # at least float32, as the models norm
    a32 = a.astype(wide)
    out = a32 * jax.lax.rsqrt(jnp.mean(a32 * a32, axis=-1, keepdims=True) + eps)
    if norm is not None:
        out = out * _lead(norm.astype(wide), a.ndim)
    return out.astype(a.dtype)


def _lead(v: jax.Array, ndim: int) -> jax.Array:
    """``v`` with leading unit axes up to ``ndim`` (explicit broadcasting, no rank promotion)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def scale_scores(logits: jax.Array, head_dim: int, query_scale: float | None) -> jax.Array:
    """The scores ``q . k`` times the query scale: divided by ``sqrt(head_dim)`` in their own
    dtype (as the model does) when ``query_scale`` is ``None``, else multiplied by it."""
    if query_scale is None:
        return logits / jnp.sqrt(jnp.asarray(head_dim, logits.dtype))
    return logits * jnp.asarray(query_scale, logits.dtype)


def layer_rope(spec: AttentionSpec, n: int, dtype) -> tuple[jax.Array, jax.Array] | None:
    """The ``(cos, sin)`` tables of positions ``0 .. n-1`` for ``spec`` (``None``: no RoPE)."""
    if spec.rope_theta is None:
        return None
    return rope_tables(n, spec.head_dim, spec.rope_theta, dtype=dtype, scaling=spec.rope_scaling)


def _split_heads(w: jax.Array, n: int, head_dim: int) -> jax.Array:
    d, out = w.shape
    if out != n * head_dim:
        raise ValueError(f"projection has {out} outputs, expected {n} heads x {head_dim}.")
    return w.reshape(d, n, head_dim).transpose(1, 0, 2)


def _per_query_head(a: jax.Array, n_heads: int, n_kv_heads: int) -> jax.Array:
    """``(g, ...) -> (h, ...)``: each key/value head's array for every query head of its group.

    A broadcast, not a gather by index: with the heads split over devices by key/value group
    (:mod:`jaxprune.sharding`) XLA sees that every query head's keys and values are local, with
    no all-gather.
    """
    rep = n_heads // n_kv_heads
    return jnp.broadcast_to(a[:, None], (n_kv_heads, rep, *a.shape[1:])).reshape(
        n_heads, *a.shape[1:]
    )


def _head_rows(v: jax.Array | None, n: int, head_dim: int) -> jax.Array | None:
    """A per-output vector ``(n*dh,)`` (a bias) as one row per head ``(n, dh)``."""
    return None if v is None else v.reshape(n, head_dim)


def _layer_keys(wk, x, spec: AttentionSpec, rope, extras: QKExtras):
    # Keys are projected once per key/value head, then shared by the query heads of its group.
    g, dh = spec.n_kv_heads, spec.head_dim
    keys = jnp.einsum("bnd,gdh->gbnh", x, _split_heads(wk, g, dh))
    bias = _head_rows(extras.k_bias, g, dh)
    keys = qk_transform(
        keys, None if bias is None else bias[:, None, None, :], extras.k_norm, spec.qk_norm_eps
    )
    if rope is not None:
        keys = apply_rope(keys, *rope)
    return _per_query_head(keys, spec.n_heads, g)


def _query_heads(wq, spec: AttentionSpec, extras: QKExtras):
    """The per-head query kernels ``(h, d, dh)`` and biases ``(h, dh)`` or ``None``."""
    h, dh = spec.n_heads, spec.head_dim
    return _split_heads(wq, h, dh), _head_rows(extras.q_bias, h, dh)


def _head_fn(x, rope, causal, query_idx, spec: AttentionSpec, extras: QKExtras):
    """One query head's probabilities ``(q kernel, keys, bias) -> (b, r, n)``."""

    def fn(wq, k, bias):
        return qk_head_probs(
            wq,
            k,
            x,
            rope,
            causal,
            query_idx,
            spec.query_scale,
            window=spec.window,
            bias=bias,
            norm=extras.q_norm,
            norm_eps=spec.qk_norm_eps,
        )

    return fn


def qk_layer_probs(
    wq: Float[Array, "d hdh"],
    wk: Float[Array, "d gdh"],
    x: Float[Array, "*b n d"],
    *,
    spec: AttentionSpec,
    causal: bool = True,
    query_idx: Int[Array, " r"] | None = None,
    extras: QKExtras | None = None,
) -> Float[Array, "h b r n"]:
    """Attention probabilities of every query head of one layer (``vmap`` over heads).

    Args:
      wq: query projection ``(d, h*dh)``; wk: key projection ``(d, g*dh)``.
      x: attention input ``(n, d)`` or ``(b, n, d)``.
      spec: the layer's attention (heads, head size, RoPE, query scale, q/k norm, window).
      causal: apply the causal mask.
      query_idx: optional subset of query rows.
      extras: the layer's q/k biases and norm multipliers (``None``: none, as in Llama).

    Returns:
      ``(h, b, r, n)`` probabilities.
    """
    x = _batched(x)
    extras = QKExtras() if extras is None else extras
    rope = layer_rope(spec, x.shape[1], x.dtype)
    keys = _layer_keys(wk, x, spec, rope, extras)
    q_heads, q_bias = _query_heads(wq, spec, extras)
    head_fn = _head_fn(x, rope, causal, query_idx, spec, extras)
    if q_bias is None:
        return jax.vmap(lambda q, k: head_fn(q, k, None))(q_heads, keys)
    return jax.vmap(head_fn)(q_heads, keys, q_bias)


def qk_pruning_loss(
    masks: dict[str, Float[Array, "d _"]],
    weights: dict[str, Float[Array, "d _"]],
    x: Float[Array, "*b n d"],
    *,
    lam: float,
    spec: AttentionSpec,
    causal: bool = True,
    target: Float[Array, "h b r n"] | None = None,
    attn_scale: float | jax.Array = 1.0,
    reg_scale: float = 1.0,
    query_idx: Int[Array, " r"] | None = None,
    values: tuple[Float[Array, "h b n dh"], Float[Array, "h dh d"]] | None = None,
    extras: QKExtras | None = None,
) -> tuple[Float[Array, ""], dict[str, jax.Array]]:
    """Factored loss of one layer: ``sum_h 1/2 ||P_h(M) - P_h||^2 / attn_scale + lam/2 ||M||^2``,
    or, with ``values``, the output form ``1/2 ||sum_h (P_h(M) - P_h) V_h O_h||^2 / attn_scale +
    lam/2 ||M||^2`` (the change of the attention block's output, see :func:`attention_output`).

    Args:
      masks: ``{"q": (d, h*dh), "k": (d, g*dh)}`` relaxed masks.
      weights: the dense projections, same keys and shapes (input-major: ``x @ w``).
      x: attention input of the layer ``(n, d)`` or ``(b, n, d)``; the term is the batch mean.
      lam: regulariser weight.
      spec, causal, query_idx: as in :func:`qk_layer_probs`.
      target: the dense probabilities (computed from ``weights`` when ``None``); pass them in to
        avoid recomputing them every step.
      attn_scale: divides the attention term (e.g. its dense scale, so one ``lam`` fits all layers).
      reg_scale: divides the regulariser (e.g. the number of mask entries).
      values: ``(V, O)`` from :func:`head_values` to measure the change of the block's output
        instead of the probabilities' (``None``: the paper's probability term).
      extras: the layer's q/k biases and norm multipliers, as in :func:`qk_layer_probs`.

    Returns:
      ``(loss, {"attention": attention term, "reg": regulariser})``.
    """
    kw = dict(spec=spec, causal=causal, query_idx=query_idx, extras=extras)
    if target is None:
        target = qk_layer_probs(weights["q"], weights["k"], x, **kw)
    probs = qk_layer_probs(masks["q"] * weights["q"], masks["k"] * weights["k"], x, **kw)
    diff = probs - jax.lax.stop_gradient(target)
    if values is None:
        attn = 0.5 * jnp.sum(jnp.mean(jnp.sum(diff * diff, axis=(-2, -1)), axis=1)) / attn_scale
    else:
        out = attention_output(diff, *values)
        attn = 0.5 * jnp.mean(jnp.sum(out * out, axis=(-2, -1))) / attn_scale
    reg = mask_regulariser(masks, lam, reg_scale)
    return attn + reg, {"attention": attn, "reg": reg}


def mask_regulariser(masks, lam: float, scale: float = 1.0) -> Float[Array, ""]:
    """``lam/2 ||M||_F^2 / scale`` summed over the masks of a pytree."""
    return 0.5 * lam * sum(jnp.sum(m * m) for m in jax.tree.leaves(masks)) / scale


def head_values(
    wv: Float[Array, "d gdh"],
    wo: Float[Array, "hdh d"],
    x: Float[Array, "*b n d"],
    *,
    spec: AttentionSpec,
    extras: QKExtras | None = None,
) -> tuple[Float[Array, "h b n dh"], Float[Array, "h dh d"]]:
    """The dense values of every query head (``x @ W_V``, shared within each key/value group) and
    the output projection split by head, for the output form of :func:`qk_pruning_loss`.

    Args:
      wv: value projection ``(d, g*dh)``; wo: output projection ``(h*dh, d)`` (input-major).
      x: attention input ``(n, d)`` or ``(b, n, d)``.
      spec: the layer's attention (its head counts and size).
      extras: the layer's value bias, if any (``extras.v_bias``).

    Returns:
      ``(V, O)``: ``(h, b, n, dh)`` values and ``(h, dh, d)`` output rows.
    """
    x = _batched(x)
    h, g, dh = spec.n_heads, spec.n_kv_heads, spec.head_dim
    v = jnp.einsum("bnd,gdh->gbnh", x, _split_heads(wv, g, dh))
    bias = _head_rows(None if extras is None else extras.v_bias, g, dh)
    if bias is not None:
        v = v + bias[:, None, None]
    return _per_query_head(v, h, g), wo.reshape(h, dh, wo.shape[1])


def attention_output(
    probs: Float[Array, "h b r n"], v: Float[Array, "h b n dh"], o: Float[Array, "h dh d"]
) -> Float[Array, "b r d"]:
    """``sum_h P_h V_h O_h``: the attention block's output (before the residual) for per-head
    probabilities, or its change for a change of the probabilities (it is linear in them)."""
    return jnp.einsum("hbrk,hkd->brd", jnp.einsum("hbrn,hbnk->hbrk", probs, v), o)


def qk_attention_term_blocked(
    masks: dict[str, Float[Array, "d _"]],
    weights: dict[str, Float[Array, "d _"]],
    x: Float[Array, "*b n d"],
    *,
    spec: AttentionSpec,
    row_block: int,
    causal: bool = True,
    dense_weights: dict[str, Float[Array, "d _"]] | None = None,
    extras: QKExtras | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """The attention term ``1/2 sum_h mean_b ||P_h(M) - P_h||_F^2`` over blocks of query rows,
    with memory linear in ``n``: each block's pruned and dense probabilities ``(h, b, B, n)`` are
    computed, reduced and (under differentiation) recomputed in the backward pass
    (``jax.checkpoint``), so no ``(n, n)`` matrix is ever stored. Same value and gradient as
    :func:`qk_pruning_loss`'s term with ``target=None`` (tested).

    Args:
      masks, weights: ``{"q": (d, h*dh), "k": (d, g*dh)}``.
      x: attention input ``(n, d)`` or ``(b, n, d)``; ``n`` must be a multiple of ``row_block``.
      spec, causal: as in :func:`qk_layer_probs`.
      row_block: query rows per block.
      dense_weights: the kernels of the target probabilities ``P_h`` when they differ from
        ``weights`` (the weight update moves ``weights`` and keeps the dense target).
      extras: the layer's q/k biases and norm multipliers, as in :func:`qk_layer_probs`.

    Returns:
      ``(term, dense_scale)``: the attention term and ``1/2 sum_h mean_b ||P_h||_F^2`` of the
      dense probabilities (the ``normalize`` divisor), both unnormalised.
    """
    x = _batched(x)
    b, n, _ = x.shape
    if row_block < 1 or n % row_block:
        raise ValueError(f"row_block={row_block} must divide the sequence length {n}.")
    extras = QKExtras() if extras is None else extras
    rope = layer_rope(spec, n, x.dtype)
    dense_w = weights if dense_weights is None else dense_weights
    keys = _layer_keys(masks["k"] * weights["k"], x, spec, rope, extras)
    dense_keys = jax.lax.stop_gradient(_layer_keys(dense_w["k"], x, spec, rope, extras))
    q_heads, q_bias = _query_heads(masks["q"] * weights["q"], spec, extras)
    dense_q = jax.lax.stop_gradient(_query_heads(dense_w["q"], spec, extras)[0])

    @jax.checkpoint
    def block(carry, start):
        fn = _head_fn(x, rope, causal, start + jnp.arange(row_block), spec, extras)
        if q_bias is None:
            probs = jax.vmap(lambda q, k: fn(q, k, None))(q_heads, keys)
            dense = jax.vmap(lambda q, k: fn(q, k, None))(dense_q, dense_keys)
        else:
            probs = jax.vmap(fn)(q_heads, keys, q_bias)
            dense = jax.vmap(fn)(dense_q, dense_keys, q_bias)
        dense = jax.lax.stop_gradient(dense)
        diff = probs - dense
        term, scale = carry
        return (term + jnp.sum(diff * diff), scale + jnp.sum(dense * dense)), None

    zero = jnp.zeros((), x.dtype)
    (term, scale), _ = jax.lax.scan(block, (zero, zero), jnp.arange(0, n, row_block))
    return 0.5 * term / b, 0.5 * scale / b


def qk_pruning_loss_layers(masks, weights, x, **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`qk_pruning_loss` over a leading layer axis of ``masks``, ``weights`` and ``x``
    (``vmap`` over layers), summed. ``target`` and ``attn_scale`` may carry the layer axis too."""
    target = kwargs.pop("target", None)
    scale = jnp.broadcast_to(jnp.asarray(kwargs.pop("attn_scale", 1.0)), (x.shape[0],))
    fn = lambda m, w, xi, t, s: qk_pruning_loss(m, w, xi, target=t, attn_scale=s, **kwargs)  # noqa: E731
    losses, aux = jax.vmap(fn)(masks, weights, x, target, scale)
    return jnp.sum(losses), jax.tree.map(jnp.sum, aux)


def relative_error(new: jax.Array, ref: jax.Array) -> jax.Array:
    """``||new - ref||_F / ||ref||_F`` over the last two axes (one attention matrix or output),
    averaged over the leading axes (heads, sequences)."""
    num = jnp.sqrt(jnp.sum((new - ref) ** 2, axis=(-2, -1)))
    return jnp.mean(num / jnp.sqrt(jnp.sum(ref * ref, axis=(-2, -1))))


@partial(jax.jit, static_argnames=("spec",))
def attention_error(wq, wk, wq_new, wk_new, x, *, spec: AttentionSpec, extras=None):
    """``||P(new) - P||_F / ||P||_F`` averaged over heads and sequences (``spec`` and
    ``extras``: the layer's attention, as in :func:`jaxprune.objective.qk_layer_probs`)."""
    kw = dict(spec=spec, extras=extras)
    return relative_error(qk_layer_probs(wq_new, wk_new, x, **kw), qk_layer_probs(wq, wk, x, **kw))


@partial(jax.jit, static_argnames=("spec",))
def layer_errors(dense, new, x, *, spec: AttentionSpec, extras=None):
    """The relative attention error ``||P(new) - P||_F / ||P||_F`` (averaged over heads and
    sequences, as :func:`attention_error`) and output error ``||O(new) - O||_F / ||O||_F`` of the
    attention block's output ``O = sum_h P_h V_h O_h`` (before the residual, averaged over
    sequences), each layer's probabilities computed once for both.

    Args:
      dense, new: ``{"q", "k", "v", "o"}`` kernels (input-major) before and after pruning.
      x: attention input ``(b, n, d)``.
      spec, extras: the layer's attention and its q/k/v biases and norm multipliers.

    Returns:
      ``(attention error, output error)``.
    """
    kw = dict(spec=spec, extras=extras)
    probs = {
        k: qk_layer_probs(w["q"], w["k"], x, **kw) for k, w in (("dense", dense), ("new", new))
    }
    outs = {
        k: attention_output(probs[k], *head_values(w["v"], w["o"], x, **kw))
        for k, w in (("dense", dense), ("new", new))
    }
    return (
        relative_error(probs["new"], probs["dense"]),
        relative_error(outs["new"], outs["dense"]),
    )

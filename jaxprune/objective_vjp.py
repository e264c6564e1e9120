"""The factored attention term of :func:`jaxprune.objective.qk_pruning_loss` with a hand-written
backward pass (the closed-form gradient), as an alternative to autodiff.

For one query head with probabilities ``P`` and target ``T`` the term is ``1/2 ||P - T||_F^2``;
with ``c = P - T`` its pullback through the row-wise softmax is ``p = P∘c - rowsum(P∘c) P``, so the
logits' cotangent is ``p`` times the scores' scale (``1 / sqrt(dh)`` by default), the rotated
queries' ``p K_rot`` and the rotated keys' ``p^T Q_rot``. RoPE is an orthogonal rotation per
position, so its transpose is the rotation by the opposite angle (:func:`jaxprune.rope.apply_rope`
with ``-sin``). The projection kernels'
cotangents are then ``x^T dQ`` and ``x^T dK``, one matmul each over all heads.

Layout: queries are grouped by key/value head, ``(b, g, rep*r, dh)``, so each group is one larger
matmul against its keys ``(b, g, n, dh)`` (no broadcast of the keys to every query head) and the
keys' cotangent sums over the group's query heads inside the contraction (no reduction over heads
afterwards). The probabilities keep the public ``(h, b, r, n)`` layout of
:func:`jaxprune.objective.qk_layer_probs` only where they meet ``target``.

Two entry points share the code: :func:`qk_attention_term_and_grad` is plain JAX with no autodiff
(value and gradient in one pass), and :func:`qk_attention_term` is a ``jax.custom_vjp`` function
that ``jax.grad`` uses as written. Both support ``jax.jvp`` of the gradient (forward over
reverse, for a Hessian-vector product).

With the causal mask and all query rows, the query rows are split into blocks and each block
meets only the keys up to its last row (``causal_blocks``), which skips about half of the
attention matmuls and elementwise passes.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxprune.models.spec import AttentionSpec, QKExtras
from jaxprune.objective import (
    _batched,
    layer_rope,
    mask_regulariser,
    qk_layer_probs,
    qk_transform,
    scale_scores,
)
from jaxprune.rope import apply_rope


class _Shape(NamedTuple):
    """Static settings of the term (hashable: the ``custom_vjp``'s non-differentiable argument)."""

    spec: AttentionSpec
    causal: bool
    # Causal row blocks: block i of the n/blocks query rows meets only keys 0 .. its last row.
    blocks: int


def _rope_tables(shape: _Shape, n: int, dtype, query_idx):
    rope = layer_rope(shape.spec, n, dtype)
    if rope is None:
        return None, None
    cos, sin = rope
    rope_q = (cos, sin) if query_idx is None else (cos[query_idx], sin[query_idx])
    return rope_q, (cos, sin)


def _rotate(a, rope, inverse=False):
    if rope is None:
        return a
    cos, sin = rope
    return apply_rope(a, cos, -sin if inverse else sin)


def _spans(shape: _Shape, r: int, n: int):
    """``(first row, end row, keys)`` of each row block: with the causal mask and all ``n`` query
    rows, block ``i`` needs only the keys up to its last row (the rest of its probabilities and
    of a causal target are zero), so the blocks together skip about half of the ``(n, n)`` work."""
    if shape.blocks == 1:
        return [(0, r, n)]
    size = r // shape.blocks
    return [(i * size, (i + 1) * size, (i + 1) * size) for i in range(shape.blocks)]


def _norm_backward(pre, scale, eps, ct):
    """The cotangent of ``pre`` through ``qk_transform``'s RMSNorm ``scale * pre / rms(pre)``
    (over the last axis) for the output's cotangent ``ct``; the identity without a norm."""
    if eps is None:
        return ct
    inv = jax.lax.rsqrt(jnp.mean(pre * pre, axis=-1, keepdims=True) + eps)
    unit = pre * inv
    g = ct if scale is None else ct * scale.reshape((1,) * (ct.ndim - 1) + scale.shape)
    return (g - unit * jnp.mean(g * unit, axis=-1, keepdims=True)) * inv


def _forward(shape: _Shape, wq, wk, x, target, query_idx, extras: QKExtras):
    """Everything the value and the backward pass need: ``(term, (x, xq, q, k, qn, kn, probs,
    c))`` with ``q: (b, g, rep, r, dh)`` and ``k: (b, g, n, dh)`` rotated, ``qn`` and ``kn`` the
    projections before the q/k norm (``None`` without one), and per row block its probabilities
    and ``c = probs - target`` in the grouped layout ``(b, g, rep*rows, keys)``."""
    h, g, dh = shape.spec.n_heads, shape.spec.n_kv_heads, shape.spec.head_dim
    rep = h // g
    b, n, _ = x.shape
    if wq.shape[1] != h * dh or wk.shape[1] != g * dh:
        raise ValueError(
            f"projections have {wq.shape[1]} and {wk.shape[1]} outputs, expected {h} and {g} heads "
            f"of one head_dim."
        )
    xq = x if query_idx is None else x[:, query_idx]
    r = xq.shape[1]
    rope_q, rope_k = _rope_tables(shape, n, x.dtype, query_idx)

    # (b, r, h*dh) -> (b, g, rep, r, dh): one matmul for all heads, then the head axes lead.
    eps = shape.spec.qk_norm_eps
    q = jnp.einsum("brd,de->bre", xq, wq)
    q = q if extras.q_bias is None else q + extras.q_bias[None, None, :]
    qn = q.reshape(b, r, g, rep, dh).transpose(0, 2, 3, 1, 4)
    q = _rotate(qk_transform(qn, None, extras.q_norm, eps), rope_q)
    k = jnp.einsum("bnd,de->bne", x, wk)
    k = k if extras.k_bias is None else k + extras.k_bias[None, None, :]
    kn = k.reshape(b, n, g, dh).transpose(0, 2, 1, 3)
    k = _rotate(qk_transform(kn, None, extras.k_norm, eps), rope_k)
    # target is (h, b, r, n) = (g, rep, b, r, n): only the outer axes move.
    target = target.reshape(g, rep, b, r, n)
    pos = jnp.arange(n - r, n) if query_idx is None else query_idx

    term, probs, cs = 0.0, [], []
    for start, end, keys in _spans(shape, r, n):
        rows = end - start
        qb = q[:, :, :, start:end].reshape(b, g, rep * rows, dh)
        logits = jnp.einsum("bgmc,bgnc->bgmn", qb, k[:, :, :keys])
        logits = scale_scores(logits, dh, shape.spec.query_scale)
        logits = logits.reshape(b, g, rep, rows, keys)
        if shape.causal:
            delta = pos[start:end, None] - jnp.arange(keys)[None, :]
            allowed = delta >= 0
            if shape.spec.window is not None:
                allowed = allowed & (delta < shape.spec.window)
            logits = jnp.where(allowed, logits, -jnp.inf)
        unnorm = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        p = unnorm / jnp.sum(unnorm, axis=-1, keepdims=True)
        c = p - target[:, :, :, start:end, :keys].transpose(2, 0, 1, 3, 4)
        term = term + 0.5 * jnp.sum(c * c) / b
        probs.append(p.reshape(b, g, rep * rows, keys))
        cs.append(c.reshape(b, g, rep * rows, keys))
    pre = (qn, kn) if eps is not None else (None, None)
    return term, (x, xq, q, k, *pre, tuple(probs), tuple(cs))


def _backward(shape: _Shape, wq, wk, res, query_idx, extras: QKExtras, ct):
    """Cotangents of ``(wq, wk, x)`` (masked kernels and input) for the term's cotangent ``ct``."""
    x, xq, q, k, qn, kn, probs, cs = res
    eps = shape.spec.qk_norm_eps
    h, g = shape.spec.n_heads, shape.spec.n_kv_heads
    rep = h // g
    b, n, d = x.shape
    r = xq.shape[1]
    dh = q.shape[-1]
    rope_q, rope_k = _rope_tables(shape, n, x.dtype, query_idx)

    # The logits' cotangent carries the scores' scale (and the term's mean over b).
    qs = shape.spec.query_scale
    scale = ct / (b * jnp.sqrt(jnp.asarray(dh, x.dtype))) if qs is None else ct * qs / b
    dqs, dk = [], jnp.zeros_like(k)
    for (start, end, keys), p, c in zip(_spans(shape, r, n), probs, cs, strict=True):
        pc = p * c
        dlogits = (pc - jnp.sum(pc, axis=-1, keepdims=True) * p) * scale
        qb = q[:, :, :, start:end].reshape(b, g, rep * (end - start), dh)
        dq = jnp.einsum("bgmn,bgnc->bgmc", dlogits, k[:, :, :keys])
        dqs.append(dq.reshape(b, g, rep, end - start, dh))
        # Sums over the group's query heads inside the contraction.
        dkb = jnp.einsum("bgmn,bgmc->bgnc", dlogits, qb)
        dk = dk + (dkb if keys == n else jnp.pad(dkb, ((0, 0), (0, 0), (0, n - keys), (0, 0))))
    dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=3)
    dq = _norm_backward(qn, extras.q_norm, eps, _rotate(dq, rope_q, inverse=True))
    dk = _norm_backward(kn, extras.k_norm, eps, _rotate(dk, rope_k, inverse=True))
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(b * r, h * dh)
    dk = dk.transpose(0, 2, 1, 3).reshape(b * n, g * dh)
    xq2, x2 = xq.reshape(b * r, d), x.reshape(b * n, d)
    dwq = xq2.T @ dq
    dwk = x2.T @ dk
    # The input's cotangent: dead code under jit unless someone differentiates with respect to x.
    dx = (dk @ wk.T).reshape(b, n, d)
    dxq = (dq @ wq.T).reshape(b, r, d)
    dx = dx + dxq if query_idx is None else dx.at[:, query_idx].add(dxq)
    return dwq, dwk, dx


def _settings(x, target, query_idx, spec, causal, blocks):
    """The static settings, after checking ``target``'s shape and choosing the row blocks."""
    b, n, _ = x.shape
    r = n if query_idx is None else query_idx.shape[0]
    want = (spec.n_heads, b, r, n)
    if target.shape != want:
        raise ValueError(f"target has shape {target.shape}, expected (h, b, r, n) = {want}.")
    if not causal or query_idx is not None:
        blocks = 1  # no causal structure to skip (or the rows' positions are not static)
    elif blocks is None:
        # At least 64 rows a block, at most 8 blocks: enough to skip most of the upper
        # triangle while every block's matmuls stay large.
        blocks = max([k for k in (1, 2, 4, 8) if n % k == 0 and n // k >= 64] or [1])
    elif blocks < 1 or n % blocks:
        raise ValueError(f"causal_blocks={blocks} must be a positive divisor of n={n}.")
    return _Shape(spec, causal, blocks)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _term(shape, wq, wk, x, target, query_idx, extras):
    return _forward(shape, wq, wk, x, target, query_idx, extras)[0]


def _term_fwd(shape, wq, wk, x, target, query_idx, extras):
    term, res = _forward(shape, wq, wk, x, target, query_idx, extras)
    return term, (wq, wk, res, query_idx, extras)


def _term_bwd(shape, saved, ct):
    wq, wk, res, query_idx, extras = saved
    dwq, dwk, dx = _backward(shape, wq, wk, res, query_idx, extras, ct)
    # No cotangent for the target (stopped, as in qk_pruning_loss), the integer rows, nor the
    # layer's biases and norm multipliers (never fitted).
    return dwq, dwk, dx, None, None, jax.tree.map(jnp.zeros_like, extras)


_term.defvjp(_term_fwd, _term_bwd)


def qk_attention_term(
    wq: Float[Array, "d hdh"],
    wk: Float[Array, "d gdh"],
    x: Float[Array, "*b n d"],
    target: Float[Array, "h b r n"],
    *,
    spec: AttentionSpec,
    causal: bool = True,
    query_idx: Int[Array, " r"] | None = None,
    causal_blocks: int | None = None,
    extras: QKExtras | None = None,
) -> Float[Array, ""]:
    """``1/2 sum_h mean_b ||P_h - target_h||_F^2`` for the (masked) kernels ``wq``, ``wk``, with
    the closed-form backward pass (``jax.custom_vjp``) for ``wq``, ``wk`` and ``x``.

    The value and its gradients equal those of the attention term of
    :func:`jaxprune.objective.qk_pruning_loss` (before ``attn_scale``); ``target`` gets no
    gradient (as there). ``jax.jvp`` of the term itself raises (a ``custom_vjp`` rule), while
    ``jax.jvp`` of its ``jax.grad`` (the solver's Hessian-vector products) works (tested).

    Args:
      wq: query kernel ``(d, h*dh)``; wk: key kernel ``(d, g*dh)`` (already masked).
      x: attention input ``(n, d)`` or ``(b, n, d)``.
      target: the dense probabilities ``(h, b, r, n)``.
      spec, causal, query_idx, extras: as in :func:`jaxprune.objective.qk_layer_probs`.
      causal_blocks: with ``causal`` and all query rows, split the rows into this many blocks
        and skip each block's keys past its last row (zero probabilities; ``target`` must be
        causal too, as dense probabilities are). ``None``: blocks of at least 64 rows, at most
        8 blocks; ``1``: no skipping. Ignored with ``query_idx`` or without ``causal``.

    Returns:
      The scalar term.
    """
    x = _batched(x)
    shape = _settings(x, target, query_idx, spec, causal, causal_blocks)
    return _term(shape, wq, wk, x, target, query_idx, QKExtras() if extras is None else extras)


def qk_attention_term_and_grad(
    wq: Float[Array, "d hdh"],
    wk: Float[Array, "d gdh"],
    x: Float[Array, "*b n d"],
    target: Float[Array, "h b r n"],
    *,
    spec: AttentionSpec,
    causal: bool = True,
    query_idx: Int[Array, " r"] | None = None,
    causal_blocks: int | None = None,
    extras: QKExtras | None = None,
) -> tuple[Float[Array, ""], tuple[Float[Array, "d hdh"], Float[Array, "d gdh"]]]:
    """The term of :func:`qk_attention_term` and its gradient with respect to ``wq`` and ``wk``,
    computed in one pass with no autodiff. Same arguments.

    Returns:
      ``(term, (d term / d wq, d term / d wk))``.
    """
    x = _batched(x)
    shape = _settings(x, target, query_idx, spec, causal, causal_blocks)
    extras = QKExtras() if extras is None else extras
    term, res = _forward(shape, wq, wk, x, target, query_idx, extras)
    dwq, dwk, _ = _backward(shape, wq, wk, res, query_idx, extras, jnp.ones((), x.dtype))
    return term, (dwq, dwk)


def qk_pruning_loss_vjp(
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
    causal_blocks: int | None = None,
    extras: QKExtras | None = None,
) -> tuple[Float[Array, ""], dict[str, jax.Array]]:
    """:func:`jaxprune.objective.qk_pruning_loss` (probability form) with the attention term's
    backward pass written by hand (:func:`qk_attention_term`); same arguments, value and gradient
    (tested), no ``values`` (output form); ``causal_blocks`` as in :func:`qk_attention_term`."""
    kw = dict(spec=spec, causal=causal, query_idx=query_idx, extras=extras)
    if target is None:
        target = qk_layer_probs(weights["q"], weights["k"], x, **kw)
    target = jax.lax.stop_gradient(target)
    wq, wk = masks["q"] * weights["q"], masks["k"] * weights["k"]
    attn = qk_attention_term(wq, wk, x, target, causal_blocks=causal_blocks, **kw)
    attn = attn / attn_scale
    reg = mask_regulariser(masks, lam, reg_scale)
    return attn + reg, {"attention": attn, "reg": reg}


def qk_pruning_value_and_grad(
    masks: dict[str, Float[Array, "d _"]],
    weights: dict[str, Float[Array, "d _"]],
    x: Float[Array, "*b n d"],
    *,
    lam: float,
    target: Float[Array, "h b r n"],
    attn_scale: float | jax.Array = 1.0,
    reg_scale: float = 1.0,
    **kw,
) -> tuple[Float[Array, ""], dict[str, jax.Array]]:
    """``(loss, d loss / d masks)`` of :func:`jaxprune.objective.qk_pruning_loss` (probability
    form, given ``target``) in one fused pass, no autodiff: what a solver's ``grad_fn`` could call.
    ``kw``: ``spec``, ``causal``, ``query_idx``, ``causal_blocks``, ``extras``
    (:func:`qk_attention_term`)."""
    wq, wk = weights["q"], weights["k"]
    term, (dwq, dwk) = qk_attention_term_and_grad(masks["q"] * wq, masks["k"] * wk, x, target, **kw)
    reg = mask_regulariser(masks, lam, reg_scale)
    coef = lam / reg_scale
    grads = {
        "q": wq * dwq / attn_scale + coef * masks["q"],
        "k": wk * dwk / attn_scale + coef * masks["k"],
    }
    return term / attn_scale + reg, grads

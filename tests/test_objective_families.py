"""The objective on attention features beyond Llama's, as the AttentionSpec and QKExtras describe
them: q/k biases (Qwen2), a per-head q/k RMSNorm before RoPE (Gemma 3, Qwen3), a sliding window
(Mistral, Gemma 3) and a query scale other than 1/sqrt(dh) (Gemma 3).

Probabilities are checked against a float64 NumPy restatement of each feature; the hand-written
backward pass and the row-blocked term against autodiff of the direct form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import objective
from jaxprune.models.spec import AttentionSpec, QKExtras
from jaxprune.objective_vjp import qk_pruning_loss_vjp, qk_pruning_value_and_grad

D, H, G, DH, B, N = 12, 4, 2, 6, 2, 16


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


FAMILIES = {
    "llama": (dict(), dict()),
    "qwen2 (q/k biases)": (dict(), dict(q_bias=True, k_bias=True)),
    "qwen3 (q/k norm)": (dict(qk_norm_eps=1e-6), dict(q_norm=True, k_norm=True)),
    "mistral (window)": (dict(window=5), dict()),
    "gemma3 (norm, window, scale)": (
        dict(qk_norm_eps=1e-6, window=7, query_scale=0.3),
        dict(q_norm=True, k_norm=True),
    ),
}


def problem(spec_kw, extras_kw, seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    spec = AttentionSpec(H, G, DH, 100.0, **spec_kw)
    w = {
        "q": rng.normal(size=(D, H * DH)) / np.sqrt(D),
        "k": rng.normal(size=(D, G * DH)) / np.sqrt(D),
    }
    sizes = {"q_bias": H * DH, "k_bias": G * DH, "q_norm": DH, "k_norm": DH}
    extras = QKExtras(
        **{
            k: jnp.asarray(
                (1.0 + 0.3 * rng.normal(size=sizes[k]))
                if "norm" in k
                else rng.normal(size=sizes[k]),
                dtype,
            )
            for k in extras_kw
        }
    )
    x = jnp.asarray(rng.normal(size=(B, N, D)), dtype)
    masks = {k: jnp.asarray(rng.uniform(size=v.shape), dtype) for k, v in w.items()}
    return spec, {k: jnp.asarray(v, dtype) for k, v in w.items()}, x, masks, extras


def reference_probs(wq, wk, x, spec: AttentionSpec, extras: QKExtras) -> np.ndarray:
    """Float64 NumPy, one head at a time, written from the features' definitions."""
    wq, wk, x = (np.asarray(a, np.float64) for a in (wq, wk, x))
    dh, rep = spec.head_dim, spec.n_heads // spec.n_kv_heads
    pos = np.arange(x.shape[1])
    inv = 1.0 / spec.rope_theta ** (np.arange(0, dh, 2) / dh)
    ang = np.concatenate([pos[:, None] * inv[None]] * 2, axis=1)

    def prep(a, bias, norm):
        if bias is not None:
            a = a + np.asarray(bias)
        if spec.qk_norm_eps is not None:
            a = a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + spec.qk_norm_eps)
            a = a * np.asarray(norm)
        half = np.concatenate([-a[..., dh // 2 :], a[..., : dh // 2]], axis=-1)
        return a * np.cos(ang) + half * np.sin(ang)

    scale = spec.query_scale if spec.query_scale is not None else dh**-0.5
    out = np.zeros((spec.n_heads, x.shape[0], x.shape[1], x.shape[1]))
    for i in range(spec.n_heads):
        j = i // rep
        cols_q, cols_k = slice(i * dh, (i + 1) * dh), slice(j * dh, (j + 1) * dh)
        qb = None if extras.q_bias is None else np.asarray(extras.q_bias)[cols_q]
        kb = None if extras.k_bias is None else np.asarray(extras.k_bias)[cols_k]
        q = prep(x @ wq[:, cols_q], qb, extras.q_norm)
        k = prep(x @ wk[:, cols_k], kb, extras.k_norm)
        s = np.einsum("bnc,bmc->bnm", q, k) * scale
        allowed = pos[:, None] >= pos[None, :]
        if spec.window is not None:
            allowed &= pos[:, None] - pos[None, :] < spec.window
        s = np.where(allowed, s, -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        out[i] = e / e.sum(-1, keepdims=True)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_probabilities_follow_each_feature(family):
    spec, w, x, _, extras = problem(*FAMILIES[family])
    got = objective.qk_layer_probs(w["q"], w["k"], x, spec=spec, extras=extras)
    want = reference_probs(w["q"], w["k"], x, spec, extras)
    # RoPE angles are computed in float32 (as the model and transformers do): hence 1e-6.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    # A subset of query rows gives the same rows.
    idx = jnp.array([0, 5, 9, 15])
    sub = objective.qk_layer_probs(w["q"], w["k"], x, spec=spec, extras=extras, query_idx=idx)
    np.testing.assert_allclose(np.asarray(sub), np.asarray(got)[:, :, np.asarray(idx)], atol=1e-12)
    if spec.window is not None:
        assert np.all(want[:, :, 10, : 10 - spec.window + 1] == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_written_gradient_and_blocked_term_equal_autodiff(family):
    spec, w, x, m, extras = problem(*FAMILIES[family], seed=1)
    target = objective.qk_layer_probs(w["q"], w["k"], x, spec=spec, extras=extras)
    kw = dict(lam=0.2, spec=spec, target=target, attn_scale=1.3, extras=extras)

    def auto(m, w):
        return objective.qk_pruning_loss(m, w, x, **kw)[0]

    def custom(m, w):
        return qk_pruning_loss_vjp(m, w, x, causal_blocks=4, **kw)[0]

    ref_value, ref_grads = jax.value_and_grad(auto, (0, 1))(m, w)
    value, grads = jax.value_and_grad(custom, (0, 1))(m, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
    fused_value, fused = qk_pruning_value_and_grad(m, w, x, **kw)
    np.testing.assert_allclose(fused_value, ref_value, rtol=1e-10)
    for k in ("q", "k"):
        np.testing.assert_allclose(fused[k], ref_grads[0][k], rtol=1e-8, atol=1e-12)

    def blocked(m):
        term = objective.qk_attention_term_blocked(m, w, x, spec=spec, row_block=4, extras=extras)[
            0
        ]
        return term / 1.3 + objective.mask_regulariser(m, 0.2)

    np.testing.assert_allclose(blocked(m), ref_value, rtol=1e-10)
    for k, g in jax.grad(blocked)(m).items():
        np.testing.assert_allclose(g, ref_grads[0][k], rtol=1e-8, atol=1e-12)


def test_value_bias_enters_the_values():
    rng = np.random.default_rng(3)
    spec = AttentionSpec(H, G, DH, 100.0)
    wv, wo = rng.normal(size=(D, G * DH)), rng.normal(size=(H * DH, D))
    x = jnp.asarray(rng.normal(size=(B, N, D)))
    bias = jnp.asarray(rng.normal(size=G * DH))
    v, _ = objective.head_values(wv, wo, x, spec=spec, extras=QKExtras(v_bias=bias))
    plain, _ = objective.head_values(wv, wo, x, spec=spec)
    # Query head 3 uses key/value head 1.
    np.testing.assert_allclose(v[3] - plain[3], np.broadcast_to(bias[DH:], (B, N, DH)))

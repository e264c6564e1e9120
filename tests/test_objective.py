"""The objective against an independent float64 NumPy computation and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import objective
from jaxprune.models.spec import AttentionSpec
from jaxprune.rope import apply_rope, rope_cos_sin


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def np_probs(w, x, causal):
    s = x @ w @ x.T
    n = s.shape[0]
    allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    s = np.where(allowed, s, -np.inf)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_loss(m, w, xs, lam, causal):
    terms = [0.5 * np.sum((np_probs(m * w, x, causal) - np_probs(w, x, causal)) ** 2) for x in xs]
    return np.mean(terms) + 0.5 * lam * np.sum(m * m)


def np_grad(m, w, xs, lam, causal):
    # Row by row through the explicit softmax Jacobian diag(f) - f f^T.
    total = np.zeros_like(w)
    for x in xs:
        f = np_probs(m * w, x, causal)
        c = f - np_probs(w, x, causal)
        g_s = np.stack([(np.diag(fr) - np.outer(fr, fr)) @ cr for fr, cr in zip(f, c, strict=True)])
        total += w * (x.T @ g_s @ x)
    return total / len(xs) + lam * m


def problem(seed, b=None, n=7, d=5):
    rng = np.random.default_rng(seed)
    shape = (n, d) if b is None else (b, n, d)
    x = rng.normal(size=shape) / np.sqrt(d)
    w = rng.normal(size=(d, d))
    m = rng.uniform(0.2, 1.0, size=(d, d))
    return m, w, x


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch", [None, 3])
def test_loss_and_grad_match_numpy(causal, batch):
    m, w, x = problem(0, batch)
    xs = [x] if batch is None else list(x)
    lam = 0.3
    loss = objective.attention_pruning_loss(m, w, x, lam=lam, causal=causal)
    grad = objective.attention_pruning_grad(m, w, x, lam=lam, causal=causal)
    np.testing.assert_allclose(loss, np_loss(m, w, xs, lam, causal), rtol=1e-12)
    np.testing.assert_allclose(grad, np_grad(m, w, xs, lam, causal), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("causal", [True, False])
def test_closed_form_grad_equals_autodiff_and_finite_differences(causal):
    m, w, x = problem(1, 2)
    lam = 0.1
    closed = objective.attention_pruning_grad(m, w, x, lam=lam, causal=causal)
    auto = jax.grad(objective.attention_pruning_loss)(m, w, x, lam=lam, causal=causal)
    np.testing.assert_allclose(closed, auto, rtol=1e-10, atol=1e-14)
    eps = 1e-6
    fd = np.zeros_like(m)
    for i, j in np.ndindex(*m.shape):
        e = np.zeros_like(m)
        e[i, j] = eps
        fd[i, j] = (
            np_loss(m + e, w, list(x), lam, causal) - np_loss(m - e, w, list(x), lam, causal)
        ) / (2 * eps)
    np.testing.assert_allclose(closed, fd, rtol=1e-6, atol=1e-9)


def test_loss_is_zero_at_full_mask_without_regulariser():
    _, w, x = problem(2)
    assert objective.attention_pruning_loss(np.ones_like(w), w, x, lam=0.0) == 0.0


def test_large_logits_stay_finite():
    _, w, x = problem(3, 2)
    loss = objective.attention_pruning_loss(0.5 * np.ones_like(w), 1e4 * w, 100 * x, lam=0.0)
    grad = objective.attention_pruning_grad(0.5 * np.ones_like(w), 1e4 * w, 100 * x, lam=0.0)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_factored_without_rope_equals_merged_per_head():
    rng = np.random.default_rng(4)
    d, h, dh, n = 6, 2, 3, 5
    x = rng.normal(size=(2, n, d)) / np.sqrt(d)
    wq, wk = rng.normal(size=(d, h * dh)), rng.normal(size=(d, h * dh))
    mq, mk = rng.uniform(size=wq.shape), rng.uniform(size=wk.shape)
    lam = 0.2
    loss, aux = objective.qk_pruning_loss(
        {"q": mq, "k": mk}, {"q": wq, "k": wk}, x, lam=lam, spec=AttentionSpec(h, h, dh, None)
    )
    expected_attn = 0.0
    for i in range(h):
        cols = slice(i * dh, (i + 1) * dh)
        w = wq[:, cols] @ wk[:, cols].T / np.sqrt(dh)
        w_masked = (mq * wq)[:, cols] @ (mk * wk)[:, cols].T / np.sqrt(dh)
        # M ∘ W = W_masked: the merged loss with that mask is this head's attention term.
        expected_attn += objective.attention_pruning_loss(w_masked / w, w, x, lam=0.0)
    np.testing.assert_allclose(aux["attention"], expected_attn, rtol=1e-10)
    np.testing.assert_allclose(loss, expected_attn + 0.5 * lam * (np.sum(mq**2) + np.sum(mk**2)))


def test_grouped_query_heads_share_their_key_head():
    rng = np.random.default_rng(5)
    d, h, g, dh, n = 8, 4, 2, 4, 6
    x = rng.normal(size=(n, d))
    wq, wk = rng.normal(size=(d, h * dh)), rng.normal(size=(d, g * dh))
    grouped = objective.qk_layer_probs(wq, wk, x, spec=AttentionSpec(h, g, dh, 1e4))
    wk_rep = np.concatenate([wk[:, (i // 2) * dh : (i // 2 + 1) * dh] for i in range(h)], axis=1)
    repeated = objective.qk_layer_probs(wq, wk_rep, x, spec=AttentionSpec(h, h, dh, 1e4))
    np.testing.assert_allclose(grouped, repeated, rtol=1e-12)
    assert grouped.shape == (h, 1, n, n)


def test_query_row_subset_matches_full_rows():
    rng = np.random.default_rng(6)
    d, h, dh, n = 8, 2, 4, 9
    x = rng.normal(size=(2, n, d))
    wq, wk = rng.normal(size=(d, h * dh)), rng.normal(size=(d, h * dh))
    idx = jnp.array([0, 3, 8])
    kw = dict(spec=AttentionSpec(h, h, dh, 1e4))
    full = objective.qk_layer_probs(wq, wk, x, **kw)
    sub = objective.qk_layer_probs(wq, wk, x, query_idx=idx, **kw)
    np.testing.assert_allclose(sub, full[:, :, idx], rtol=1e-12)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(7)
    q, k = rng.normal(size=(1, 8)), rng.normal(size=(1, 8))
    cos, sin = rope_cos_sin(jnp.arange(20), 8, 100.0)

    def score(i, j):
        qi = apply_rope(q, cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k, cos[j : j + 1], sin[j : j + 1])
        return float(jnp.sum(qi * kj))

    # Angles are computed in float32 (as Hugging Face does), hence the tolerance.
    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_layers_vmap_equals_sum_of_layers():
    rng = np.random.default_rng(8)
    L, d, h, g, dh, n = 3, 8, 4, 2, 4, 5
    x = rng.normal(size=(L, 2, n, d))
    weights = {"q": rng.normal(size=(L, d, h * dh)), "k": rng.normal(size=(L, d, g * dh))}
    masks = jax.tree.map(lambda w: rng.uniform(size=w.shape), weights)
    kw = dict(lam=0.1, spec=AttentionSpec(h, g, dh, 1e4))
    total, _ = objective.qk_pruning_loss_layers(masks, weights, x, **kw)

    def layer(tree, i):
        return jax.tree.map(lambda a: a[i], tree)

    per_layer = [
        objective.qk_pruning_loss(layer(masks, i), layer(weights, i), x[i], **kw)[0]
        for i in range(L)
    ]
    np.testing.assert_allclose(total, sum(per_layer), rtol=1e-12)

"""The row-blocked attention term: the same loss and gradient as the direct form, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import objective
from jaxprune.models.spec import AttentionSpec


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "row_block"), [(4, 2, 4), (3, 1, 16)])
def test_blocked_term_and_gradient_equal_the_direct_form(n_heads, n_kv_heads, row_block):
    rng = np.random.default_rng(0)
    d, dh, n, b = 12, 4, 16, 2
    x = jnp.asarray(rng.normal(size=(b, n, d)))
    weights = {
        "q": jnp.asarray(rng.normal(size=(d, n_heads * dh))),
        "k": jnp.asarray(rng.normal(size=(d, n_kv_heads * dh))),
    }
    masks = {k: jnp.asarray(rng.uniform(size=w.shape)) for k, w in weights.items()}
    kw = dict(spec=AttentionSpec(n_heads, n_kv_heads, dh, 100.0))

    def direct(m):
        return objective.qk_pruning_loss(m, weights, x, lam=0.0, **kw)[0]

    def blocked(m):
        return objective.qk_attention_term_blocked(m, weights, x, row_block=row_block, **kw)[0]

    np.testing.assert_allclose(blocked(masks), direct(masks), rtol=1e-12)
    g_direct, g_blocked = jax.grad(direct)(masks), jax.grad(blocked)(masks)
    for k in masks:
        np.testing.assert_allclose(g_blocked[k], g_direct[k], rtol=1e-10, atol=1e-14)
    # The dense scale is the direct 1/2 sum_h mean_b ||P_h||^2.
    probs = objective.qk_layer_probs(weights["q"], weights["k"], x, **kw)
    scale = objective.qk_attention_term_blocked(masks, weights, x, row_block=row_block, **kw)[1]
    np.testing.assert_allclose(scale, 0.5 * jnp.sum(jnp.mean(jnp.sum(probs**2, (-2, -1)), 1)))


def test_blocked_term_against_other_dense_weights_equals_the_direct_form_in_the_weights():
    """The weight update moves the kept weights against the dense model's probabilities: the
    blocked term with ``dense_weights`` has the direct term's value and weight gradient."""
    rng = np.random.default_rng(1)
    d, dh, n, b, n_heads, n_kv_heads = 12, 4, 16, 2, 4, 2
    x = jnp.asarray(rng.normal(size=(b, n, d)))
    dense = {
        "q": jnp.asarray(rng.normal(size=(d, n_heads * dh))),
        "k": jnp.asarray(rng.normal(size=(d, n_kv_heads * dh))),
    }
    keep = {k: jnp.asarray(rng.uniform(size=w.shape) < 0.5, x.dtype) for k, w in dense.items()}
    moved = {k: w + 0.1 * jnp.asarray(rng.normal(size=w.shape)) for k, w in dense.items()}
    kw = dict(spec=AttentionSpec(n_heads, n_kv_heads, dh, 100.0))
    target = objective.qk_layer_probs(dense["q"], dense["k"], x, **kw)

    def direct(w):
        return objective.qk_pruning_loss(keep, w, x, lam=0.0, target=target, **kw)[0]

    def blocked(w):
        term = objective.qk_attention_term_blocked(
            keep, w, x, row_block=4, dense_weights=dense, **kw
        )
        return term[0]

    np.testing.assert_allclose(blocked(moved), direct(moved), rtol=1e-12)
    assert blocked(moved) > 0
    g_direct, g_blocked = jax.grad(direct)(moved), jax.grad(blocked)(moved)
    for k in moved:
        np.testing.assert_allclose(g_blocked[k], g_direct[k], rtol=1e-10, atol=1e-14)


def test_blocked_term_refuses_a_block_that_does_not_divide_n():
    x = jnp.ones((1, 10, 4))
    w = {"q": jnp.ones((4, 4)), "k": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="row_block=4 must divide the sequence length 10"):
        objective.qk_attention_term_blocked(w, w, x, spec=AttentionSpec(1, 1, 4, None), row_block=4)

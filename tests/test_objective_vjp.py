"""The hand-written backward pass of the factored objective against autodiff of the reference."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models.spec import AttentionSpec
from jaxprune.objective import qk_layer_probs, qk_pruning_loss
from jaxprune.objective_vjp import (
    qk_attention_term,
    qk_pruning_loss_vjp,
    qk_pruning_value_and_grad,
)


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


B, N, D, H, G, DH = 3, 12, 16, 6, 2, 8  # GQA: three query heads per key/value head
ROWS = np.array([1, 4, 5, 9, 11])  # a sorted subset of query rows


def problem(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, N, D)))
    # Kernels of scale 1/2 give logits of order one: the softmax is neither flat nor saturated.
    w = {k: jnp.asarray(rng.normal(size=(D, n * DH)) / 2) for k, n in (("q", H), ("k", G))}
    m = {k: jnp.asarray(rng.uniform(0.2, 1.0, size=v.shape)) for k, v in w.items()}
    return m, w, x


def settings(query_rows, causal=True):
    rows = None if query_rows is None else jnp.asarray(query_rows)
    return dict(spec=AttentionSpec(H, G, DH, 100.0), causal=causal, query_idx=rows)


def loss_of(loss_fn, **kw):
    """``(masks, weights, x) -> loss`` of ``qk_pruning_loss`` or ``qk_pruning_loss_vjp``."""
    return lambda m, w, x: loss_fn(m, w, x, **kw)[0]


def assert_close(new, ref, rtol=1e-5):
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref), strict=True):
        assert a.shape == b.shape
        gap = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert gap < rtol, gap


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("query_rows", [None, ROWS])
def test_value_and_mask_grad_match_autodiff(query_rows, causal):
    m, w, x = problem()
    kw = settings(query_rows, causal)
    target = qk_layer_probs(w["q"], w["k"], x, **kw)
    kw.update(lam=0.3, target=target, attn_scale=1.7, reg_scale=5.0)
    ref = jax.jit(jax.value_and_grad(loss_of(qk_pruning_loss, **kw)))(m, w, x)
    custom = jax.jit(jax.value_and_grad(loss_of(qk_pruning_loss_vjp, **kw)))(m, w, x)
    fused = jax.jit(lambda m, w, x: qk_pruning_value_and_grad(m, w, x, **kw))(m, w, x)
    assert float(jnp.max(jnp.abs(ref[1]["q"]))) > 1e-3  # a gradient worth comparing
    assert_close(custom, ref)
    assert_close(fused, ref)


@pytest.mark.parametrize("blocks", [2, 3, 12])
def test_causal_row_blocks_match_autodiff(blocks):
    # Row blocks skip the keys past each block's last row: same value and gradients.
    m, w, x = problem(4)
    kw = settings(None)
    kw.update(lam=0.3, target=qk_layer_probs(w["q"], w["k"], x, **kw), attn_scale=1.7)
    ref = jax.jit(jax.value_and_grad(loss_of(qk_pruning_loss, **kw), (0, 1, 2)))(m, w, x)
    kw["causal_blocks"] = blocks
    custom = jax.jit(jax.value_and_grad(loss_of(qk_pruning_loss_vjp, **kw), (0, 1, 2)))(m, w, x)
    fused = jax.jit(lambda m, w, x: qk_pruning_value_and_grad(m, w, x, **kw))(m, w, x)
    assert_close(custom, ref)
    assert_close(fused, (ref[0], ref[1][0]))


def test_causal_blocks_must_divide_the_rows():
    m, w, x = problem()
    kw = settings(None)
    target = qk_layer_probs(w["q"], w["k"], x, **kw)
    with pytest.raises(ValueError, match="causal_blocks=5 must be a positive divisor of n=12"):
        qk_pruning_loss_vjp(m, w, x, lam=0.0, target=target, causal_blocks=5, **kw)


def test_weight_and_input_grads_match_autodiff():
    # The weight update differentiates with respect to the weights; the VJP gives x's too.
    m, w, x = problem(1)
    kw = settings(ROWS)
    kw.update(lam=0.0, target=qk_layer_probs(w["q"], w["k"], x, **kw))
    ref = jax.jit(jax.grad(loss_of(qk_pruning_loss, **kw), (1, 2)))(m, w, x)
    assert_close(jax.jit(jax.grad(loss_of(qk_pruning_loss_vjp, **kw), (1, 2)))(m, w, x), ref)


def test_without_target_and_unbatched_input():
    m, w, x = problem(2)
    kw = dict(settings(None), lam=0.1)
    ref = jax.jit(jax.value_and_grad(loss_of(qk_pruning_loss, **kw)))(m, w, x[0])
    assert_close(jax.jit(jax.value_and_grad(loss_of(qk_pruning_loss_vjp, **kw)))(m, w, x[0]), ref)


@pytest.mark.parametrize("blocks", [1, 3])
def test_hessian_vector_products_match_autodiff(blocks):
    # The solver's step size comes from jax.jvp of the gradient (forward over reverse).
    m, w, x = problem(3)
    kw = settings(None)
    kw.update(lam=0.3, target=qk_layer_probs(w["q"], w["k"], x, **kw))
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), m)
    ref_grad = jax.grad(loss_of(qk_pruning_loss, **kw))
    kw["causal_blocks"] = blocks
    custom_grad = jax.grad(loss_of(qk_pruning_loss_vjp, **kw))
    fused_grad = lambda m, w, x: qk_pruning_value_and_grad(m, w, x, **kw)[1]  # noqa: E731

    @partial(jax.jit, static_argnums=0)
    def hvp(grad_fn):
        return jax.jvp(lambda m: grad_fn(m, w, x), (m,), (v,))[1]

    assert_close(hvp(custom_grad), hvp(ref_grad))
    assert_close(hvp(fused_grad), hvp(ref_grad))


def test_wrong_target_shape_is_named():
    _, w, x = problem()
    with pytest.raises(ValueError, match=r"target has shape \(6, 3, 12, 11\)"):
        qk_attention_term(
            w["q"], w["k"], x, jnp.zeros((H, B, N, N - 1)), spec=AttentionSpec(H, G, DH, None)
        )

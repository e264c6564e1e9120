"""The fused CPU head NLL equals XLA's chunked NLL, forwards and backwards, for tied and untied
heads; heads it cannot compute keep XLA's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_run import tiny_config

from jaxprune.kernels import head_nll as fused_head
from jaxprune.models import llama as model_lib
from jaxprune.models.llama import Llama

pytestmark = pytest.mark.skipif(
    not fused_head.available(), reason="the fused CPU head NLL did not build here (no compiler)"
)


def _model(tied: bool, vocab: int) -> Llama:
    return Llama(tiny_config(vocab_size=vocab, tie_embeddings=tied), rngs=nnx.Rngs(0))


def _nll(model, tokens, setting, monkeypatch):
    graphdef, state = nnx.split(model)
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", setting)
    fn = jax.jit(lambda state: model_lib._token_nll(nnx.merge(graphdef, state), tokens))
    return fn(state), str(jax.make_jaxpr(fn)(state))


@pytest.mark.parametrize(("tied", "vocab", "shape"), [(True, 1000, (2, 45)), (False, 263, (1, 33))])
def test_fused_head_nll_equals_xla(tied, vocab, shape, monkeypatch):
    """Vocabularies and token counts that are not multiples of the kernel's blocks."""
    model = _model(tied, vocab)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, vocab, size=shape), jnp.int32)
    fused, graph = _nll(model, tokens, "fused", monkeypatch)
    assert fused_head.TARGET in graph
    xla, graph = _nll(model, tokens, "xla", monkeypatch)
    assert fused_head.TARGET not in graph
    assert fused.shape == (shape[0], shape[1] - 1)
    np.testing.assert_allclose(fused, xla, rtol=1e-5, atol=1e-5)


def test_fused_kernels_give_the_same_bits_on_any_number_of_threads():
    """A rerun, or a machine with another CPU count, gives the same NLL and attention exactly
    (the notebooks check a reloaded model's perplexity for equality)."""
    from jaxprune.kernels import causal_attention

    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(70, 48)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(20000, 48)) / 7, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 20000, 70), jnp.int32)
    q, k, v = (
        jnp.asarray(rng.normal(size=s), jnp.float32)
        for s in [(1, 2, 2, 300, 32)] + [(1, 2, 300, 32)] * 2
    )

    def outputs(threads):
        nll = jax.ffi.ffi_call(fused_head.TARGET, jax.ShapeDtypeStruct((70,), jnp.float32))(
            h, weight, targets, threads=threads
        )
        attn = jax.ffi.ffi_call(
            causal_attention.TARGET, jax.ShapeDtypeStruct((1, 300, 128), jnp.float32)
        )(q, k, v, scale=np.float32(0.2), window=0, threads=threads)
        return np.asarray(nll), np.asarray(attn)

    assert causal_attention.available()
    one = outputs(1)
    for threads in (2, 3, 7):
        for a, b in zip(one, outputs(threads), strict=True):
            np.testing.assert_array_equal(a, b)


def test_fused_head_nll_gradients_are_xlas(monkeypatch):
    model = _model(False, 300)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 300, size=(2, 20)), jnp.int32)
    graphdef, state = nnx.split(model)

    def loss(state):
        return jnp.sum(model_lib._token_nll(nnx.merge(graphdef, state), tokens))

    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "fused")
    fused = jax.jit(jax.grad(loss))(state)
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "xla")
    xla = jax.jit(jax.grad(loss))(state)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(xla), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_heads_the_kernel_cannot_compute_keep_xlas(monkeypatch):
    """A bfloat16 model, and a head with a bias."""
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "auto")
    h = jnp.zeros((4, 8), jnp.bfloat16)
    assert not fused_head.applies(h, jnp.zeros((10, 8), jnp.bfloat16))
    assert fused_head.applies(h.astype(jnp.float32), jnp.zeros((10, 8), jnp.float32))
    model = _model(False, 50)
    model.lm_head = nnx.Linear(32, 50, use_bias=True, rngs=nnx.Rngs(1))
    assert model_lib.head_weight(model) is None


def test_a_target_outside_the_vocabulary_is_an_error():
    h = jnp.ones((3, 16), jnp.float32)
    weight = jnp.ones((10, 16), jnp.float32)
    with pytest.raises(Exception, match="a target is outside the vocabulary"):
        fused_head.head_nll(h, weight, jnp.asarray([0, 10, 1]), None).block_until_ready()

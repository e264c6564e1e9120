"""The blocked causal attention and the chunked NLL equal the direct computation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_run import tiny_config

from jaxprune.attention import attention_probs, blocked_causal_attention
from jaxprune.models import llama as model_lib
from jaxprune.models.llama import Llama


def direct_logits(m: Llama, tokens):
    """The forward with one full (t, t) softmax per head, from the layer's own probabilities."""
    cos, sin = m.rope(tokens.shape[1])
    h = m.embed(tokens)
    for layer in m.layers:
        a = layer.self_attn
        x = layer.input_layernorm(h)
        probs = a.probs(x, cos, sin)  # (b, h, t, t)
        b, t, _ = x.shape
        v = a.v_proj(x).reshape(b, t, a.num_kv_heads, a.head_dim)
        v = jnp.repeat(v, a.num_heads // a.num_kv_heads, axis=2)
        out = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, -1)
        h = h + a.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))[0]
    return m.head(h)


@pytest.mark.parametrize("block", [8, 64])
def test_blocked_attention_and_chunked_nll_match_the_direct_forward(monkeypatch, block):
    cfg = tiny_config(vocab_size=50)
    m = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 21)), jnp.int32)
    monkeypatch.setattr(model_lib, "QUERY_BLOCK", block)
    monkeypatch.setattr(model_lib, "NLL_CHUNK", block)
    expected = direct_logits(m, tokens)
    np.testing.assert_allclose(m(tokens), expected, rtol=1e-5, atol=1e-5)
    nll = model_lib._token_nll(m, tokens)
    logp = jnp.take_along_axis(
        jnp.log(jnp.exp(expected) / jnp.exp(expected).sum(-1, keepdims=True))[:, :-1],
        tokens[:, 1:, None],
        axis=-1,
    )[..., 0]
    np.testing.assert_allclose(nll, -logp, rtol=1e-4, atol=1e-5)
    # The probabilities the captures report are the causal softmax rows.
    probs = m.layers[0].self_attn.probs(m.layers[0].input_layernorm(m.embed(tokens)), *m.rope(21))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert float(jnp.abs(jnp.triu(probs, k=1)).max()) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block", [4, 7, 64])
def test_blocked_causal_attention_equals_full_softmax_rows(dtype, window, block):
    """Blocks that do not divide t, a window shorter than a block's reach, grouped heads: the
    output is each query head's full causal (windowed) softmax rows times the values, in the
    head order ``o_proj`` reads."""
    b, g, r, t, dh = 2, 2, 3, 19, 8
    rng = np.random.default_rng(1)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), dtype)
        for shape in ((b, g, r, t, dh), (b, g, t, dh), (b, g, t, dh))
    )
    out = blocked_causal_attention(
        q, k, v, scale_logits=lambda s: s * 0.25, window=window, block=block
    )
    assert out.shape == (b, t, g * r * dh) and out.dtype == dtype
    logits = jnp.einsum("bgrtd,bgsd->bgrts", q, k).astype(jnp.float32) * 0.25
    probs = attention_probs(logits, window=window)
    expected = jnp.einsum("bgrts,bgsd->btgrd", probs, v.astype(jnp.float32)).reshape(b, t, -1)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=tol, atol=tol)

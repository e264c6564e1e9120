"""Llama 3 RoPE frequency scaling against Hugging Face ``transformers`` (PyTorch), no downloads.

The tiny config (``head_dim=16``, ``rope_theta=500``, ``original_max_position_embeddings=100``)
puts rotary pairs in all three regimes of the scaling: wavelengths 6.3 and 13.7 are below
``100 / high_freq_factor = 25`` (unchanged), 29.7 and 64.6 lie between 25 and
``100 / low_freq_factor = 100`` (blended), and the four longer ones are divided by ``factor``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_model import hf_logits, hf_model, small_config, state_numpy, tokens

from jaxprune.loaders.params import model_from_tensors
from jaxprune.models.llama import LlamaConfig, make_forward, projection_kernels
from jaxprune.models.spec import AttentionSpec
from jaxprune.objective import attention_error, qk_layer_probs
from jaxprune.rope import Llama3RopeScaling, apply_rope, rope_cos_sin, rope_inv_freq, rope_tables

THETA = 500.0
HEAD_DIM = 16
SCALING = Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=100
)


def hf_rope_parameters(scaling: Llama3RopeScaling = SCALING) -> dict:
    """The transformers 5 ``rope_parameters`` dict of ``scaling`` with ``THETA``."""
    return {"rope_theta": THETA, **scaling.to_hf()}


def hf_scaled_model(num_kv_heads: int = 2, seed: int = 0):
    """A tiny random Hugging Face Llama with llama3 RoPE scaling (eager attention)."""
    return hf_model(
        num_kv_heads,
        seed=seed,
        head_dim=HEAD_DIM,
        rope_theta=None,
        rope_parameters=hf_rope_parameters(),
        max_position_embeddings=512,
    )


def test_inv_freq_regimes_by_hand():
    plain = np.asarray(rope_inv_freq(HEAD_DIM, THETA), np.float64)
    scaled = np.asarray(rope_inv_freq(HEAD_DIM, THETA, SCALING), np.float64)
    wavelength = 2 * math.pi / plain
    np.testing.assert_allclose(wavelength[:2], [2 * math.pi, 2 * math.pi * 500 ** (1 / 8)])
    # Short wavelengths unchanged, long ones divided by the factor.
    np.testing.assert_array_equal(scaled[:2], plain[:2])
    np.testing.assert_allclose(scaled[4:], plain[4:] / 8.0, rtol=1e-6)
    # In between: keep the fraction s = (100 / wavelength - 1) / (4 - 1) of the original frequency.
    s = (100 / wavelength[2:4] - 1.0) / 3.0
    assert np.all((s > 0) & (s < 1))
    np.testing.assert_allclose(scaled[2:4], plain[2:4] * ((1 - s) / 8.0 + s), rtol=1e-6)


def test_cos_sin_match_transformers_rotary_embedding():
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        rope_parameters=hf_rope_parameters(),
        max_position_embeddings=512,
    )
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config=config)
    n = 300
    positions = torch.arange(n)[None]
    with torch.no_grad():
        cos_ref, sin_ref = rotary(torch.zeros(1, n, HEAD_DIM), positions)
    cos, sin = rope_cos_sin(jnp.arange(n), HEAD_DIM, THETA, scaling=SCALING)
    np.testing.assert_allclose(np.asarray(cos), cos_ref[0].numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(sin), sin_ref[0].numpy(), atol=2e-5)
    # The comparison can tell scaled from plain RoPE.
    cos_plain, _ = rope_cos_sin(jnp.arange(n), HEAD_DIM, THETA)
    assert np.abs(np.asarray(cos_plain) - cos_ref[0].numpy()).max() > 0.1


def test_tables_are_constants_of_a_jitted_function():
    """Inside jit the tables are computed at trace time: the compiled function has no sin or cos
    (XLA would otherwise evaluate them once per rotated element), with the same values."""

    def rotate(x):
        return apply_rope(x, *rope_tables(x.shape[-2], HEAD_DIM, THETA, scaling=SCALING))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 40, HEAD_DIM)), jnp.float32)
    hlo = jax.jit(rotate).lower(x).as_text()
    assert "sine" not in hlo and "cosine" not in hlo
    cos, sin = rope_cos_sin(jnp.arange(40), HEAD_DIM, THETA, scaling=SCALING)
    np.testing.assert_allclose(jax.jit(rotate)(x), apply_rope(x, cos, sin), rtol=1e-6, atol=1e-6)
    in_graph = jax.jit(lambda x: apply_rope(x, *rope_cos_sin(jnp.arange(40), HEAD_DIM, THETA)))
    assert "cosine" in in_graph.lower(x).as_text()  # the check can see trig in the graph


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_scaled_logits_match_transformers(num_kv_heads):
    ref = hf_scaled_model(num_kv_heads)
    config = LlamaConfig.from_hf_config(ref.config.to_dict())
    assert config.rope_scaling == SCALING
    ours = model_from_tensors(config, state_numpy(ref))
    toks = tokens(t=40)
    expected = hf_logits(ref, toks)
    np.testing.assert_allclose(np.asarray(make_forward(ours)(toks)), expected, atol=1e-5, rtol=1e-5)


def test_config_round_trips_the_scaling():
    config = small_config(rope_theta=5e5, rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192))
    hf = config.to_hf_config()
    assert hf["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert LlamaConfig.from_hf_config(hf) == config
    # transformers 5 moves it into rope_parameters; reading that back gives the same config.
    assert LlamaConfig.from_hf_config(transformers.LlamaConfig(**hf).to_dict()) == config
    # Without original_max_position_embeddings, transformers uses max_position_embeddings.
    scaling = {
        k: v for k, v in hf["rope_scaling"].items() if k != "original_max_position_embeddings"
    }
    short = dict(hf, rope_scaling=scaling, max_position_embeddings=4096)
    assert LlamaConfig.from_hf_config(short).rope_scaling.original_max_position_embeddings == 4096


def test_config_rejects_incomplete_or_bad_scaling():
    hf = small_config().to_hf_config()
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0}
    with pytest.raises(ValueError, match="lacks the keys"):
        LlamaConfig.from_hf_config(hf)
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        Llama3RopeScaling(8.0, 4.0, 1.0, 8192)


def test_objective_probs_equal_model_probs_with_scaling():
    ref = hf_scaled_model(num_kv_heads=2)
    config = LlamaConfig.from_hf_config(ref.config.to_dict())
    ours = model_from_tensors(config, state_numpy(ref))
    toks = jnp.asarray(tokens(t=40))
    cos, sin = ours.rope(toks.shape[1])
    layer = ours.layers[1]
    h = ours.layers[0](ours.embed(toks), cos, sin)
    _, captures = layer(h, cos, sin, capture=True)
    kernels = projection_kernels(layer)
    wq, wk = kernels["q"][...], kernels["k"][...]
    spec = config.attention_spec(1)
    assert spec.rope_theta == THETA and spec.rope_scaling == config.rope_scaling
    probs = qk_layer_probs(wq, wk, captures["attn_in"], spec=spec)
    # The objective gives (h, b, t, t); the model captures (b, h, t, t).
    np.testing.assert_allclose(
        np.asarray(probs).transpose(1, 0, 2, 3), np.asarray(captures["probs"]), atol=1e-6
    )
    plain_spec = AttentionSpec(config.num_heads, config.num_kv_heads, config.head_dim, THETA)
    plain = qk_layer_probs(wq, wk, captures["attn_in"], spec=plain_spec)
    assert np.abs(np.asarray(plain) - np.asarray(probs)).max() > 1e-3
    # The jitted pruning helper takes the scaling as a static (hashable) argument.
    err = attention_error(wq, wk, wq, wk, captures["attn_in"], spec=spec)
    assert float(err) == pytest.approx(0.0, abs=1e-6)

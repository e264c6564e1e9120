"""The output form of the attention term: the change of ``sum_h P_h V_h O_h``, the attention
block's real output, rather than of the probabilities alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tiny_run import tiny_config

from jaxprune.config import from_dict, replace
from jaxprune.models.llama import Llama, projection_kernels
from jaxprune.objective import attention_output, head_values, qk_layer_probs, qk_pruning_loss
from jaxprune.pipeline import PruneConfig, calibration_chunks, prune_model
from jaxprune.rope import rope_cos_sin

TINY = tiny_config()


def _layer_and_input():
    model = Llama(TINY, rngs=nnx.Rngs(1))
    layer = model.layers[0]
    x = jax.random.normal(jax.random.key(2), (2, 12, TINY.hidden_size))
    kernels = {k: jnp.asarray(v[...]) for k, v in projection_kernels(layer).items()}
    shape = dict(spec=TINY.attention_spec(0))
    return layer, x, kernels, shape


def test_output_equals_the_models_attention_block():
    layer, x, w, shape = _layer_and_input()
    cos, sin = rope_cos_sin(jnp.arange(x.shape[1]), TINY.head_dim, TINY.rope_theta)
    expected, _ = layer.self_attn(x, cos, sin)
    probs = qk_layer_probs(w["q"], w["k"], x, **shape)
    got = attention_output(probs, *head_values(w["v"], w["o"], x, **shape))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_output_term_is_the_squared_change_of_the_block_output():
    _, x, w, shape = _layer_and_input()
    kw = dict(shape)
    values = head_values(w["v"], w["o"], x, **shape)
    rng = np.random.default_rng(0)
    masks = {k: jnp.asarray(rng.uniform(size=w[k].shape), jnp.float32) for k in ("q", "k")}
    qk = {k: w[k] for k in ("q", "k")}
    ones = {k: jnp.ones_like(v) for k, v in qk.items()}
    assert float(qk_pruning_loss(ones, qk, x, lam=0.0, values=values, **kw)[0]) == 0.0
    loss, _ = qk_pruning_loss(masks, qk, x, lam=0.0, values=values, **kw)
    new = attention_output(
        qk_layer_probs(masks["q"] * w["q"], masks["k"] * w["k"], x, **kw), *values
    )
    old = attention_output(qk_layer_probs(w["q"], w["k"], x, **kw), *values)
    want = 0.5 * np.mean(np.sum(np.asarray(new - old) ** 2, axis=(-2, -1)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    # The output form weighs each probability change by the values it moves: it differs from the
    # probability form on the same masks.
    plain, _ = qk_pruning_loss(masks, qk, x, lam=0.0, **kw)
    assert not np.isclose(float(plain), float(loss), rtol=1e-2)


def test_pipeline_with_the_output_term_records_the_output_error():
    tokens = np.random.default_rng(6).integers(0, 64, size=(2, 16)).astype(np.int32)
    cfg = from_dict(
        PruneConfig,
        {
            "method": "softmax",
            "targets": "qk",
            "softmax": {"samples": 2, "seq_len": 16, "steps": 10},
            "eval": {"heldout_samples": 0},
            "progress": False,
            "layers": [0],
        },
    )
    runs = {}
    for term in ("probs", "output"):
        m = Llama(TINY, rngs=nnx.Rngs(5))
        runs[term] = prune_model(
            m, calibration_chunks(tokens, 2), [], replace(cfg, softmax={"term": term})
        )
    info = runs["output"]["layers"][0]
    assert info["final_attention_term"] < info["initial_loss"]
    # Another objective, another mask.
    assert any(
        not np.array_equal(runs["output"]["masks"][0][k], runs["probs"]["masks"][0][k])
        for k in ("q", "k")
    )

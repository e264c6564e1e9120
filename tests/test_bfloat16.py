"""``--dtype bfloat16``: the model's weights and activations in bfloat16, while the calibration
statistics, the mask solves and the weight updates run in float32."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_pipeline import BASE as PIPELINE_BASE
from tiny_run import TINY_FLAGS, jaxprune, prune_tiny, tiny_config, tiny_folders

from jaxprune import streaming
from jaxprune.config import replace
from jaxprune.loaders.lazy import open_weights
from jaxprune.methods.registry import prune_matrix
from jaxprune.methods.stats import init_stats, update_stats
from jaxprune.models.llama import Llama, projection_kernels
from jaxprune.pipeline import calibration_chunks, prune_model

TINY = tiny_config()
# The pipeline tests' settings, in bfloat16.
BASE = replace(PIPELINE_BASE, dtype="bfloat16")


def tokens(n=4, t=16, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, size=(n, t)).astype(np.int32)


def bf16_model(seed=0):
    return Llama(TINY, jnp.bfloat16, rngs=nnx.Rngs(seed))


def test_updated_weights_are_the_float32_solve_stored_in_bfloat16():
    """Layer 0's SparseGPT result equals SparseGPT run in float32 on the widened bf16 kernel and
    the float32 statistics of the bf16 model's own layer-0 inputs, rounded once to bf16."""
    model = bf16_model()
    calib = tokens(4, 16, seed=3)
    dense_q = np.asarray(projection_kernels(model.layers[0])["q"][...])
    assert dense_q.dtype == jnp.bfloat16
    h = model.embed(jnp.asarray(calib))
    x = model.layers[0].input_layernorm(h)
    assert x.dtype == jnp.bfloat16
    stats = update_stats(init_stats(TINY.hidden_size), x)
    assert stats.hessian.dtype == jnp.float32
    w, keep = prune_matrix(
        "sparsegpt",
        jnp.asarray(dense_q, jnp.float32),
        stats,
        sparsity=0.5,
        pattern="unstructured",
        blocksize=16,
    )
    cfg = replace(BASE, method="sparsegpt", targets="qk", eval={"heldout_samples": 0})
    report = prune_model(model, calibration_chunks(calib, 4), [], cfg)
    after = projection_kernels(model.layers[0])["q"][...]
    assert after.dtype == jnp.bfloat16
    np.testing.assert_array_equal(report["masks"][0]["q"], keep)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(w.astype(jnp.bfloat16)))


@pytest.mark.parametrize(
    "method,targets,pattern",
    [("softmax", "qk", "unstructured"), ("wanda", "attn", "2:4"), ("alps", "qk", "2:4")],
)
def test_every_kernel_stays_bfloat16_with_exact_masks(method, targets, pattern):
    model = bf16_model(1)
    cfg = replace(BASE, method=method, targets=targets, pattern=pattern)
    report = prune_model(
        model, calibration_chunks(tokens(), 2), calibration_chunks(tokens(1, seed=1), 1), cfg
    )
    for li, layer in enumerate(model.layers):
        for name, kernel in projection_kernels(layer).items():
            assert kernel[...].dtype == jnp.bfloat16, (li, name)
            if name in report["masks"][li]:
                keep = np.asarray(report["masks"][li][name])
                assert np.mean(~keep) == pytest.approx(0.5, abs=1e-9)
                assert np.all(np.asarray(kernel[...], np.float32)[~keep] == 0)
                assert np.all(np.asarray(kernel[...], np.float32)[keep] != 0)
    assert all(np.isfinite(layer["heldout_attention_error"]) for layer in report["layers"])
    logits = model(jnp.asarray(tokens(1)))
    assert logits.dtype == jnp.bfloat16 and np.isfinite(np.asarray(logits, np.float32)).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("bf16"))


def test_the_command_prunes_in_bfloat16_streamed_or_not(tiny):
    model, data, tmp = tiny
    flags = ("--method", "sparsegpt", "--targets", "attn", "--sparsegpt.blocksize", "16")
    f32, f32_masks = prune_tiny(tiny, *flags)
    bf16, masks = prune_tiny(tiny, *flags, "--dtype", "bfloat16")
    assert f32["config"]["dtype"] == "float32" and bf16["config"]["dtype"] == "bfloat16"
    # bf16 activations move the Hessians a little, and so a few mask entries.
    ppl, ppl32 = bf16["perplexity"]["wikitext2"], f32["perplexity"]["wikitext2"]
    assert ppl != ppl32 and np.isfinite(ppl)
    agree = np.mean([np.mean(masks[li][n] == f32_masks[li][n]) for li in masks for n in masks[li]])
    print(f"bf16 {ppl:.3f} f32 {ppl32:.3f} mask agreement {agree:.4f}")
    assert agree > 0.8
    # Streaming reads and computes each layer in the same dtype: the same masks, the same model.
    out = tmp / "runs" / "bf16-streamed"
    argv = ["prune", "--model", str(model), "--data-dir", str(data), "--out", str(out)]
    argv += [*TINY_FLAGS, "--save-params", "false", *flags, "--dtype", "bfloat16"]
    done = jaxprune(*argv, "--stream", "true", "--json", cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    streamed = json.loads(done.stdout.strip().splitlines()[-1])
    assert streamed["stream"] is True
    names = streaming.StreamedLayers(open_weights(model)).kernel_names
    files = streaming.LayerFiles(Path(streamed["run_dir"]) / streaming.PRUNED_DIR, {}, names)
    for li, layer in masks.items():
        for name, keep in files.masks(int(li)).items():
            np.testing.assert_array_equal(keep, layer[name])
        assert all(k.dtype == jnp.bfloat16 for k in files.kernels(int(li)).values())
    assert streamed["perplexity"]["wikitext2"] == pytest.approx(ppl, rel=1e-3)

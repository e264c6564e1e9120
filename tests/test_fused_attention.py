"""The fused CPU attention kernel equals XLA's blocked attention, forwards and backwards, and the
model's forward is the same either way; a missing compiler or a bad setting is one clear error."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_run import tiny_config

from jaxprune import attention
from jaxprune.kernels import build, loading
from jaxprune.kernels import causal_attention as fused
from jaxprune.models import llama as model_lib
from jaxprune.models.llama import Llama

pytestmark = pytest.mark.skipif(
    not fused.available(), reason="the fused CPU attention did not build here (no C++ compiler)"
)


def _qkv(b, g, r, t, dh, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = 2.0 * jax.random.normal(keys[0], (b, g, r, t, dh))
    k = jax.random.normal(keys[1], (b, g, t, dh))
    v = jax.random.normal(keys[2], (b, g, t, dh))
    return q, k, v


def _both(q, k, v, window, monkeypatch):
    """(fused, XLA) outputs of the blocked attention on the same inputs."""
    dh = q.shape[-1]

    def run():
        return attention.blocked_causal_attention(
            q,
            k,
            v,
            scale_logits=lambda x: x / math.sqrt(dh),
            window=window,
            block=64,
            logit_scale=1 / math.sqrt(dh),
        )

    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "fused")
    out_fused = jax.jit(run)()
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "xla")
    out_xla = jax.jit(run)()
    return out_fused, out_xla


@pytest.mark.parametrize(
    ("shape", "window"),
    [
        ((1, 3, 3, 2048 // 8, 64), None),  # SmolLM2's heads; rows a multiple of the tile
        ((2, 2, 4, 77, 16), None),  # a batch; t not a multiple of a tile or a key block
        ((1, 1, 2, 130, 48), None),  # a head size that is not a multiple of 64
        ((1, 1, 4, 300, 256), 37),  # Gemma's head size and a sliding window
        ((2, 2, 1, 200, 32), 1),  # a window of one key: each row sees only itself
        ((1, 1, 1, 1, 16), None),  # one token
    ],
)
def test_fused_attention_equals_xla(shape, window, monkeypatch):
    q, k, v = _qkv(*shape)
    out_fused, out_xla = _both(q, k, v, window, monkeypatch)
    assert out_fused.shape == out_xla.shape == (shape[0], shape[3], shape[1] * shape[2] * shape[4])
    np.testing.assert_allclose(out_fused, out_xla, rtol=1e-5, atol=2e-5)


def test_fused_attention_is_used_only_where_it_applies(monkeypatch):
    """The kernel is in the graph on a CPU in float32; bfloat16, head sizes that are not a
    multiple of 16, a scale the kernel is not told, and JAXPRUNE_CPU_KERNELS=xla keep XLA's."""

    def uses_kernel(q, k, v, logit_scale=0.125):
        fn = lambda q, k, v: attention.blocked_causal_attention(  # noqa: E731
            q, k, v, scale_logits=lambda x: x * 0.125, block=64, logit_scale=logit_scale
        )
        return fused.TARGET in str(jax.make_jaxpr(fn)(q, k, v))

    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "auto")
    q, k, v = _qkv(1, 1, 2, 40, 32)
    assert uses_kernel(q, k, v)
    assert not uses_kernel(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    assert not uses_kernel(*_qkv(1, 1, 2, 40, 24))
    assert not uses_kernel(q, k, v, logit_scale=None)
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "xla")
    assert not uses_kernel(q, k, v)


def test_fused_attention_gradients_are_xlas(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 90, 32, seed=1)
    weights = jax.random.normal(jax.random.PRNGKey(2), (1, 90, 2 * 2 * 32))

    def loss(q, k, v):
        out = attention.blocked_causal_attention(
            q, k, v, scale_logits=lambda x: x * 0.2, window=50, block=32, logit_scale=0.2
        )
        return jnp.sum(out * weights)

    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "fused")
    grads_fused = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "xla")
    grads_xla = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(grads_fused, grads_xla, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fused_attention_under_vmap(monkeypatch):
    """vmap (over layers, say) runs the kernel once per mapped element."""
    q, k, v = _qkv(3, 1, 2, 50, 16, seed=3)
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "fused")

    def one(q, k, v):
        return attention.blocked_causal_attention(
            q[None], k[None], v[None], scale_logits=lambda x: x * 0.25, logit_scale=0.25
        )[0]

    mapped = jax.vmap(one)(q, k, v)
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "xla")
    np.testing.assert_allclose(mapped, jax.vmap(one)(q, k, v), rtol=1e-5, atol=2e-5)


def test_model_forward_is_the_same_with_either_attention(monkeypatch):
    cfg = tiny_config(vocab_size=64, head_dim=16)
    m = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 70)), jnp.int32)
    graphdef, state = nnx.split(m)

    def nll(state):
        return model_lib._token_nll(nnx.merge(graphdef, state), tokens)

    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "fused")
    assert fused.TARGET in str(jax.make_jaxpr(nll)(state))
    out_fused = jax.jit(nll)(state)
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "xla")
    out_xla = jax.jit(nll)(state)
    np.testing.assert_allclose(out_fused, out_xla, rtol=1e-5, atol=1e-5)


def test_a_setting_holds_inside_its_block_only(monkeypatch):
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "fused")
    with loading.setting("xla"):
        assert loading.choice() == "xla"
    assert loading.choice() == "fused"
    monkeypatch.delenv("JAXPRUNE_CPU_KERNELS")
    with loading.setting("xla"):
        assert loading.choice() == "xla"
    assert loading.choice() == "auto"


def test_a_bad_attention_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", "fast")
    with pytest.raises(
        ValueError, match="JAXPRUNE_CPU_KERNELS='fast' is not one of auto, fused, xla"
    ):
        loading.choice()


def test_a_failed_build_names_the_compiler_and_its_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPRUNE_KERNEL_CACHE", str(tmp_path))
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    with pytest.raises(build.KernelBuildError, match=r"compiling broken\.cc failed"):
        build.build(broken)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on the path
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(build.KernelBuildError, match="no C\\+\\+ compiler found"):
        build.build(fused.SOURCE)
    assert not list(tmp_path.glob("*.so"))  # nothing half-written is left to be loaded

"""The CPU matmul kernel computes the models' projections as XLA's product does, forwards and
backwards, under ``vmap`` and on any number of threads; products it cannot compute keep XLA's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_run import tiny_config

from jaxprune.kernels import loading
from jaxprune.kernels import matmul as fused
from jaxprune.models import llama as model_lib
from jaxprune.models.llama import Llama

pytestmark = pytest.mark.skipif(
    not fused.available(), reason="the CPU matmul kernel did not build here (no compiler)"
)

LINEAR = (((1,), (0,)), ((), ()))


def _product(x, w, setting="fused", dims=LINEAR):
    """``dot_general`` traced with the kernel setting, and whether the kernel computed it."""

    def fn(x, w):
        with loading.setting(setting):
            return fused.dot_general(x, w, dims)

    graph = str(jax.make_jaxpr(fn)(x, w))
    return jax.jit(fn)(x, w), fused.TARGET in graph


def _arrays(*shapes, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        (64, 5, 1),  # fewer columns than a panel, a depth shorter than a vector
        (97, 48, 70),  # row and column tails
        (200, 1100, 33),  # three depth passes, a one-column tail
        (130, 64, 600),  # enough panels for the column-group layout
    ],
)
def test_kernel_equals_xla(m, k, n):
    x, w = _arrays((m, k), (k, n))
    out, used = _product(x, w)
    assert used
    expected = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_leading_axes_are_rows():
    """A linear layer's ``(batch, tokens, d)`` input is one product of ``batch x tokens`` rows."""
    x, w = _arrays((3, 40, 24), (24, 50), seed=1)
    out, used = _product(x, w, dims=(((2,), (0,)), ((), ())))
    assert used and out.shape == (3, 40, 50)
    np.testing.assert_allclose(out, jnp.einsum("btk,kn->btn", x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("why", "shapes", "dtype", "dims", "setting"),
    [
        ("too few rows", ((fused.MIN_ROWS - 1, 16), (16, 8)), jnp.float32, LINEAR, "fused"),
        (
            "a vocabulary-wide head",
            ((64, 4), (4, fused.MAX_COLUMNS + 1)),
            jnp.float32,
            LINEAR,
            "fused",
        ),
        ("bfloat16", ((64, 16), (16, 8)), jnp.bfloat16, LINEAR, "fused"),
        (
            "the transposed weight",
            ((64, 16), (8, 16)),
            jnp.float32,
            (((1,), (1,)), ((), ())),
            "fused",
        ),
        ("kernels off", ((64, 16), (16, 8)), jnp.float32, LINEAR, "xla"),
    ],
)
def test_other_products_keep_xla(why, shapes, dtype, dims, setting):
    x, w = _arrays(*shapes, seed=2, dtype=dtype)
    out, used = _product(x, w, setting=setting, dims=dims)
    assert not used, why
    np.testing.assert_array_equal(out, jax.lax.dot_general(x, w, dims))


def test_same_bits_on_any_number_of_threads():
    """Each output is one dot product in order of depth, whoever computes it."""
    x, w = _arrays((150, 700), (700, 300), seed=3)

    def run(threads):
        call = jax.ffi.ffi_call(fused.TARGET, jax.ShapeDtypeStruct((150, 300), jnp.float32))
        return np.asarray(call(x, w, threads=threads))

    one = run(1)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(one, run(threads))


def test_gradients_and_vmap_are_xlas():
    x, w, cot = _arrays((4, 70, 24), (24, 40), (4, 70, 40), seed=4)

    def loss(setting):
        def fn(x, w):
            with loading.setting(setting):
                out = jax.vmap(lambda xi: fused.dot_general(xi, w, LINEAR))(x)
            return jnp.sum(out * cot)

        return jax.jit(jax.grad(fn, argnums=(0, 1)))

    assert fused.TARGET in str(jax.make_jaxpr(loss("fused"))(x, w))
    for got, want in zip(loss("fused")(x, w), loss("xla")(x, w), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_model_projections_use_the_kernel(monkeypatch):
    """The models' linear layers run the kernel in float32 on a CPU, and their NLL is XLA's."""
    model = Llama(tiny_config(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(
        np.random.default_rng(5).integers(0, model.config.vocab_size, size=(2, 40)), jnp.int32
    )

    def nll(setting):
        monkeypatch.setenv("JAXPRUNE_CPU_KERNELS", setting)
        fn = jax.jit(lambda state: model_lib._token_nll(nnx.merge(graphdef, state), tokens))
        return fn(state), str(jax.make_jaxpr(fn)(state))

    fused_nll, graph = nll("fused")
    assert graph.count(fused.TARGET) == 7 * model.config.num_layers
    xla_nll, graph = nll("xla")
    assert fused.TARGET not in graph
    np.testing.assert_allclose(fused_nll, xla_nll, rtol=1e-5, atol=1e-5)


def test_auto_runs_the_kernel_only_on_cpus_where_it_was_measured(monkeypatch):
    """``auto`` leaves the projections to XLA on a CPU without AVX-512; ``fused`` runs it."""
    x, w = _arrays((64, 16), (16, 8), seed=6)
    monkeypatch.setattr(fused, "measured_here", lambda: False)
    assert not _product(x, w, setting="auto")[1]
    assert _product(x, w, setting="fused")[1]
    monkeypatch.setattr(fused, "measured_here", lambda: True)
    assert _product(x, w, setting="auto")[1]

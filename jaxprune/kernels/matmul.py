"""The CPU matrix product kernel (``matmul.cc``) as a ``dot_general`` for the models' linear layers,
with XLA's product as its derivative (the kernel computes forwards only)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxprune.kernels import build, loading

SOURCE = Path(__file__).with_name("matmul.cc")
SYMBOL = "JaxpruneMatmul"
TARGET = "jaxprune_matmul"
# Fewer rows than this go to XLA: the kernel packs the whole kernel matrix on every call, which
# a product of a few rows does not repay.
MIN_ROWS = 64
# Wider products (an output head's vocabulary) go to XLA too: packing a matrix that wide reads
# it with a large stride, and at 512 x 576 x 49,152 the kernel ran at 0.9 of XLA's speed.
MAX_COLUMNS = 16384


@functools.cache
def measured_here() -> bool:
    """Whether this CPU has AVX-512, where the kernel was measured faster than XLA's product (its
    register blocks are sized for AVX-512's 32 vector registers). Elsewhere it is untested, and
    ``JAXPRUNE_CPU_KERNELS=auto`` leaves the projections to XLA (``fused`` still runs it)."""
    return " avx512f" in f" {build.cpu_flags()} "


def available() -> bool:
    """Whether the kernel builds and is registered here (built once per process)."""
    return loading.load(SOURCE, SYMBOL, TARGET)


def _plain(dimension_numbers, lhs, rhs) -> bool:
    """Whether ``dimension_numbers`` contracts ``lhs``'s last axis with a 2-d ``rhs``'s first,
    with no batch axes: a linear layer's ``x @ kernel``."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    return (
        rhs.ndim == 2
        and tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and not lhs_batch
        and not rhs_batch
    )


def applies(lhs: jax.Array, rhs: jax.Array, dimension_numbers, preferred_element_type) -> bool:
    """Whether the kernel computes this product: ``JAXPRUNE_CPU_KERNELS`` allows it, both operands
    float32 on a CPU backend (the result too), a linear layer's contraction with at least
    ``MIN_ROWS`` rows and at most ``MAX_COLUMNS`` columns, a CPU where it was measured
    (:func:`measured_here`) unless the setting is ``fused``, and the kernel builds.

    Raises:
      ValueError: a bad ``JAXPRUNE_CPU_KERNELS``, or ``fused`` where the kernel does not build.
    """
    fits = (
        lhs.dtype == jnp.float32
        and rhs.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32)
        and _plain(dimension_numbers, lhs, rhs)
        and math.prod(lhs.shape[:-1]) >= MIN_ROWS
        and rhs.shape[-1] <= MAX_COLUMNS
        and (loading.choice() == "fused" or measured_here())
    )
    return loading.use(SOURCE, SYMBOL, TARGET, fits)


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (..., k) @ w (k, n)`` by the kernel, XLA's product giving the derivatives."""

    def kernel(x, w):
        rows = x.reshape(-1, x.shape[-1])
        call = jax.ffi.ffi_call(
            TARGET,
            jax.ShapeDtypeStruct((rows.shape[0], w.shape[1]), jnp.float32),
            vmap_method="sequential",
        )
        return call(rows, w, threads=loading.threads()).reshape(*x.shape[:-1], w.shape[1])

    return loading.with_reference_vjp(kernel, jnp.matmul)(x, w)


def dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
):
    """``jax.lax.dot_general``, computed by the CPU kernel where :func:`applies` (a linear
    layer's float32 ``x @ kernel`` on a CPU) and by XLA otherwise; for ``nnx.Linear``'s
    ``dot_general``."""
    if out_sharding is None and applies(lhs, rhs, dimension_numbers, preferred_element_type):
        return _matmul(lhs, rhs)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )

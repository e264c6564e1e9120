"""The fused CPU next-token NLL through the output head (``head_nll.cc``) as a JAX function, with
the chunked pure-JAX NLL as its derivative (the kernel computes forwards only)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxprune.kernels import loading

SOURCE = Path(__file__).with_name("head_nll.cc")
SYMBOL = "JaxpruneHeadNll"
TARGET = "jaxprune_head_nll"


def available() -> bool:
    """Whether the kernel builds and is registered here (built once per process)."""
    return loading.load(SOURCE, SYMBOL, TARGET)


def applies(h: jax.Array, weight: jax.Array) -> bool:
    """Whether the kernel computes this NLL: ``JAXPRUNE_CPU_KERNELS`` allows it, float32 hidden
    states and head on a CPU backend, and the kernel builds.

    Raises:
      ValueError: a bad ``JAXPRUNE_CPU_KERNELS``, or ``fused`` where the kernel does not build.
    """
    fits = h.dtype == jnp.float32 and weight.dtype == jnp.float32
    return loading.use(SOURCE, SYMBOL, TARGET, fits)


def head_nll(h, weight, targets, reference):
    """``nll (n,)``: ``logsumexp(h @ weight.T) - (h @ weight.T)[i, targets[i]]`` for normed hidden
    states ``h (n, d)``, a head ``weight (vocab, d)`` and ``targets (n,)``, without the
    ``(n, vocab)`` logits. ``reference(h, weight)`` computes the same in JAX (targets fixed);
    it gives the derivatives."""

    def nll(h, weight):
        call = jax.ffi.ffi_call(
            TARGET, jax.ShapeDtypeStruct(h.shape[:1], jnp.float32), vmap_method="sequential"
        )
        return call(h, weight, targets.astype(jnp.int32), threads=loading.threads())

    return loading.with_reference_vjp(nll, reference)(h, weight)

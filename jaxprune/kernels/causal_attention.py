"""The fused CPU attention kernel (``causal_attention.cc``) as a JAX function, with the pure-JAX
blocked attention as its derivative (the kernel computes forwards only)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.kernels import loading

SOURCE = Path(__file__).with_name("causal_attention.cc")
SYMBOL = "JaxpruneCausalAttention"
TARGET = "jaxprune_causal_attention"
LANES = 16


def available() -> bool:
    """Whether the kernel builds and is registered here (built once per process)."""
    return loading.load(SOURCE, SYMBOL, TARGET)


def applies(q: jax.Array, window: int | None) -> bool:
    """Whether the kernel computes this attention: ``JAXPRUNE_CPU_KERNELS`` allows it, float32 on
    a CPU backend, the head size a multiple of 16, a window (if any) of at least one key, and the
    kernel builds.

    Raises:
      ValueError: a bad ``JAXPRUNE_CPU_KERNELS``, or ``fused`` where the kernel does not build.
    """
    fits = q.dtype == jnp.float32 and q.shape[-1] % LANES == 0 and (window is None or window >= 1)
    return loading.use(SOURCE, SYMBOL, TARGET, fits)


def causal_attention(q, k, v, scale: float, window: int | None, reference):
    """Causal attention ``(b, t, g * r * dh)`` of ``q (b, g, r, t, dh)`` and ``k, v (b, g, t,
    dh)``, logits multiplied by ``scale``, by the fused kernel. ``reference(q, k, v)`` computes
    the same in JAX; it gives the derivatives."""

    def attend(q, k, v):
        b, g, r, t, dh = q.shape
        call = jax.ffi.ffi_call(
            TARGET,
            jax.ShapeDtypeStruct((b, t, g * r * dh), q.dtype),
            vmap_method="sequential",
        )
        return call(q, k, v, scale=np.float32(scale), window=window or 0, threads=loading.threads())

    return loading.with_reference_vjp(attend, reference)(q, k, v)

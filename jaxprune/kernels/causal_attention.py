"""The fused CPU attention kernel (``causal_attention.cc``) as a JAX function.

:func:`available` builds and registers it on first call; :func:`causal_attention` runs it, with
the pure-JAX blocked attention as its derivative (the kernel computes forwards only).
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.kernels.build import KernelBuildError, build

TARGET = "jaxprune_causal_attention"
SOURCE = Path(__file__).with_name("causal_attention.cc")
LANES = 16
CHOICES = ("auto", "fused", "xla")


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (once per process). A failed build warns once,
    naming why, and the caller falls back to the pure-JAX attention."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build(SOURCE)))
    except (KernelBuildError, OSError) as err:
        warnings.warn(f"fused CPU attention unavailable, using XLA's: {err}", stacklevel=2)
        return False
    jax.ffi.register_ffi_target(
        TARGET, jax.ffi.pycapsule(library.JaxpruneCausalAttention), platform="cpu"
    )
    return True


def choice() -> str:
    """``JAXPRUNE_ATTENTION``: ``auto`` (the default: the fused kernel on a CPU where it builds),
    ``fused`` (the kernel, or an error where it does not build) or ``xla`` (XLA's attention).

    Raises:
      ValueError: another value.
    """
    value = os.environ.get("JAXPRUNE_ATTENTION", "auto")
    if value not in CHOICES:
        raise ValueError(
            f"JAXPRUNE_ATTENTION={value!r} is not one of {', '.join(CHOICES)}; unset it to use "
            "the fused CPU attention where it builds"
        )
    return value


def applies(q: jax.Array, window: int | None) -> bool:
    """Whether the kernel computes this attention: the setting allows it; float32 on a CPU
    backend; the head size a multiple of 16; a window (if any) of at least one key; and the
    kernel builds (checked last, so other backends never compile it).

    Raises:
      ValueError: a bad ``JAXPRUNE_ATTENTION``, or ``fused`` where the kernel does not build.
    """
    value = choice()
    if value == "xla" or not (
        jax.default_backend() == "cpu"
        and q.dtype == jnp.float32
        and q.shape[-1] % LANES == 0
        and (window is None or window >= 1)
    ):
        return False
    if value == "fused" and not available():
        raise ValueError(
            "JAXPRUNE_ATTENTION=fused, but the fused CPU attention did not build (see the warning "
            "above); install a C++ compiler or set JAXPRUNE_ATTENTION=auto"
        )
    return available()


def causal_attention(q, k, v, scale: float, window: int | None, reference):
    """Causal attention ``(b, t, g * r * dh)`` of ``q (b, g, r, t, dh)`` and ``k, v (b, g, t,
    dh)``, logits multiplied by ``scale``, by the fused kernel. ``reference(q, k, v)`` computes
    the same in JAX; it gives the derivatives."""

    @jax.custom_vjp
    def attend(q, k, v):
        b, g, r, t, dh = q.shape
        call = jax.ffi.ffi_call(
            TARGET,
            jax.ShapeDtypeStruct((b, t, g * r * dh), q.dtype),
            vmap_method="sequential",
        )
        return call(q, k, v, scale=np.float32(scale), window=window or 0, threads=_threads())

    def forward(q, k, v):
        return attend(q, k, v), (q, k, v)

    def backward(saved, grad):
        return jax.vjp(reference, *saved)[1](grad)

    attend.defvjp(forward, backward)
    return attend(q, k, v)


def _threads() -> int:
    """The CPUs this process may run on (the kernel's worker count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

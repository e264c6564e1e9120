"""Which CPU kernels run: the ``JAXPRUNE_CPU_KERNELS`` setting, building and registering a kernel
once per process, and the worker count."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax

from jaxprune.kernels.build import KernelBuildError, build

ENV = "JAXPRUNE_CPU_KERNELS"
CHOICES = ("auto", "fused", "xla")


def choice() -> str:
    """``JAXPRUNE_CPU_KERNELS``: ``auto`` (the default: the fused kernels on a CPU where they
    build), ``fused`` (the kernels, or an error where they do not build) or ``xla`` (XLA's
    computations everywhere).

    Raises:
      ValueError: another value.
    """
    value = os.environ.get(ENV, "auto")
    if value not in CHOICES:
        raise ValueError(
            f"{ENV}={value!r} is not one of {', '.join(CHOICES)}; unset it to use the fused CPU "
            "kernels where they build"
        )
    return value


@contextlib.contextmanager
def setting(value: str) -> Iterator[None]:
    """``JAXPRUNE_CPU_KERNELS=value`` inside the block (functions traced there keep it), the
    previous value after."""
    saved = os.environ.get(ENV)
    os.environ[ENV] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = saved


@functools.cache
def load(source: Path, symbol: str, target: str) -> bool:
    """Build ``source`` and register its handler ``symbol`` as the ``jax.ffi`` target ``target``,
    once per process. A failed build warns once, naming why, and returns False."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build(source)))
    except (KernelBuildError, OSError) as err:
        warnings.warn(f"{source.stem} kernel unavailable, using XLA: {err}", stacklevel=3)
        return False
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), "cpu")
    return True


def use(source: Path, symbol: str, target: str, fits: bool) -> bool:
    """Whether a kernel computes this call: the setting allows it, the backend is a CPU, the
    inputs ``fits`` the kernel, and it builds (checked last, so other backends never compile it).

    Raises:
      ValueError: a bad setting, or ``fused`` where the kernel does not build.
    """
    value = choice()
    if value == "xla" or not fits or jax.default_backend() != "cpu":
        return False
    if not load(source, symbol, target):
        if value == "fused":
            raise ValueError(
                f"{ENV}=fused, but the {source.stem} kernel did not build (see the warning "
                f"above); install a C++ compiler or set {ENV}=auto"
            )
        return False
    return True


def with_reference_vjp(kernel, reference):
    """``kernel`` (a forward-only call) with the derivatives of ``reference``, a JAX function of
    the same arguments computing the same values: the backward pass differentiates the reference
    at the saved inputs."""

    @jax.custom_vjp
    def fn(*args):
        return kernel(*args)

    def forward(*args):
        return fn(*args), args

    def backward(saved, grad):
        return jax.vjp(reference, *saved)[1](grad)

    fn.defvjp(forward, backward)
    return fn


def threads() -> int:
    """The CPUs this process may run on (a kernel's worker count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

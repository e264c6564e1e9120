"""Compile a kernel's C++ source into a shared library once per source, compiler flags and
machine, cached under ``$JAXPRUNE_KERNEL_CACHE`` (default ``~/.cache/jaxprune/kernels``)."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.ffi

FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread")


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled (no compiler, or the compiler failed)."""


def cache_dir() -> Path:
    """Where built libraries are kept."""
    root = os.environ.get("JAXPRUNE_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "jaxprune" / "kernels"


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else ``c++``, ``g++`` or ``clang++`` on the path."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build(source: Path) -> Path:
    """The shared library of ``source``, compiled now unless a cached build matches.

    The cache key covers the source and the headers beside it, the flags, the compiler, the JAX
    version and headers, and the machine (``-march=native`` code runs only where it was built).
    A build is written to a temporary name and renamed into place, so concurrent processes never
    load a half-written library.

    Raises:
      KernelBuildError: no C++ compiler is on the path, or it failed (its message is included).
    """
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    headers = sorted(source.parent.glob("*.h"))
    for part in (source, *headers):
        key.update(part.read_bytes())
    for part in (" ".join(FLAGS), cxx, include, jax.__version__):
        key.update(part.encode())
    key.update(platform.machine().encode() + platform.node().encode() + cpu_flags().encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cxx, *FLAGS, f"-I{include}", f"-I{source.parent}", str(source), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelBuildError(
                f"compiling {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
            )
        os.replace(out, target)
    return target


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a cache shared between machines never mixes builds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()

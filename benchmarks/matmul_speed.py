"""The float32 matmul speed of XLA (``jnp.dot``, jit), the fused CPU kernel
(``jaxprune.kernels.matmul``, jit) and torch at the model's shapes, side by side in one run.

The forward is matmul-bound on CPU: this says how much of its gap to transformers is the matmul
kernels themselves. Each shape alternates the three implementations over ``--repeats`` rounds and
reports the best of each in GFLOP/s, and the largest difference of the kernel's product from
XLA's.

    python benchmarks/matmul_speed.py
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.kernels import loading
from jaxprune.kernels import matmul as fused

# (m, k, n): SmolLM2-135M's projections at 2048 tokens, an output-head chunk, a square one, and
# Gemma 3 270M's MLP (640 x 2048) at 2048 tokens.
SHAPES = [
    (2048, 576, 576),
    (2048, 576, 1536),
    (2048, 1536, 576),
    (2048, 576, 192),
    (512, 576, 49152),
    (2048, 2048, 2048),
    (2048, 640, 2048),
]


def _kernel_dot():
    """The models' ``dot_general`` with the kernel on, jit-compiled."""
    dims = (((1,), (0,)), ((), ()))

    def product(a, b):
        with loading.setting("fused"):
            return fused.dot_general(a, b, dims)

    return jax.jit(product)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}; JAX devices {jax.devices()}")
    head = ("m x k x n", "XLA", "kernel", "torch", "XLA/torch", "kernel/torch", "max |diff|")
    print(
        f"{head[0]:>20s} {head[1]:>8s} {head[2]:>8s} {head[3]:>8s} "
        f"{head[4]:>10s} {head[5]:>13s} {head[6]:>11s}   (GFLOP/s)"
    )
    dot = jax.jit(jnp.dot)
    kernel = _kernel_dot()
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a = rng.random((m, k), dtype=np.float32)
        b = rng.random((k, n), dtype=np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        diff = float(jnp.max(jnp.abs(kernel(ja, jb) - dot(ja, jb))))
        ta @ tb
        runs = {
            "xla": (lambda a, b: dot(a, b).block_until_ready(), ja, jb),
            "kernel": (lambda a, b: kernel(a, b).block_until_ready(), ja, jb),
            "torch": (lambda a, b: a @ b, ta, tb),
        }
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for name, (run, left, right) in runs.items():
                start = time.perf_counter()
                run(left, right)
                best[name] = min(best[name], time.perf_counter() - start)
        speed = {name: 2 * m * k * n / t / 1e9 for name, t in best.items()}
        xla, ker, tor = speed["xla"], speed["kernel"], speed["torch"]
        print(
            f"{f'{m} x {k} x {n}':>20s} {xla:8.1f} {ker:8.1f} {tor:8.1f} "
            f"{xla / tor:10.2f} {ker / tor:13.2f} {diff:11.2e}"
        )


if __name__ == "__main__":
    main()

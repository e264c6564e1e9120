"""The float32 matmul speed of XLA (``jnp.dot``, jit) against torch at the model's shapes.

The forward is matmul-bound on CPU: this says how much of its gap to transformers is the matmul
kernels themselves. Each shape alternates the two implementations over 5 repeats and reports the
best of each in GFLOP/s.

    python benchmarks/matmul_speed.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# (m, k, n): SmolLM2-135M's projections at 2048 tokens, an output-head chunk, and a square one.
SHAPES = [
    (2048, 576, 576),
    (2048, 576, 1536),
    (2048, 1536, 576),
    (2048, 576, 192),
    (512, 576, 49152),
    (2048, 2048, 2048),
]


def main() -> None:
    import torch

    print(f"torch threads {torch.get_num_threads()}; JAX devices {jax.devices()}")
    print(f"{'m x k x n':>20s} {'XLA GFLOP/s':>12s} {'torch GFLOP/s':>14s} {'XLA / torch':>12s}")
    dot = jax.jit(jnp.dot)
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a = rng.random((m, k), dtype=np.float32)
        b = rng.random((k, n), dtype=np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        dot(ja, jb).block_until_ready()
        ta @ tb
        best = {"xla": float("inf"), "torch": float("inf")}
        for _ in range(5):
            start = time.perf_counter()
            dot(ja, jb).block_until_ready()
            best["xla"] = min(best["xla"], time.perf_counter() - start)
            start = time.perf_counter()
            ta @ tb
            best["torch"] = min(best["torch"], time.perf_counter() - start)
        flops = 2 * m * k * n
        xla, tor = flops / best["xla"] / 1e9, flops / best["torch"] / 1e9
        print(f"{f'{m} x {k} x {n}':>20s} {xla:12.1f} {tor:14.1f} {xla / tor:12.2f}")


if __name__ == "__main__":
    main()

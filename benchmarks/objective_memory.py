"""Peak memory of one loss-and-gradient step of the q/k attention term, direct against
row-blocked (``jaxprune.objective.qk_attention_term_blocked``), at 2k, 4k and 8k tokens.

Shapes are SmolLM2-135M's attention (d = 576, 9 query and 3 key/value heads of 64), batch 1.
The figure is XLA's own accounting of the compiled step (``memory_analysis``: arguments, outputs
and temporaries), read without running it, so the direct form can be sized where it would not fit;
the blocked step is then also run at every length to show that it does.

    python benchmarks/objective_memory.py [--lengths 2048 4096 8192] [--row-block 256]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import objective
from jaxprune.models.spec import AttentionSpec

D, H, G, DH = 576, 9, 3, 64


def _bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--row-block", type=int, default=256)
    p.add_argument("--no-run", action="store_true", help="only compile and size the steps")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    w = {
        "q": jnp.asarray(rng.normal(size=(D, H * DH)) * 0.05, jnp.float32),
        "k": jnp.asarray(rng.normal(size=(D, G * DH)) * 0.05, jnp.float32),
    }
    m = {k: jnp.full_like(v, 0.9) for k, v in w.items()}
    kw = dict(spec=AttentionSpec(H, G, DH, 1e5))

    def direct(m, w, x):
        return objective.qk_pruning_loss(m, w, x, lam=0.0, **kw)[0]

    def blocked(m, w, x):
        return objective.qk_attention_term_blocked(m, w, x, row_block=a.row_block, **kw)[0]

    print(
        f"one value-and-grad step, d={D}, {H}/{G} heads x {DH}, batch 1; device {jax.devices()[0]}"
    )
    print(
        f"{'tokens':>7s} {'direct GiB':>11s} {'blocked GiB':>12s} {'ratio':>6s}"
        f" {'blocked step s':>15s}"
    )
    for n in a.lengths:
        x = jax.ShapeDtypeStruct((1, n, D), jnp.float32)
        sizes = []
        for fn in (direct, blocked):
            step = jax.jit(jax.value_and_grad(fn))
            sizes.append(_bytes(step.lower(m, w, x).compile()))
        run = "-"
        if not a.no_run:
            xs = jnp.asarray(rng.normal(size=(1, n, D)), jnp.float32)
            step = jax.jit(jax.value_and_grad(blocked))
            jax.block_until_ready(step(m, w, xs))
            t = time.perf_counter()
            jax.block_until_ready(step(m, w, xs))
            run = f"{time.perf_counter() - t:.2f}"
        print(
            f"{n:7d} {sizes[0] / 2**30:11.2f} {sizes[1] / 2**30:12.2f} "
            f"{sizes[0] / sizes[1]:6.1f} {run:>15s}",
            flush=True,
        )


if __name__ == "__main__":
    main()

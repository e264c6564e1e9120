"""One loss-and-gradient step of the factored objective at a realistic size, against a big matmul.

Prints the step time, its achieved FLOP/s (FLOPs from XLA's cost analysis of the compiled step,
and from a hand count), and the FLOP/s of a large ``jnp.dot`` measured in the same run, with the
ratio. Timings interleave the two workloads so a noisy shared machine affects both alike.

    python benchmarks/objective_step.py [--n 2048 --d 576 --heads 9 --kv-heads 3 --head-dim 64]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.objective import qk_layer_probs, qk_pruning_loss


def timed(fn, *args, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--matmul", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a.batch, a.n, a.d)), jnp.float32)
    weights = {
        "q": jnp.asarray(rng.normal(size=(a.d, a.heads * a.head_dim)) / np.sqrt(a.d), jnp.float32),
        "k": jnp.asarray(
            rng.normal(size=(a.d, a.kv_heads * a.head_dim)) / np.sqrt(a.d), jnp.float32
        ),
    }
    kw = dict(n_heads=a.heads, n_kv_heads=a.kv_heads, rope_theta=1e5)
    target = jax.jit(lambda w, x: qk_layer_probs(w["q"], w["k"], x, **kw))(weights, x)
    masks = jax.tree.map(lambda w: 0.9 * jnp.ones_like(w), weights)

    # Data are arguments, not closed-over constants (XLA would constant-fold them).
    step = jax.jit(
        jax.value_and_grad(lambda m, w, x, t: qk_pruning_loss(m, w, x, lam=1e-3, target=t, **kw)[0])
    )
    args = (masks, weights, x, target)
    compiled = step.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", float("nan")))
    n, d, h, g, dh, b = a.n, a.d, a.heads, a.kv_heads, a.head_dim, a.batch
    fwd = 2 * b * n * d * dh * (h + g) + 2 * b * h * n * n * dh  # projections + logits
    hand_flops = 3 * fwd  # forward + backward (about twice the forward's matmuls)

    m = a.matmul
    big_a = jnp.asarray(rng.normal(size=(m, m)), jnp.float32)
    big_b = jnp.asarray(rng.normal(size=(m, m)), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(compiled(*args))
    jax.block_until_ready(dot(big_a, big_b))

    step_times, dot_times = [], []
    for _ in range(a.repeats):  # interleaved
        step_times += timed(compiled, *args, repeats=1)
        dot_times += timed(dot, big_a, big_b, repeats=1)
    t_step, t_dot = float(np.median(step_times)), float(np.median(dot_times))
    dot_flops = 2 * m**3 / t_dot
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})")
    print(f"factored loss+grad, n={n} d={d} heads={h} kv_heads={g} head_dim={dh} batch={b}")
    print(f"  step time (median of {a.repeats}): {t_step * 1e3:.1f} ms")
    print(
        f"  FLOPs per step: XLA cost analysis {xla_flops / 1e9:.2f} GFLOP, "
        f"hand count {hand_flops / 1e9:.2f} GFLOP"
    )
    print(
        f"  achieved: {xla_flops / t_step / 1e9:.1f} GFLOP/s (XLA count), "
        f"{hand_flops / t_step / 1e9:.1f} GFLOP/s (hand count)"
    )
    print(f"jnp.dot {m}x{m} @ {m}x{m}: {t_dot * 1e3:.1f} ms, {dot_flops / 1e9:.1f} GFLOP/s")
    print(
        f"ratio step/dot FLOP/s: {xla_flops / t_step / dot_flops:.3f} (XLA count), "
        f"{hand_flops / t_step / dot_flops:.3f} (hand count)"
    )


if __name__ == "__main__":
    main()

"""One loss-and-gradient step of the factored objective at a realistic size, against a big matmul.

Times the step five ways, side by side: ``autodiff`` (``jax.value_and_grad`` of
:func:`jaxprune.objective.qk_pruning_loss`, what the solver runs); ``custom_vjp`` (the same with
the attention term's hand-written backward pass, :func:`jaxprune.objective_vjp.qk_pruning_loss_vjp`,
every query row against every key); ``autodiff_blocks`` (autodiff of the custom path's forward:
heads grouped by key/value head, and causal row blocks that skip the keys past each block's last
row); ``custom_vjp_blocks`` (the hand-written backward pass with the row blocks, the default);
``fused_blocks`` (value and mask gradient in one pass with no autodiff,
:func:`jaxprune.objective_vjp.qk_pruning_value_and_grad`, with the row blocks). On request
(``--variants``), ``custom_vjp_blocks_norope``: the default step with the rotary embedding left
out, a diagnostic of what the rotations cost (a different function: its gradients differ).

For each it prints the step's wall-clock and CPU time and its FLOP/s over those of a large
``jnp.dot`` measured in the same run, with two FLOP counts: XLA's cost analysis of the compiled
step (the work it does: lower with the row blocks, which skip about half of the attention
matmuls) and a hand count of the work the causal objective needs (projections and their kernel
gradients, and the three score-sized matmuls over the causal half only; the same for all
variants, so its ratio compares step times). Timings interleave all workloads so a noisy shared
machine affects them alike.

    python benchmarks/objective_step.py [--n 2048 --d 576 --heads 9 --kv-heads 3 --head-dim 64]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models.spec import AttentionSpec
from jaxprune.objective import mask_regulariser, qk_layer_probs, qk_pruning_loss
from jaxprune.objective_vjp import (
    qk_attention_term_and_grad,
    qk_pruning_loss_vjp,
    qk_pruning_value_and_grad,
)

DEFAULT_VARIANTS = (
    "autodiff",
    "custom_vjp",
    "autodiff_blocks",
    "custom_vjp_blocks",
    "fused_blocks",
)
VARIANTS = (*DEFAULT_VARIANTS, "custom_vjp_blocks_norope")


def timed(fn, *args):
    """Wall-clock and process CPU seconds of one call. On a machine shared with other jobs the
    CPU time is the steadier measure: time slices lost to other processes do not count."""
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t, time.process_time() - c


def steps(kw):
    """The jitted ``(masks, weights, x, target) -> (loss, mask gradients)`` of each variant."""
    loss = dict(lam=1e-3, **kw)
    return {
        "autodiff": jax.value_and_grad(
            lambda m, w, x, t: qk_pruning_loss(m, w, x, target=t, **loss)[0]
        ),
        "custom_vjp": jax.value_and_grad(
            lambda m, w, x, t: qk_pruning_loss_vjp(m, w, x, target=t, causal_blocks=1, **loss)[0]
        ),
        # Autodiff through the custom path's forward (grouped heads, row blocks): its hand-written
        # gradient is unused and dropped by XLA, so this separates layout from backward pass.
        "autodiff_blocks": jax.value_and_grad(
            lambda m, w, x, t: (
                qk_attention_term_and_grad(m["q"] * w["q"], m["k"] * w["k"], x, t, **kw)[0]
                + mask_regulariser(m, loss["lam"])
            )
        ),
        "custom_vjp_blocks": jax.value_and_grad(
            lambda m, w, x, t: qk_pruning_loss_vjp(m, w, x, target=t, **loss)[0]
        ),
        "fused_blocks": lambda m, w, x, t: qk_pruning_value_and_grad(m, w, x, target=t, **loss),
        "custom_vjp_blocks_norope": jax.value_and_grad(
            lambda m, w, x, t: qk_pruning_loss_vjp(
                m, w, x, target=t, **dict(loss, rope_theta=None)
            )[0]
        ),
    }


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
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"subset of {VARIANTS}")
    a = p.parse_args()
    names = a.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        p.error(f"--variants {a.variants!r}: unknown {sorted(unknown)}; choose from {VARIANTS}.")

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a.batch, a.n, a.d)), jnp.float32)
    weights = {
        "q": jnp.asarray(rng.normal(size=(a.d, a.heads * a.head_dim)) / np.sqrt(a.d), jnp.float32),
        "k": jnp.asarray(
            rng.normal(size=(a.d, a.kv_heads * a.head_dim)) / np.sqrt(a.d), jnp.float32
        ),
    }
    kw = dict(spec=AttentionSpec(a.heads, a.kv_heads, a.head_dim, 1e5))
    target = jax.jit(lambda w, x: qk_layer_probs(w["q"], w["k"], x, **kw))(weights, x)
    masks = jax.tree.map(lambda w: 0.9 * jnp.ones_like(w), weights)

    # Data are arguments, not closed-over constants (XLA would constant-fold them).
    args = (masks, weights, x, target)
    compiled, xla_flops, outs = {}, {}, {}
    variants = steps(kw)
    for name in names:
        compiled[name] = jax.jit(variants[name]).lower(*args).compile()
        cost = compiled[name].cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        xla_flops[name] = float(cost.get("flops", float("nan")))
        outs[name] = jax.block_until_ready(compiled[name](*args))
    n, d, h, g, dh, b = a.n, a.d, a.heads, a.kv_heads, a.head_dim, a.batch
    # What the causal objective needs: the q/k projections and their kernels' gradients (x is
    # data: no gradient for it), and the logits with their dQ and dK products over the causal
    # half of each score matrix only.
    projections = 2 * b * n * d * dh * (h + g)
    logits = 2 * b * h * n * n * dh / 2
    hand_flops = 2 * projections + 3 * logits

    m = a.matmul
    big_a = jnp.asarray(rng.normal(size=(m, m)), jnp.float32)
    big_b = jnp.asarray(rng.normal(size=(m, m)), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(big_a, big_b))

    wall = {name: [] for name in [*names, "dot"]}
    cpu = {name: [] for name in wall}
    for _ in range(a.repeats):  # interleaved
        for name, fn, fn_args in [
            *((k, compiled[k], args) for k in names),
            ("dot", dot, (big_a, big_b)),
        ]:
            t, c = timed(fn, *fn_args)
            wall[name].append(t)
            cpu[name].append(c)
    t_dot, c_dot = float(np.median(wall["dot"])), float(np.median(cpu["dot"]))
    dot_flops = 2 * m**3 / t_dot
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})")
    print(f"factored loss+grad, n={n} d={d} heads={h} kv_heads={g} head_dim={dh} batch={b}")
    print(
        f"jnp.dot {m}x{m} @ {m}x{m}: {t_dot * 1e3:.1f} ms, {dot_flops / 1e9:.1f} GFLOP/s "
        f"(CPU time {c_dot * 1e3:.1f} ms)"
    )
    print(f"hand count {hand_flops / 1e9:.2f} GFLOP per step (all variants)")
    ref = outs[names[0]]
    for name in names:
        t, c = float(np.median(wall[name])), float(np.median(cpu[name]))
        gap = max(
            float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
            for u, v in zip(jax.tree.leaves(outs[name][1]), jax.tree.leaves(ref[1]), strict=True)
        )
        print(
            f"  {name:17s} step {t * 1e3:7.1f} ms (median of {a.repeats}, "
            f"min {min(wall[name]) * 1e3:.1f}), CPU time {c * 1e3:.1f} ms; "
            f"XLA count {xla_flops[name] / 1e9:.2f} GFLOP; "
            f"grad max rel. diff to {names[0]} {gap:.1e}"
        )
        print(
            f"  {'':17s} ratio step/dot FLOP/s: wall {xla_flops[name] / t / dot_flops:.3f} "
            f"(XLA count), {hand_flops / t / dot_flops:.3f} (hand count); CPU time "
            f"{xla_flops[name] / c * c_dot / (2 * m**3):.3f} (XLA count), "
            f"{hand_flops / c * c_dot / (2 * m**3):.3f} (hand count)"
        )


if __name__ == "__main__":
    main()

"""How many solver steps the softmax-aware mask needs (issue 8): held-out attention and output
error of the rounded masks against the number of Adam steps, for a few layers of the dense model.

Each chosen layer is solved on the DENSE model's inputs (no earlier layer pruned, so the layers
are independent and the study is cheap), with the run's defaults otherwise: attention term on the
first ``softmax.samples`` calibration sequences' ``softmax.seq_len``-token prefixes, Wanda start,
lambda 0.1. Wanda's input statistics come from all calibration windows. For every step count the
solve restarts from the same start, so each row is what ``--steps S`` would give. Errors are
measured on held-out C4 evaluation windows at ``--heldout-len`` tokens (2048: the evaluation's
length), relative to the dense layer, averaged over the layers; "wanda" (0 steps of the solve,
Wanda's own mask) is the first row.

    python benchmarks/solve_steps.py [--layers 0 10 20] [--calib 8 2048] [--steps 10 20 40 80 160]
        [--set softmax.term=output ...]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import data, layerwise
from jaxprune.config import parse_overrides, replace
from jaxprune.loaders.resolve import load_model
from jaxprune.methods.registry import prune_matrix
from jaxprune.methods.softmax_solve import prune_qk_softmax
from jaxprune.methods.stats import init_stats, update_stats
from jaxprune.models.llama import projection_kernels
from jaxprune.objective import layer_errors
from jaxprune.pipeline import PruneConfig, request_for


def dense_inputs(model, tokens, layers):
    """``attn_in`` of the chosen layers of the dense model for ``tokens`` ``(b, t)``."""
    h = layerwise.embed_chunks(model, [tokens])[0]
    cos, sin = model.rope(tokens.shape[1])
    out = {}
    for li, layer in enumerate(model.layers[: max(layers) + 1]):
        graphdef, state = nnx.split(layer)
        if li in layers:
            out[li] = layerwise.capture_layer(graphdef, state, h, cos, sin, ("attn_in",))["attn_in"]
        h = layerwise.apply_layer(graphdef, state, h, cos, sin)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20])
    p.add_argument("--calib", type=int, nargs=2, default=[8, 2048], metavar=("N", "T"))
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80, 160])
    p.add_argument("--heldout-len", type=int, default=2048)
    p.add_argument("--set", nargs="*", default=[], help="PruneConfig overrides, key=value")
    a = p.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    c = model.config
    shape = dict(spec=c.attention_spec(0))  # every layer of a Llama attends alike
    cfg = replace(PruneConfig(), parse_overrides(a.set), method="softmax", progress=False)
    calib = data.calibration_windows(tokenizer, "standard", a.calib[0], a.calib[1])
    held = data.eval_windows(tokenizer, "c4", 2, seq_len=a.heldout_len)
    xs = {li: [] for li in a.layers}
    for i in range(0, len(calib), 4):
        for li, x in dense_inputs(model, jnp.asarray(calib[i : i + 4]), a.layers).items():
            xs[li].append(x)
    held_x = dense_inputs(model, jnp.asarray(held), a.layers)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(
        f"SmolLM2-135M q/k {cfg.pattern} {cfg.sparsity:g}, layers {a.layers} on dense inputs; "
        f"calibration {a.calib[0]} x {a.calib[1]} C4 tokens, attention term "
        f"{cfg.softmax.samples} x {cfg.softmax.seq_len}; held-out 2 x {a.heldout_len} C4 tokens"
        + (f"; overrides {' '.join(a.set)}" if a.set else "")
    )
    print(f"{'steps':>6s} {'attn err':>9s} {'out err':>8s} {'final term':>11s} {'s/layer':>8s}")
    for steps in [0, *a.steps]:
        attn, out, term, secs = [], [], [], []
        for li in a.layers:
            kernels = {
                k: jnp.asarray(v[...]) for k, v in projection_kernels(model.layers[li]).items()
            }
            x_all = jnp.concatenate(xs[li])
            stats = update_stats(init_stats(x_all.shape[-1]), x_all)
            qk = {k: kernels[k] for k in ("q", "k")}
            t0 = time.perf_counter()
            if steps == 0:
                new = {
                    k: prune_matrix("wanda", w, stats, sparsity=cfg.sparsity, pattern=cfg.pattern)[
                        0
                    ]
                    for k, w in qk.items()
                }
                term.append(float("nan"))
            else:
                x = x_all[: cfg.softmax.samples, : cfg.softmax.seq_len]
                new, _, info = prune_qk_softmax(
                    qk,
                    x,
                    stats,
                    request_for(cfg),
                    replace(cfg, softmax={"steps": steps}).softmax,
                    value_weights={k: kernels[k] for k in ("v", "o")},
                    progress=False,
                    **shape,
                )
                term.append(info["final_attention_term"])
            jax.block_until_ready(new)
            secs.append(time.perf_counter() - t0)
            hx = held_x[li]
            errors = layer_errors(kernels, kernels | new, hx, **shape)
            attn.append(float(errors[0]))
            out.append(float(errors[1]))
        print(
            f"{steps if steps else 'wanda':>6} {np.mean(attn):9.4f} {np.mean(out):8.4f} "
            f"{np.nanmean(term) if steps else float('nan'):11.5f} {np.mean(secs):8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

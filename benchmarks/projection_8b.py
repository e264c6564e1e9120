"""A full-protocol ``qk`` 50% row of Llama-3.1-8B on one H100, projected on paper.

No GPU has run this: every figure is a projection. The FLOPs and bytes of each phase are
XLA's own cost analysis of the project's compiled functions at Llama-3.1-8B's shapes (lowered and
compiled on this machine from abstract shapes, so nothing of the model's size is allocated):

- the forward of one decoder layer and of the output head (``token_nll`` of a one- and a
  two-layer model of that shape) at 1 x 2048 tokens;
- the calibration statistics of one layer's attention input (``update_stats``, the ``X^T X`` every
  method's pipeline accumulates);
- each method's work on one layer's q and k: Wanda's and SparseGPT's whole prune of each matrix,
  and one step of the softmax-aware solve (the loss and its hand-written gradient on the run's
  ``softmax.samples x softmax.seq_len`` attention inputs), counted ``steps + update_steps`` times.

A row is then: 32 layers x (one layer forward and the statistics over the calibration tokens, plus
the method's work), and the 64 evaluation windows' forwards. Each phase's time is the larger of
FLOPs over the device's peak and bytes over its memory bandwidth (a roofline, the fastest the
device could run it), then divided by an assumed efficiency. The device figures are NVIDIA's
published H100 SXM numbers; ``--efficiency`` is an assumption, not a measurement.

ADMM and ALPS are not projected: their iteration counts depend on the data (ALPS stops when the
support settles), and XLA counts a loop's body once.

    python benchmarks/projection_8b.py [--efficiency 0.5] [--calib 32 2048]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.methods.sparsegpt import sparsegpt_prune
from jaxprune.methods.stats import InputStats, init_stats, update_stats
from jaxprune.methods.wanda import wanda_prune
from jaxprune.models.llama import Llama, LlamaConfig, _token_nll
from jaxprune.objective_vjp import qk_pruning_loss_vjp
from jaxprune.prune_config import PruneConfig

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json); RoPE scaling changes no FLOP count.
LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    tie_embeddings=False,
)
N_LAYERS = 32

# NVIDIA H100 SXM5 datasheet: dense peak FLOP/s and HBM3 bandwidth.
H100 = {"float32": 67e12, "tf32 tensor": 494.7e12, "bandwidth": 3.35e12}


def cost(fn, *args) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of ``jax.jit(fn)(*args)`` by XLA's cost analysis; ``args`` may be
    ``jax.ShapeDtypeStruct``."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis["flops"]), float(analysis.get("bytes accessed", 0.0))


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def abstract_model(layers: int):
    config = LlamaConfig(num_layers=layers, **LLAMA_31_8B)
    return nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))


def forward_costs(seq_len: int) -> dict[str, tuple[float, float]]:
    """One decoder layer and the embedding plus head, at 1 x ``seq_len`` tokens."""
    tokens = spec((1, seq_len), jnp.int32)
    out = {}
    for layers in (1, 2):
        graphdef, state = abstract_model(layers)
        out[layers] = cost(lambda s, t, g=graphdef: _token_nll(nnx.merge(g, s), t), state, tokens)
    layer = tuple(b - a for a, b in zip(out[1], out[2], strict=True))
    head = tuple(a - b for a, b in zip(out[1], layer, strict=True))
    return {"layer": layer, "head": head}


def stats_of(d: int) -> InputStats:
    """The shapes of the calibration statistics of ``d``-wide inputs."""
    return jax.eval_shape(lambda: init_stats(d))


def method_costs(cfg: PruneConfig, config: LlamaConfig) -> dict[str, tuple[float, float]]:
    """Each method's work on one layer's q and k (the statistics excluded)."""
    d = config.hidden_size
    shapes = {
        "q": (d, config.num_heads * config.head_dim),
        "k": (d, config.num_kv_heads * config.head_dim),
    }
    out = {}
    for name, prune in (
        ("wanda", lambda w, s: wanda_prune(w, s, sparsity=0.5)),
        (
            "sparsegpt",
            lambda w, s: sparsegpt_prune(
                w, s, sparsity=0.5, pattern="unstructured", blocksize=cfg.sparsegpt.blocksize
            ),
        ),
    ):
        per = [cost(prune, spec(shape), stats_of(d)) for shape in shapes.values()]
        out[name] = tuple(sum(c) for c in zip(*per, strict=True))
    attn_spec = config.attention_spec(0)
    s = cfg.softmax
    x = spec((s.samples, s.seq_len, d))
    n_heads, n = config.num_heads, s.seq_len
    target = spec((n_heads, s.samples, n, n))
    masks = {k: spec(v) for k, v in shapes.items()}

    def step(m, w, x, target):
        def loss(m):
            return qk_pruning_loss_vjp(m, w, x, lam=s.lam, spec=attn_spec, target=target)[0]

        return jax.value_and_grad(loss)(m)

    one = cost(step, masks, masks, x, target)
    steps = s.steps + (s.update_steps if s.update != "none" else 0)
    out["softmax"] = tuple(steps * c for c in one)
    return out


def seconds(flops_bytes: tuple[float, float], peak: float, efficiency: float) -> float:
    flops, nbytes = flops_bytes
    return max(flops / peak, nbytes / H100["bandwidth"]) / efficiency


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, nargs=2, default=[32, 2048], metavar=("N", "T"))
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--efficiency", type=float, default=0.5, help="assumed fraction of roofline")
    a = p.parse_args()
    cfg = PruneConfig()
    config = LlamaConfig(num_layers=N_LAYERS, **LLAMA_31_8B)
    n_calib, seq_len = a.calib
    fwd = forward_costs(seq_len)
    stats = cost(update_stats, stats_of(config.hidden_size), spec((seq_len, config.hidden_size)))
    methods = method_costs(cfg, config)
    # Per layer: the layer's forward and the statistics over every calibration window.
    calib = tuple(n_calib * (f + s_) for f, s_ in zip(fwd["layer"], stats, strict=True))
    evaluation = tuple(
        a.eval_windows * (N_LAYERS * lf + hf)
        for lf, hf in zip(fwd["layer"], fwd["head"], strict=True)
    )
    print(
        f"Llama-3.1-8B shape ({N_LAYERS} layers, d {config.hidden_size}, {config.num_heads} query /"
        f" {config.num_kv_heads} key-value heads of {config.head_dim}, MLP "
        f"{config.intermediate_size}, vocabulary {config.vocab_size}); full-protocol qk 50% row:"
        f" calibration {n_calib} x {seq_len}, evaluation {a.eval_windows} x {seq_len}; softmax "
        f"{cfg.softmax.samples} x {cfg.softmax.seq_len} attention inputs, {cfg.softmax.steps} + "
        f"{cfg.softmax.update_steps} steps per layer"
    )
    print("XLA cost analysis on this machine (abstract shapes, nothing allocated):")
    print(f"  one layer forward, 1 x {seq_len}: {fwd['layer'][0] / 1e12:.3f} TFLOP")
    print(f"  embedding + output head, 1 x {seq_len}: {fwd['head'][0] / 1e12:.3f} TFLOP")
    print(f"  attention-input statistics, {seq_len} tokens: {stats[0] / 1e12:.3f} TFLOP")
    for name, (flops, nbytes) in methods.items():
        print(f"  {name} on one layer's q and k: {flops / 1e12:.3f} TFLOP, {nbytes / 1e9:.1f} GB")
    print(
        f"\nProjected on one H100 SXM (roofline / efficiency {a.efficiency}; published peaks: "
        f"float32 {H100['float32'] / 1e12:.0f}, TF32 tensor {H100['tf32 tensor'] / 1e12:.0f} "
        f"TFLOP/s, {H100['bandwidth'] / 1e12:.2f} TB/s). Not measured: no GPU has run it."
    )
    print(
        "| method | prune s (float32 peak) | prune s (TF32 peak) | row s (float32) | row s (TF32) |"
    )
    print("|---|---|---|---|---|")
    for name, work in methods.items():
        row = []
        for peak in (H100["float32"], H100["tf32 tensor"]):
            per_layer = seconds(calib, peak, a.efficiency) + seconds(work, peak, a.efficiency)
            row.append(N_LAYERS * per_layer)
        evals = [
            seconds(evaluation, pk, a.efficiency) for pk in (H100["float32"], H100["tf32 tensor"])
        ]
        print(
            f"| {name} | {row[0]:.0f} | {row[1]:.0f} | {row[0] + evals[0]:.0f} | "
            f"{row[1] + evals[1]:.0f} |"
        )


if __name__ == "__main__":
    main()

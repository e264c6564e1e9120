"""The synthetic experiment behind the paper's convergence claims (Algorithm 1 on random X, W).

It checks, on problems small enough for a laptop: (1) gradient descent from ``M = 1`` with a step
derived from the smoothness estimate decreases the loss monotonically and, with ``lam > 0``,
linearly (the Polyak-Lojasiewicz rate), and (2) how the rounded mask compares with linear
baselines on the attention error ``||f(B∘W) - f(W)||_F / ||f(W)||_F``, on the calibration
sequences and on held-out ones.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import plots, results
from jaxprune.config import to_dict
from jaxprune.masks import binarize, measured_sparsity, parse_nm
from jaxprune.objective import attention_pruning_grad, merged_attention, relative_error
from jaxprune.solvers import smoothness_estimate, solve_mask

POSITIVE = {"range": (0, None)}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic convergence / rounding experiment."""

    # Seed of the random inputs and weights.
    seed: int = 0
    # Tokens per sequence n.
    n: int = field(default=64, metadata={"range": (2, 4096)})
    # Model dimension d (W and M are d x d).
    d: int = field(default=32, metadata={"range": (2, 1024)})
    # Calibration sequences (the attention term is their mean).
    batch: int = field(default=4, metadata={"range": (1, 256)})
    # Held-out sequences for the rounding comparison.
    heldout: int = field(default=4, metadata={"range": (1, 256)})
    # Bound R on each row norm of X (rows have norms uniform in [R/2, R]).
    x_norm: float = field(default=2.0, metadata={"range": (1e-6, None)})
    # W = weight_scale * G / sqrt(d) with G standard normal.
    weight_scale: float = field(default=4.0, metadata={"range": (1e-6, None)})
    # Causal mask C in f.
    causal: bool = True
    # Values of lambda for the convergence runs.
    lams: tuple[float, ...] = field(
        default=(1e-3, 1e-2, 3e-2), metadata={**POSITIVE, "nonempty": True}
    )
    # Step sizes as multiples of the derived 1/L (1.0 = the derived step).
    step_scales: tuple[float, ...] = field(default=(0.25, 1.0), metadata={"range": (1e-6, 1e3)})
    # Gradient-descent steps per run.
    steps: int = field(default=300, metadata={"range": (1, 1_000_000)})
    # The reference optimum L* comes from a run this many times longer.
    ref_factor: int = field(default=5, metadata={"range": (1, 100)})
    # Clip the mask to [0, 1] after each step (the paper's Algorithm 1 does not).
    project: bool = False
    # Sparsities of the rounding comparison.
    sparsities: tuple[float, ...] = field(default=(0.3, 0.5, 0.7), metadata={"range": (0.0, 0.99)})
    # Rounding pattern for every method: unstructured, row, or N:M such as 2:4.
    pattern: str = "unstructured"
    # Lambdas of the masks compared in the rounding comparison (one method per value).
    round_lams: tuple[float, ...] = field(
        default=(1e-3, 1e-2), metadata={**POSITIVE, "nonempty": True}
    )
    # Steps per compiled chunk (progress granularity).
    chunk_steps: int = field(default=50, metadata={"range": (1, 100_000)})
    # Folder under which a new timestamped run folder is made.
    out: str = "runs/synthetic"
    # Show progress bars.
    progress: bool = True

    def __post_init__(self):
        nm = parse_nm(self.pattern)  # raises a clear ValueError for an unknown pattern
        # Checked here, before the run folder exists: N:M groups run along W's d inputs.
        if nm is not None and self.d % nm[1]:
            raise ValueError(
                f"pattern={self.pattern} needs d divisible by {nm[1]}, but d={self.d}; choose "
                f"d={self.d + nm[1] - self.d % nm[1]} or another pattern."
            )


def make_problem(cfg: SyntheticConfig):
    """Random ``X`` (calibration and held-out, rows of bounded norm) and ``W``."""
    rng = np.random.default_rng(cfg.seed)

    def inputs(b):
        g = rng.normal(size=(b, cfg.n, cfg.d))
        norms = rng.uniform(cfg.x_norm / 2, cfg.x_norm, size=(b, cfg.n, 1))
        return (g / np.linalg.norm(g, axis=-1, keepdims=True) * norms).astype(np.float32)

    w = (cfg.weight_scale * rng.normal(size=(cfg.d, cfg.d)) / np.sqrt(cfg.d)).astype(np.float32)
    return jnp.asarray(inputs(cfg.batch)), jnp.asarray(inputs(cfg.heldout)), jnp.asarray(w)


@partial(jax.jit, static_argnames="causal")
def attention_error(keep, weight, x, causal=True):
    """Mean over sequences of ``||f(B∘W) - f(W)||_F / ||f(W)||_F``."""
    return relative_error(
        merged_attention(keep * weight, x, causal), merged_attention(weight, x, causal)
    )


def _merged_grad(mask, data, *, lam, causal):
    return attention_pruning_grad(mask, *data, lam=lam, causal=causal)


def linear_rate(gap: np.ndarray, floor: float = 1e-6) -> float:
    """Per-step contraction of ``L - L*`` from a log-linear fit while the gap is above
    ``floor`` times its start (NaN when too few points)."""
    keep = np.flatnonzero(gap > floor * gap[0])
    if len(keep) < 5:
        return float("nan")
    t = keep[: max(5, len(keep))]
    slope = np.polyfit(t, np.log(gap[t]), 1)[0]
    return float(np.exp(slope))


def run(cfg: SyntheticConfig) -> dict:
    """Runs the experiment, writes plots and ``metrics.json`` into a new run folder.

    Returns:
      The metrics dict (also written), with ``"run_dir"``.
    """
    start = time.perf_counter()
    out = results.new_run_dir(cfg.out)
    x, x_held, w = make_problem(cfg)
    solve_kw = dict(
        causal=cfg.causal, project=cfg.project, chunk_steps=cfg.chunk_steps, progress=cfg.progress
    )

    runs, curves = [], []
    for lam in cfg.lams:
        grad_fn = partial(_merged_grad, lam=lam, causal=cfg.causal)
        smooth = smoothness_estimate(grad_fn, jnp.ones_like(w), (w, x))
        ref = solve_mask(
            w,
            x,
            lam=lam,
            steps=cfg.steps * cfg.ref_factor,
            step_size=1.0 / smooth,
            desc=f"L* lam={lam:g}",
            **solve_kw,
        )
        l_star = min(ref.final_loss, float(np.min(ref.history["loss"])))
        for scale in cfg.step_scales:
            res = solve_mask(
                w,
                x,
                lam=lam,
                steps=cfg.steps,
                step_size=scale / smooth,
                desc=f"lam={lam:g} eta={scale:g}/L",
                **solve_kw,
            )
            loss = res.history["loss"]
            gap = np.maximum(loss - l_star, 0.0)
            runs.append(
                dict(
                    lam=lam,
                    step_scale=scale,
                    step_size=res.step_size,
                    smoothness=smooth,
                    initial_loss=float(loss[0]),
                    final_loss=res.final_loss,
                    l_star=l_star,
                    rate=linear_rate(gap),
                    monotone=bool(np.all(np.diff(loss) <= 1e-7 * abs(loss[0]))),
                    rejected_steps=int(np.sum(np.diff(res.history["step_size"]) < 0)),
                )
            )
            curves.append(
                dict(
                    group=f"lambda = {lam:g}",
                    label=f"eta = {scale:g}/L",
                    gap=gap,
                    grad_norm=res.history["grad_norm"],
                )
            )
    plots.convergence_plot(
        curves, out / "convergence.png", title=f"Algorithm 1 on random X, W (n={cfg.n}, d={cfg.d})"
    )

    scores = {}
    for lam in cfg.round_lams:
        mask = solve_mask(
            w, x, lam=lam, steps=cfg.steps, desc=f"rounding mask lam={lam:g}", **solve_kw
        ).masks
        scores[f"M (lam={lam:g})"] = mask
        scores[f"|M*W| (lam={lam:g})"] = jnp.abs(mask * w)
    col_norm = jnp.sqrt(jnp.sum(x**2, axis=(0, 1)))
    rng = np.random.default_rng(cfg.seed + 1)
    scores |= {
        "magnitude |W|": jnp.abs(w),
        "wanda |W|*||X_j||": jnp.abs(w) * col_norm[:, None],
        "random": jnp.asarray(rng.uniform(size=w.shape), jnp.float32),
    }
    rounding = []
    for sparsity in cfg.sparsities:
        for method, score in scores.items():
            keep = binarize(score, sparsity, cfg.pattern)
            rounding.append(
                dict(
                    sparsity=sparsity,
                    method=method,
                    measured_sparsity=measured_sparsity(keep),
                    error_calibration=float(attention_error(keep, w, x, cfg.causal)),
                    error_heldout=float(attention_error(keep, w, x_held, cfg.causal)),
                )
            )
    series = {m: [r["error_heldout"] for r in rounding if r["method"] == m] for m in scores}
    plots.lines_plot(
        cfg.sparsities,
        series,
        out / "rounding.png",
        xlabel="sparsity",
        ylabel="||f(B*W) - f(W)||_F / ||f(W)||_F (held out)",
        logy=True,
        title=f"Rounded masks ({cfg.pattern}): softmax-aware vs linear",
    )

    metrics = dict(
        experiment="synthetic",
        command=results.command_line(),
        config=to_dict(cfg),
        runs=runs,
        rounding=rounding,
        seconds=time.perf_counter() - start,
        run_dir=str(out),
        files=["convergence.png", "rounding.png", "metrics.json"],
    )
    results.write_json(out / "metrics.json", metrics)
    return metrics


def summary(metrics: dict) -> str:
    """The short tables printed at the end of a run."""
    conv = results.text_table(
        ["lambda", "eta*L", "L(M_0)", "L(M_T)", "L*", "rate/step", "monotone"],
        [
            [
                r["lam"],
                r["step_scale"],
                r["initial_loss"],
                r["final_loss"],
                r["l_star"],
                r["rate"],
                r["monotone"],
            ]
            for r in metrics["runs"]
        ],
    )
    methods = list(dict.fromkeys(r["method"] for r in metrics["rounding"]))
    sparsities = list(dict.fromkeys(r["sparsity"] for r in metrics["rounding"]))
    table = {(r["sparsity"], r["method"]): r["error_heldout"] for r in metrics["rounding"]}
    rnd = results.text_table(
        ["sparsity", *methods], [[s, *(table[s, m] for m in methods)] for s in sparsities]
    )
    return (
        f"Convergence (loss gap to L* falls by 'rate' per step):\n{conv}\n\n"
        f"Held-out relative attention error of the rounded mask:\n{rnd}\n\n"
        f"Wrote {Path(metrics['run_dir'])}/{{{', '.join(metrics['files'])}}} "
        f"in {metrics['seconds']:.1f} s"
    )

"""Whole-model prune time of each method on the same calibration set, side by side in one run
(issue 8: the softmax-aware ``qk`` prune at most 3x SparseGPT's time, with its held-out error).

Loads SmolLM2-135M once, takes the calibration windows once, then prunes a fresh copy of the
model with each method (``qk`` 50% unstructured by default, no evaluation) and prints, per method,
the prune seconds (calibration forwards, statistics and solves of all 30 layers), the ratio to
SparseGPT's, and the mean held-out attention and output errors over layers. With ``--repeats``
the methods alternate, so a noisy shared machine affects all of them alike.

    python benchmarks/prune_time.py [--calib 32 2048] [--methods sparsegpt softmax] [--repeats 1]
        [--set softmax.steps=40 ...]

A method may carry its own overrides after a colon, comma-separated, to time variants side by
side: ``--methods sparsegpt softmax softmax:softmax.update=none``.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from jaxprune import data
from jaxprune.config import parse_overrides, replace
from jaxprune.loaders.resolve import load_model
from jaxprune.pipeline import PruneConfig, calibration_chunks, prune_model


def method_config(base: PruneConfig, method: str) -> PruneConfig:
    """``name`` or ``name:key=value,key=value`` (a variant of the method, side by side)."""
    name, _, extra = method.partition(":")
    cfg = replace(base, method=name)
    return replace(cfg, parse_overrides(extra.split(","))) if extra else cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, nargs=2, default=[32, 2048], metavar=("N", "T"))
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "softmax"])
    p.add_argument("--targets", default="qk")
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="PruneConfig overrides, key=value")
    a = p.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    base = replace(
        PruneConfig(), targets=a.targets, pattern=a.pattern, progress=False, eval={"data": []}
    )
    base = replace(base, parse_overrides(a.set))
    calib = data.calibration_windows(tokenizer, "standard", a.calib[0], a.calib[1])
    held = data.eval_windows(
        tokenizer, "c4", base.eval.heldout_samples, seq_len=min(base.softmax.seq_len, a.calib[1])
    )
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(
        f"SmolLM2-135M {a.targets} {a.pattern}; calibration {a.calib[0]} x {a.calib[1]} C4 tokens;"
        f" held-out {len(held)} x {held.shape[1]} C4 evaluation tokens"
        + (f"; overrides {' '.join(a.set)}" if a.set else "")
    )
    times: dict[str, list[float]] = {m: [] for m in a.methods}
    errors: dict[str, tuple[float, float]] = {}
    for _ in range(a.repeats):
        for method in a.methods:
            # A fresh copy of the dense model (nnx.merge of split parts would share its arrays).
            pruned = nnx.clone(model)
            cfg = method_config(base, method)
            start = time.perf_counter()
            report = prune_model(
                pruned,
                calibration_chunks(calib, cfg.calibration.micro_batch),
                calibration_chunks(np.asarray(held), cfg.calibration.micro_batch),
                cfg,
            )
            jax.block_until_ready(jax.tree.leaves(nnx.state(pruned)))
            times[method].append(time.perf_counter() - start)
            layers = report["layers"]
            errors[method] = (
                float(np.mean([li["heldout_attention_error"] for li in layers])),
                float(np.mean([li["heldout_output_error"] for li in layers])),
            )
            print(f"  {method}: {times[method][-1]:.1f} s", flush=True)
    ref = np.median(times["sparsegpt"]) if "sparsegpt" in times else None
    width = max(12, *(len(m) for m in a.methods))
    header = f"{'seconds':>9s} {'x sparsegpt':>12s} {'attn err':>9s} {'out err':>8s}"
    print(f"{'method':{width}s} {header}")
    for method in a.methods:
        t = float(np.median(times[method]))
        ratio = f"{t / ref:.2f}" if ref else "-"
        attn, out = errors[method]
        print(f"{method:{width}s} {t:9.1f} {ratio:>12s} {attn:9.4f} {out:8.4f}")


if __name__ == "__main__":
    main()

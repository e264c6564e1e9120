"""What the softmax-aware method's speed shortcuts cost: held-out attention error and solve time
on a few layers of the default model, for several sizes of the attention term.

Each variant prunes only the chosen layers' q/k (50% unstructured, Wanda warm start, lam 0.1)
and reports, per layer, the held-out relative attention error ``||P_pruned - P||_F / ||P||_F``
and the solve seconds; Wanda is the reference. All variants run in one process, one after the
other, on the same calibration windows.

    python benchmarks/softmax_shortcuts.py [--layers 0 10 20] [--steps 80]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from jaxprune import data
from jaxprune.config import replace
from jaxprune.loaders.resolve import load_model
from jaxprune.pipeline import PruneConfig, calibration_chunks, prune_model

# (label, softmax.samples, softmax.seq_len, softmax.query_rows)
VARIANTS = [
    ("8 x 512 tokens", 8, 512, None),
    ("4 x 256 tokens (table, demo)", 4, 256, None),
    ("4 x 256, 64 query rows", 4, 256, 64),
    ("2 x 128 tokens", 2, 128, None),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20])
    p.add_argument("--steps", type=int, default=80)
    a = p.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    graphdef, state = nnx.split(model)
    calib = data.calibration_windows(tokenizer, "standard", 8, 512)
    held = data.eval_windows(tokenizer, "c4", 2, seq_len=512)
    base = replace(
        PruneConfig(layers=tuple(a.layers), progress=False),
        softmax={"steps": a.steps, "init": "wanda", "lam": 0.1},
    )
    rows = [("wanda", replace(base, method="wanda"))]
    rows += [
        (
            label,
            replace(base, method="softmax", softmax={"samples": s, "seq_len": t, "query_rows": q}),
        )
        for label, s, t, q in VARIANTS
    ]
    print(f"layers {a.layers}, {a.steps} Adam steps, calibration 8 x 512, held-out 2 x 512 (C4)")
    print(f"{'variant':32s} " + " ".join(f"err L{i:<4d}" for i in a.layers) + "  solve s/layer")
    for label, cfg in rows:
        fresh = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))
        t = time.perf_counter()
        report = prune_model(fresh, calibration_chunks(calib, 4), calibration_chunks(held, 2), cfg)
        errs = [report["layers"][i]["heldout_attention_error"] for i in a.layers]
        solve = [report["layers"][i].get("solve_seconds", float("nan")) for i in a.layers]
        print(
            f"{label:32s} "
            + " ".join(f"{e:<9.4f}" for e in errs)
            + f"  {np.mean(solve):.1f}   (total {time.perf_counter() - t:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()

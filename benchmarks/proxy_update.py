"""The cheap proxy of issue 11: held-out attention error of a few layers' q/k, for the weight
updates after rounding (none, SparseGPT's linear reconstruction, the softmax-aware one) next to
Wanda and SparseGPT, at the calibration's length and at the evaluation's 2048 tokens.

Every variant prunes only the chosen layers' q/k (50% unstructured by default), each calibrated
on the inputs of the model with the earlier chosen layers already pruned, and reports per layer
the held-out relative attention error ``||P_pruned - P||_F / ||P||_F`` on C4 evaluation windows
(PROTOCOL.md's C4 split), plus the solve seconds. All variants run in one process on the same
calibration windows.

    python benchmarks/proxy_update.py [--layers 0 10 20] [--calib 8 512] [--heldout-len 2048]
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

# PruneConfig keys of each variant (dotted keys for the sections).
LONG = {"softmax.seq_len": 2048, "softmax.query_rows": 256}
PAPER = {"softmax.init": "ones", "softmax.lam": 0.03}
VARIANTS = {
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "softmax": {"method": "softmax"},
    "softmax paper start": {"method": "softmax", **PAPER},
    "softmax 2048/256 rows": {"method": "softmax", **LONG},
    "softmax paper start 2048/256": {"method": "softmax", **PAPER, **LONG},
    "softmax + sparsegpt update": {"method": "softmax", "softmax.update": "sparsegpt"},
    "softmax + softmax update": {"method": "softmax", "softmax.update": "softmax"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20])
    p.add_argument("--calib", type=int, nargs=2, default=[8, 512], metavar=("N", "T"))
    p.add_argument("--heldout-len", type=int, default=2048)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    a = p.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    graphdef, state = nnx.split(model)
    calib = data.calibration_windows(tokenizer, "standard", a.calib[0], a.calib[1])
    held = data.eval_windows(tokenizer, "c4", 2, seq_len=a.heldout_len)
    base = PruneConfig(layers=tuple(a.layers), pattern=a.pattern, progress=False)
    print(
        f"SmolLM2-135M q/k {a.pattern}, layers {a.layers}; calibration {a.calib[0]} x {a.calib[1]}"
        f" C4 tokens (standard windows); held-out 2 x {a.heldout_len} C4 evaluation tokens"
    )
    print(f"{'variant':28s} " + " ".join(f"err L{i:<4d}" for i in a.layers) + "  mean    s/layer")
    for label in a.variants:
        cfg = replace(base, VARIANTS[label])
        fresh = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), state))
        t = time.perf_counter()
        report = prune_model(fresh, calibration_chunks(calib, 4), calibration_chunks(held, 1), cfg)
        errs = [report["layers"][i]["heldout_attention_error"] for i in a.layers]
        solve = [report["layers"][i].get("solve_seconds", float("nan")) for i in a.layers]
        print(
            f"{label:28s} "
            + " ".join(f"{e:<9.4f}" for e in errs)
            + f" {np.mean(errs):.4f}  {np.mean(solve):6.1f}"
            + f"  (total {time.perf_counter() - t:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()

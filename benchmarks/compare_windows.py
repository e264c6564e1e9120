"""A scaled-down run against committed full-protocol rows, on the windows both evaluated.

A run evaluated on the first K windows of each set (``--eval.windows K``) is compared, paired
over those K windows, with full-protocol rows cut to their first K windows (the same windows:
the protocol's windows are taken in order). Prints each set's perplexity on those windows, the
paired 95% bootstrap interval of the difference against each reference row, and the run's excess
over dense as a fraction of each reference's excess.

    python benchmarks/compare_windows.py RUN/metrics.json [--rows dense=RUN_ID sparsegpt=RUN_ID ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jaxprune.compare import paired_bootstrap

RUNS = Path("experiments/results/full/runs")
ROWS = {
    "dense": "20261130-031618",
    "sparsegpt qk 50%": "20261130-035228",
    "softmax qk 50%": "20261130-043543",
}


def first_windows(evaluation: dict, k: int) -> dict:
    nll, tokens = evaluation["window_nll"][:k], evaluation["window_tokens"][:k]
    ppl = float(np.exp(np.sum(nll) / np.sum(tokens)))
    return {"window_nll": nll, "window_tokens": tokens, "perplexity": ppl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="metrics.json of the scaled-down run")
    p.add_argument("--rows", nargs="*", default=[f"{k}={v}" for k, v in ROWS.items()])
    a = p.parse_args()
    run = json.loads(a.run.read_text())
    refs = {}
    for item in a.rows:
        name, _, run_id = item.partition("=")
        refs[name] = json.loads((RUNS / run_id / "metrics.json").read_text())
    print(f"run: {run['command']}")
    for data_set, evaluation in run["evaluation"].items():
        k = len(evaluation["window_nll"])
        new = first_windows(evaluation, k)
        cut = {n: first_windows(r["evaluation"][data_set], k) for n, r in refs.items()}
        others = ", ".join(f"{n} {c['perplexity']:.2f}" for n, c in cut.items())
        print(f"{data_set}, first {k} windows: run {new['perplexity']:.2f}; {others}")
        dense = cut.get("dense", {}).get("perplexity")
        for name, ref in cut.items():
            if name == "dense":
                continue
            cmp = paired_bootstrap(new, ref)
            line = f"  vs {name}: {cmp['difference']:+.3f} [{cmp['low']:+.3f}, {cmp['high']:+.3f}]"
            if dense is not None:
                share = (new["perplexity"] - dense) / (ref["perplexity"] - dense)
                line += f"; excess over dense {share:.2f} of this row's"
            print(line)


if __name__ == "__main__":
    main()

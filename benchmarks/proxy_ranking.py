"""How well two cheap per-layer errors rank the committed full-protocol rows the way their
perplexities do: the held-out attention error (the softmax-aware objective's own measure) and the
held-out output error of the attention block (``o_proj`` of the pruned attention against the
dense one, which sees v and o and the weight updates).

Reads ``table.json`` of a results folder (no model is run). Within each setting (targets,
pattern, calibration protocol) every pair of rows is one comparison; a proxy ranks a pair
correctly when it orders the two rows as their perplexity does. Reported per setting and
evaluation set: the pairs the proxy orders correctly and Spearman's rank correlation, over all
rows and over the close rows only (perplexity within ``--near`` of the setting's best: the pairs
a search must get right). Rows stored before the output error was recorded have none and are
left out of both columns, so that the two proxies rank the same rows.

    python benchmarks/proxy_ranking.py [experiments/results/full/table.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROXIES = {"attention": "heldout_attention_error", "output": "heldout_output_error"}


def setting(row: dict) -> str:
    cfg = row["config"]
    protocol = cfg.get("calibration", {}).get("protocol", cfg.get("protocol", "standard"))
    pattern = cfg["pattern"] if ":" in cfg["pattern"] else f"{cfg['sparsity']:.0%}"
    return f"{cfg['targets']} {pattern}" + ("" if protocol == "standard" else f" ({protocol})")


def proxy_value(row: dict, key: str) -> float | None:
    """The mean over layers of one per-layer error, or ``None`` when a layer lacks it."""
    values = [layer.get(key) for layer in row.get("layers") or []]
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return float("nan")
    return float(np.corrcoef(ranks(np.asarray(x)), ranks(np.asarray(y)))[0, 1])


def pairs_agreeing(x: list[float], y: list[float]) -> tuple[int, int]:
    pairs = list(itertools.combinations(range(len(x)), 2))
    right = sum((x[i] - x[j]) * (y[i] - y[j]) > 0 for i, j in pairs)
    return right, len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "table", nargs="?", type=Path, default=ROOT / "experiments/results/full/table.json"
    )
    p.add_argument("--near", type=float, default=0.10, help="close rows: within this of the best")
    a = p.parse_args()
    rows = [r for r in json.loads(a.table.read_text()) if r.get("layers")]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(setting(row), []).append(row)
    print(f"{a.table}: {len(rows)} pruned rows; pairs ordered as perplexity orders them")
    for near in (None, a.near):
        print("all rows" if near is None else f"close rows (within {near:.0%} of the best)")
        print(f"{'setting':<18}{'set':<11}" + "".join(f"{n + ' error':>26}" for n in PROXIES))
        for name, group in groups.items():
            for data in sorted({k for r in group for k in r["perplexity"]}):
                best = min(r["perplexity"][data] for r in group)
                # The rows that hold both errors, so the two columns rank the same rows.
                close = [
                    r
                    for r in group
                    if (near is None or r["perplexity"][data] <= best * (1 + near))
                    and all(proxy_value(r, key) is not None for key in PROXIES.values())
                ]
                line = f"{name:<18}{data:<11}"
                for key in PROXIES.values():
                    kept = [(proxy_value(r, key), r["perplexity"][data]) for r in close]
                    kept = [(v, ppl) for v, ppl in kept if v is not None]
                    if len(kept) < 2:
                        line += f"{'-':>26}"
                        continue
                    x, y = [v for v, _ in kept], [ppl for _, ppl in kept]
                    right, total = pairs_agreeing(x, y)
                    line += f"{f'{right}/{total} pairs, rho {spearman(x, y):+.2f}':>26}"
                print(line)


if __name__ == "__main__":
    main()

"""Paired comparison of two evaluations on the same windows (PROTOCOL.md, "Comparing two runs").

Both runs are evaluated on the same windows (or documents), so their difference in perplexity is
judged paired: resample window indices with replacement, recompute both token-weighted
perplexities on each resample, and read the interval of their difference. Window-to-window
variation in difficulty, which dominates each run's own uncertainty, cancels in the difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def _per_window(run: Mapping[str, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    if "window_nll" not in run or "window_tokens" not in run:
        raise ValueError(
            f"{name} has no per-window NLL (window_nll, window_tokens); it was evaluated by an "
            "older jaxprune: run it again to compare it paired."
        )
    nll = np.asarray(run["window_nll"], np.float64)
    tokens = np.asarray(run["window_tokens"], np.float64)
    if nll.shape != tokens.shape or nll.ndim != 1 or len(nll) == 0:
        raise ValueError(f"{name}: window_nll and window_tokens must be equal, non-empty lists.")
    return nll, tokens


def paired_bootstrap(
    run: Mapping[str, Any],
    reference: Mapping[str, Any],
    *,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | bool | int]:
    """Difference in perplexity ``run - reference`` with a paired bootstrap interval.

    Args:
      run, reference: evaluations of the same windows, each with ``window_nll`` (summed NLL per
        window) and ``window_tokens`` (predicted tokens per window), as
        :func:`jaxprune.perplexity.perplexity` returns them.
      resamples: bootstrap resamples of the window indices.
      seed: seed of ``numpy.random.default_rng``.
      level: coverage of the central interval.

    Returns:
      ``{"difference", "low", "high", "significant", "windows", "resamples", "level"}``:
      the observed perplexity difference, the interval's bounds, and whether the interval
      excludes zero.

    Raises:
      ValueError: the runs lack per-window values or were not evaluated on the same windows.
    """
    a_nll, a_tok = _per_window(run, "the run")
    b_nll, b_tok = _per_window(reference, "the reference run")
    if a_nll.shape != b_nll.shape or not np.array_equal(a_tok, b_tok):
        raise ValueError(
            f"the runs were not evaluated on the same windows ({len(a_nll)} vs {len(b_nll)} "
            "windows, or different token counts): compare runs of the same evaluation set."
        )
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level={level} must be in (0, 1) and resamples={resamples} >= 1.")
    n = len(a_nll)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    tok = a_tok[idx].sum(axis=1)
    diff = np.exp(a_nll[idx].sum(axis=1) / tok) - np.exp(b_nll[idx].sum(axis=1) / tok)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diff, [tail, 100 - tail])
    observed = math.exp(a_nll.sum() / a_tok.sum()) - math.exp(b_nll.sum() / b_tok.sum())
    return {
        "difference": observed,
        "low": float(low),
        "high": float(high),
        "significant": bool(low > 0 or high < 0),
        "windows": n,
        "resamples": resamples,
        "level": level,
    }


def format_difference(cmp: Mapping[str, Any]) -> str:
    """``+0.42 [+0.20, +0.65]*`` (the star marks an interval that excludes zero)."""
    star = "*" if cmp["significant"] else ""
    return f"{cmp['difference']:+.2f} [{cmp['low']:+.2f}, {cmp['high']:+.2f}]{star}"

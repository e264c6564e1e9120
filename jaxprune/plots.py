"""PNG plots of solver histories and method comparisons (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def convergence_plot(
    curves: Sequence[Mapping], path: str | Path, title: str = "Algorithm 1 convergence"
) -> Path:
    """Suboptimality ``L(M_t) - L*`` and gradient norm against iteration, log scale.

    Args:
      curves: dicts with ``label``, ``group`` (one panel per group), ``gap`` (per-step
        ``L - L*``) and ``grad_norm`` arrays.
      path: output PNG.
      title: figure title.

    Returns:
      The written path.
    """
    groups = list(dict.fromkeys(c["group"] for c in curves))
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.4), squeeze=False)
    for col, group in enumerate(groups):
        for c in (c for c in curves if c["group"] == group):
            steps = np.arange(len(c["gap"]))
            axes[0, col].semilogy(steps, np.maximum(c["gap"], 1e-16), label=c["label"])
            axes[1, col].semilogy(steps, np.maximum(c["grad_norm"], 1e-16), label=c["label"])
        axes[0, col].set_title(group)
        axes[0, col].set_ylabel("L(M_t) - L*")
        axes[1, col].set_ylabel("||grad L(M_t)||")
        axes[1, col].set_xlabel("iteration t")
        axes[0, col].legend(fontsize=8)
        for ax in axes[:, col]:
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def lines_plot(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
) -> Path:
    """One line per series over a shared x axis (e.g. attention error against sparsity)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def bar_plot(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    ylabel: str,
    title: str,
    logy: bool = False,
) -> Path:
    """Grouped bars: one group per setting, one bar per method (NaN bars are left out)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) * max(1, len(series)) / 3), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (label, ys) in enumerate(series.items()):
        pos = np.arange(len(groups)) + i * width
        ax.bar(pos, np.asarray(ys, dtype=float), width, label=label)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    ax.set_xticklabels(groups, rotation=20, ha="right")
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

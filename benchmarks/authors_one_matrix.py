"""One matrix, the same ``X^T X``: the authors' ADMM or ALPS rule against ours.

Where :mod:`authors_check` compares whole pruned models, this compares the two rules alone: one
random ``(192, 576)`` weight (a SmolLM2 key projection's shape) and one float32 ``X^T X`` of 1,024
random inputs with log-normal feature scales, handed to the authors' ``AdmmPruner.fasterprune``
(with ``prune_admm``'s ``percdamp=0.1``) or ``ALPS_prune.ALPS_admm`` (with ``llama.py``'s
``rho=0.1``) and to ours with its defaults. Prints the fraction of mask entries that agree, the
largest weight difference and both relative reconstruction errors
``||X (w - w0)||^2 / ||X w0||^2``.

    python benchmarks/authors_one_matrix.py admm --repo admm-pruning
    python benchmarks/authors_one_matrix.py alps --repo ALPS
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
from authors_adapters import check_repo, cuda_as_cpu


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1024, 576)) * np.exp(rng.standard_normal(576))
    w = (rng.standard_normal((192, 576)) * 0.05).astype(np.float32)  # (out, in), as torch
    return w, (x.T @ x).astype(np.float32)


def _authors(method: str, w: np.ndarray, h: np.ndarray, n: int, m: int) -> np.ndarray:
    import torch

    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = torch.tensor(w)
    torch.cuda.synchronize = lambda *a, **k: None  # a no-op on a CPU-only torch
    if method == "admm":
        from lib.admm import AdmmPruner

        pruner = AdmmPruner(layer)
        pruner.XX = torch.tensor(h)
        pruner.fasterprune(0.5, prune_n=n, prune_m=m, percdamp=0.1)
    else:
        from alps import ALPS_prune

        pruner = ALPS_prune(layer, nsamples=1, seqlen=1024)
        pruner.XtX = torch.tensor(h)
        with cuda_as_cpu():
            pruner.ALPS_admm(0.5, nm_n=n, nm_m=m, rho=0.1)
    return layer.weight.data.numpy().T


def _ours(method: str, w: np.ndarray, h: np.ndarray, pattern: str) -> np.ndarray:
    import jax.numpy as jnp

    from jaxprune.methods.admm import admm_prune
    from jaxprune.methods.alps import alps_prune
    from jaxprune.methods.stats import InputStats

    stats = InputStats(jnp.asarray(h), jnp.asarray(np.diag(h)), jnp.asarray(1024))
    rule = admm_prune if method == "admm" else alps_prune
    pruned, _ = rule(jnp.asarray(w.T), stats, sparsity=0.5, pattern=pattern)
    return np.asarray(pruned)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=("admm", "alps"))
    p.add_argument("--repo", type=Path, required=True, help="checkout of the authors' repository")
    a = p.parse_args()
    check_repo(a.repo, a.method)
    sys.path.insert(0, str(a.repo))
    w, h = _problem()
    w0, h64 = w.T.astype(np.float64), h.astype(np.float64)

    def error(q):
        d = q.astype(np.float64) - w0
        return np.sum(d * (h64 @ d)) / np.sum(w0 * (h64 @ w0))

    for pattern, (n, m) in (("unstructured", (0, 0)), ("2:4", (2, 4))):
        # ADMM's prune_n counts the pruned (it hard-codes 2 of 4); ALPS's nm_n the kept.
        with contextlib.redirect_stdout(sys.stderr):  # their progress prints
            theirs = _authors(a.method, w, h, n, m)
        ours = _ours(a.method, w, h, pattern)
        agree = np.mean((ours != 0) == (theirs != 0))
        print(
            f"{a.method} {pattern} at 50%: masks agree on {100 * agree:.2f}% of entries, largest "
            f"weight difference {np.abs(ours - theirs).max():.1e}, relative error ours "
            f"{error(ours):.6f}, authors' {error(theirs):.6f}"
        )


if __name__ == "__main__":
    main()

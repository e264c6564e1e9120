"""How often equal |W| decide magnitude's N:M masks on a model, and how much the tie rule moves.

For every ``q_proj`` / ``k_proj`` (or the matrices named by ``--targets``) of the model, in
groups of ``M`` consecutive inputs of each output: the fraction of groups holding equal |W|, the
fraction where the tie straddles the cut (the ``(M - N)``-th and ``(M - N + 1)``-th smallest are
equal, so the tie rule decides the mask), and how many mask entries differ between
``ties="first"`` (the default: ``torch.topk`` on CUDA) and ``ties="torch-cpu"``. It also checks
that ``torch-cpu`` equals the authors' loop (locuslab/wanda ``prune_magnitude``) run in torch on
this CPU, matrix by matrix.

    python benchmarks/magnitude_ties.py        # the default model, 2:4 and 4:8, q and k
    python benchmarks/magnitude_ties.py --patterns 2:4 --targets q,k,v,o
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import torch

from jaxprune.loaders.gguf import fetch_default_model, read_gguf
from jaxprune.masks import binarize, parse_nm

NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
}


def authors_mask(w: np.ndarray, prune_n: int, prune_m: int) -> np.ndarray:
    """locuslab/wanda ``prune_magnitude``'s N:M loop on ``w`` (out, in); True = pruned."""
    W_metric = torch.abs(torch.from_numpy(w))
    W_mask = torch.zeros_like(W_metric) == 1
    for ii in range(W_metric.shape[1]):
        if ii % prune_m == 0:
            tmp = W_metric[:, ii : (ii + prune_m)].float()
            W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    return W_mask.numpy()


def count(tensors, layers: int, targets: list[str], pattern: str) -> dict[str, int]:
    """The tie counts of one pattern over the targets of every layer."""
    n, m = parse_nm(pattern)
    totals = dict(groups=0, tied=0, decided=0, entries=0, changed=0)
    for layer in range(layers):
        for t in targets:
            w = tensors[f"model.layers.{layer}.{NAMES[t]}.weight"]  # (out, in)
            s = np.sort(np.abs(w).reshape(w.shape[0], -1, m), axis=-1)
            scores = jnp.abs(jnp.asarray(w.T))  # input-major
            first = np.asarray(binarize(scores, pattern=pattern))
            cpu = np.asarray(binarize(scores, pattern=pattern, ties="torch-cpu"))
            assert (authors_mask(w, m - n, m) == ~cpu.T).all(), f"layer {layer} {t}"
            totals["groups"] += s.shape[0] * s.shape[1]
            totals["tied"] += int((np.diff(s, axis=-1) == 0).any(axis=-1).sum())
            if 0 < m - n < m:
                totals["decided"] += int((s[..., m - n - 1] == s[..., m - n]).sum())
            totals["entries"] += w.size
            totals["changed"] += int((first != cpu).sum())
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    parser.add_argument("--patterns", default="2:4,4:8")
    parser.add_argument("--targets", default="q,k")
    args = parser.parse_args()
    config, tensors, _ = read_gguf(args.model or fetch_default_model())
    targets = args.targets.split(",")
    for pattern in args.patterns.split(","):
        totals = count(tensors, config.num_layers, targets, pattern)
        print(f"{pattern} on {args.targets} of {config.num_layers} layers:")
        rows = (
            ("groups with equal |W|", totals["tied"], totals["groups"]),
            ("groups where a tie decides the mask", totals["decided"], totals["groups"]),
            ("mask entries first != torch-cpu", totals["changed"], totals["entries"]),
        )
        for label, n, of in rows:
            print(f"  {label + ':':<38} {n:>8} / {of} = {n / of:.4f}")
        print("  torch-cpu == the authors' loop in torch on this CPU: every matrix")


if __name__ == "__main__":
    main()

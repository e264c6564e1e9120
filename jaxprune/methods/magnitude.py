"""Magnitude pruning: the entries with the smallest ``|W|`` go."""

from __future__ import annotations

import dataclasses
from dataclasses import field

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxprune.masks import TIES, binarize, parse_nm
from jaxprune.methods.base import Method, Request, per_matrix
from jaxprune.methods.stats import check_matrix

# Comparison groups for unstructured sparsity; the first is the default (one threshold per
# matrix, as in the magnitude baseline of locuslab/wanda).
GROUPS = ("matrix", "output")


def magnitude_prune(
    w: Float[Array, "d_in d_out"],
    *,
    sparsity: float | None = None,
    pattern: str,
    group: str = "matrix",
    ties: str = "first",
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """Magnitude pruning: the entries with the smallest ``|W|`` are set to zero.

    For N:M this is locuslab/wanda's ``prune_magnitude``: in each group of ``M`` consecutive
    inputs of an output, the ``M - N`` smallest ``|W|`` go (``torch.topk(largest=False)``).
    Weights dequantized from a few bits hold many equal ``|W|`` within a group, so the order of
    ties matters; ``ties`` picks it (see :data:`jaxprune.masks.TIES`).

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"``, ``"row"`` (the same as ``group="output"``) or ``"N:M"``.
      group: unstructured comparison group, ``"matrix"`` or ``"output"``.
      ties: equal ``|W|`` in an N:M group: ``"first"`` (the earlier input pruned first, as
        ``torch.topk`` on CUDA, where the authors ran it) or ``"torch-cpu"`` (the order of
        ``torch.topk`` on CPU). Only ``"first"`` applies to other patterns.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned = w * keep``.
    """
    check_matrix(w, None)
    if group not in GROUPS:
        raise ValueError(f"magnitude group={group!r}: use one of {GROUPS}.")
    keep = binarize(jnp.abs(w), sparsity, pattern, group=group, ties=ties)
    return jnp.where(keep, w, jnp.zeros_like(w)), keep


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig:
    """Magnitude pruning (method magnitude, or the matrices another method hands to it)."""

    # Equal |W| in an N:M group: first (the earlier input pruned first: torch.topk on CUDA, as the
    # authors ran prune_magnitude) or torch-cpu (the order torch.topk leaves on CPU, libstdc++'s
    # nth_element: their code run on a CPU). Unstructured patterns ignore it.
    ties: str = field(default="first", metadata={"choices": TIES})


_jitted = jax.jit(magnitude_prune, static_argnames=("sparsity", "pattern", "group", "ties"))


def prune_matrix(w, stats, request: Request, options: MagnitudeConfig | None = None):
    """The plug-in's one-matrix rule (no statistics needed), with the section's tie rule."""
    del stats
    options = options or MagnitudeConfig()
    group = request.group or GROUPS[0]
    # Only N:M groups have a tie rule to choose (binarize refuses any other for the rest).
    ties = options.ties if parse_nm(request.pattern) is not None else "first"
    return _jitted(w, sparsity=request.sparsity, pattern=request.pattern, group=group, ties=ties)


METHOD = Method(
    name="magnitude",
    prune=per_matrix(prune_matrix),
    description="smallest |W| pruned, one threshold per matrix (the magnitude baseline)",
    section=MagnitudeConfig,
    groups=GROUPS,
    prune_matrix=prune_matrix,
)

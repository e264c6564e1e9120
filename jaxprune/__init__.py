"""jaxprune: softmax-aware pruning of LLM attention weights in JAX (Liang et al., ICLR 2025)."""

from jaxprune.masks import binarize, measured_sparsity
from jaxprune.objective import (
    attention_pruning_grad,
    attention_pruning_loss,
    qk_pruning_loss,
    qk_pruning_loss_layers,
)
from jaxprune.solvers import SolveDivergedError, SolveResult, solve_mask, solve_masks

__all__ = [
    "SolveDivergedError",
    "SolveResult",
    "attention_pruning_grad",
    "attention_pruning_loss",
    "binarize",
    "measured_sparsity",
    "qk_pruning_loss",
    "qk_pruning_loss_layers",
    "solve_mask",
    "solve_masks",
]

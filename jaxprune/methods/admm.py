"""ADMM weight updates with gradual mask selection (Boža 2024, arXiv 2401.02938).

The layer-wise problem ``min ||X w - X w_hat||^2`` subject to ``w_hat`` being sparse is split by
ADMM into a least-squares step on a dense copy ``W`` (one inverse of the damped ``X^T X + rho I``
serves all iterations), a projection ``Z`` of ``W + U`` onto the sparsity pattern, and a dual step
``U += W - Z``. During the first iterations the mask itself is re-chosen from ``|W + U|``, so it
follows the weights as they are updated. The result is the last projection ``Z``: exactly sparse.

By default this is the authors' code (fmfi-compbio/admm-pruning ``lib/admm.py``,
``AdmmPruner.fasterprune``, with the arguments ``lib/prune.py``'s ``prune_admm`` passes for the
README's LLaMA commands): ``X^T X`` normalised to a unit diagonal (the weights scaled by
``||X_j||``, so that ``|W|`` is Wanda's score), ``percdamp = 0.1`` of the mean diagonal added,
``rho = 1`` held constant, 20 iterations of which the first 15 re-choose the mask, one
threshold per matrix for unstructured sparsity, and for 2:4 a cubic schedule that prunes the
lower half of each group of 4 gradually. Departures, each written out where it is made:

* ``matrix_schedule="cubic"`` (an option) re-chooses per-matrix unstructured masks at the
  paper's cubic schedule; the authors' code uses the final sparsity from the first iteration
  there (and the cubic schedule only for per-output and N:M masks).
* ``group="output"`` (an option) is the code's ``per_out=True``: the lowest per output column.
* N:M for any N and M: the authors' code hard-codes groups of 4 and keeps 2 in each (so their
  ``4:8`` yields 2:4 masks); we keep N of every M, with final sparsity ``1 - N/M``.
* Ties: we prune exactly the requested count (ties to the earlier flat index, as
  :func:`~jaxprune.masks.binarize` does); the code's ``>=`` thresholds (per output, N:M) keep
  every tied entry, and its per-matrix ``topk`` breaks ties in no set order.
* Sparsity 0 returns the weights untouched (the code is not called then).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import field

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from jaxprune.masks import binarize, parse_nm
from jaxprune.methods.base import Method, Request, per_matrix
from jaxprune.methods.stats import HIGHEST, InputStats, check_matrix

# Comparison groups for unstructured sparsity; the first is the authors' default (per matrix).
GROUPS = ("matrix", "output")
SCHEDULES = ("full", "cubic")
# Added to each input's norm before dividing by it (the authors' guard for unseen inputs).
NORM_EPS = 1e-8


def _normalised(
    w: Float[Array, "d_in d_out"], stats: InputStats, percdamp: float
) -> tuple[Float[Array, "d_in d_out"], Float[Array, "d_in d_in"], Float[Array, "d_in 1"]]:
    """The problem in the authors' coordinates: ``W = D w`` and ``D^-1 X^T X D^-1 + damp I``.

    ``D = diag(||X_j|| + eps)``: the normalised Gram matrix has a unit diagonal (for inputs
    seen), so ``rho`` and ``percdamp`` mean the same in every layer, and ``|W|`` is Wanda's score.
    An unseen input gets a tiny scaled weight, so it is pruned first, as in the authors' code.
    """
    h = stats.hessian.astype(jnp.float32)
    norm = (jnp.sqrt(jnp.diag(h)) + NORM_EPS).reshape(-1, 1)
    h = h / norm / norm.reshape(1, -1)
    h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=jnp.float32)
    return w.astype(jnp.float32) * norm, h, norm


def _pruned_counts(
    shape: tuple[int, int],
    sparsity: float | None,
    nm: tuple[int, int] | None,
    group: str,
    gradual_iterations: int,
    matrix_schedule: str,
) -> list[int]:
    """How many entries each gradual iteration prunes (per output column for ``"output"``).

    The cubic schedule of iteration ``t`` (0-based) of ``T`` is ``s - s * (1 - (t+1)/T)^3``,
    reaching the final sparsity ``s`` at the last one; counts are ``int(n * s_t)`` (floored, as
    the authors' code) with ``n`` the entries of the comparison group.
    """
    d_in, d_out = shape
    if nm is not None:
        # The final sparsity of N:M; counts are over the whole matrix (see _choose_mask).
        target, n, cubic = 1 - nm[0] / nm[1], d_in * d_out, True
    elif group == "output":
        target, n, cubic = sparsity, d_in, True
    else:
        target, n, cubic = sparsity, d_in * d_out, matrix_schedule == "cubic"
    counts = []
    for t in range(gradual_iterations):
        current = target - target * (1 - (t + 1) / gradual_iterations) ** 3 if cubic else target
        counts.append(int(n * current))
    return counts


def _choose_mask(
    score: Float[Array, "d_in d_out"],
    count: int | None,
    nm: tuple[int, int] | None,
    group: str,
) -> Bool[Array, "d_in d_out"]:
    """The keep-mask pruning ``count`` entries with the lowest ``score`` (``|W + U|``).

    For N:M, the ``N`` largest of every ``M`` inputs of an output are always kept, and ``count``
    entries among the others are pruned with one threshold over the matrix; ``count=None``
    prunes them all (the exact N:M mask).
    """
    d_in, d_out = score.shape
    if nm is not None:
        top = binarize(score, None, f"{nm[0]}:{nm[1]}")
        if count is None:
            return top
        candidates = d_in * d_out * (nm[1] - nm[0]) // nm[1]
        return binarize(
            jnp.where(top, jnp.inf, score), min(count, candidates) / score.size, group="matrix"
        )
    if group == "output":
        return binarize(score, count / d_in, group="output")
    return binarize(score, count / score.size, group="matrix")


def _admm(w, stats, sparsity, nm, group, iterations, gradual_iterations, percdamp, rho, schedule):
    wn, h, norm = _normalised(w, stats, percdamp)
    d_in = h.shape[0]
    # The least-squares step keeps the damping in its target too: it minimises
    # ||X_n (W - W0)||^2 + damp ||W - W0||^2 + rho ||W - Z + U||^2 (X_n: normalised inputs).
    target = jnp.matmul(h, wn, precision=HIGHEST)
    lower = jnp.linalg.cholesky(h + rho * jnp.eye(d_in, dtype=jnp.float32))
    inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(d_in, dtype=jnp.float32))

    counts: list[int | None] = _pruned_counts(
        w.shape, sparsity, nm, group, gradual_iterations, schedule
    )
    if nm is not None and counts:
        counts[-1] = None  # the last gradual iteration leaves the exact N:M mask
    if counts:
        keep = jnp.ones(w.shape, bool)  # chosen at the first iteration
    elif nm is not None:
        keep = _choose_mask(jnp.abs(wn), None, nm, group)
    else:
        # No gradual iterations: one mask from the scaled dense weights, at the final sparsity.
        n = w.shape[0] if group == "output" else w.size
        keep = _choose_mask(jnp.abs(wn), int(n * sparsity), nm, group)

    def iterate(carry, steps, count=None, rechoose=False):
        def step(_, carry):
            w, u, keep = carry
            if rechoose:
                keep = _choose_mask(jnp.abs(w + u), count, nm, group)
            z = jnp.where(keep, w + u, 0.0)
            u = u + (w - z)
            w = jnp.matmul(inverse, target + rho * (z - u), precision=HIGHEST)
            return w, u, keep

        return lax.fori_loop(0, steps, step, carry)

    carry = (wn, jnp.zeros_like(wn), keep)
    # Consecutive iterations that prune the same count share one compiled loop.
    for count, run in itertools.groupby(counts):
        carry = iterate(carry, len(list(run)), count, rechoose=True)
    carry = iterate(carry, iterations - gradual_iterations)
    w_n, u, keep = carry
    z = jnp.where(keep, w_n + u, 0.0)
    return z / norm, keep


def _check_admm(w, stats, sparsity, pattern, group, iterations, gradual_iterations, rho, schedule):
    check_matrix(w, stats)
    if group not in GROUPS:
        raise ValueError(f"ADMM group={group!r}: use one of {GROUPS}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"matrix_schedule={schedule!r}: use one of {SCHEDULES}.")
    # Same errors as every other method: run binarize's checks on shapes only (no computation).
    jax.eval_shape(lambda: binarize(jnp.zeros(w.shape), sparsity, pattern, group=group))
    if not 0 <= gradual_iterations <= iterations:
        raise ValueError(
            f"gradual_iterations={gradual_iterations}, iterations={iterations}: the mask is "
            "re-chosen only in the first iterations; give 0 <= gradual_iterations <= iterations."
        )
    if not rho > 0:
        raise ValueError(f"rho={rho!r}: the ADMM penalty must be positive, such as 1.0.")
    return parse_nm(pattern)


def admm_prune(
    w: Float[Array, "d_in d_out"],
    stats: InputStats,
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    group: str = "matrix",
    iterations: int = 20,
    gradual_iterations: int = 15,
    percdamp: float = 0.1,
    rho: float = 1.0,
    matrix_schedule: str = "full",
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """ADMM pruning (Boža 2024): masks re-chosen from ``|W + U|``, weights solved by ADMM.

    In the normalised coordinates ``W = D w`` (``D = diag(||X_j|| + 1e-8)``, ``A = D^-1 X^T X
    D^-1 + percdamp * mean(diag) * I``), starting from ``W = W0``, ``U = 0``, each iteration

      1. (the first ``gradual_iterations`` only) re-chooses the mask from ``|W + U|``;
      2. ``Z = mask * (W + U)``;  ``U += W - Z``;
      3. ``W = (A + rho I)^-1 (A W0 + rho (Z - U))``;

    and the result is ``mask * (W + U)`` mapped back by ``D^-1``. Masks per pattern (the
    authors' ``AdmmPruner.fasterprune`` by default):

      * ``"unstructured"``, ``group="matrix"``: the ``int(sparsity * size)`` smallest of the
        matrix, at every gradual iteration (``matrix_schedule="cubic"``: the cubic schedule's
        count at each, an option).
      * ``"unstructured"``, ``group="output"``: the smallest ``int(d_in * s_t)`` of each output,
        ``s_t`` the cubic schedule ``s - s (1 - (t+1)/T)^3``.
      * ``"N:M"``: the ``N`` largest of each group kept; of the others, the ``int(size * s_t)``
        smallest over the matrix pruned (``s = 1 - N/M``), all of them at the last gradual
        iteration.

    With ``gradual_iterations=0`` the mask is chosen once from ``|W0|`` at the final sparsity;
    with ``iterations=0`` too this is Wanda's score with the group's threshold, no update.

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      stats: calibration statistics of the inputs of ``w`` (``hessian`` = ``X^T X``).
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"``, ``"row"`` (``group="output"``) or ``"N:M"``.
      group: unstructured comparison group, ``"matrix"`` (the authors') or ``"output"``.
      iterations: ADMM iterations.
      gradual_iterations: the first iterations, which re-choose the mask (at most
        ``iterations``).
      percdamp: dampening of the normalised ``X^T X``, relative to its mean diagonal.
      rho: the ADMM penalty, constant.
      matrix_schedule: ``"full"`` (the authors') or ``"cubic"``: the sparsity of per-matrix
        unstructured masks in the gradual iterations.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned`` is exactly zero where ``keep``
      is False, in ``w``'s dtype (computed in float32).
    """
    if pattern == "row":
        pattern, group = "unstructured", "output"
    nm = _check_admm(
        w, stats, sparsity, pattern, group, iterations, gradual_iterations, rho, matrix_schedule
    )
    if nm is None and sparsity == 0:
        return w, jnp.ones(w.shape, bool)
    q, keep = _admm(
        w,
        stats,
        sparsity,
        nm,
        group,
        iterations,
        gradual_iterations,
        percdamp,
        rho,
        matrix_schedule,
    )
    return q.astype(w.dtype), keep


@dataclasses.dataclass(frozen=True)
class ADMMConfig:
    """ADMM weight updates (method admm): Boža 2024's solver and gradual mask selection."""

    # ADMM iterations per matrix.
    iterations: int = field(default=20, metadata={"range": (0, 100000)})
    # The first this many iterations re-choose the mask from |W + U| (0: one mask from the
    # dense weights, kept through all iterations).
    gradual_iterations: int = field(default=15, metadata={"range": (0, 100000)})
    # Dampening added to the diagonal of the normalised X^T X, relative to its mean.
    percdamp: float = field(default=0.1, metadata={"range": (0.0, 10.0)})
    # ADMM penalty rho (constant; the normalised X^T X has a unit diagonal).
    rho: float = field(default=1.0, metadata={"range": (1e-6, 1e6)})
    # Sparsity of the per-matrix unstructured masks of the gradual iterations: full (the
    # authors' code) or cubic (the paper's schedule, which the code applies to per-output and
    # N:M masks only).
    matrix_schedule: str = field(default="full", metadata={"choices": SCHEDULES})

    def __post_init__(self):
        if self.gradual_iterations > self.iterations:
            raise ValueError(
                f"admm.gradual_iterations={self.gradual_iterations} exceeds admm.iterations="
                f"{self.iterations}: the mask is re-chosen in the first iterations only; give "
                "gradual_iterations <= iterations (the authors': 15 of 20)."
            )


_jitted = jax.jit(
    admm_prune,
    static_argnames=(
        "sparsity",
        "pattern",
        "group",
        "iterations",
        "gradual_iterations",
        "percdamp",
        "rho",
        "matrix_schedule",
    ),
)


def prune_matrix(w, stats: InputStats | None, request: Request, options: ADMMConfig | None):
    """The plug-in's one-matrix rule: :func:`admm_prune` with the section's options."""
    if stats is None:
        raise ValueError("method 'admm' needs calibration statistics (see update_stats).")
    options = options or ADMMConfig()
    return _jitted(
        w,
        stats,
        sparsity=request.sparsity,
        pattern=request.pattern,
        group=request.group or GROUPS[0],
        iterations=options.iterations,
        gradual_iterations=options.gradual_iterations,
        percdamp=options.percdamp,
        rho=options.rho,
        matrix_schedule=options.matrix_schedule,
    )


METHOD = Method(
    name="admm",
    prune=per_matrix(prune_matrix),
    description="ADMM (Boža 2024): gradual masks from |W + U| and ADMM weight updates",
    section=ADMMConfig,
    groups=GROUPS,
    prune_matrix=prune_matrix,
)

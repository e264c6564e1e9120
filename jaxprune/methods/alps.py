"""ALPS (Meng et al. 2024): ADMM with a hard sparsity constraint, then a conjugate-gradient refit.

The layer's reconstruction problem ``min ||X w - X w_hat||^2`` s.t. a count of nonzeros is split by
ADMM into a ridge solve (closed form from one eigendecomposition of ``X^T X``) and a projection
onto the sparsity pattern; the penalty ``rho`` grows every few iterations until the support stops
changing. Conjugate gradient then refits the kept weights on the fixed support.

By default this is the authors' code (mazumder-lab/ALPS ``alps.py``, ``ALPS_prune.ALPS_admm`` and
``cg_batch``, with the arguments that ``opt.py`` and ``llama.py`` pass: ``rho=0.1``, hard-coded
there, so ``llama.py``'s ``--rho 300`` is parsed but unused; ``max_iter=300``, ``update_iter=3``,
``switch_iter=30``; the refit with ``rtol=1e-4``, ``maxiter=10`` and no preconditioner beyond the
unit-diagonal scaling of ``X^T X``). Where we differ, the results agree up to float32 rounding on
data without ties:

  * the eigendecomposition of the scaled ``X^T X`` is float32 (theirs is float64, but their
    inverses ``(X^T X + rho I)^-1`` are float32, as ours);
  * the support is the projection's mask (theirs is ``D != 0``; they differ only where a kept
    value is exactly zero), so the count of zeros is always exact;
  * ties in the projection keep the earlier entry (``torch.topk`` leaves them unspecified);
  * ``group="output"`` (the same count of kept weights in every output) is an ablation; their
    projection is one top-k over the whole matrix (``group="matrix"``, the default).

Every loop is a ``lax.while_loop`` with the authors' stopping rules, so the whole rule jits; their
iteration caps are options of :class:`ALPSConfig` (``max_iter``, ``cg_iters``), to be lowered only
when time matters more than fidelity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from jaxprune.masks import binarize, parse_nm
from jaxprune.methods.base import Method, Request, per_matrix
from jaxprune.methods.stats import HIGHEST, InputStats, check_matrix

# Comparison groups for unstructured sparsity; the first is the authors' (one top-k per matrix).
GROUPS = ("matrix", "output")

# The authors' rho schedule, applied every update_iter iterations from the fraction of the kept
# count whose support changed since the last check: above _FAST, rho *= 1.3; above _MEDIUM,
# rho *= 1.2; any change, rho *= 1.1 once rho has grown (before that, the start is too stiff:
# rho /= 5 and ADMM restarts); no change stops once rho has grown (before, rho /= 5). After
# switch_iter iterations a change below _SETTLED stops too. rho never exceeds _RHO_MAX.
_FAST, _MEDIUM, _SETTLED = 0.1, 0.005, 0.0003
_RHO_MAX = 1e6
# Added to the square roots of the diagonal of X^T X before dividing by them (the authors').
_NORM_EPS = 1e-8
# Replaces a zero denominator in the conjugate-gradient steps (the authors').
_CG_EPS = 1e-8


def _dot(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def _keep_top(scores: Float[Array, "n ..."], k: int) -> Bool[Array, "n ..."]:
    """Keeps the ``k`` largest of the non-negative ``scores`` along axis 0, for every other index.

    The ``k``-th largest value is found by bisection on the float bit patterns, which order
    non-negative floats as integers: 31 counting passes (5 ms on a (576, 576) matrix on CPU, where
    ``lax.top_k`` takes 60 ms and a sort 120 ms, against 2.5 ms for one of the ADMM iteration's
    matmuls). Entries equal to it are kept in index order until the count is exact.
    """
    n = scores.shape[0]
    if k >= n:
        return jnp.ones(scores.shape, bool)
    if k <= 0:
        return jnp.zeros(scores.shape, bool)
    bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
    lo = jnp.zeros(scores.shape[1:], jnp.int32)  # count(bits >= lo) >= k
    hi = jnp.full(scores.shape[1:], 0x7F800001, jnp.int32)  # above +inf: count(bits >= hi) < k

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid[None], axis=0) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = lax.fori_loop(0, 31, halve, (lo, hi))
    above = bits > lo[None]
    tied = bits == lo[None]
    room = k - jnp.sum(above, axis=0)
    return above | (tied & (jnp.cumsum(tied, axis=0) <= room[None]))


def _projector(shape: tuple[int, int], n_keep: int, group: str, nm: tuple[int, int] | None):
    """``z -> keep``: the largest ``|z|`` per matrix, per output, or ``N`` per ``M`` inputs."""
    d_in, d_out = shape
    if nm is not None:
        n, m = nm

        def project(z):
            groups = jnp.moveaxis(z.reshape(d_in // m, m, d_out), 1, 0)
            keep = _keep_top(groups * groups, n)
            return jnp.moveaxis(keep, 0, 1).reshape(d_in, d_out)

    elif group == "output":

        def project(z):
            return _keep_top(z * z, n_keep)

    else:

        def project(z):
            return _keep_top((z * z).reshape(-1, 1), n_keep).reshape(d_in, d_out)

    return project


class ALPSResult(NamedTuple):
    """What :func:`alps_solve` returns.

    Attributes:
      weight: the pruned weight ``(d_in, d_out)``, zero where ``keep`` is False, in ``w``'s dtype.
      keep: the boolean keep-mask ``(d_in, d_out)``.
      admm_iters: ADMM iterations run (at most ``max_iter``).
      rho: the penalty when ADMM stopped.
      cg_iters: conjugate-gradient iterations run (at most ``cg_iters``).
    """

    weight: Float[Array, "d_in d_out"]
    keep: Bool[Array, "d_in d_out"]
    admm_iters: Int[Array, ""]
    rho: Float[Array, ""]
    cg_iters: Int[Array, ""]


def _scaled_problem(w, stats: InputStats, percdamp: float):
    """The authors' ridge and scaling: ``A = S^-1 (H + damp I) S^-1`` with ``S = sqrt(diag)``.

    In the scaled variable ``b = S w`` the objective is ``b^T A b / 2 - b^T A b0``; ``A`` has a
    unit diagonal, which makes ``rho`` scale-free and preconditions conjugate gradient.
    """
    h = stats.hessian.astype(jnp.float32)
    d_in = h.shape[0]
    h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(d_in, dtype=jnp.float32)
    norm = jnp.sqrt(jnp.diag(h)) + _NORM_EPS
    a = h / norm.reshape(1, -1) / norm.reshape(-1, 1)
    b0 = w.astype(jnp.float32) * norm.reshape(-1, 1)
    return a, b0, _dot(a, b0), norm


def _admm(a, b0, rhs, project, kept: float, *, rho, max_iter, update_iter, switch_iter):
    """The authors' ADMM loop; returns ``(b, iterations, rho)`` (``b`` not yet projected)."""
    eigvals, eigvecs = jnp.linalg.eigh(a)

    def ridge_inverse(rho):
        # (A + rho I)^-1, formed again only when rho changes.
        return _dot(eigvecs * (1.0 / (eigvals + rho)).reshape(1, -1), eigvecs.T)

    keep0 = project(b0)
    d0 = jnp.where(keep0, b0, 0.0)

    class State(NamedTuple):
        i: Int[Array, ""]
        b: Float[Array, "d_in d_out"]
        d: Float[Array, "d_in d_out"]
        v: Float[Array, "d_in d_out"]
        rho: Float[Array, ""]
        inverse: Float[Array, "d_in d_in"]
        raised: Bool[Array, ""]  # rho has grown at least once (their init_rho)
        last_keep: Bool[Array, "d_in d_out"]  # the support at the last check
        done: Bool[Array, ""]

    def step(s: State) -> State:
        b = _dot(s.inverse, rhs - s.v + s.rho * s.d)
        z = (s.v + s.rho * b) / s.rho
        keep = project(z)
        d = jnp.where(keep, z, 0.0)
        v = s.v + s.rho * (b - d)
        check = (s.i + 1) % update_iter == 0
        changed = jnp.sum(keep != s.last_keep)
        ratio = changed / kept
        fast, medium, some = ratio > _FAST, ratio > _MEDIUM, changed > 0
        factor = jnp.where(
            fast, 1.3, jnp.where(medium, 1.2, jnp.where(some & s.raised, 1.1, 1.0 / 5.0))
        )
        settled = ~some & s.raised
        restart = check & some & ~medium & ~s.raised
        rho = jnp.where(check, jnp.minimum(s.rho * factor, _RHO_MAX), s.rho)
        stop = check & (settled | ((s.i >= switch_iter) & (ratio < _SETTLED)))
        inverse = lax.cond(check & ~stop, ridge_inverse, lambda _: s.inverse, rho)
        return State(
            i=s.i + 1,
            b=jnp.where(restart, b0, b),
            d=jnp.where(restart, d0, d),
            v=jnp.where(restart, 0.0, v),
            rho=rho,
            inverse=inverse,
            raised=s.raised | (check & medium),
            last_keep=jnp.where(check, keep, s.last_keep),
            done=stop,
        )

    rho = jnp.asarray(rho, jnp.float32)
    start = State(
        i=jnp.zeros((), jnp.int32),
        b=b0,
        d=d0,
        v=jnp.zeros_like(b0),
        rho=rho,
        inverse=ridge_inverse(rho),
        raised=jnp.zeros((), bool),
        last_keep=keep0,
        done=jnp.zeros((), bool),
    )
    end = lax.while_loop(lambda s: (s.i < max_iter) & ~s.done, step, start)
    return end.b, end.i, end.rho


def _refit(a, rhs, b, keep, *, iters, rtol):
    """The authors' ``cg_batch``: conjugate gradient per output on the kept weights of ``b``.

    It solves ``A b = rhs`` restricted to the support (residuals masked), starting from ``b``. Its
    stopping test reads the unrestricted residual of every input row, ``||A b - rhs||`` against
    ``rtol * ||rhs||``, which a sparse ``b`` rarely meets: it usually runs all ``iters``.
    """
    mask = keep.astype(jnp.float32)
    bound = rtol * jnp.linalg.norm(rhs, axis=1)

    def nonzero(x):
        return jnp.where(x == 0, _CG_EPS, x)

    def step(s):
        k, x, r, p, rr_last, _ = s
        rr = jnp.sum(r * r, axis=0)
        p = jnp.where(k == 0, r, r + (rr / nonzero(rr_last)).reshape(1, -1) * p)
        ap = _dot(a, p)
        alpha = rr / nonzero(jnp.sum(p * ap, axis=0))
        x = x + alpha.reshape(1, -1) * p
        r = (r - alpha.reshape(1, -1) * ap) * mask
        met = jnp.all(jnp.linalg.norm(_dot(a, x) - rhs, axis=1) <= bound)
        return k + 1, x, r, p, rr, met

    r = (rhs - _dot(a, b)) * mask
    zero = jnp.zeros((), jnp.int32)
    start = (zero, b, r, jnp.zeros_like(b), jnp.ones(b.shape[1], jnp.float32), jnp.zeros((), bool))
    k, x, *_ = lax.while_loop(lambda s: (s[0] < iters) & ~s[-1], step, start)
    return x, k


def _check_alps(w, stats, sparsity, pattern, group, rho, max_iter, update_iter, switch_iter):
    check_matrix(w, stats)
    if group not in GROUPS:
        raise ValueError(f"ALPS group={group!r}: use one of {GROUPS}.")
    # Same errors as every other method: binarize's checks on shapes only (no computation).
    jax.eval_shape(lambda: binarize(jnp.zeros(w.shape), sparsity, pattern, group=group))
    if not rho > 0:
        raise ValueError(f"rho={rho!r}: give a positive penalty such as 0.1.")
    for name, value, low in (
        ("max_iter", max_iter, 1),
        ("update_iter", update_iter, 1),
        ("switch_iter", switch_iter, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: give an integer >= {low}.")


def alps_solve(
    w: Float[Array, "d_in d_out"],
    stats: InputStats,
    *,
    sparsity: float | None = None,
    pattern: str,
    group: str = "matrix",
    rho: float = 0.1,
    max_iter: int = 300,
    update_iter: int = 3,
    switch_iter: int = 30,
    percdamp: float = 0.01,
    cg_iters: int = 10,
    cg_rtol: float = 1e-4,
) -> ALPSResult:
    """ALPS with its iteration counts: :func:`alps_prune`'s arguments, an :class:`ALPSResult`."""
    if pattern == "row":
        pattern, group = "unstructured", "output"
    _check_alps(w, stats, sparsity, pattern, group, rho, max_iter, update_iter, switch_iter)
    nm = parse_nm(pattern)
    d_in, d_out = w.shape
    if nm is not None:
        n_keep, kept = nm[0], w.size * nm[0] / nm[1]
    elif group == "output":
        n_keep = round((1.0 - sparsity) * d_in)
        kept = n_keep * d_out
    else:
        # The authors keep int(np.round((1 - sp) * numel)) entries.
        n_keep = kept = round((1.0 - sparsity) * w.size)
    zero = jnp.zeros((), jnp.int32)
    if kept == 0:
        keep = jnp.zeros(w.shape, bool)
        return ALPSResult(jnp.zeros_like(w), keep, zero, jnp.asarray(rho, jnp.float32), zero)
    project = _projector(w.shape, n_keep, group, nm)
    a, b0, rhs, norm = _scaled_problem(w, stats, percdamp)
    b, admm_iters, rho_end = _admm(
        a,
        b0,
        rhs,
        project,
        kept,
        rho=rho,
        max_iter=max_iter,
        update_iter=update_iter,
        switch_iter=switch_iter,
    )
    keep = project(b)
    b, refit_iters = _refit(a, rhs, jnp.where(keep, b, 0.0), keep, iters=cg_iters, rtol=cg_rtol)
    weight = jnp.where(keep, b / norm.reshape(-1, 1), 0.0).astype(w.dtype)
    return ALPSResult(weight, keep, admm_iters, rho_end, refit_iters)


def alps_prune(
    w: Float[Array, "d_in d_out"],
    stats: InputStats,
    *,
    sparsity: float | None = None,
    pattern: str,
    group: str = "matrix",
    rho: float = 0.1,
    max_iter: int = 300,
    update_iter: int = 3,
    switch_iter: int = 30,
    percdamp: float = 0.01,
    cg_iters: int = 10,
    cg_rtol: float = 1e-4,
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """ALPS (Meng et al. 2024): ADMM on the layer's reconstruction, then a CG refit.

    ``H = X^T X + percdamp * mean(diag(H)) * I`` is scaled to a unit diagonal (``A = S^-1 H
    S^-1``, ``b = S w``). ADMM alternates ``b = (A + rho I)^-1 (A b0 - v + rho d)``, ``d`` = the
    projection of ``b + v / rho`` onto the pattern, and ``v += rho (b - d)``. Every
    ``update_iter`` iterations ``rho`` grows with the change of the support (see the module's
    constants) and ADMM stops when the support no longer changes, or changes by under 0.03% of
    the kept count after ``switch_iter`` iterations, or after ``max_iter``. The projection of
    the last ``b`` is the mask; ``cg_iters`` conjugate-gradient steps refit its kept weights.

    Masks per pattern (mazumder-lab/ALPS ``ALPS_admm`` by default):
      * ``"unstructured"``, ``group="matrix"``: the ``round((1 - sparsity) * size)`` largest
        ``|b|`` of the whole matrix are kept.
      * ``"unstructured"``, ``group="output"`` (an ablation; ``"row"`` is the same): the
        ``round((1 - sparsity) * d_in)`` largest of every output.
      * ``"N:M"``: the ``N`` largest of every ``M`` consecutive inputs of an output.

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      stats: calibration statistics of the inputs of ``w``.
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"``, ``"row"`` or ``"N:M"``.
      group: unstructured comparison group, ``"matrix"`` (the authors') or ``"output"``.
      rho: the initial ADMM penalty (relative to ``A``'s unit diagonal).
      max_iter: most ADMM iterations.
      update_iter: ADMM iterations between support checks and ``rho`` updates.
      switch_iter: iterations after which a small support change stops ADMM.
      percdamp: ridge added to ``H``'s diagonal, as a fraction of its mean.
      cg_iters: most conjugate-gradient iterations of the refit (0: no refit).
      cg_rtol: the refit stops when every input row's residual is below ``cg_rtol`` times the
        norm of that row of ``A b0``.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned`` is zero where ``keep`` is
      False, in ``w``'s dtype (computed in float32).
    """
    result = alps_solve(
        w,
        stats,
        sparsity=sparsity,
        pattern=pattern,
        group=group,
        rho=rho,
        max_iter=max_iter,
        update_iter=update_iter,
        switch_iter=switch_iter,
        percdamp=percdamp,
        cg_iters=cg_iters,
        cg_rtol=cg_rtol,
    )
    return result.weight, result.keep


@dataclasses.dataclass(frozen=True)
class ALPSConfig:
    """ALPS (method alps): ADMM with a growing penalty, then a conjugate-gradient refit."""

    # Initial ADMM penalty rho, relative to X^T X scaled to a unit diagonal (the authors' 0.1).
    rho: float = field(default=0.1, metadata={"range": (1e-6, 1e6)})
    # Most ADMM iterations (the authors' 300; lower only to save time).
    max_iter: int = field(default=300, metadata={"range": (1, 100000)})
    # ADMM iterations between support checks and penalty updates.
    update_iter: int = field(default=3, metadata={"range": (1, 1000)})
    # Iterations after which a support change under 0.03% of the kept weights stops ADMM.
    switch_iter: int = field(default=30, metadata={"range": (0, 100000)})
    # Ridge added to X^T X's diagonal, relative to its mean.
    percdamp: float = field(default=0.01, metadata={"range": (0.0, 10.0)})
    # Most conjugate-gradient iterations of the refit on the final support (0: no refit).
    cg_iters: int = field(default=10, metadata={"range": (0, 10000)})
    # Relative residual, per input row, at which the refit stops early.
    cg_rtol: float = field(default=1e-4, metadata={"range": (0.0, 1.0)})


_STATIC = (
    "sparsity",
    "pattern",
    "group",
    "rho",
    "max_iter",
    "update_iter",
    "switch_iter",
    "percdamp",
    "cg_iters",
    "cg_rtol",
)
_jitted = jax.jit(alps_solve, static_argnames=_STATIC)


def prune_matrix(w, stats: InputStats | None, request: Request, options: ALPSConfig | None):
    """The plug-in's one-matrix rule: :func:`alps_prune` with the section's options."""
    if stats is None:
        raise ValueError("method 'alps' needs calibration statistics (see update_stats).")
    options = options or ALPSConfig()
    result = _jitted(
        w,
        stats,
        sparsity=request.sparsity,
        pattern=request.pattern,
        group=request.group or GROUPS[0],
        **dataclasses.asdict(options),
    )
    return result.weight, result.keep


METHOD = Method(
    name="alps",
    prune=per_matrix(prune_matrix),
    description="ALPS (Meng et al. 2024): ADMM with a hard sparsity constraint, then a CG refit",
    section=ALPSConfig,
    groups=GROUPS,
    prune_matrix=prune_matrix,
)

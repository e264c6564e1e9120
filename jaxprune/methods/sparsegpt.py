"""SparseGPT (Frantar & Alistarh 2023): adaptive mask selection with OBS weight reconstruction.

In our input-major layout SparseGPT's "input columns", processed left to right, are the rows of
``w`` processed top to bottom, and its "output rows" are our columns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from jaxprune.masks import binarize, parse_nm
from jaxprune.methods.base import Method, Request, per_matrix
from jaxprune.methods.stats import HIGHEST, InputStats, check_matrix


def _hinv_upper(
    w: Float[Array, "d_in d_out"], hessian: Float[Array, "d_in d_in"], percdamp: float
) -> tuple[Float[Array, "d_in d_out"], Float[Array, "d_in d_in"]]:
    """Float32 weight with dead inputs zeroed, and the upper Cholesky factor ``U`` of ``H^-1``.

    ``U^T U = (H + damp I)^-1``. Row ``i`` of ``U`` divided by ``U_ii`` is the OBS update direction
    once inputs ``0..i-1`` are fixed, so the sequential updates need no further inversions.
    """
    h = hessian.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    # An input never seen has no effect on the calibration outputs: its weight can go, and a unit
    # diagonal keeps H invertible without coupling it to the others.
    h = jnp.where(jnp.diag(dead), 1.0, h)
    w = jnp.where(dead.reshape(-1, 1), 0.0, w.astype(jnp.float32))
    d_in = h.shape[0]
    eye = jnp.eye(d_in, dtype=jnp.float32)
    h = h + percdamp * jnp.mean(jnp.diag(h)) * eye
    lower = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((lower, True), eye)
    # Triangular exactly: the per-column update relies on U[i, :i] == 0 (see _sparsegpt_block).
    return w, jnp.triu(jnp.linalg.cholesky(hinv).T)


def _sparsegpt_block(
    w: Float[Array, "b d_out"],
    u: Float[Array, "b b"],
    keep: Bool[Array, "b d_out"],
    nm: tuple[int, int] | None,
    extra=None,
) -> tuple[Float[Array, "b d_out"], Float[Array, "b d_out"], Bool[Array, "b d_out"]]:
    """OBS updates inside one block of inputs, input by input.

    Args:
      w: the block's rows of the weight (already updated by earlier blocks).
      u: the block's diagonal block of the upper Cholesky factor of ``H^-1``.
      keep: the block's mask; ignored and chosen here for ``nm`` (N:M picks each group of ``M``
        inputs from the weights as updated by the inputs before it).
      nm: ``(N, M)`` or ``None``.

    Returns:
      ``(q, err, keep)``: the final rows, the scaled errors ``(w_i - q_i) / U_ii`` that drive the
      lazy update of later blocks, and the mask used.
    """
    diag = jnp.diag(u)

    def choose_group(i, keep, w):
        n, m = nm
        group = lax.dynamic_slice_in_dim(w, i, m, axis=0)
        scale = lax.dynamic_slice_in_dim(diag, i, m).reshape(m, 1)
        scores = group**2 / scale**2
        if extra is not None:
            scores = scores + extra(group, i)
        chosen = binarize(scores, None, f"{n}:{m}")
        return lax.dynamic_update_slice_in_dim(keep, chosen, i, axis=0)

    def step(i, carry):
        w, err, keep = carry
        if nm is not None:
            keep = lax.cond(i % nm[1] == 0, choose_group, lambda i, k, w: k, i, keep, w)
        row = w[i]
        q = jnp.where(keep[i], row, 0.0)
        e = (row - q) / diag[i]
        # U[i, j] = 0 for j < i, so this only moves input i (to q, up to rounding) and later ones.
        w = w - u[i].reshape(-1, 1) * e.reshape(1, -1)
        w = w.at[i].set(q)  # exact zeros where pruned, whatever the rounding above
        return w, err.at[i].set(e), keep

    return lax.fori_loop(0, w.shape[0], step, (w, jnp.zeros_like(w), keep))


def _block_mask(scores, sparsity: float, group: str):
    """The keep-mask of one block from its saliencies ``w^2 / U_jj^2`` (``(b, d_out)``)."""
    if group == "block":
        # The authors' rule: one threshold over the whole block (every output), at the
        # int(numel * sparsity)-th smallest saliency, pruning every entry <= it. At sparsity 0 we
        # prune nothing (their `<=` would still drop the smallest entry of each block).
        k = int(scores.size * sparsity)
        if k == 0:
            return jnp.ones(scores.shape, bool)
        thresh = jnp.sort(scores.reshape(-1))[k]
        return scores > thresh
    # Per output: prune round(s*end) - round(s*start) of this block's inputs (see the caller).
    k = round(sparsity * scores.shape[0])
    if k == scores.shape[0]:  # binarize takes sparsity < 1; a short block may lose all
        return jnp.zeros(scores.shape, bool)
    return binarize(scores, k / scores.shape[0], "unstructured", group="output")


def sparsegpt_blocks(
    w, hessian, keep, nm, sparsity, blocksize, percdamp, group="block", extra=None
):
    """SparseGPT's blocks of OBS updates with their lazy updates: ``(rows, keep)`` in float32.

    ``keep`` is ``None`` when the mask is chosen here (from ``sparsity`` or ``nm``), else the
    fixed mask; ``extra(rows, first input) -> (rows, d_out)`` is an optional term added to the
    saliencies, for methods that extend SparseGPT's score (D2Prune's dual-Taylor term).
    """
    w, u = _hinv_upper(w, hessian, percdamp)
    d_in = w.shape[0]
    out_rows, out_keep = [], []
    # Blocks are a Python loop (few, static shapes); inputs within a block are a fori_loop.
    for start in range(0, d_in, blocksize):
        end = min(start + blocksize, d_in)
        wb, ub = w[start:end], u[start:end, start:end]
        if keep is not None:
            kb = keep[start:end]
        elif nm is not None:
            kb = jnp.ones(wb.shape, bool)
        else:
            scores = wb**2 / jnp.diag(ub).reshape(-1, 1) ** 2
            if extra is not None:
                scores = scores + extra(wb, start)
            if group == "output":
                # Each block gets about the fraction s per output, and the counts telescope to
                # exactly round(s*d_in) per output.
                count = round(sparsity * end) - round(sparsity * start)
                kb = _block_mask(scores, count / (end - start), "output")
            else:
                kb = _block_mask(scores, sparsity, "block")
        block_extra = None if extra is None else (lambda rows, i, lo=start: extra(rows, lo + i))
        qb, err, kb = _sparsegpt_block(wb, ub, kb, nm, block_extra)
        out_rows.append(qb)
        out_keep.append(kb)
        # Lazy batch update: later inputs absorb this block's errors in one matmul.
        w = w.at[end:].add(-jnp.einsum("bi,bo->io", u[start:end, end:], err, precision=HIGHEST))
    return jnp.concatenate(out_rows, axis=0), jnp.concatenate(out_keep, axis=0)


# Comparison groups for unstructured sparsity; the first is the authors' default.
GROUPS = ("block", "output")


def _check_sparsegpt(w, stats, sparsity, pattern, blocksize, percdamp, group="block"):
    check_matrix(w, stats)
    if group not in GROUPS:
        raise ValueError(f"SparseGPT group={group!r}: use one of {GROUPS}.")
    # Same errors as every other method: run binarize's checks on shapes only (no computation).
    jax.eval_shape(lambda: binarize(jnp.zeros((w.shape[0], 1)), sparsity, pattern))
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r}: give a positive integer such as 128.")
    if not percdamp >= 0:
        raise ValueError(f"percdamp={percdamp!r}: give a non-negative fraction such as 0.01.")
    nm = parse_nm(pattern)
    if nm is not None and blocksize < w.shape[0] and blocksize % nm[1]:
        raise ValueError(
            f"blocksize={blocksize} is not a multiple of M={nm[1]} (pattern {pattern}): "
            "N:M groups must not straddle blocks."
        )
    return nm


def sparsegpt_prune(
    w: Float[Array, "d_in d_out"],
    stats: InputStats,
    *,
    sparsity: float | None = None,
    pattern: str,
    blocksize: int = 128,
    percdamp: float = 0.01,
    group: str = "block",
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """SparseGPT (Frantar & Alistarh 2023): adaptive masks and OBS weight updates.

    ``H = X^T X + percdamp * mean(diag(H)) * I`` (its scale does not matter). Inputs are processed
    in blocks of ``blocksize``; in each block the mask is chosen by the saliency
    ``w^2 / U_ii^2`` (``U`` the upper Cholesky factor of ``H^-1``), then each input in turn is
    masked and the error is compensated on the later inputs of the block; later blocks get the
    block's compensation in one lazy matmul.

    Mask choice per pattern (the authors' IST-DASLab/sparsegpt ``fasterprune`` by default):
      * ``"unstructured"``, ``group="block"``: one threshold over the whole block (all outputs x
        ``blocksize`` inputs), at the ``int(numel * sparsity)``-th smallest saliency, and every
        entry at or below it pruned; outputs get unequal counts and the total is about
        ``sparsity`` (one entry more per block).
      * ``"unstructured"``, ``group="output"`` (an ablation; ``"row"`` is the same): per output
        and block, the lowest-saliency ``round(s*end) - round(s*start)`` entries, so every output
        has exactly ``round(sparsity * d_in)`` zeros.
      * ``"N:M"``: at every ``M``-th input, the ``M - N`` lowest in each group of ``M``, scored on
        the weights as updated so far.

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      stats: calibration statistics of the inputs of ``w``.
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"``, ``"row"`` or ``"N:M"``.
      blocksize: inputs per block (the lazy-update granularity); a multiple of ``M`` for N:M.
      percdamp: dampening as a fraction of the mean diagonal of ``H``.
      group: unstructured comparison group, ``"block"`` (the authors') or ``"output"``.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned`` is zero where ``keep`` is False
      and also on dead inputs (``H_jj = 0``), in ``w``'s dtype (computed in float32).
    """
    if pattern == "row":
        pattern, group = "unstructured", "output"
    nm = _check_sparsegpt(w, stats, sparsity, pattern, blocksize, percdamp, group)
    q, keep = sparsegpt_blocks(w, stats.hessian, None, nm, sparsity, blocksize, percdamp, group)
    return q.astype(w.dtype), keep


def sparsegpt_reconstruct(
    w: Float[Array, "d_in d_out"],
    stats: InputStats,
    keep: Bool[Array, "d_in d_out"],
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Float[Array, "d_in d_out"]:
    """SparseGPT's OBS weight updates for a given mask (for masks found by another method).

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      stats: calibration statistics of the inputs of ``w``.
      keep: the mask to apply, ``(d_in, d_out)``, ``True`` = keep.
      blocksize: inputs per block of the lazy update (the result does not depend on it).
      percdamp: dampening as a fraction of the mean diagonal of ``H``.

    Returns:
      The updated weight ``(d_in, d_out)``, zero where ``keep`` is False, in ``w``'s dtype.
    """
    _check_sparsegpt(w, stats, 0.0, "unstructured", blocksize, percdamp)
    if keep.shape != w.shape:
        raise ValueError(f"keep has shape {keep.shape}, w has shape {w.shape}: they must match.")
    q, _ = sparsegpt_blocks(w, stats.hessian, keep.astype(bool), None, None, blocksize, percdamp)
    return q.astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT (method sparsegpt, or the matrices another method hands to it)."""

    # Inputs per block of the OBS updates.
    blocksize: int = field(default=128, metadata={"range": (1, 65536)})
    # Dampening added to the Hessian's diagonal, relative to its mean.
    percdamp: float = field(default=0.01, metadata={"range": (0.0, 10.0)})


_jitted = jax.jit(
    sparsegpt_prune, static_argnames=("sparsity", "pattern", "group", "blocksize", "percdamp")
)


def prune_matrix(w, stats: InputStats | None, request: Request, options: SparseGPTConfig | None):
    """The plug-in's one-matrix rule: :func:`sparsegpt_prune` with the section's options."""
    if stats is None:
        raise ValueError("method 'sparsegpt' needs calibration statistics (see update_stats).")
    options = options or SparseGPTConfig()
    return _jitted(
        w,
        stats,
        sparsity=request.sparsity,
        pattern=request.pattern,
        group=request.group or GROUPS[0],
        blocksize=options.blocksize,
        percdamp=options.percdamp,
    )


def check(request: Request, options: SparseGPTConfig, input_dims) -> None:
    """Refuses a block size that would split the N:M groups of a pruned matrix."""
    nm = parse_nm(request.pattern)
    if nm is None or options.blocksize % nm[1] == 0:
        return
    if any(options.blocksize < input_dims[t] for t in request.targets):
        raise ValueError(
            f"sparsegpt.blocksize={options.blocksize} is not a multiple of M={nm[1]} (pattern "
            f"{request.pattern}); SparseGPT's blocks would split N:M groups: use a multiple of "
            f"{nm[1]}."
        )


METHOD = Method(
    name="sparsegpt",
    prune=per_matrix(prune_matrix),
    description="SparseGPT (Frantar & Alistarh 2023): OBS masks and weight updates per block",
    section=SparseGPTConfig,
    groups=GROUPS,
    check=check,
    prune_matrix=prune_matrix,
)

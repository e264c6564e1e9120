"""Rounding relaxed masks to binary keep-masks at a requested sparsity.

Every matrix here is in the input-major layout of ``x @ w``: shape ``(d_in, d_out)``. An "output
row" of the PyTorch layout (Wanda's comparison group) is a column here, and N:M groups run along
the input axis (axis 0). The lowest scores are pruned; ties go to the earlier flat index (a stable
sort), so the result is deterministic.

Ties within an N:M group follow one of :data:`TIES`. ``"first"`` (the default) prunes the earlier
of equal scores first, as ``torch.topk(group, M - N, largest=False)`` does on CUDA: its kernel
takes every score below the ``(M - N)``-th smallest, then the scores equal to it in index order
(``gatherTopK`` in PyTorch's ``aten/src/ATen/native/cuda/TensorTopK.cu``). That is the call of
the authors' N:M code (locuslab/wanda ``prune_magnitude``, ``prune_wanda``; IST-DASLab/sparsegpt
``fasterprune``), run on GPUs. ``"torch-cpu"`` reproduces the same call on CPU (PyTorch's Linux
builds), whose tie order is no simple rule: ``topk`` copies the group into a buffer of
``(score, index)`` pairs and runs libstdc++'s ``std::nth_element`` (introselect) on it with
``operator<`` on the scores, and the pruned entries are the first ``M - N`` of the result.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

PATTERNS = ("unstructured", "row")
SCORES = ("mask", "mask_times_weight")
# Comparison groups of unstructured pruning: one threshold per matrix, or per output (Wanda's).
GROUPS = ("matrix", "output")
# Tie rules within an N:M group: the earlier input pruned first (torch.topk on CUDA), or the order
# torch.topk leaves on CPU (libstdc++'s nth_element).
TIES = ("first", "torch-cpu")
# "torch-cpu" is reproduced for groups up to this size: there introselect's depth limit
# (2 * floor(log2 M) partitions) is never reached, as a partition shrinks the range by at least
# one and stops at three, so its heap-select fallback (not reproduced) never runs.
TORCH_CPU_MAX_M = 9


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None`` for the named patterns.

    Raises:
      ValueError: not a known pattern, or ``N > M`` / ``M < 1``.
    """
    if pattern in PATTERNS:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not match:
        raise ValueError(f"pattern={pattern!r}: use one of {PATTERNS} or 'N:M' such as '2:4'.")
    n, m = int(match[1]), int(match[2])
    if m < 1 or n > m:
        raise ValueError(f"pattern={pattern!r}: N:M needs 0 <= N <= M and M >= 1.")
    return n, m


def mask_scores(mask: jax.Array, weight: jax.Array | None = None, score: str = "mask") -> jax.Array:
    """Scores to round: the relaxed mask itself, or ``|M ∘ W|``."""
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not one of {SCORES}.")
    if score == "mask":
        return mask
    if weight is None:
        raise ValueError("score='mask_times_weight' needs the weight.")
    return jnp.abs(mask * weight)


def _sort_key(x: jax.Array) -> jax.Array:
    """``uint32`` keys whose order is ``lax.sort``'s order of the float values ``x``: -0.0
    equal to 0.0, every NaN equal and last (the float's bits, negative values reversed)."""
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.zeros_like(x), x)
    x = jnp.where(jnp.isnan(x), jnp.full_like(x, jnp.nan), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    sign = jnp.uint32(1 << 31)
    return jnp.where(bits >= sign, ~bits, bits | sign)


def _kth_key(keys: jax.Array, eligible: jax.Array, k: jax.Array, axis: int) -> jax.Array:
    """Per slice along ``axis``, the smallest key ``v`` with at least ``k`` eligible entries at
    or below it (a binary search over the 32 key bits: linear memory, no sort)."""
    lo = jnp.zeros_like(k, dtype=jnp.uint32)
    hi = jnp.full_like(k, 0xFFFFFFFF, dtype=jnp.uint32)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        count = jnp.sum(eligible & (keys <= mid), axis=axis, keepdims=True, dtype=jnp.int32)
        enough = count >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    return lax.fori_loop(0, 32, step, (lo, hi))[0]


@partial(jax.jit, static_argnames=("n_prune", "axis"))
def _keep_lowest_pruned(
    scores: jax.Array, n_prune: int, axis: int, tiebreak: jax.Array | None = None
) -> jax.Array:
    """``False`` at the ``n_prune`` lowest entries of every slice along ``axis``, in the order
    of a stable sort by ``(scores, tiebreak)``: lower score first, then lower tiebreak, then
    the earlier position.

    Selected, not sorted: the threshold score is found by a binary search over the keys' bits,
    then the threshold tiebreak among the entries tied at it, then the first of the entries
    tied in both are taken by position. The same entries as the sort, in memory linear in the
    slice (sorting a 2048 x 2048 matrix with three operands held about 200 MB more on a CPU).
    """
    shape = list(scores.shape)
    shape[axis] = 1
    if n_prune <= 0:
        return jnp.ones(scores.shape, bool)
    k = jnp.full(shape, n_prune, jnp.int32)
    everything = jnp.ones(scores.shape, bool)
    key = _sort_key(scores)
    v1 = _kth_key(key, everything, k, axis)
    pruned = key < v1
    tied = key == v1
    left = k - jnp.sum(pruned, axis=axis, keepdims=True, dtype=jnp.int32)
    if tiebreak is not None:
        key2 = _sort_key(tiebreak)
        v2 = _kth_key(key2, tied, left, axis)
        below = tied & (key2 < v2)
        pruned = pruned | below
        left = left - jnp.sum(below, axis=axis, keepdims=True, dtype=jnp.int32)
        tied = tied & (key2 == v2)
    first = jnp.cumsum(tied, axis=axis, dtype=jnp.int32) <= left
    return ~(pruned | (tied & first))


def _nth_element_order(v: Float[Array, " m"], nth: int) -> Int[Array, " m"]:
    """The positions of ``v`` in the order libstdc++'s ``std::nth_element(first, first + nth,
    last)`` leaves a buffer of ``(v[i], i)`` pairs compared by ``v`` alone (as torch's CPU
    ``topk(largest=False)`` calls it; NaN counts as the largest). One group; vmap batches it.

    Introselect, as ``std::__introselect`` runs it while more than three entries remain: the
    median of the entries at ``first + 1``, the middle and ``last - 1`` is swapped to ``first``,
    ``std::__unguarded_partition`` splits the rest around it, and the side holding ``nth`` is
    kept; then an insertion sort (stable) orders the last stretch.
    """
    m = v.shape[0]
    positions = jnp.arange(m)

    def less(q, a, b):
        x, y = v[q[a]], v[q[b]]
        return (x < y) | (~jnp.isnan(x) & jnp.isnan(y))

    def swap(q, a, b):
        return q.at[a].set(q[b]).at[b].set(q[a])

    def partition(state):
        q, first, last = state
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        ab, bc, ac = less(q, a, b), less(q, b, c), less(q, a, c)
        median = jnp.where(
            ab, jnp.where(bc, b, jnp.where(ac, c, a)), jnp.where(ac, a, jnp.where(bc, c, b))
        )
        q = swap(q, first, median)

        # The bounds never bind for a range still being split (the pivot stops both scans); under
        # vmap the body also runs for groups already done, and they keep those loops finite.
        def scan(s):
            q, lo, hi, _ = s
            lo = lax.while_loop(lambda i: (i < m - 1) & less(q, i, first), lambda i: i + 1, lo)
            hi = lax.while_loop(lambda j: (j > 0) & less(q, first, j), lambda j: j - 1, hi - 1)
            crossed = lo >= hi
            q = jnp.where(crossed, q, swap(q, lo, hi))
            return q, jnp.where(crossed, lo, lo + 1), hi, ~crossed

        q, cut, _, _ = lax.while_loop(lambda s: s[3], scan, (q, first + 1, last, jnp.bool_(True)))
        left = cut <= nth
        return q, jnp.where(left, cut, first), jnp.where(left, last, cut)

    start = (positions, jnp.int32(0), jnp.int32(m))
    q, first, last = lax.while_loop(lambda s: s[2] - s[1] > 3, partition, start)
    # The final insertion sort of [first, last) is stable: sort that stretch by value, then by
    # position, and leave the entries outside it in place.
    inside = (positions >= first) & (positions < last)
    stretch = jnp.where(positions < first, 0, jnp.where(inside, 1, 2))
    value = jnp.where(inside, v[q], jnp.zeros_like(v))
    return lax.sort((stretch, value, positions, q), num_keys=3)[-1]


def _keep_torch_cpu(groups: jax.Array, n_prune: int) -> jax.Array:
    # groups: (d_in // m, m, d_out); the pruned entries are the first n_prune of each group's
    # nth_element order (torch's CPU topk with k = n_prune).
    if n_prune == 0:
        return jnp.ones(groups.shape, bool)
    m = groups.shape[1]
    rows = jnp.moveaxis(groups, 1, -1).reshape(-1, m)
    order = jax.vmap(lambda v: _nth_element_order(v, n_prune - 1))(rows)
    ranks = jnp.argsort(order, axis=-1)
    keep = (ranks >= n_prune).reshape(groups.shape[0], groups.shape[2], m)
    return jnp.moveaxis(keep, -1, 1)


def binarize(
    scores: Float[Array, "d_in d_out"],
    sparsity: float | None = None,
    pattern: str = "unstructured",
    *,
    group: str = "matrix",
    tiebreak: Float[Array, "d_in d_out"] | None = None,
    ties: str = "first",
) -> Bool[Array, "d_in d_out"]:
    """Boolean keep-mask with exactly the requested number of zeros.

    Args:
      scores: importance scores, input-major ``(d_in, d_out)`` (higher = keep).
      sparsity: fraction pruned, in ``[0, 1)``; for ``unstructured`` ``round(sparsity * size)``
        zeros, for ``row`` ``round(sparsity * d_in)`` zeros in every output column. For ``"N:M"``
        it may be omitted; if given it must equal ``1 - N/M``.
      pattern: ``"unstructured"``, ``"row"`` (``"unstructured"`` with ``group="output"``) or
        ``"N:M"`` (at most N kept in every M consecutive inputs of an output).
      group: for unstructured patterns, ``"matrix"`` (one threshold per matrix) or ``"output"``
        (``round(sparsity * d_in)`` pruned in every output column, Wanda's comparison group).
        N:M groups are always within one output.
      tiebreak: optional second sort key (same shape): entries with equal scores are ordered by
        it, and only entries equal in both fall back to the flat index order.
      ties: which of equal scores in an N:M group go first (:data:`TIES`): ``"first"`` (the
        earlier input; ``torch.topk`` on CUDA) or ``"torch-cpu"`` (``torch.topk`` on CPU:
        libstdc++'s ``nth_element`` order, for ``M <= 9`` and without ``tiebreak``). Other
        patterns always break ties by flat index.

    Returns:
      A boolean array shaped like ``scores``, ``True`` = keep.

    Raises:
      ValueError: impossible request (sparsity out of range, N > M, d_in not divisible by M), or
        an unknown group or tie rule, or ``"torch-cpu"`` ties where they do not apply.
    """
    if group not in GROUPS:
        raise ValueError(f"group={group!r} is not one of {GROUPS}.")
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not one of {TIES}.")
    if tiebreak is not None and tiebreak.shape != scores.shape:
        raise ValueError(f"tiebreak has shape {tiebreak.shape}, scores {scores.shape}.")
    if scores.ndim != 2:
        raise ValueError(f"binarize takes one (d_in, d_out) matrix, got shape {scores.shape}.")
    nm = parse_nm(pattern)
    d_in, d_out = scores.shape
    if nm is not None:
        n, m = nm
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"sparsity={sparsity} contradicts pattern {pattern} (= {1 - n / m}).")
        if d_in % m:
            raise ValueError(f"pattern {pattern}: input dimension {d_in} is not divisible by {m}.")
        groups = scores.reshape(d_in // m, m, d_out)
        if ties == "torch-cpu":
            if tiebreak is not None or m > TORCH_CPU_MAX_M:
                raise ValueError(
                    f"ties='torch-cpu' reproduces torch.topk for N:M groups of M <= "
                    f"{TORCH_CPU_MAX_M} without a tiebreak (got {pattern}, tiebreak "
                    f"{'given' if tiebreak is not None else 'none'}); use ties='first'."
                )
            return _keep_torch_cpu(groups, m - n).reshape(d_in, d_out)
        tb = None if tiebreak is None else tiebreak.reshape(d_in // m, m, d_out)
        return _keep_lowest_pruned(groups, m - n, axis=1, tiebreak=tb).reshape(d_in, d_out)
    if ties != "first":
        raise ValueError(f"ties={ties!r} applies to N:M patterns only, not {pattern!r}.")
    if sparsity is None or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is impossible: give a fraction in [0, 1).")
    if pattern == "row" or group == "output":
        return _keep_lowest_pruned(scores, round(sparsity * d_in), axis=0, tiebreak=tiebreak)
    tb = None if tiebreak is None else tiebreak.reshape(-1)
    flat = _keep_lowest_pruned(
        scores.reshape(-1), round(sparsity * scores.size), axis=0, tiebreak=tb
    )
    return flat.reshape(d_in, d_out)


def measured_sparsity(keep: jax.Array) -> float:
    """Fraction of ``False`` entries."""
    return float(1.0 - jnp.mean(keep.astype(jnp.float32)))

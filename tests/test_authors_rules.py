"""Wanda, SparseGPT and magnitude against references written from their authors' code, not ours.

The references below follow locuslab/wanda ``lib/prune.py`` (``prune_wanda``) and IST-DASLab/
sparsegpt ``sparsegpt.py`` (``SparseGPT.fasterprune``) step by step, in float64 and in PyTorch's
``(d_out, d_in)`` layout, with the authors' mask convention (``True`` = pruned) and their counting
rules (``int(d_in * sparsity)`` per output for Wanda; a threshold at the ``int(numel *
sparsity)``-th smallest saliency of each whole block, pruning ``<=`` it, for SparseGPT). They share
no selection code with ``jaxprune`` (no ``binarize``), so a change to our rules cannot make them
agree.

Their N:M loops call ``torch.topk(group, k, dim=1, largest=False)``, whose order of equal scores
depends on the device. The references here take the earlier of equal scores first (a stable
argsort), as the CUDA kernel does and as the authors ran it; the last section restates the CPU
order (libstdc++'s ``std::nth_element``) and checks both against ``torch.topk`` on tied data.
"""

import itertools
import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprune.methods.registry import prune_matrix
from jaxprune.methods.stats import init_stats, update_stats


def problem(n=256, d_in=32, d_out=12, seed=0):
    """Correlated inputs with uneven feature scales and outputs with very uneven row norms (the
    case where a per-matrix or per-block threshold differs from a per-output one)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) @ rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    x = x * np.exp(rng.normal(size=d_in))
    w = rng.normal(size=(d_in, d_out)) * np.exp(1.5 * rng.normal(size=d_out))[None, :]
    return x.astype(np.float32), w.astype(np.float32)


def stats_of(x):
    return update_stats(init_stats(x.shape[1]), jnp.asarray(x))


# ---------------------------------------------------------------- Wanda, as its authors wrote it


def authors_wanda(W, X, sparsity=None, prune_n=0, prune_m=0):
    """``W``: (d_out, d_in); ``X``: (tokens, d_in). Returns the pruned mask (True = pruned)."""
    scaler_row = np.sum(X.astype(np.float64) ** 2, axis=0) / len(X)  # their running mean
    metric = np.abs(W.astype(np.float64)) * np.sqrt(scaler_row.reshape(1, -1))
    mask = np.zeros(metric.shape, bool)
    if prune_n:
        for ii in range(metric.shape[1]):
            if ii % prune_m == 0:
                tmp = metric[:, ii : ii + prune_m]
                idx = np.argsort(tmp, axis=1, kind="stable")[:, :prune_n]
                np.put_along_axis(mask[:, ii : ii + prune_m], idx, True, axis=1)
    else:
        order = np.argsort(metric, axis=-1, kind="stable")
        idx = order[:, : int(metric.shape[1] * sparsity)]
        np.put_along_axis(mask, idx, True, axis=1)
    return mask


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7])
def test_wanda_default_is_the_authors_per_output_rule(sparsity):
    x, w = problem(seed=1)
    pruned = authors_wanda(w.T, x, sparsity=sparsity)
    got, keep = prune_matrix(
        "wanda", jnp.asarray(w), stats_of(x), sparsity=sparsity, pattern="unstructured"
    )
    np.testing.assert_array_equal(np.asarray(keep).T, ~pruned)
    np.testing.assert_array_equal(np.asarray(got).T, np.where(pruned, 0, w.T))


def test_wanda_two_four_is_the_authors_rule():
    x, w = problem(seed=2)
    pruned = authors_wanda(w.T, x, prune_n=2, prune_m=4)
    _, keep = prune_matrix("wanda", jnp.asarray(w), stats_of(x), pattern="2:4")
    np.testing.assert_array_equal(np.asarray(keep).T, ~pruned)


def test_wanda_matrix_group_is_an_explicit_option_and_differs():
    x, w = problem(seed=3)
    _, keep_out = prune_matrix(
        "wanda", jnp.asarray(w), stats_of(x), sparsity=0.5, pattern="unstructured"
    )
    _, keep_mat = prune_matrix(
        "wanda", jnp.asarray(w), stats_of(x), sparsity=0.5, pattern="unstructured", group="matrix"
    )
    # Per output: every output keeps exactly half; per matrix: outputs with large rows keep more.
    np.testing.assert_array_equal(np.asarray(keep_out).sum(axis=0), 16)
    assert np.asarray(keep_mat).sum() == np.asarray(keep_out).sum()
    assert len(set(np.asarray(keep_mat).sum(axis=0).tolist())) > 1


# ---------------------------------------------------------------- SparseGPT, as its authors wrote


def authors_sparsegpt(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """``W``: (d_out, d_in); ``H``: (d_in, d_in). Returns ``(Q, mask)`` (mask True = pruned)."""
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    columns = W.shape[1]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[np.arange(columns), np.arange(columns)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # torch.linalg.cholesky(., upper=True)
    mask_all = np.zeros(W.shape, bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / np.diag(Hinv1).reshape((1, -1)) ** 2
            thresh = np.sort(tmp.flatten())[int(tmp.size * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = np.zeros(W1.shape, bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = (
                    W1[:, i : i + prunem] ** 2 / np.diag(Hinv1)[i : i + prunem].reshape(1, -1) ** 2
                )
                idx = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]
                np.put_along_axis(mask1[:, i : i + prunem], idx, True, axis=1)
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        mask_all[:, i1:i2] = mask1
    return W, mask_all


@pytest.mark.parametrize(("sparsity", "blocksize"), [(0.5, 8), (0.5, 32), (0.3, 12)])
def test_sparsegpt_default_is_the_authors_block_threshold(sparsity, blocksize):
    x, w = problem(seed=4)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    q, pruned = authors_sparsegpt(w.T, h, sparsity, blocksize=blocksize)
    got, keep = prune_matrix(
        "sparsegpt",
        jnp.asarray(w),
        stats_of(x),
        sparsity=sparsity,
        pattern="unstructured",
        blocksize=blocksize,
    )
    np.testing.assert_array_equal(np.asarray(keep).T, ~pruned)
    np.testing.assert_allclose(np.asarray(got).T, q, rtol=2e-3, atol=2e-3)
    # The block threshold gives outputs unequal counts on this problem (the per-output rule would
    # not), so this test tells the two rules apart.
    assert len(set(pruned.sum(axis=1).tolist())) > 1


def test_sparsegpt_two_four_is_the_authors_rule():
    x, w = problem(seed=5)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    q, pruned = authors_sparsegpt(w.T, h, 0, prunen=2, prunem=4, blocksize=16)
    got, keep = prune_matrix("sparsegpt", jnp.asarray(w), stats_of(x), pattern="2:4", blocksize=16)
    np.testing.assert_array_equal(np.asarray(keep).T, ~pruned)
    np.testing.assert_allclose(np.asarray(got).T, q, rtol=2e-3, atol=2e-3)


def test_sparsegpt_output_group_is_an_explicit_option():
    x, w = problem(seed=6)
    _, keep = prune_matrix(
        "sparsegpt",
        jnp.asarray(w),
        stats_of(x),
        sparsity=0.5,
        pattern="unstructured",
        blocksize=8,
        group="output",
    )
    np.testing.assert_array_equal(np.asarray(keep).sum(axis=0), 16)


# ---------------------------------------------------------------- N:M ties: torch.topk's order
#
# locuslab/wanda prune_magnitude (and prune_wanda, and SparseGPT's fasterprune) at N:M:
#     tmp = W_metric[:, ii:(ii + prune_m)].float()
#     W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
# Which of equal scores topk returns is the tie rule. On CUDA (the authors' GPUs) the kernel
# (gatherTopK in aten/src/ATen/native/cuda/TensorTopK.cu) finds the k-th smallest value, then
# writes every smaller score and the equal ones in index order until k are written: the earlier
# index goes first. On CPU (aten/src/ATen/native/cpu/SortingKernel.cpp, topk_impl_loop) it copies
# the slice into (value, index) pairs and, for k * 64 > slice size, calls std::nth_element on them
# comparing values only; the first k pairs are the result. Below: that call as libstdc++ runs it.


def _less(a, b):
    # topk's comparator for largest=False: NaN is the largest value.
    return (not math.isnan(a[0]) and math.isnan(b[0])) or a[0] < b[0]


def _insertion_sort(buf, first, last):
    # std::__insertion_sort: each entry moves left past the strictly larger ones.
    for i in range(first + 1, last):
        item, j = buf[i], i
        while j > first and _less(item, buf[j - 1]):
            buf[j] = buf[j - 1]
            j -= 1
        buf[j] = item


def _nth_element(buf, nth):
    """libstdc++'s std::nth_element(begin, begin + nth, end) on the list ``buf``, in place."""
    first, last = 0, len(buf)
    depth = 2 * (len(buf).bit_length() - 1)  # 2 * std::__lg(n)
    while last - first > 3:
        assert depth > 0, "introselect's heap-select fallback is not restated here"
        depth -= 1
        # std::__move_median_to_first(first, first + 1, mid, last - 1)
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        if _less(buf[a], buf[b]):
            pick = b if _less(buf[b], buf[c]) else (c if _less(buf[a], buf[c]) else a)
        elif _less(buf[a], buf[c]):
            pick = a
        elif _less(buf[b], buf[c]):
            pick = c
        else:
            pick = b
        buf[first], buf[pick] = buf[pick], buf[first]
        # std::__unguarded_partition(first + 1, last, pivot = first)
        lo, hi = first + 1, last
        while True:
            while _less(buf[lo], buf[first]):
                lo += 1
            hi -= 1
            while _less(buf[first], buf[hi]):
                hi -= 1
            if not lo < hi:
                break
            buf[lo], buf[hi] = buf[hi], buf[lo]
            lo += 1
        if lo <= nth:
            first = lo
        else:
            last = lo
    _insertion_sort(buf, first, last)


def topk_smallest_cpu(values, k):
    """The indices ``torch.topk(values, k, largest=False)`` returns on CPU (one slice)."""
    buf = [(float(v), i) for i, v in enumerate(values)]
    assert k * 64 > len(buf), "topk's partial_sort branch is not restated here"
    _nth_element(buf, k - 1)
    _insertion_sort(buf, 0, k - 1)  # topk's std::sort of the first k - 1 (sorted=True)
    return [i for _, i in buf[:k]]


def topk_smallest_cuda(values, k):
    """The indices ``torch.topk(values, k, largest=False)`` returns on CUDA: every value below
    the k-th smallest, then the ones equal to it in index order (before the final value sort,
    which does not change the set)."""
    kth = np.sort(np.asarray(values, np.float64))[k - 1]
    below = [i for i, v in enumerate(values) if v < kth]
    equal = [i for i, v in enumerate(values) if v == kth]
    return below + equal[: k - len(below)]


def authors_magnitude_nm(W, prune_n, prune_m, topk):
    """``W``: (d_out, d_in). The authors' N:M loop with ``topk`` standing for torch.topk; returns
    the pruned mask (True = pruned)."""
    metric = np.abs(W.astype(np.float64))
    mask = np.zeros(metric.shape, bool)
    for ii in range(0, metric.shape[1], prune_m):
        for row in range(metric.shape[0]):
            mask[row, ii + np.array(topk(metric[row, ii : ii + prune_m], prune_n))] = True
    return mask


def quantized_like(d_in=64, d_out=24, bits=4, block=32, seed=0):
    """Weights as a 4-bit GGUF dequantizes them: integer levels times one scale per block of
    ``block`` inputs of an output, so equal |W| are common within a group of four inputs."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(d_in, d_out))
    scales = np.exp(rng.normal(size=(d_in // block, 1, d_out))) * 0.01
    w = (levels.reshape(d_in // block, block, d_out) * scales).reshape(d_in, d_out)
    return w.astype(np.float32)


cpu_torch_is_libstdcxx = pytest.mark.skipif(
    sys.platform != "linux", reason="torch's CPU topk uses libstdc++'s nth_element on Linux only"
)


@cpu_torch_is_libstdcxx
@pytest.mark.parametrize("m", [4, 5, 8])
def test_the_cpu_restatement_is_torch_topk(m):
    # Every weak order of four entries (values 0-3), and random tied groups of five and eight.
    if m == 4:
        groups = np.array(list(itertools.product(range(4), repeat=4)), np.float32)
    else:
        rng = np.random.default_rng(m)
        groups = rng.integers(0, 3, size=(2000, m)).astype(np.float32)
        groups[::7] = rng.permuted(np.tile(np.arange(m), (len(groups[::7]), 1)), axis=1)
    for k in range(1, m):
        got = torch.topk(torch.from_numpy(groups), k, dim=1, largest=False)[1].numpy()
        expected = np.array([topk_smallest_cpu(g, k) for g in groups])
        np.testing.assert_array_equal(got, expected)
    # It is no simple rule: neither the earlier nor the later of equal values always goes first.
    got = torch.topk(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]), 2, largest=False)
    assert got[1].tolist() == [[2, 3], [1, 0]]


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_magnitude_default_ties_are_topk_on_cuda(pattern):
    n, m = map(int, pattern.split(":"))
    w = quantized_like(seed=1)
    pruned = authors_magnitude_nm(w.T, m - n, m, topk_smallest_cuda)
    _, keep = prune_matrix("magnitude", jnp.asarray(w), None, pattern=pattern)
    np.testing.assert_array_equal(np.asarray(keep).T, ~pruned)
    # The CPU order prunes other entries on these weights, so the test tells the rules apart.
    assert (authors_magnitude_nm(w.T, m - n, m, topk_smallest_cpu) != pruned).any()


@cpu_torch_is_libstdcxx
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_magnitude_torch_cpu_ties_are_the_authors_code_on_cpu(pattern):
    n, m = map(int, pattern.split(":"))
    w = quantized_like(seed=2)
    pruned = authors_magnitude_nm(w.T, m - n, m, topk_smallest_cpu)
    _, keep = prune_matrix("magnitude", jnp.asarray(w), None, pattern=pattern, ties="torch-cpu")
    np.testing.assert_array_equal(np.asarray(keep).T, ~pruned)
    assert (authors_magnitude_nm(w.T, m - n, m, topk_smallest_cuda) != pruned).any()
    # And the authors' loop itself, in torch on this CPU.
    W = torch.from_numpy(w.T.copy())
    mask = torch.zeros_like(W) == 1
    for ii in range(0, W.shape[1], m):
        mask.scatter_(
            1, ii + torch.topk(W[:, ii : ii + m].abs(), m - n, dim=1, largest=False)[1], True
        )
    np.testing.assert_array_equal(mask.numpy(), pruned)

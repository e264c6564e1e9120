"""Wanda and SparseGPT against references written from their authors' code, not from ours.

The references below follow locuslab/wanda ``lib/prune.py`` (``prune_wanda``) and IST-DASLab/
sparsegpt ``sparsegpt.py`` (``SparseGPT.fasterprune``) step by step, in float64 and in PyTorch's
``(d_out, d_in)`` layout, with the authors' mask convention (``True`` = pruned) and their counting
rules (``int(d_in * sparsity)`` per output for Wanda; a threshold at the ``int(numel *
sparsity)``-th smallest saliency of each whole block, pruning ``<=`` it, for SparseGPT). They share
no selection code with ``jaxprune`` (no ``binarize``), so a change to our rules cannot make them
agree.
"""

import jax.numpy as jnp
import numpy as np
import pytest

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

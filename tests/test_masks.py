"""Binarisation: exact counts, deterministic ties, N:M structure and clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.masks import binarize, mask_scores, measured_sparsity


def test_unstructured_prunes_the_lowest_scores_exactly():
    scores = jnp.array([[0.1, 0.9], [0.5, 0.3], [0.7, 0.2]])
    keep = binarize(scores, 0.5)
    np.testing.assert_array_equal(keep, [[False, True], [True, False], [True, False]])


def test_ties_go_to_the_earlier_index_and_count_is_exact():
    keep = binarize(jnp.ones((4, 4)), 0.25)
    assert int((~keep).sum()) == 4
    np.testing.assert_array_equal(~keep.reshape(-1), np.arange(16) < 4)


def test_row_pattern_prunes_within_each_output_column():
    scores = jnp.array([[1.0, 8.0], [2.0, 7.0], [3.0, 6.0], [4.0, 5.0]])
    keep = binarize(scores, 0.5, "row")
    np.testing.assert_array_equal(
        keep, [[False, True], [False, True], [True, False], [True, False]]
    )


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_n_m_keeps_n_in_every_group_of_m_inputs(pattern, n, m):
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.normal(size=(16, 5)))
    keep = np.asarray(binarize(scores, pattern=pattern))
    groups = keep.reshape(16 // m, m, 5)
    assert (groups.sum(axis=1) == n).all()
    # The kept ones are the largest of their group.
    s = np.asarray(scores).reshape(16 // m, m, 5)
    assert (
        np.where(groups, s, np.inf).min(axis=1) >= np.where(groups, -np.inf, s).max(axis=1)
    ).all()
    assert measured_sparsity(jnp.asarray(keep)) == pytest.approx(1 - n / m)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=1.0), r"sparsity=1.0 is impossible"),
        (dict(sparsity=-0.1), r"impossible"),
        (dict(sparsity=None), r"impossible"),
        (dict(pattern="5:4"), r"N <= M"),
        (dict(pattern="2:3"), r"not divisible by 3"),
        (dict(pattern="2:4", sparsity=0.3), r"contradicts"),
        (dict(pattern="blocks"), r"use one of"),
    ],
)
def test_impossible_requests_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        binarize(jnp.ones((8, 4)), **kwargs)


def test_scores_mask_times_weight():
    m = jnp.array([[0.5, 1.0]])
    w = jnp.array([[-4.0, 1.0]])
    np.testing.assert_allclose(mask_scores(m, w, "mask_times_weight"), [[2.0, 1.0]])
    with pytest.raises(ValueError, match="needs the weight"):
        mask_scores(m, None, "mask_times_weight")

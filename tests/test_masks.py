"""Binarisation: exact counts, deterministic ties, N:M structure and clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import masks
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


# One output, one group of four inputs; the pruned inputs of 2:4 under each tie rule. "first":
# the earlier of equal scores goes (torch.topk on CUDA). "torch-cpu": the order libstdc++'s
# nth_element leaves (torch.topk on CPU), by hand: the median of entries 1, 2, 3 is swapped to the
# front as the pivot, the rest is partitioned around it, and the side holding entry 1 is sorted.
@pytest.mark.parametrize(
    "group,first,torch_cpu",
    [
        ([1.0, 1.0, 1.0, 1.0], [0, 1], [2, 3]),
        ([0.0, 0.0, 1.0, 1.0], [0, 1], [0, 1]),
        ([2.0, 1.0, 1.0, 1.0], [1, 2], [2, 3]),
        ([1.0, 1.0, 0.0, 0.0], [2, 3], [2, 3]),
        ([3.0, 1.0, 1.0, 2.0], [1, 2], [1, 2]),
        ([0.5, 0.1, 0.9, 0.3], [1, 3], [1, 3]),
    ],
)
def test_n_m_tie_rules(group, first, torch_cpu):
    scores = jnp.asarray(group).reshape(4, 1)
    for ties, pruned in (("first", first), ("torch-cpu", torch_cpu)):
        keep = np.asarray(binarize(scores, pattern="2:4", ties=ties))[:, 0]
        assert sorted(np.flatnonzero(~keep).tolist()) == pruned, ties


def test_torch_cpu_ties_keep_n_of_m_and_the_largest():
    rng = np.random.default_rng(1)
    scores = jnp.asarray(rng.integers(0, 3, size=(72, 6)).astype(np.float32))
    for n, m in [(2, 4), (4, 8), (1, 4), (3, 9), (4, 4), (0, 4)]:
        d_in = scores.shape[0] // m * m
        keep = np.asarray(binarize(scores[:d_in], pattern=f"{n}:{m}", ties="torch-cpu"))
        first = np.asarray(binarize(scores[:d_in], pattern=f"{n}:{m}"))
        groups, s = keep.reshape(-1, m, 6), np.asarray(scores[:d_in]).reshape(-1, m, 6)
        assert (groups.sum(axis=1) == n).all()
        # Only the order among equal scores differs: the kept scores are the same multiset.
        np.testing.assert_array_equal(
            np.sort(np.where(groups, s, -1), axis=1),
            np.sort(np.where(first.reshape(-1, m, 6), s, -1), axis=1),
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pattern="2:4", ties="last"), r"ties='last' is not one of"),
        (dict(sparsity=0.5, ties="torch-cpu"), r"N:M patterns only"),
        (dict(pattern="2:4", ties="torch-cpu", tiebreak=jnp.ones((16, 4))), r"without a tiebreak"),
        (dict(pattern="8:16", ties="torch-cpu"), r"M <= 9"),
    ],
)
def test_tie_rule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        binarize(jnp.ones((16, 4)), **kwargs)


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


@pytest.mark.parametrize("group", ["matrix", "output"])
def test_ties_are_ordered_by_the_second_key_however_small(group):
    # Entries the projection left at exactly 1: in float32, 1 + 1e-6 * 0.03 == 1, so adding a
    # small multiple of the second score cannot order them; the second sort key must.
    scores = jnp.ones((4, 2), jnp.float32)
    second = jnp.array([[0.03, 0.05], [0.01, 0.02], [0.04, 0.01], [0.02, 0.055]], jnp.float32)
    assert bool(jnp.all(scores + 1e-6 * second == 1.0))
    keep = binarize(scores, 0.5, group=group, tiebreak=second)
    if group == "output":
        expected = [[True, True], [False, False], [True, False], [False, True]]
    else:  # the four lowest second keys of the matrix: 0.01, 0.01, 0.02, 0.02
        expected = [[True, True], [False, False], [True, False], [False, True]]
    np.testing.assert_array_equal(keep, expected)
    # The second key never reorders distinct scores.
    scores = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]], jnp.float32)
    np.testing.assert_array_equal(
        binarize(scores, 0.5, group=group, tiebreak=1 - scores), binarize(scores, 0.5, group=group)
    )


def _stable_sort_keep(scores, n_prune, axis, tiebreak=None):
    """Reference: keep all but the first n_prune of each slice in a stable lexicographic sort
    by (score, tiebreak, position), done by numpy (NaN last, -0.0 equal to 0.0)."""
    s = np.moveaxis(np.asarray(scores, np.float32), axis, -1)
    t = np.zeros_like(s) if tiebreak is None else np.moveaxis(np.asarray(tiebreak), axis, -1)
    keep = np.ones(s.shape, bool)
    for idx in np.ndindex(s.shape[:-1]):
        order = np.lexsort((np.arange(s.shape[-1]), t[idx], s[idx]))
        keep[idx][order[:n_prune]] = False
    return np.moveaxis(keep, -1, axis)


@pytest.mark.parametrize("seed", range(6))
def test_rounding_prunes_what_a_stable_sort_by_score_then_tiebreak_would(seed):
    # The rounding selects by binary search instead of sorting; it must pick the same entries
    # as a stable sort, with ties, signed zeros, infinities and NaN in both keys.
    rng = np.random.default_rng(seed)
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, -1.0, 1e-30, -2.5], np.float32)
    shape = (12, 8) if seed % 2 else (3, 5, 8)
    scores = rng.choice(special, shape) if seed < 2 else np.round(rng.random(shape) * 4) / 4
    tiebreak = rng.choice(special, shape) if seed % 3 else None
    for axis in range(len(shape)):
        for n_prune in (0, 1, shape[axis] // 2, shape[axis]):
            got = masks._keep_lowest_pruned(
                jnp.asarray(scores, jnp.float32),
                n_prune,
                axis,
                None if tiebreak is None else jnp.asarray(tiebreak),
            )
            want = _stable_sort_keep(scores, n_prune, axis, tiebreak)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_matrix_rounding_of_a_large_matrix_equals_the_stable_sort():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((512, 512)), 2).astype(np.float32)  # many ties
    tiebreak = np.round(rng.random((512, 512)), 2).astype(np.float32)
    got = masks.binarize(jnp.asarray(scores), 0.5, tiebreak=jnp.asarray(tiebreak))
    want = _stable_sort_keep(scores.reshape(-1), scores.size // 2, 0, tiebreak.reshape(-1))
    np.testing.assert_array_equal(np.asarray(got), want.reshape(scores.shape))

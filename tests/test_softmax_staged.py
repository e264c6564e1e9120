"""Staged rounding of the softmax-aware mask solve (``softmax.stages``): the solve's steps split
over stages, the lowest-scored entries fixed at zero after each stage but the last, and the
remaining entries re-solved without those weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_run import QK_LAYER, qk_layer_problem, qk_layer_spec, qk_mask_solve

from jaxprune.config import replace
from jaxprune.masks import binarize
from jaxprune.methods.softmax_solve import prune_qk_softmax
from jaxprune.methods.wanda import wanda_scores
from jaxprune.pipeline import PruneConfig, request_for
from jaxprune.solvers import solve_masks

D = QK_LAYER[0]
SPEC = qk_layer_spec()


def config(**softmax):
    return replace(
        PruneConfig(),
        method="softmax",
        softmax={"steps": 12, "update": "none", **softmax},
        progress=False,
    )


def by_hand(weights, x, stats, cfg):
    """Two stages written out: 6 steps, fix the lowest quarter of each matrix (by mask, Wanda
    tie-break) at zero, 6 steps without those weights, then the final rounding to half with the
    fixed entries first."""
    setup, loss, options = qk_mask_solve(cfg, weights, x, stats)
    first = solve_masks(loss, setup.init, data=setup.data, steps=6, **options)
    fixed = {
        k: ~binarize(first.masks[k], 0.25, tiebreak=wanda_scores(w, stats))
        for k, w in weights.items()
    }
    kept = {k: jnp.where(fixed[k], 0.0, w) for k, w in weights.items()}
    start = {k: jnp.where(fixed[k], 0.0, m) for k, m in first.masks.items()}
    second = solve_masks(loss, start, data=(kept, *setup.data[1:]), steps=6, **options)
    return {
        k: binarize(
            jnp.where(fixed[k], -jnp.inf, second.masks[k]), 0.5, tiebreak=wanda_scores(w, stats)
        )
        for k, w in weights.items()
    }, fixed


def test_two_stages_fix_the_first_rounding_and_resolve_without_those_weights():
    weights, x, stats = qk_layer_problem(0)
    cfg = config(stages=2)
    new, keep, _ = prune_qk_softmax(
        weights, x, stats, request_for(cfg), cfg.softmax, spec=SPEC, progress=False
    )
    expected, fixed = by_hand(weights, x, stats, cfg)
    for k, w in weights.items():
        np.testing.assert_array_equal(keep[k], expected[k])
        assert not bool(jnp.any(keep[k] & fixed[k]))  # fixed zeros never come back
        assert int((~keep[k]).sum()) == round(0.5 * w.size)
        np.testing.assert_array_equal(new[k], jnp.where(keep[k], w, 0))
    # The stages change the answer: one solve of all 12 steps keeps other entries.
    one = config(stages=1)
    _, keep_one, _ = prune_qk_softmax(
        weights, x, stats, request_for(one), one.softmax, spec=SPEC, progress=False
    )
    assert any(bool(jnp.any(keep_one[k] != keep[k])) for k in weights)


@pytest.mark.parametrize(
    "softmax,match",
    [
        ({"stages": 20, "steps": 10}, r"softmax.stages=20 is more than softmax.steps=10"),
        ({"stages": 2, "row_block": 8}, r"softmax.stages > 1 needs the direct attention term"),
    ],
)
def test_impossible_stage_settings_are_refused(softmax, match):
    with pytest.raises(ValueError, match=match):
        config(**softmax)


def test_staged_rounding_refuses_nm_patterns_only_where_it_solves():
    from jaxprune.methods import softmax

    dims = {"q": D, "k": D}
    nm = replace(config(stages=2, update="softmax"), pattern="2:4", targets="qk")
    # 2:4 takes ALPS's mask by default (no solve, so nothing to stage) ...
    softmax.check(request_for(nm), nm.softmax, dims)
    # ... and a solved 2:4 mask cannot be staged.
    solved = replace(nm, softmax={"update": "none"})
    with pytest.raises(ValueError, match="cannot stage the 2:4 pattern"):
        softmax.check(request_for(solved), solved.softmax, dims)

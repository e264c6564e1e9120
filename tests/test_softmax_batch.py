"""A batch of the attention term's sequences per solver step (``softmax.batch``): each step
reads the next sequences in turn, the start's and final losses read all of them, and a stopped
solve resumes on the same batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_run import qk_layer_problem, qk_layer_spec, qk_mask_solve

from jaxprune.config import replace
from jaxprune.methods.softmax_layers import prune_qk_softmax_layers
from jaxprune.methods.softmax_solve import (
    SequenceBatch,
    prune_qk_softmax,
    solve_options,
)
from jaxprune.pipeline import PruneConfig, request_for
from jaxprune.solvers import solve_masks

SPEC = qk_layer_spec()


def config(**softmax):
    return replace(
        PruneConfig(),
        method="softmax",
        softmax={"steps": 12, "update_steps": 8, **softmax},
        progress=False,
    )


def relaxed_solve(cfg, weights, x, stats, **kw):
    """The continuous masks of the mask solve (before rounding)."""
    setup, loss, options = qk_mask_solve(cfg, weights, x, stats)
    return solve_masks(loss, setup.init, data=setup.data, steps=cfg.softmax.steps, **options | kw)


def four_sequences(seed):
    """Kernels, four input sequences (two problems' inputs) and the first problem's stats."""
    weights, x, stats = qk_layer_problem(seed)
    more = qk_layer_problem(seed + 100)[1]
    return weights, jnp.concatenate([x, more])[:4], stats


def test_each_step_reads_the_next_sequences_in_turn():
    b = 5
    x = jnp.arange(b, dtype=jnp.float32)[:, None, None] * jnp.ones((b, 2, 3))
    target = jnp.arange(b, dtype=jnp.float32)[None, :, None, None] * jnp.ones((2, b, 2, 2))
    values = (target[..., :1] + 10, jnp.ones((2, 1, 3)))
    data = ({"q": jnp.ones(3)}, x, target, jnp.ones(()), values, None)
    pick = SequenceBatch(3, "mask")
    for step, want in [(0, [0, 1, 2]), (1, [3, 4, 0]), (2, [1, 2, 3])]:
        _, xs, ts, _, vs, _ = pick(data, jnp.asarray(step))
        np.testing.assert_array_equal(xs[:, 0, 0], want)
        np.testing.assert_array_equal(ts[0, :, 0, 0], want)
        np.testing.assert_array_equal(vs[0][0, :, 0, 0], np.asarray(want) + 10)
        np.testing.assert_array_equal(vs[1], values[1])
    # The update's data tuple: x at index 3, the target at 4, the values at 6.
    update_data = (None, None, None, x, target, jnp.ones(()), values, None, None)
    out = SequenceBatch(2, "update")(update_data, jnp.asarray(2))
    np.testing.assert_array_equal(out[3][:, 0, 0], [4, 0])
    np.testing.assert_array_equal(out[4][0, :, 0, 0], [4, 0])


def test_batches_of_identical_sequences_give_the_full_solve():
    """Every batch's term equals the whole term when the sequences are copies of one, so the
    batched solve and update must land where the full ones do."""
    weights, x, stats = qk_layer_problem(21)
    copies = jnp.repeat(x[:1], 4, axis=0)
    request = request_for(config(samples=4))
    results = {}
    for batch in (None, 2):
        cfg = config(samples=4, batch=batch)
        results[batch] = prune_qk_softmax(
            weights, copies, stats, request, cfg.softmax, spec=SPEC, progress=False
        )
    (w_full, keep_full, info_full), (w_batch, keep_batch, info_batch) = results[None], results[2]
    for k in ("q", "k"):
        np.testing.assert_array_equal(keep_batch[k], keep_full[k])
        np.testing.assert_allclose(w_batch[k], w_full[k], rtol=1e-5, atol=1e-6)
    assert info_batch["update_attention_before"] == pytest.approx(
        info_full["update_attention_before"], rel=1e-5
    )


def test_a_batched_solve_sees_every_sequence_and_reports_losses_on_all():
    weights, four, stats = four_sequences(22)
    batched = relaxed_solve(config(samples=4, batch=2), weights, four, stats)
    first_two = relaxed_solve(config(samples=2), weights, four[:2], stats)
    full = relaxed_solve(config(samples=4), weights, four, stats)
    for k in ("q", "k"):
        assert not np.allclose(batched.masks[k], first_two.masks[k])
        assert not np.allclose(batched.masks[k], full.masks[k])
    # The start's loss is on all four sequences (the full solve's), not on the first batch.
    assert batched.initial_loss == pytest.approx(full.initial_loss, rel=1e-6)
    assert batched.history["loss"][0] != pytest.approx(full.initial_loss, rel=1e-6)


def test_a_batched_layer_records_its_losses_on_every_sequence():
    """The layer's facts (``initial_loss``, ``final_attention_term``, which the run's warnings
    compare) are on all sequences, not on the first or last step's batch: the start's loss is
    the unbatched solve's, and the final term is the term at the returned masks."""
    weights, four, stats = four_sequences(24)
    cfg = config(samples=4, batch=2, update="none")
    request, opts = request_for(cfg), cfg.softmax
    batched = prune_qk_softmax(weights, four, stats, request, opts, spec=SPEC, progress=False)[2]
    full_cfg = config(samples=4, batch=None, update="none")
    full = prune_qk_softmax(
        weights, four, stats, request_for(full_cfg), full_cfg.softmax, spec=SPEC, progress=False
    )[2]
    assert batched["initial_loss"] == pytest.approx(full["initial_loss"], rel=1e-6)
    res = relaxed_solve(cfg, weights, four, stats)
    assert batched["final_attention_term"] == pytest.approx(res.final_attention, rel=1e-6)
    assert res.final_attention != pytest.approx(float(res.history["attention"][-1]), rel=1e-6)


def test_a_stopped_batched_solve_resumes_on_the_same_batches(tmp_path):
    weights, four, stats = four_sequences(23)
    cfg = config(samples=4, batch=2, steps=20)
    kw = dict(chunk_steps=5, checkpoint_every=5)
    whole = relaxed_solve(cfg, weights, four, stats)
    relaxed_solve(cfg, weights, four, stats, checkpoint_dir=tmp_path, stop_after=10, **kw)
    resumed = relaxed_solve(cfg, weights, four, stats, checkpoint_dir=tmp_path, **kw)
    for k in ("q", "k"):
        np.testing.assert_array_equal(resumed.masks[k], whole.masks[k])
    np.testing.assert_array_equal(resumed.history["loss"], whole.history["loss"])


def test_plain_gradient_descent_reads_every_sequence_and_a_solver_batch_for_it_is_refused():
    """GD's accept-or-halve rule compares losses on the same data: with softmax.optimizer gd
    every step reads every sequence (the batch applies to Adam and SGD), and the solver refuses
    a minibatch for GD outright."""
    opts = config(batch=2, optimizer="gd", lr=0.0).softmax
    assert solve_options(opts, 4)["minibatch"] is None
    assert solve_options(config(batch=2).softmax, 4)["minibatch"] == SequenceBatch(2, "mask")
    assert solve_options(config(batch=4).softmax, 4)["minibatch"] is None
    with pytest.raises(ValueError, match="every step must read the same data"):
        solve_masks(
            lambda m, d: (jnp.sum(m * m), {}),
            jnp.ones(3),
            steps=2,
            optimizer="gd",
            minibatch=SequenceBatch(1, "mask"),
            progress=False,
        )


def test_layers_solved_together_with_a_batch_match_one_by_one():
    """Independent layers stacked into one solve (``calibration.layer_inputs: dense``) take
    each step's batch along their own sequence axis: the same masks and weights as each layer
    solved alone."""
    problems = [four_sequences(seed) for seed in (31, 32, 33)]
    cfg = config(samples=4, batch=2)
    request, opts = request_for(cfg), cfg.softmax
    alone = [
        prune_qk_softmax(w, x, s, request, opts, spec=SPEC, progress=False) for w, x, s in problems
    ]
    together = prune_qk_softmax_layers(
        *zip(*problems, strict=True),
        request,
        opts,
        spec=SPEC,
        devices=jax.devices()[:1],
        progress=False,
    )
    assert [info["batch_layers"] for _, _, info in together] == [3, 3, 3]
    for (w_ref, keep_ref, info_ref), (w_out, keep_out, info_out) in zip(
        alone, together, strict=True
    ):
        for k in ("q", "k"):
            np.testing.assert_array_equal(keep_out[k], keep_ref[k])
            np.testing.assert_allclose(w_out[k], w_ref[k], rtol=1e-4, atol=1e-5)
        assert info_out["final_loss"] == pytest.approx(info_ref["final_loss"], rel=1e-4)

"""Solvers: monotone Algorithm 1, optax options, pytrees, divergence errors, checkpoint resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import objective
from jaxprune.checkpoints import CheckpointError
from jaxprune.models.spec import AttentionSpec
from jaxprune.solvers import SolveDivergedError, smoothness_estimate, solve_mask, solve_masks


def problem(seed=0, b=2, n=12, d=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, n, d)).astype(np.float32) / np.sqrt(d)
    w = 3 * rng.normal(size=(d, d)).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(x)


def test_derived_step_gd_is_monotone_and_converges():
    w, x = problem()
    res = solve_mask(w, x, lam=0.05, steps=200, progress=False)
    loss = res.history["loss"]
    assert len(loss) == 200 and np.all(np.diff(loss) <= 0)
    assert res.final_loss < 0.5 * loss[0]
    grad = objective.attention_pruning_grad(res.masks, w, x, lam=0.05)
    assert float(jnp.linalg.norm(grad)) < 0.1 * res.history["grad_norm"][0]


def test_derived_step_is_inverse_of_the_hessian_norm():
    # A quadratic with Hessian diag(1, 10): the power iteration must find 10.
    h = jnp.array([1.0, 10.0])
    assert smoothness_estimate(lambda m, _: h * m, jnp.ones(2), iters=50) == pytest.approx(
        10, rel=1e-3
    )


def test_too_large_step_is_rejected_not_taken():
    w, x = problem(1)
    res = solve_mask(w, x, lam=0.05, steps=50, step_size=1e4, progress=False)
    assert np.all(np.diff(res.history["loss"]) <= 0)
    assert res.history["step_size"][-1] < 1e4


def test_closed_form_and_autodiff_solves_agree():
    w, x = problem(2)
    a = solve_mask(w, x, lam=0.05, steps=30, progress=False)
    b = solve_mask(w, x, lam=0.05, steps=30, progress=False, closed_form=False)
    np.testing.assert_allclose(a.masks, b.masks, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "constant"), ("adam", "cosine")])
def test_optax_optimizers_keep_the_mask_in_the_unit_box(optimizer, schedule):
    w, x = problem(3)
    res = solve_mask(
        w,
        x,
        lam=0.5,
        steps=60,
        optimizer=optimizer,
        step_size=0.05,
        schedule=schedule,
        progress=False,
    )
    assert float(res.masks.min()) >= 0.0 and float(res.masks.max()) <= 1.0
    assert res.final_loss < res.history["loss"][0]


def test_pytree_of_masks_for_several_layers():
    rng = np.random.default_rng(4)
    L, d, h, g, dh, n = 2, 8, 2, 1, 4, 6
    x = jnp.asarray(rng.normal(size=(L, 2, n, d)), jnp.float32)
    weights = {
        "q": jnp.asarray(rng.normal(size=(L, d, h * dh)), jnp.float32),
        "k": jnp.asarray(rng.normal(size=(L, d, g * dh)), jnp.float32),
    }
    kw = dict(lam=0.05, spec=AttentionSpec(h, g, dh, 1e4))
    res = solve_masks(
        lambda m, d: objective.qk_pruning_loss_layers(m, *d, **kw),
        jax.tree.map(jnp.ones_like, weights),
        data=(weights, x),
        steps=40,
        progress=False,
    )
    assert jax.tree.map(jnp.shape, res.masks) == jax.tree.map(jnp.shape, weights)
    assert np.all(np.diff(res.history["loss"]) <= 0)


def test_nan_loss_stops_with_the_step_and_advice():
    w, x = problem(5)
    bad_x = x.at[0, 3, 0].set(jnp.nan)
    with pytest.raises(SolveDivergedError, match=r"step 0.*smaller step_size"):
        solve_mask(w, bad_x, lam=0.05, steps=10, optimizer="sgd", step_size=0.1, progress=False)


def test_exploding_loss_is_reported_as_divergence():
    # lam < 0 makes the loss unbounded below in magnitude: |loss| grows without limit.
    quad = lambda m, _: (jnp.sum(m**2) * 1.0, {})  # noqa: E731
    with pytest.raises(SolveDivergedError, match="diverged at step"):
        solve_masks(
            quad,
            jnp.ones(3),
            steps=200,
            optimizer="sgd",
            step_size=5.0,
            project=False,
            progress=False,
            chunk_steps=10,
        )


def test_bad_settings_are_clear_errors():
    w, x = problem()
    with pytest.raises(ValueError, match="not one of"):
        solve_mask(w, x, lam=0.1, steps=5, optimizer="lbfgs")
    with pytest.raises(ValueError, match="needs a step_size"):
        solve_mask(w, x, lam=0.1, steps=5, optimizer="adam")
    with pytest.raises(ValueError, match="multiple of"):
        solve_mask(
            w, x, lam=0.1, steps=5, chunk_steps=4, checkpoint_every=6, checkpoint_dir="/tmp/x"
        )


@pytest.mark.parametrize("optimizer", ["gd", "adam"])
def test_resume_after_a_stop_gives_the_same_mask_and_history(tmp_path, optimizer):
    w, x = problem(6)
    kw = dict(
        lam=0.05,
        steps=40,
        optimizer=optimizer,
        chunk_steps=5,
        progress=False,
        step_size=None if optimizer == "gd" else 0.05,
    )
    full = solve_mask(w, x, **kw)
    ckpt = tmp_path / "ckpt"
    partial_run = solve_mask(w, x, checkpoint_dir=ckpt, checkpoint_every=10, stop_after=25, **kw)
    assert len(partial_run.history["loss"]) == 25
    resumed = solve_mask(w, x, checkpoint_dir=ckpt, checkpoint_every=10, **kw)
    np.testing.assert_array_equal(resumed.masks, full.masks)
    for key in full.history:
        np.testing.assert_array_equal(resumed.history[key], full.history[key])


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    w, x = problem(7)
    solve_mask(
        w,
        x,
        lam=0.05,
        steps=20,
        chunk_steps=5,
        checkpoint_dir=tmp_path,
        checkpoint_every=5,
        progress=False,
    )
    with pytest.raises(CheckpointError, match="other settings"):
        solve_mask(
            w,
            x,
            lam=0.05,
            steps=30,
            chunk_steps=5,
            checkpoint_dir=tmp_path,
            checkpoint_every=5,
            progress=False,
        )


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    w, x = problem(8)
    kw = dict(
        lam=0.05,
        steps=20,
        chunk_steps=5,
        checkpoint_dir=tmp_path,
        checkpoint_every=10,
        progress=False,
    )
    solve_mask(w, x, **kw)
    for f in (tmp_path / "20").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "meta" not in str(f):
            f.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="delete that folder"):
        solve_mask(w, x, **kw)

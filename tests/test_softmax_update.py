"""The softmax-aware weight update: same masks, lower attention error on the calibration set."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from tiny_run import TINY_FLAGS, jaxprune, tiny_config, write_tiny_data, write_tiny_model

from jaxprune.config import from_dict, replace
from jaxprune.models.llama import Llama, projection_kernels
from jaxprune.pipeline import PruneConfig, calibration_chunks, prune_model

TINY = tiny_config()
CFG = from_dict(
    PruneConfig,
    {
        "method": "softmax",
        "targets": "qk",
        "softmax": {
            "samples": 2,
            "seq_len": 16,
            "steps": 20,
            "update_steps": 60,
            "update_lr": 0.02,
        },
        "eval": {"heldout_samples": 0},
        "progress": False,
    },
)


def run(update):
    model = Llama(TINY, rngs=nnx.Rngs(5))
    tokens = np.random.default_rng(6).integers(0, 64, size=(2, 16)).astype(np.int32)
    cfg = replace(CFG, softmax={"update": update}, layers=[0])
    report = prune_model(model, calibration_chunks(tokens, 2), [], cfg)
    kernels = {k: np.asarray(v[...]) for k, v in projection_kernels(model.layers[0]).items()}
    return report, kernels


def test_update_keeps_the_masks_and_lowers_the_calibration_attention_error():
    plain, w_plain = run("none")
    updated, w_new = run("softmax")
    for name in ("q", "k"):
        keep = np.asarray(updated["masks"][0][name])
        # The same mask: the update runs after rounding and never revives a pruned entry.
        np.testing.assert_array_equal(keep, np.asarray(plain["masks"][0][name]))
        assert np.all(w_new[name][~keep] == 0)
        assert not np.allclose(w_new[name][keep], w_plain[name][keep])
    before = plain["layers"][0]["calib_attention_error"]
    after = updated["layers"][0]["calib_attention_error"]
    assert after < 0.9 * before
    info = updated["layers"][0]
    assert info["update_attention_after"] < info["update_attention_before"]


def test_row_blocked_solve_and_update_give_the_direct_masks_and_weights():
    direct, w_direct = run("softmax")
    model = Llama(TINY, rngs=nnx.Rngs(5))
    tokens = np.random.default_rng(6).integers(0, 64, size=(2, 16)).astype(np.int32)
    cfg = replace(CFG, softmax={"update": "softmax", "row_block": 4}, layers=[0])
    blocked = prune_model(model, calibration_chunks(tokens, 2), [], cfg)
    w_blocked = {k: np.asarray(v[...]) for k, v in projection_kernels(model.layers[0]).items()}
    for name in ("q", "k"):
        np.testing.assert_array_equal(blocked["masks"][0][name], direct["masks"][0][name])
        np.testing.assert_allclose(w_blocked[name], w_direct[name], rtol=1e-3, atol=1e-5)
    for key in ("final_loss", "update_attention_before", "update_attention_after"):
        np.testing.assert_allclose(blocked["layers"][0][key], direct["layers"][0][key], rtol=1e-3)


@pytest.mark.parametrize(("method", "pattern"), [("sparsegpt", "unstructured"), ("alps", "2:4")])
def test_another_methods_mask_then_softmax_update_keeps_its_mask_and_lowers_its_error(
    method, pattern
):
    """``softmax.mask=NAME``: NAME's masks and weights (as ``--method NAME`` gives them), then the
    softmax-aware update of the kept weights."""
    tokens = np.random.default_rng(6).integers(0, 64, size=(2, 16)).astype(np.int32)
    results = {}
    for name, cfg in {
        "alone": replace(CFG, method=method, pattern=pattern, layers=[0]),
        "+ update": replace(CFG, pattern=pattern, softmax={"mask": method}, layers=[0]),
    }.items():
        model = Llama(TINY, rngs=nnx.Rngs(5))
        report = prune_model(model, calibration_chunks(tokens, 2), [], cfg)
        kernels = {k: np.asarray(v[...]) for k, v in projection_kernels(model.layers[0]).items()}
        results[name] = report, kernels
    (base, w_base), (ours, w_ours) = results["alone"], results["+ update"]
    for name in ("q", "k"):
        keep = np.asarray(ours["masks"][0][name])
        np.testing.assert_array_equal(keep, np.asarray(base["masks"][0][name]))
        assert np.all(w_ours[name][~keep] == 0)
        assert not np.allclose(w_ours[name][keep], w_base[name][keep])
    info = ours["layers"][0]
    assert info["update_attention_after"] < 0.9 * info["update_attention_before"]


def test_another_methods_mask_without_the_softmax_update_is_refused():
    with pytest.raises(ValueError, match="is sparsegpt itself: use --method sparsegpt"):
        replace(CFG, softmax={"mask": "sparsegpt", "update": "none"})
    with pytest.raises(ValueError, match=r"softmax\.mask='sgpt' is not allowed; choose auto"):
        replace(CFG, softmax={"mask": "sgpt"})


def test_an_update_that_raises_the_attention_term_is_rolled_back():
    """A runaway update (a learning rate far too large) is refused: the rounded weights stay,
    the layer's facts say what the update reached, and a warning names the flag."""
    _, w_plain = run("none")
    model = Llama(TINY, rngs=nnx.Rngs(5))
    tokens = np.random.default_rng(6).integers(0, 64, size=(2, 16)).astype(np.int32)
    cfg = replace(CFG, softmax={"update": "softmax", "update_lr": 1e9}, layers=[0])
    report = prune_model(model, calibration_chunks(tokens, 2), [], cfg)
    w_new = {k: np.asarray(v[...]) for k, v in projection_kernels(model.layers[0]).items()}
    info = report["layers"][0]
    assert info["update_attention_rejected"] > info["update_attention_before"]
    assert info["update_attention_after"] == info["update_attention_before"]
    for name in ("q", "k"):
        np.testing.assert_array_equal(w_new[name], w_plain[name])
    (warning,) = [w for w in info["warnings"] if "rolled back" in w]
    assert warning.startswith("layer 0: the weight update raised the attention term")
    assert "--softmax.update-lr (now 1e+09)" in warning


def test_a_solve_that_never_moves_is_warned_about():
    model = Llama(TINY, rngs=nnx.Rngs(5))
    tokens = np.random.default_rng(6).integers(0, 64, size=(2, 16)).astype(np.int32)
    cfg = replace(
        CFG, softmax={"update": "none", "optimizer": "gd", "lr": 1e9, "steps": 10}, layers=[0]
    )
    info = prune_model(model, calibration_chunks(tokens, 2), [], cfg)["layers"][0]
    assert info["final_loss"] == info["initial_loss"]
    (warning,) = [w for w in info["warnings"] if "never moved" in w]
    assert "--softmax.lr (now 1e+09)" in warning
    # A solve that moves is not warned about.
    moved = prune_model(
        Llama(TINY, rngs=nnx.Rngs(5)),
        calibration_chunks(tokens, 2),
        [],
        replace(cfg, softmax={"lr": 0.0}),
    )["layers"][0]
    assert not [w for w in moved["warnings"] if "never moved" in w]


def test_the_command_line_warns_of_a_rolled_back_update(tmp_path):
    model, data = write_tiny_model(tmp_path / "model"), write_tiny_data(tmp_path / "data")
    argv = ["prune", "--model", str(model), "--data-dir", str(data), "--out", str(tmp_path / "r")]
    flags = ["--method", "softmax", "--save-params", "false", "--softmax.update-lr", "1e9"]
    done = jaxprune(*argv, *TINY_FLAGS, *flags, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("jaxprune: warning:")]
    assert len(lines) == 4 and all("rolled back" in line for line in lines)
    assert "4 warning(s) in metrics.json" in done.stdout

"""The softmax-aware weight update: same masks, lower attention error on the calibration set."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from tiny_run import tiny_config

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


def test_sparsegpt_mask_then_softmax_update_keeps_sparsegpts_mask_and_lowers_its_error():
    tokens = np.random.default_rng(6).integers(0, 64, size=(2, 16)).astype(np.int32)
    results = {}
    for name, cfg in {
        "sparsegpt": replace(CFG, method="sparsegpt", layers=[0]),
        "sparsegpt + update": replace(CFG, softmax={"mask": "sparsegpt"}, layers=[0]),
    }.items():
        model = Llama(TINY, rngs=nnx.Rngs(5))
        report = prune_model(model, calibration_chunks(tokens, 2), [], cfg)
        kernels = {k: np.asarray(v[...]) for k, v in projection_kernels(model.layers[0]).items()}
        results[name] = report, kernels
    (base, w_base), (ours, w_ours) = results["sparsegpt"], results["sparsegpt + update"]
    for name in ("q", "k"):
        keep = np.asarray(ours["masks"][0][name])
        np.testing.assert_array_equal(keep, np.asarray(base["masks"][0][name]))
        assert np.all(w_ours[name][~keep] == 0)
        assert not np.allclose(w_ours[name][keep], w_base[name][keep])
    info = ours["layers"][0]
    assert info["update_attention_after"] < 0.9 * info["update_attention_before"]


def test_sparsegpt_mask_without_the_softmax_update_is_refused():
    with pytest.raises(ValueError, match="is SparseGPT itself: use --method sparsegpt"):
        replace(CFG, softmax={"mask": "sparsegpt", "update": "none"})

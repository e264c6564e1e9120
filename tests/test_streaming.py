"""Streaming runs (one decoder layer at a time from disk) give the bits of runs in memory: the
same masks, pruned weights and per-layer facts, for safetensors folders and GGUF files; a
stopped streaming run resumes to the same files; evaluation layer by layer matches the model's
own forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_run import N_LAYERS, TINY_FLAGS, jaxprune, write_tiny_data, write_tiny_model

from jaxprune import streaming
from jaxprune.config import from_dict, replace
from jaxprune.loaders.lazy import open_weights
from jaxprune.loaders.resolve import load_model
from jaxprune.models.llama import projection_kernels
from jaxprune.perplexity import perplexity
from jaxprune.pipeline import PruneConfig, calibration_chunks, prune_model

BASE = from_dict(
    PruneConfig,
    {
        "targets": "qk",
        "softmax": {"samples": 2, "seq_len": 12, "steps": 5},
        "sparsegpt": {"blocksize": 16},
        "progress": False,
    },
)


def tokens(n, t=16, seed=0, vocab=64):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, t)).astype(np.int32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("stream") / "model")


def in_memory(path, cfg, calib, held):
    model, _ = load_model(str(path))
    report = prune_model(model, calib, held, cfg)
    kernels = [
        {n: np.asarray(p[...]) for n, p in projection_kernels(layer).items()}
        for layer in model.layers
    ]
    return report, kernels, model


def streamed(path, cfg, calib, held, out: Path, store_cls=streaming.LayerFiles):
    source = streaming.StreamedLayers(open_weights(path))
    store = store_cls(out, {"cfg": "test"}, source.kernel_names)
    report = prune_model(
        source.model, calib, held, cfg, store=store, layers=source, keep_masks=False
    )
    return report, store, source


def assert_same_run(memory, stream, targets=("q", "k")):
    (report_m, kernels_m, _), (report_s, store, _) = memory, stream
    assert report_s["masks"] == {}
    assert report_s["sparsity"] == report_m["sparsity"]
    for li, masks in report_m["masks"].items():
        saved_masks, saved_kernels = store.masks(li), store.kernels(li)
        assert sorted(saved_masks) == sorted(targets)
        for name in targets:
            np.testing.assert_array_equal(saved_masks[name], np.asarray(masks[name]))
            np.testing.assert_array_equal(saved_kernels[name], kernels_m[li][name])
    facts = [
        [{k: v for k, v in f.items() if k != "solve_seconds"} for f in r["layers"]]
        for r in (report_m, report_s)
    ]
    assert facts[0] == facts[1]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "softmax"])
def test_streamed_qk_run_equals_the_run_in_memory(folder, tmp_path, method):
    cfg = replace(BASE, method=method)
    calib = calibration_chunks(tokens(4), 2)
    held = calibration_chunks(tokens(1, seed=1), 1)
    memory = in_memory(folder, cfg, calib, held)
    stream = streamed(folder, cfg, calib, held, tmp_path / "pruned")
    assert stream[1].saved_layers() == list(range(N_LAYERS))
    assert_same_run(memory, stream)


def test_streamed_run_from_gguf_equals_the_run_in_memory(tmp_path):
    from test_gguf import _cfg, _hf_tensors, write_tiny_gguf

    cfg = _cfg(tied=False)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, _hf_tensors(cfg, tied=False), cfg)
    run = replace(BASE, method="wanda")
    calib = calibration_chunks(tokens(4, vocab=cfg["vocab_size"]), 2)
    memory = in_memory(path, run, calib, [])
    stream = streamed(path, run, calib, [], tmp_path / "pruned")
    assert_same_run(memory, stream)


def test_streamed_run_of_a_family_with_biases_and_qk_norm_equals_the_run_in_memory(tmp_path):
    # Qwen3 with attention biases: the held-out errors read the open layer's biases and q/k
    # norm weights (attention_extras).
    from flax import nnx

    from jaxprune.loaders.hf import write_hf_folder
    from jaxprune.models import model_class
    from jaxprune.models.qwen3 import Qwen3Config

    config = Qwen3Config.from_hf_config(
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            attention_bias=True,
            tie_word_embeddings=True,
        )
    )
    model = model_class(config)(config, rngs=nnx.Rngs(0))
    path = write_hf_folder(model, tmp_path / "qwen3")
    cfg = replace(BASE, method="wanda")
    calib = calibration_chunks(tokens(4), 2)
    held = calibration_chunks(tokens(1, seed=1), 1)
    assert_same_run(
        in_memory(path, cfg, calib, held), streamed(path, cfg, calib, held, tmp_path / "p")
    )


class _StopError(Exception):
    pass


class _StoppingFiles(streaming.LayerFiles):
    """Saves a layer, then stops the run when layer 1 is saved (as a kill would)."""

    def save(self, layer, *args, **kwargs):
        super().save(layer, *args, **kwargs)
        if layer == 1:
            raise _StopError


def test_stopped_streaming_run_resumes_to_the_files_of_an_uninterrupted_one(folder, tmp_path):
    cfg = replace(BASE, method="sparsegpt")
    calib = calibration_chunks(tokens(4), 2)
    held = calibration_chunks(tokens(1, seed=1), 1)
    whole = streamed(folder, cfg, calib, held, tmp_path / "whole")
    with pytest.raises(_StopError):
        streamed(folder, cfg, calib, held, tmp_path / "stopped", _StoppingFiles)
    stopped = streaming.LayerFiles(tmp_path / "stopped", {"cfg": "test"}, None)
    assert stopped.saved_layers() == [0, 1]
    resumed = streamed(folder, cfg, calib, held, tmp_path / "stopped")
    assert resumed[0]["resumed_layers"] == [0, 1]
    assert resumed[0]["sparsity"] == whole[0]["sparsity"]
    for li in range(N_LAYERS):
        for part in ("masks", "kernels"):
            x, y = getattr(whole[1], part)(li), getattr(resumed[1], part)(li)
            assert x.keys() == y.keys()
            for name in x:
                np.testing.assert_array_equal(x[name], y[name])
    # The facts too, but for the one that is timing.
    facts = [
        [{k: v for k, v in f.items() if k != "solve_seconds"} for f in r[0]["layers"]]
        for r in (whole, resumed)
    ]
    assert facts[0] == facts[1]


def test_layer_by_layer_evaluation_matches_the_pruned_model_in_memory(folder, tmp_path):
    cfg = replace(BASE, method="wanda")
    calib = calibration_chunks(tokens(4), 2)
    windows = tokens(5, t=16, seed=3)
    _, _, model = in_memory(folder, cfg, calib, [])
    _, store, source = streamed(folder, cfg, calib, [], tmp_path / "pruned")
    source.pruned = store
    want = perplexity(model, windows, batch_size=2, progress=False)
    got = perplexity(None, windows, batch_size=2, progress=False, token_nlls=source.token_nlls)
    np.testing.assert_allclose(got["window_nll"], want["window_nll"], rtol=1e-5)
    # Several passes over the layers when the windows' activations exceed the budget.
    budget = streaming.EVAL_ACTIVATION_BYTES
    try:
        streaming.EVAL_ACTIVATION_BYTES = 2 * 16 * 32 * 4
        again = perplexity(
            None, windows, batch_size=2, progress=False, token_nlls=source.token_nlls
        )
    finally:
        streaming.EVAL_ACTIVATION_BYTES = budget
    assert again["window_nll"] == got["window_nll"]


def test_layer_by_layer_export_is_the_pruned_model_in_memory(folder, tmp_path):
    from flax import nnx

    cfg = replace(BASE, method="sparsegpt")
    calib = calibration_chunks(tokens(4), 2)
    _, _, model = in_memory(folder, cfg, calib, [])
    _, store, source = streamed(folder, cfg, calib, [], tmp_path / "pruned")
    source.pruned = store
    exported, _ = load_model(str(streaming.write_hf_folder(source, tmp_path / "hf")))
    want = nnx.to_flat_state(nnx.state(model, nnx.Param))
    got = dict(nnx.to_flat_state(nnx.state(exported, nnx.Param)))
    assert len(want) == len(got)
    for path, var in want:
        np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(var[...]), path)


@pytest.mark.parametrize(
    "stream,bytes_,expected",
    [("auto", 2**30, False), ("auto", 9 * 2**30, True), (True, 1, True), (False, 2**40, False)],
)
def test_auto_streams_above_the_threshold(stream, bytes_, expected):
    assert streaming.should_stream(stream, 8.0, bytes_) is expected


def test_lazy_weights_know_the_model_size_before_reading(folder):
    weights = open_weights(folder)
    model, _ = load_model(str(folder))
    from flax import nnx

    n = sum(int(np.size(x)) for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
    assert weights.param_count == n and weights.param_bytes == 4 * n


KILL_AFTER = 1
KILLING_SCRIPT = f"""
import os, signal, sys
from jaxprune import streaming
save = streaming.LayerFiles.save
def save_then_die(self, layer, *args, **kwargs):
    save(self, layer, *args, **kwargs)
    if layer == {KILL_AFTER}:
        os.kill(os.getpid(), signal.SIGKILL)
streaming.LayerFiles.save = save_then_die
from jaxprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_command_streams_resumes_and_matches_the_run_in_memory(tmp_path):
    model, data = write_tiny_model(tmp_path / "model"), write_tiny_data(tmp_path / "data")
    env = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }

    def run(out, *extra, script=None):
        argv = ["prune", "--model", str(model), "--data-dir", str(data), "--out", str(out)]
        argv += ["--method", "sparsegpt", "--targets", "qk", "--json", *TINY_FLAGS, *extra]
        return jaxprune(*argv, cwd=tmp_path, env=env, script=script)

    memory = run(tmp_path / "memory", "--stream", "false")
    assert memory.returncode == 0, memory.stderr[-3000:]
    memory = json.loads(memory.stdout.strip().splitlines()[-1])
    killed = run(tmp_path / "stream", "--stream", "true", script=KILLING_SCRIPT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (run_dir,) = (tmp_path / "stream").iterdir()
    # Resumed in the mode its folder shows, whatever --stream says now.
    resumed = run(
        tmp_path / "stream", "--resume", str(run_dir), "--export-hf", str(tmp_path / "hf")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stream = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert stream["stream"] is True and memory["stream"] is False
    assert stream["resumed_layers"] == [0, 1] and stream["files"][-1] == "pruned/"
    assert stream["measured_sparsity"] == memory["measured_sparsity"]
    for name, value in memory["perplexity"].items():
        assert stream["perplexity"][name] == pytest.approx(value, rel=1e-5)

    import orbax.checkpoint as ocp

    params = ocp.PyTreeCheckpointer().restore((Path(memory["run_dir"]) / "params").absolute())
    exported, _ = load_model(str(tmp_path / "hf"))
    for li, layer in enumerate(exported.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            want = params["layers"][str(li)]["self_attn"][name]["kernel"]["value"]
            got = getattr(layer.self_attn, name).kernel[...]
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    masks = ocp.PyTreeCheckpointer().restore((Path(memory["run_dir"]) / "masks").absolute())
    files = streaming.LayerFiles(run_dir / streaming.PRUNED_DIR, {}, _names(model))
    for li in range(N_LAYERS):
        for name, keep in files.masks(li).items():
            np.testing.assert_array_equal(keep, masks[str(li)][name])


def _names(model_dir):
    return streaming.StreamedLayers(open_weights(model_dir)).kernel_names


def test_eval_command_streams_to_the_perplexity_in_memory(folder, tmp_path):
    """``jaxprune eval --stream true`` reads one layer at a time and gives the perplexity and the
    per-window sums of the model in memory; ``auto`` under the threshold loads it whole."""
    data = write_tiny_data(tmp_path / "data")
    argv = ["eval", "--model", str(folder), "--data-dir", str(data), "--windows", "3"]
    argv += ["--seq-len", "16", "--batch-size", "2", "--json"]
    runs = {}
    for stream in ("true", "auto"):
        done = jaxprune(*argv, "--stream", stream, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[stream] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["true"]["stream"] is True and runs["auto"]["stream"] is False
    assert runs["true"]["perplexity"] == pytest.approx(runs["auto"]["perplexity"], rel=1e-5)
    np.testing.assert_allclose(runs["true"]["window_nll"], runs["auto"]["window_nll"], rtol=1e-5)
    low = jaxprune(*argv, "--stream-threshold-gib", "0", cwd=tmp_path)
    assert json.loads(low.stdout.strip().splitlines()[-1])["stream"] is True


def test_a_closed_layer_leaves_memory_at_once(folder):
    # A streamed layer's arrays must be gone when it is closed, not when Python's cycle
    # collector next runs: otherwise several layers' weights are resident together.
    import gc
    import weakref

    source = streaming.StreamedLayers(open_weights(folder))
    gc.disable()
    try:
        layer = source.open(0)
        kernel = projection_kernels(layer)["gate"][...]
        ref = weakref.ref(kernel)
        del layer, kernel
        source.close(0)
        assert ref() is None
    finally:
        gc.enable()

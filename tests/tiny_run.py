"""A tiny random Llama in a Hugging Face folder, a tiny data folder, and the ``jaxprune`` command
run in a subprocess: what the command-line tests need, without downloads (not a test module)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

VOCAB = 64
N_LAYERS = 4
# Flags of a run that takes seconds on the tiny model and data.
TINY_FLAGS = [
    "--calibration.samples",
    "4",
    "--calibration.seq-len",
    "16",
    "--calibration.micro-batch",
    "2",
    "--eval.data",
    "[wikitext2]",
    "--eval.windows",
    "2",
    "--eval.seq-len",
    "16",
    "--eval.heldout-samples",
    "1",
    "--softmax.samples",
    "2",
    "--softmax.seq-len",
    "16",
    "--softmax.steps",
    "5",
    "--progress",
    "false",
]


def tiny_config(**overrides):
    """The tests' tiny Llama shape (2 layers, 4 query and 2 key/value heads of 8, tied)."""
    from jaxprune.models.llama import LlamaConfig

    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rope_theta=1e4,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
    )
    return LlamaConfig(**(shape | overrides))


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random 4-layer Llama (hidden 32, 4 query and 2 key/value heads of 8) with a word-level
    tokenizer ``w0 .. w62``, written as a Hugging Face folder."""
    from flax import nnx
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxprune.loaders.hf import write_hf_folder
    from jaxprune.models.llama import Llama

    config = tiny_config(num_layers=N_LAYERS)
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return write_hf_folder(Llama(config, rngs=nnx.Rngs(seed)), folder, tokenizer=tokenizer)


def write_tiny_data(folder: Path, seed: int = 0) -> Path:
    """WikiText-2 and C4 files in the hub's layouts: 2,000 C4 documents of 12 words, 300
    WikiText rows of 8 words."""
    from jaxprune import data

    rng = np.random.default_rng(seed)

    def text(n):
        return " ".join(f"w{i}" for i in rng.integers(0, VOCAB - 1, n))

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / data.C4_FILES[2], "w") as f:
        for _ in range(2000):
            f.write(json.dumps({"text": text(12)}) + "\n")
    with open(folder / data.WIKITEXT_FILE, "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": text(8)}) + "\n")
    return folder


def jaxprune(*args: str, cwd: Path, env: dict | None = None, script: str | None = None):
    """Runs ``python -m jaxprune.cli ARGS`` (or ``python -c SCRIPT ARGS``) and returns the
    ``CompletedProcess`` with text stdout and stderr."""
    command = (
        [sys.executable, "-c", script, *args]
        if script
        else [sys.executable, "-m", "jaxprune.cli", *args]
    )
    full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    full_env.pop("JAXPRUNE_DATA", None)
    return subprocess.run(
        command, cwd=cwd, env=full_env | (env or {}), capture_output=True, text=True, timeout=300
    )


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes (to show nothing was touched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def prune_tiny(folders: tuple[Path, Path, Path], *flags: str, script: str | None = None):
    """``jaxprune prune FLAGS`` on the tiny model and data ``folders = (model, data, tmp)`` (as
    :func:`tiny_folders` makes them), in a subprocess, into a fresh ``--out`` folder; asserts it
    exits 0 and returns ``(metrics.json, {layer: {name: keep mask}})``."""
    import orbax.checkpoint as ocp

    model, data, tmp = folders
    out = tmp / "runs" / "_".join(re.sub(r"[^\w]", "", f) for f in flags)
    argv = ["prune", "--model", str(model), "--data-dir", str(data), "--out", str(out)]
    done = jaxprune(*argv, *TINY_FLAGS, "--save-params", "false", *flags, cwd=tmp, script=script)
    assert done.returncode == 0, done.stderr
    (run,) = sorted(p for p in out.iterdir() if p.is_dir())
    masks = ocp.PyTreeCheckpointer().restore((run / "masks").absolute())
    return json.loads((run / "metrics.json").read_text()), masks


def tiny_folders(tmp: Path) -> tuple[Path, Path, Path]:
    """The tiny model and data written under ``tmp``: ``(model, data, tmp)``."""
    return write_tiny_model(tmp / "model"), write_tiny_data(tmp / "data"), tmp


def prune_attention_of(model, method: str, tokens) -> dict:
    """Prunes ``model``'s q, k, v and o at 50% with ``method`` on tiny calibration (2 sequences
    of 12 tokens from ``tokens(b=, t=, seed=)``) and one held-out sequence; asserts what every
    method owes every family: each layer's four matrices pruned at 50% (SparseGPT's block
    threshold, its authors' rule, prunes one entry more per block: up to 51%) and a finite
    held-out attention error, and the pruned entries zero in the model. Returns the report."""
    from jaxprune.config import replace
    from jaxprune.models.llama import projection_kernels
    from jaxprune.pipeline import PruneConfig, calibration_chunks, prune_model

    cfg = replace(
        PruneConfig(),
        method=method,
        targets="attn",
        progress=False,
        softmax={"samples": 2, "seq_len": 12, "steps": 5, "update_steps": 5},
    )
    calib = calibration_chunks(tokens(b=2, t=12, seed=1), 2)
    report = prune_model(model, calib, [tokens(b=1, t=12, seed=2)], cfg)
    assert len(report["layers"]) == model.config.num_layers
    for li, info in enumerate(report["layers"]):
        assert set(info["sparsity"]) == {"q", "k", "v", "o"}
        assert all(0.5 <= s <= 0.51 for s in info["sparsity"].values()), info["sparsity"]
        assert np.isfinite(info["heldout_attention_error"])
        kernels = projection_kernels(model.layers[li])
        for name, keep in report["masks"][li].items():
            keep = np.asarray(keep)
            assert np.all(np.asarray(kernels[name][...])[~keep] == 0), (li, name)
    return report


# One attention layer of the q/k solve tests (d, query heads, key/value heads, head width,
# sequences, tokens): d 32, 4 query heads and 2 key/value heads of 8, 2 sequences of 16 tokens.
QK_LAYER = (32, 4, 2, 8, 2, 16)


def qk_layer_problem(seed):
    """Random q/k kernels of :data:`QK_LAYER` (scaled so the attention is far from uniform),
    inputs and their stats."""
    import jax.numpy as jnp

    from jaxprune.methods.stats import init_stats, update_stats

    d, h, g, dh, b, n = QK_LAYER
    rng = np.random.default_rng(seed)
    weights = {
        "q": jnp.asarray(rng.normal(size=(d, h * dh)) * 3 / np.sqrt(d), jnp.float32),
        "k": jnp.asarray(rng.normal(size=(d, g * dh)) * 3 / np.sqrt(d), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    return weights, x, update_stats(init_stats(d), x)


def qk_layer_spec():
    """The attention of :data:`QK_LAYER` (RoPE base 1e4)."""
    from jaxprune.models.spec import AttentionSpec

    _, h, g, dh, _, _ = QK_LAYER
    return AttentionSpec(h, g, dh, 1e4)


def qk_mask_solve(cfg, weights, x, stats):
    """The mask solve of one :data:`QK_LAYER` layer under the run config ``cfg``, written out
    as ``prune_qk_softmax`` sets it up: ``(setup, loss_fn, options)``, ``options`` being
    :func:`~jaxprune.methods.softmax_solve.solve_options` for ``x``'s sequences."""
    from jaxprune.methods.softmax_solve import _mask_loss, solve_options, solve_setup
    from jaxprune.pipeline import request_for

    spec = qk_layer_spec()
    opts = cfg.softmax
    setup = solve_setup(weights, x, stats, request_for(cfg), opts, dict(spec=spec))
    loss = _mask_loss(
        lam=opts.lam,
        n_entries=setup.n_entries,
        query_idx=setup.query_idx,
        row_block=None,
        shape=(("spec", spec),),
    )
    return setup, loss, solve_options(opts, x.shape[0])

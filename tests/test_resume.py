"""A pruning run killed midway continues with ``--resume RUN_DIR`` and ends bit-identical to an
uninterrupted run; a run with other settings refuses the folder; ``--export-hf`` replaces an
earlier export only with ``--overwrite``, whole. Subprocesses on a tiny random model."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_run import TINY_FLAGS, jaxprune, snapshot, write_tiny_data, write_tiny_model

# Prunes through the command line, but SIGKILLs itself right after layer KILL_AFTER is saved.
KILL_AFTER = 1
KILLING_SCRIPT = f"""
import os, signal, sys
from jaxprune import resume
save = resume.LayerStore.save
def save_then_die(self, layer, *args, **kwargs):
    save(self, layer, *args, **kwargs)
    if layer == {KILL_AFTER}:
        os.kill(os.getpid(), signal.SIGKILL)
resume.LayerStore.save = save_then_die
from jaxprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_tiny_model(root / "model")
    write_tiny_data(root / "data")
    return root


def cli(world: Path, *args: str, script: str | None = None):
    # One persistent compilation cache for the module's processes: each would otherwise spend
    # most of its time compiling the same solver.
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(world / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    return jaxprune(*args, cwd=world, env=cache, script=script)


def flags(world: Path, out: str, *extra: str) -> list[str]:
    # Softmax-aware q/k plus SparseGPT v/o: both kinds of layer work are checkpointed.
    return [
        "prune",
        "--model",
        str(world / "model"),
        "--data-dir",
        str(world / "data"),
        "--method",
        "softmax",
        "--targets",
        "attn",
        "--out",
        str(world / out),
        "--json",
        *TINY_FLAGS,
        *extra,
    ]


def restored(run_dir: Path, item: str) -> dict:
    return ocp.StandardCheckpointer().restore((run_dir / item).absolute())


def test_killed_run_resumes_bit_identical_and_refuses_other_settings(world):
    whole = cli(world, *flags(world, "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    whole_metrics = json.loads(whole.stdout.strip().splitlines()[-1])

    killed = cli(world, *flags(world, "killed"), script=KILLING_SCRIPT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run_dir,) = (world / "killed").iterdir()
    assert sorted(p.name for p in (run_dir / "layers").iterdir()) == ["0", "1"]
    assert not (run_dir / "metrics.json").exists()

    # Other settings: refused in one line, the folder untouched.
    before = snapshot(run_dir)
    other = cli(world, *flags(world, "killed", "--softmax.lr", "0.02", "--resume", str(run_dir)))
    err = other.stderr.strip()
    assert other.returncode == 2 and "\n" not in err, other.stderr[-3000:]
    assert "other settings (softmax.lr: 0.01 there, 0.02 now)" in err and str(run_dir) in err
    assert snapshot(run_dir) == before

    resumed = cli(world, *flags(world, "killed", "--resume", str(run_dir)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert metrics["run_dir"] == str(run_dir) and metrics["resumed_layers"] == [0, 1]
    assert not (run_dir / "layers").exists()

    whole_dir = Path(whole_metrics["run_dir"])
    for item in ("masks", "params"):
        a, b = restored(whole_dir, item), restored(run_dir, item)
        flat_a, flat_b = dict(_flat(a)), dict(_flat(b))
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=f"{item} {key}")
    assert metrics["perplexity"] == whole_metrics["perplexity"]
    layers = [json.loads((d / "metrics.json").read_text())["layers"] for d in (run_dir, whole_dir)]
    for info in (*layers[0], *layers[1]):
        info.pop("solve_seconds", None)  # timing: the one per-layer fact that may differ
    assert layers[0] == layers[1]

    finished = cli(world, *flags(world, "killed", "--resume", str(run_dir)))
    assert finished.returncode == 2 and "that run finished" in finished.stderr


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", np.asarray(value)


def test_export_replaces_an_earlier_export_only_whole_and_warns_of_a_collapsed_mask(world):
    export = world / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "stray.bin").write_bytes(b"old")
    # lam 100 and big Adam steps drive the relaxed mask to zero: the run finishes, warning.
    args = flags(world, "exported", "--export-hf", str(export), "--overwrite")
    args += ["--softmax.lam", "100", "--softmax.lr", "0.5"]
    args += ["--targets", "qk", "--layers", "[0]", "--save-params", "false"]
    proc = cli(world, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in export.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert not [p for p in world.iterdir() if p.name.startswith(".export")]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["warnings"] and "layer 0: the relaxed mask collapsed" in metrics["warnings"][0]
    assert "jaxprune: warning: layer 0: the relaxed mask collapsed" in proc.stderr

    from jaxprune.loaders.resolve import load_model

    model, _ = load_model(str(export))
    q = np.asarray(model.layers[0].self_attn.q_proj.kernel[...])
    assert np.mean(q == 0) == pytest.approx(0.5)

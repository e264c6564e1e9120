"""The softmax-aware solve spread over devices (``jaxprune.sharding``): key/value groups split over
a "heads" axis and independent layers over a "layers" axis give the masks of one device, and the
independent-layer mode runs end to end. ``conftest.py`` gives this process two CPU devices; one
test forces four in a subprocess (the flag must be set before JAX starts)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from tiny_run import QK_LAYER, TINY_FLAGS, jaxprune, tiny_config, write_tiny_data, write_tiny_model
from tiny_run import qk_layer_problem as layer_problem

from jaxprune import sharding
from jaxprune.config import replace
from jaxprune.methods import softmax_layers, softmax_solve
from jaxprune.methods.softmax_layers import prune_qk_softmax_layers
from jaxprune.methods.softmax_solve import _mask_loss, prune_qk_softmax, solve_setup
from jaxprune.models.llama import Llama
from jaxprune.models.spec import AttentionSpec
from jaxprune.pipeline import PruneConfig, calibration_chunks, prune_model, request_for

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 2, reason="needs the two CPU devices that tests/conftest.py forces"
)

D, H, G, DH, B, N = QK_LAYER
SHAPE = dict(spec=AttentionSpec(H, G, DH, 1e4))
# The weight update after rounding is split like the mask solve; most tests here leave it out
# for speed, and test_heads_sharded_prune_matches_one_device includes it once.
CFG = replace(
    PruneConfig(), method="softmax", softmax={"steps": 10, "update": "none"}, progress=False
)


def args(cfg):
    """The softmax-aware solve's ``(request, options)`` for a run config."""
    return request_for(cfg), cfg.softmax


def recording(module, monkeypatch):
    """Wraps ``module.solve_masks`` to record the sharding of each solve's start point."""
    seen, solve = [], module.solve_masks

    def wrapped(loss_fn, init, **kw):
        seen.append(init["q"].sharding)
        return solve(loss_fn, init, **kw)

    monkeypatch.setattr(module, "solve_masks", wrapped)
    return seen


def assert_same_results(ref, out, weight_atol=0.0):
    """The same masks, and the same kernels (exactly; ``weight_atol`` allows the float32
    rounding of a split weight update, whose loss sums over devices in another order)."""
    for (new_a, keep_a, info_a), (new_b, keep_b, info_b) in zip(ref, out, strict=True):
        for k in ("q", "k"):
            np.testing.assert_array_equal(np.asarray(keep_a[k]), np.asarray(keep_b[k]))
            np.testing.assert_allclose(
                np.asarray(new_a[k]), np.asarray(new_b[k]), rtol=0, atol=weight_atol
            )
        assert info_b["lam"] == info_a["lam"]
        assert info_b["initial_loss"] == pytest.approx(info_a["initial_loss"], rel=1e-5)
        assert info_b["final_loss"] == pytest.approx(info_a["final_loss"], rel=1e-5)
        assert info_b["mask_mean"] == pytest.approx(info_a["mask_mean"], rel=1e-5)


def test_mesh_shapes():
    two = jax.devices()[:2]
    assert sharding.solve_mesh(2, 1, two[:1]) is None
    assert dict(sharding.solve_mesh(2, 1, two).shape) == {"layers": 1, "heads": 2}
    # Three key/value groups do not split over two devices: no mesh, the one-device path.
    assert sharding.solve_mesh(3, 1, two) is None
    # Several layers: every device on the layer axis (no communication at all).
    assert dict(sharding.solve_mesh(3, 30, two).shape) == {"layers": 2, "heads": 1}
    assert dict(sharding.solve_mesh(2, 2, two).shape) == {"layers": 2, "heads": 1}


def test_devices_limit(monkeypatch):
    monkeypatch.setenv("JAXPRUNE_DEVICES", "1")
    assert sharding.solve_devices() == jax.devices()[:1]
    assert sharding.solve_mesh(G) is None
    monkeypatch.setenv("JAXPRUNE_DEVICES", "two")
    with pytest.raises(ValueError, match="JAXPRUNE_DEVICES='two'"):
        sharding.solve_devices()


def test_a_key_head_and_its_query_heads_share_a_device():
    weights, x, stats = layer_problem(0)
    setup = solve_setup(weights, x, stats, *args(CFG), SHAPE)
    mesh = sharding.solve_mesh(G, 1, jax.devices()[:2])
    init, (w, xx, target, *_) = sharding.place_qk_solve(mesh, setup.init, setup.data)
    assert w["q"].sharding.spec == P(None, "heads") and target.sharding.spec == P("heads")
    per_device = {}
    for name, arr, axis, width in [
        ("q", w["q"], 1, DH),
        ("k", w["k"], 1, DH),
        ("mask", init["q"], 1, DH),
        ("target", target, 0, 1),
    ]:
        for shard in arr.addressable_shards:
            cut = shard.index[axis]
            heads = set(range(cut.start // width, cut.stop // width))
            per_device.setdefault(shard.device, {})[name] = heads
    assert len(per_device) == 2
    for heads in per_device.values():
        assert heads["q"] == heads["mask"] == heads["target"]
        assert {i // (H // G) for i in heads["q"]} == heads["k"]
        assert len(heads["k"]) == G // 2
    assert all(s.data.shape == xx.shape for s in xx.addressable_shards)  # replicated


@pytest.mark.parametrize("row_block", [None, 8])
def test_heads_sharded_step_communicates_only_scalars(row_block):
    weights, x, stats = layer_problem(0)
    cfg = replace(CFG, softmax={"row_block": row_block})
    setup = solve_setup(weights, x, stats, *args(cfg), SHAPE)
    mesh = sharding.solve_mesh(G, 1, jax.devices()[:2])
    init, data = sharding.place_qk_solve(mesh, setup.init, setup.data)
    loss = _mask_loss(
        lam=0.1,
        n_entries=setup.n_entries,
        query_idx=None,
        row_block=row_block,
        shape=tuple(sorted(SHAPE.items())),
    )
    step = jax.jit(jax.value_and_grad(lambda m, d: loss(m, d)[0]))
    hlo = step.lower(init, data).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    reduced = re.findall(r"= (\(.*?\)|\S+) all-reduce\(", hlo)
    assert reduced, "the sum of the loss over the devices' heads should be one all-reduce"
    for shapes in reduced:
        assert all(dims == "" for dims in re.findall(r"f32\[([^\]]*)\]", shapes)), shapes


@pytest.mark.parametrize(
    "row_block,term,update",
    [
        (None, "probs", "none"),
        (8, "probs", "none"),
        (None, "output", "none"),
        (8, "probs", "softmax"),
    ],
)
def test_heads_sharded_prune_matches_one_device(monkeypatch, row_block, term, update):
    weights, x, stats = layer_problem(1)
    rng = np.random.default_rng(2)
    values = {
        "v": jnp.asarray(rng.normal(size=(D, G * DH)) / np.sqrt(D), jnp.float32),
        "o": jnp.asarray(rng.normal(size=(H * DH, D)) / np.sqrt(H * DH), jnp.float32),
    }
    cfg = replace(CFG, softmax={"row_block": row_block, "term": term, "update": update})
    seen = recording(softmax_solve, monkeypatch)
    monkeypatch.setenv("JAXPRUNE_DEVICES", "1")
    ref = prune_qk_softmax(weights, x, stats, *args(cfg), value_weights=values, **SHAPE)
    monkeypatch.setenv("JAXPRUNE_DEVICES", "2")
    out = prune_qk_softmax(weights, x, stats, *args(cfg), value_weights=values, **SHAPE)
    if update == "softmax":  # the update's own solve follows each mask solve, split alike
        assert ref[2]["update_attention_after"] < ref[2]["update_attention_before"]
        assert len(seen[1].device_set) == 1
        assert len(seen[3].device_set) == 2 and seen[3].spec == P(None, "heads")
        seen = seen[::2]
        assert out[2]["update_attention_after"] == pytest.approx(
            ref[2]["update_attention_after"], rel=1e-4
        )
    assert len(seen[0].device_set) == 1
    assert len(seen[1].device_set) == 2 and seen[1].spec == P(None, "heads")
    assert_same_results([ref], [out], weight_atol=1e-5 if update == "softmax" else 0.0)


@pytest.mark.parametrize(
    "devices,max_layers,lam_search", [(1, None, False), (2, 2, False), (2, None, True)]
)
def test_layers_solved_together_match_one_by_one(monkeypatch, devices, max_layers, lam_search):
    cfg = replace(
        CFG, softmax={"lam_search": lam_search, "lam_grid": [0.1, 1.0], "search_steps": 5}
    )
    problems = [layer_problem(seed) for seed in range(3)]
    monkeypatch.setenv("JAXPRUNE_DEVICES", "1")
    ref = [prune_qk_softmax(w, x, s, *args(cfg), **SHAPE) for w, x, s in problems]
    seen = recording(softmax_layers, monkeypatch)
    out = prune_qk_softmax_layers(
        *zip(*problems, strict=True),
        *args(cfg),
        devices=jax.devices()[:devices],
        max_layers=max_layers,
        **SHAPE,
    )
    assert_same_results(ref, out)
    if devices == 2:
        # Three layers over two devices: padded to four (batches of 2 + 1 padded, or one of 4).
        assert all(s.spec == P("layers", None, "heads") for s in seen)
        assert all(len(s.device_set) == 2 for s in seen)
        assert [o[2]["batch_layers"] for o in out] == ([2, 2, 1] if max_layers else [3, 3, 3])


def test_dense_layer_inputs_equal_each_layer_pruned_alone(monkeypatch):
    """With ``layer_inputs: dense`` each layer's masks are those of a run that prunes only that
    layer (whose inputs are then the dense model's), the layers solved on two devices, the
    references on one."""
    config = tiny_config()
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (4, 16)).astype(np.int32)
    base = replace(
        PruneConfig(),
        method="softmax",
        softmax={"samples": 2, "seq_len": 12, "steps": 10},
        eval={"heldout_samples": 0},
        progress=False,
    )
    model = Llama(config, rngs=nnx.Rngs(0))
    seen = recording(softmax_layers, monkeypatch)
    report = prune_model(
        model,
        calibration_chunks(tokens, 2),
        [],
        replace(base, calibration={"layer_inputs": "dense"}),
    )
    assert len(seen) == 1 and seen[0].spec == P("layers", None, "heads")
    monkeypatch.setenv("JAXPRUNE_DEVICES", "1")
    for li in range(config.num_layers):
        alone = prune_model(
            Llama(config, rngs=nnx.Rngs(0)),
            calibration_chunks(tokens, 2),
            [],
            dataclasses.replace(base, layers=(li,)),
        )
        for k in ("q", "k"):
            np.testing.assert_array_equal(
                np.asarray(report["masks"][li][k]), np.asarray(alone["masks"][li][k])
            )
        assert report["layers"][li]["final_loss"] == pytest.approx(
            alone["layers"][li]["final_loss"], rel=1e-5
        )


FOUR_DEVICES = """
import json, os
import jax, numpy as np
from jaxprune.methods import softmax_layers
from jaxprune.methods.softmax_layers import prune_qk_softmax_layers
from jaxprune.methods.softmax_solve import prune_qk_softmax
from test_sharding import CFG, SHAPE, args, layer_problem
problems = [layer_problem(seed) for seed in range(2)]
seen, solve = [], softmax_layers.solve_masks
softmax_layers.solve_masks = lambda f, init, **kw: seen.append(init["q"].sharding) or solve(
    f, init, **kw)
out = prune_qk_softmax_layers(*zip(*problems), *args(CFG), **SHAPE)
os.environ["JAXPRUNE_DEVICES"] = "1"
ref = [prune_qk_softmax(w, x, s, *args(CFG), **SHAPE) for w, x, s in problems]
print(json.dumps(dict(
    devices=len(jax.devices()),
    mesh={k: int(v) for k, v in seen[0].mesh.shape.items()},
    spec=str(seen[0].spec),
    same_masks=[bool(np.array_equal(a[1][k], b[1][k])) for a, b in zip(ref, out) for k in "qk"],
    losses=[[a[2]["final_loss"], b[2]["final_loss"]] for a, b in zip(ref, out)],
)))
"""


def test_four_devices_split_layers_and_heads():
    """Two layers on four forced CPU devices: a 2 x 2 mesh (layers x key/value groups), the
    masks of one device."""
    here = Path(__file__).resolve().parent
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]),
    )
    env.pop("JAXPRUNE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FOUR_DEVICES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["devices"] == 4
    assert got["mesh"] == {"layers": 2, "heads": 2}
    assert got["spec"] == str(P("layers", None, "heads"))
    assert all(got["same_masks"])
    for ref, out in got["losses"]:
        assert out == pytest.approx(ref, rel=1e-5)


def test_dense_layer_inputs_from_the_command_line(tmp_path):
    """``jaxprune prune --layer-inputs dense`` on a tiny model, in a subprocess with this
    process's two devices: every layer pruned at 50%, solved in one batch, evaluated."""
    write_tiny_model(tmp_path / "model")
    write_tiny_data(tmp_path / "data")
    proc = jaxprune(
        "prune",
        "--model",
        str(tmp_path / "model"),
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "runs"),
        *TINY_FLAGS,
        "--method",
        "softmax",
        "--calibration.layer-inputs",
        "dense",
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["config"]["calibration"]["layer_inputs"] == "dense"
    assert metrics["device_count"] == 2
    assert set(metrics["measured_sparsity"].values()) == {0.5}
    assert np.isfinite(metrics["perplexity"]["wikitext2"])
    run = json.loads((Path(metrics["run_dir"]) / "metrics.json").read_text())
    assert [layer["batch_layers"] for layer in run["layers"]] == [4] * 4


DISTRIBUTED = """
import socket, sys
import jax
from jax._src import xla_bridge
with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
initialize = jax.distributed.initialize
def one_process():
    # What a pod's process does, with one process: JAX must not have picked its devices yet.
    assert not xla_bridge.backends_are_initialized(), "JAX started before initialize()"
    initialize(coordinator_address=f"localhost:{port}", num_processes=1, process_id=0)
    print("initialized", file=sys.stderr)
jax.distributed.initialize = one_process
from jaxprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_distributed_hook_runs_before_jax_starts(tmp_path):
    """``JAXPRUNE_DISTRIBUTED=1`` calls ``jax.distributed.initialize()`` (here a real one, with
    one process) before anything starts JAX, and the run then goes on normally."""
    write_tiny_model(tmp_path / "model")
    write_tiny_data(tmp_path / "data")
    args = ["eval", "--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data")]
    args += ["--windows", "1", "--seq-len", "16", "--json"]
    proc = jaxprune(*args, cwd=tmp_path, env={"JAXPRUNE_DISTRIBUTED": "1"}, script=DISTRIBUTED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialized" in proc.stderr
    assert np.isfinite(json.loads(proc.stdout.strip().splitlines()[-1])["perplexity"])
    proc = jaxprune(*args, cwd=tmp_path, env={"JAXPRUNE_DISTRIBUTED": "0"}, script=DISTRIBUTED)
    assert proc.returncode == 0 and "initialized" not in proc.stderr


def run_two_processes(command: list[str], cwd=None) -> list[tuple[str, str]]:
    """Runs ``command`` as processes 0 and 1 of one ``jax.distributed`` run on this machine
    (``JAXPRUNE_DISTRIBUTED=1``, a free local port as the coordinator, one CPU device each);
    asserts both exit 0 and returns their (stdout, stderr) in process order."""
    import socket

    here = Path(__file__).resolve().parent
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]),
        JAXPRUNE_DISTRIBUTED="1",
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAXPRUNE_NUM_PROCESSES="2",
    )
    for name in ("XLA_FLAGS", "JAXPRUNE_DEVICES"):  # one CPU device per process
        env.pop(name, None)
    procs = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env=env | {"JAXPRUNE_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


TWO_PROCESSES = """
import json, os, sys
from jaxprune import sharding
sharding.maybe_initialize()  # JAXPRUNE_DISTRIBUTED=1, the coordinator and index from the env
import jax, numpy as np
from jaxprune.methods import softmax_layers, softmax_solve
from test_sharding import CFG, SHAPE, args, layer_problem
seen = []
for module in (softmax_solve, softmax_layers):
    solve = module.solve_masks
    module.solve_masks = lambda f, init, solve=solve, **kw: seen.append(
        init["q"].sharding) or solve(f, init, **kw)
problems = [layer_problem(seed) for seed in range(2)]
heads = softmax_solve.prune_qk_softmax(*problems[0], *args(CFG), **SHAPE)
layers = softmax_layers.prune_qk_softmax_layers(*zip(*problems), *args(CFG), **SHAPE)
print(json.dumps(dict(
    process=jax.process_index(),
    devices=len(jax.devices()),
    processes_per_solve=[len({d.process_index for d in s.device_set}) for s in seen],
    masks=[{k: np.asarray(r[1][k]).astype(int).tolist() for k in "qk"} for r in [heads, *layers]],
    losses=[r[2]["final_loss"] for r in [heads, *layers]],
)))
"""


def test_two_processes_give_the_masks_of_one(monkeypatch):
    """Two local processes joined by ``jax.distributed`` (gloo collectives, one CPU device
    each): one layer's key/value groups split over the processes, and two independent layers
    split one per process, give the masks of one device."""
    outs = run_two_processes([sys.executable, "-c", textwrap.dedent(TWO_PROCESSES)])
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    problems = [layer_problem(seed) for seed in range(2)]
    monkeypatch.setenv("JAXPRUNE_DEVICES", "1")
    ref = [prune_qk_softmax(w, x, s, *args(CFG), **SHAPE) for w, x, s in problems]
    ref = [ref[0], *ref]  # the heads split solves problem 0; the layers split solves both
    assert [g["process"] for g in got] == [0, 1]
    for g in got:
        assert g["devices"] == 2
        # Both solves spanned both processes.
        assert g["processes_per_solve"] == [2, 2]
        for r, masks, loss in zip(ref, g["masks"], g["losses"], strict=True):
            for k in "qk":
                np.testing.assert_array_equal(np.asarray(masks[k], bool), np.asarray(r[1][k]))
            assert loss == pytest.approx(r[2]["final_loss"], rel=1e-5)


def test_a_half_given_process_layout_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("JAXPRUNE_DISTRIBUTED", "1")
    monkeypatch.setenv("JAXPRUNE_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAXPRUNE_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="JAXPRUNE_PROCESS_ID=None: give both"):
        sharding.maybe_initialize()


@pytest.mark.slow
def test_the_command_runs_as_two_processes_with_the_masks_of_one(tmp_path):
    """``jaxprune prune`` as two ``jax.distributed`` processes given the same ``--out``: process
    0 writes the one run folder, with the masks of a one-process run, and names it; the other
    writes and names none."""
    import orbax.checkpoint as ocp

    write_tiny_model(tmp_path / "model")
    write_tiny_data(tmp_path / "data")
    argv = ["prune", "--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data")]
    argv += [*TINY_FLAGS, "--method", "softmax", "--targets", "qk", "--json"]
    one = jaxprune(*argv, "--out", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    outs = run_two_processes(
        [
            sys.executable,
            "-m",
            "jaxprune.cli",
            *argv,
            "--out",
            str(tmp_path / "two"),
            "--progress",
            "true",
        ],
        cwd=tmp_path,
    )

    def masks(stdout):
        metrics = json.loads(stdout.strip().splitlines()[-1])
        path = (Path(metrics["run_dir"]) / "masks").absolute()
        return metrics, ocp.PyTreeCheckpointer().restore(path)

    ref_metrics, ref = masks(one.stdout)
    metrics, got = masks(outs[0][0])
    assert metrics["device_count"] == 2
    assert metrics["measured_sparsity"] == ref_metrics["measured_sparsity"]
    for li, layer in ref.items():
        for name, keep in layer.items():
            np.testing.assert_array_equal(got[li][name], keep)
    other = json.loads(outs[1][0].strip().splitlines()[-1])
    assert other["run_dir"] is None and other["perplexity"] == metrics["perplexity"]
    assert f"run folder {metrics['run_dir']}" in outs[0][1]
    assert "run folder" not in outs[1][1]
    assert [p.name for p in (tmp_path / "two").iterdir()] == [Path(metrics["run_dir"]).name]

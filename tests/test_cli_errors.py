"""Every command fails the same way on bad input: one line naming the file, flag or value and the
fix, exit status 2, found before the work it would spoil, and earlier results left untouched.

Each case runs the real command line in a subprocess on a tiny random model and tiny data
(``tests/tiny_run.py``); only the truncated-GGUF case reads the default model's file (slow: fetched
once per session, see ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_run import (
    TINY_FLAGS,
    jaxprune,
    snapshot,
    tiny_config,
    write_tiny_data,
    write_tiny_model,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and data, an earlier run and an earlier export that no failure may touch."""
    root = tmp_path_factory.mktemp("world")
    write_tiny_model(root / "model")
    write_tiny_data(root / "data")
    earlier = root / "runs" / "20000101-000000"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text('{"config": {}}\n')
    shutil.copytree(root / "model", root / "export")
    return root


def tiny(world: Path, *extra: str) -> list[str]:
    """``prune`` on the tiny model and data into ``world/runs``, with ``extra`` flags."""
    return [
        "prune",
        "--model",
        str(world / "model"),
        "--data-dir",
        str(world / "data"),
        "--out",
        str(world / "runs"),
        *TINY_FLAGS,
        *extra,
    ]


def assert_one_line_error(proc, command: str, *needles: str) -> str:
    """Exit status 2, and stderr one line ``jaxprune COMMAND: error: ...`` holding ``needles``."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"jaxprune {command}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def run_and_check(world: Path, args: list[str], command: str, *needles: str, **kw) -> str:
    before = snapshot(world)
    proc = jaxprune(*args, cwd=world, **kw)
    err = assert_one_line_error(proc, command, *needles)
    assert snapshot(world) == before, "a failed run changed earlier files or left new ones"
    return err


@pytest.mark.slow
def test_truncated_gguf_is_one_line_for_prune_and_eval(world, tmp_path, default_model_path):
    cut = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as f:
        cut.write_bytes(f.read(10 * 2**20))
    for command in ("prune", "eval"):
        args = [command, "--model", str(cut), "--data-dir", str(world / "data")]
        run_and_check(world, args, command, str(cut), "truncated")


def test_missing_data_folder_is_found_before_the_model_loads(world):
    # A model that does not exist shows the data check comes first.
    args = ["prune", "--model", "./no-such-model", "--data-dir", "/nonexistent"]
    run_and_check(world, args, "prune", "'/nonexistent'", "--data-dir")


def test_missing_wikitext_file_is_found_before_pruning(world, tmp_path):
    only_c4 = tmp_path / "data"
    only_c4.mkdir()
    for f in (world / "data").glob("c4*"):
        shutil.copy(f, only_c4)
    args = tiny(world, "--data-dir", str(only_c4), "--model", "./no-such-model")
    run_and_check(world, args, "prune", "wikitext-2-raw-v1-test.jsonl does not exist", "--data-dir")


def test_hub_id_without_network_is_one_line(world, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = tiny(world, "--model", "HuggingFaceTB/SmolLM2-135M")
    run_and_check(world, args, "prune", "cannot reach the Hugging Face hub", env=env)


@contextlib.contextmanager
def silent_server(lifetime: float = 30.0):
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hub or proxy that
    hangs); it stops when the block ends, or by itself after ``lifetime`` seconds."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    done = threading.Event()

    def serve():
        held, deadline = [], time.monotonic() + lifetime
        while not done.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])
        for conn in held:
            conn.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        done.set()
        thread.join()


def test_hub_that_never_answers_is_one_line_naming_the_timeout(world, tmp_path):
    with silent_server() as endpoint:
        env = {
            "HF_ENDPOINT": endpoint,
            "HF_HUB_ETAG_TIMEOUT": "1",  # huggingface_hub's default is 10 s
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
        args = ["eval", "--model", "HuggingFaceTB/SmolLM2-135M", "--data-dir", str(world / "data")]
        start = time.monotonic()
        run_and_check(
            world,
            args,
            "eval",
            f"the Hugging Face hub at {endpoint} did not answer within 1 s",
            "while fetching HuggingFaceTB/SmolLM2-135M",
            "allow more time with HF_HUB_ETAG_TIMEOUT=60 (seconds; now 1)",
            env=env,
        )
        assert time.monotonic() - start < 25  # not the server giving up after its lifetime


def test_pattern_that_does_not_divide_the_inputs_is_refused_before_calibration(world):
    # hidden size 32: groups of 5 do not fit; nothing (no run folder) is written.
    run_and_check(world, tiny(world, "--pattern", "2:5"), "prune", "pattern=2:5", "32 inputs")


def test_synthetic_pattern_that_does_not_divide_d_leaves_no_run_folder(world, tmp_path):
    cfg = tmp_path / "synthetic.yaml"
    out = tmp_path / "synthetic-runs"
    cfg.write_text(f"experiment: synthetic\nd: 6\npattern: '2:4'\nout: {out}\n")
    run_and_check(world, ["run", str(cfg)], "run", "pattern=2:4", "d=6")
    assert not out.exists()


def test_other_architecture_is_refused_by_prune_and_eval(world, tmp_path):
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(world / "model", gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    for command in ("prune", "eval"):
        args = [command, "--model", str(gpt2), "--data-dir", str(world / "data")]
        run_and_check(world, args, command, str(gpt2 / "config.json"), "'gpt2'", "Llama")


def test_weights_with_random_bytes_are_refused_naming_a_tensor(world, tmp_path):
    noisy = tmp_path / "noisy"
    shutil.copytree(world / "model", noisy)
    blob = (noisy / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    body = np.random.default_rng(0).bytes(len(blob) - 8 - header_len)
    (noisy / "model.safetensors").write_bytes(blob[: 8 + header_len] + body)
    for command in ("eval", "prune"):
        args = [command, "--model", str(noisy), "--data-dir", str(world / "data")]
        err = run_and_check(world, args, command, "NaN or infinite values", "tensor model.")
        assert str(noisy) in err


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--softmax.optimizer", "adam", "--softmax.lr", ".inf"], ["softmax.lr=inf", "finite"]),
        (["--softmax.optimizer", "sgd", "--softmax.lr", ".inf"], ["softmax.lr=inf", "finite"]),
        (["--softmax.lr", "-1"], ["softmax.lr=-1.0", "softmax.optimizer='adam'", "positive"]),
        (["--softmax.lamda", "0.1"], ["unknown flag --softmax.lamda", "mean --softmax.lam?"]),
        (["--softmax.lamb", "0.1"], ["unknown flag --softmax.lamb; did you mean --softmax.lam?"]),
        (["--eval.window", "4"], ["unknown flag --eval.window; did you mean --eval.windows?"]),
        (["--lamda", "0.1"], ["unknown flag --lamda; did you mean --softmax.lam?"]),
        (["--lam", "0.1"], ["flag --lam moved to --softmax.lam"]),
        (["--calib_samples", "2"], ["flag --calib_samples moved to --calibration.samples"]),
        (["--eval-windows", "2"], ["flag --eval-windows moved to --eval.windows"]),
        (["--softmax.lam-grid", "[0.1,"], ["--softmax.lam-grid", "not a value YAML reads"]),
    ],
)
def test_bad_settings_are_refused_before_the_model_loads(world, flags, needles):
    args = tiny(world, "--model", "./no-such-model", *flags)
    run_and_check(world, args, "prune", *needles)


def test_unknown_key_in_a_config_file_names_the_file(world, tmp_path):
    config = tmp_path / "prune.yaml"
    config.write_text("method: wanda\nsparsty: 0.5\n")
    args = tiny(world, "--model", "./no-such-model", "--config", str(config))
    run_and_check(
        world, args, "prune", f"unknown key 'sparsty' in {config}; did you mean 'sparsity'?"
    )


def test_layer_index_beyond_the_model_is_refused(world):
    run_and_check(world, tiny(world, "--layers", "[99]"), "prune", "layers=[99]", "4 layers")


def test_export_into_an_earlier_export_is_refused_without_overwrite(world):
    args = tiny(world, "--model", "./no-such-model", "--export-hf", str(world / "export"))
    run_and_check(world, args, "prune", f"--export-hf {world / 'export'}", "--overwrite")


def test_export_into_a_folder_that_is_no_export_is_refused_even_with_overwrite(world, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    args = tiny(world, "--export-hf", str(mine), "--overwrite")
    run_and_check(world, args, "prune", f"--export-hf {mine}", "no config.json")
    assert (mine / "notes.txt").read_text() == "mine"


def test_resume_of_a_folder_that_is_no_run_is_refused(world, tmp_path):
    args = tiny(world, "--resume", str(tmp_path / "nothing"))
    run_and_check(world, args, "prune", "--resume", "no jaxprune prune run folder")


def test_debug_shows_the_traceback(world):
    proc = jaxprune("prune", "--data-dir", "/nonexistent", "--debug", cwd=world)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "DataFileError" in proc.stderr


# --- In-process checks of the pieces ------------------------------------------------------------


def test_flags_take_python_numbers_and_describe_themselves():
    import argparse

    from jaxprune.commands import prune as prune_cmd
    from jaxprune.config import leaf_fields
    from jaxprune.pipeline import PruneConfig

    parser = argparse.ArgumentParser()
    prune_cmd.add_arguments(parser)
    words = ["--softmax.lr", "1e-3", "--sparsity", "5e-1", "--softmax.lam-grid", "[1e-2, .5]"]
    cfg = prune_cmd.config_from_args(parser.parse_args([*words, "--eval.windows", "4"]))
    assert (cfg.softmax.lr, cfg.sparsity, cfg.softmax.lam_grid) == (1e-3, 0.5, (0.01, 0.5))
    assert cfg.eval.windows == 4 and cfg.softmax.lam == PruneConfig().softmax.lam
    text = " ".join(parser.format_help().split())
    assert "--softmax.lam FLOAT Lambda (with normalize, relative to" in text
    assert "--eval.data LIST Evaluation sets: wikitext2, c4" in text
    assert "Default: [wikitext2, c4]" in text and "--pattern TEXT unstructured, or N:M" in text
    assert "softmax (--softmax.KEY): The softmax-aware method" in text
    # Every flag has its description and its default.
    body = text.split(" options: ", 1)[1]  # past the usage line
    for key, *_ in leaf_fields(PruneConfig):
        help_text = body.split(prune_cmd.flag(key) + " ", 1)[1].split(" --", 1)[0]
        assert len(help_text.split("Default: ")[0].split()) > 2, key
        assert "Default: " in help_text, key


def test_unknown_config_key_names_the_nearest():
    from jaxprune.config import ConfigError, from_dict
    from jaxprune.pipeline import PruneConfig

    with pytest.raises(ConfigError, match=r"unknown key 'sparsty'.*did you mean 'sparsity'"):
        from_dict(PruneConfig, {"sparsty": 0.5})
    with pytest.raises(ConfigError, match=r"unknown key 'softmax.lamb'.*mean 'softmax.lam'\?"):
        from_dict(PruneConfig, {"softmax": {"lamb": 0.5}})
    with pytest.raises(ConfigError, match=r"unknown key 'eval.window'.*mean 'eval.windows'\?"):
        from_dict(PruneConfig, {"eval.window": 4})


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(capsys):
    import argparse

    from jaxprune.cli import run_command
    from jaxprune.errors import DataError

    args = argparse.Namespace(debug=False)

    def bug(_):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command("prune", bug, args)

    def bad_file(_):
        raise DataError("data.json line 3 is damaged;\n  - replace it")

    assert run_command("prune", bad_file, args) == 2
    assert (
        capsys.readouterr().err
        == "jaxprune prune: error: data.json line 3 is damaged; - replace it\n"
    )


def test_out_of_memory_names_flags_that_exist():
    import argparse
    import re

    from jaxprune.commands import prune as prune_cmd
    from jaxprune.errors import is_user_error, one_line

    class XlaRuntimeError(RuntimeError):
        pass

    err = XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8589934592 bytes.")
    assert is_user_error(err)
    message = one_line(err)
    assert message.startswith("out of memory (RESOURCE_EXHAUSTED: Out of memory allocating")
    parser = argparse.ArgumentParser()
    prune_cmd.add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    named = re.findall(r"--[\w.-]+", message)
    assert len(named) >= 4 and set(named) <= flags, set(named) - flags


def test_diverged_solve_names_the_flags():
    from jaxprune.config import from_dict
    from jaxprune.methods.softmax import diverged
    from jaxprune.pipeline import PruneConfig
    from jaxprune.solvers import SolveDivergedError

    cfg = from_dict(PruneConfig, {"method": "softmax", "softmax": {"optimizer": "sgd", "lr": 100}})
    err = SolveDivergedError(
        "the solve diverged at step 3: loss 1e+09 (start 0.5). Use a smaller step_size than "
        "100, or optimizer='gd' with step_size=None (derived, monotone)."
    )
    message = str(diverged(err, cfg.softmax, 7))
    assert message.startswith("layer 7: the solve diverged at step 3: loss 1e+09 (start 0.5)")
    assert "--softmax.lr than 100" in message and "step_size" not in message
    assert "--softmax.optimizer gd --softmax.lr 0" in message


def test_a_solve_that_rises_or_collapses_is_warned_about():
    from jaxprune.config import from_dict
    from jaxprune.methods.softmax import solve_warnings
    from jaxprune.pipeline import PruneConfig, request_for

    cfg = from_dict(PruneConfig, {"method": "softmax", "softmax.lr": 0.5})
    good = {"initial_loss": 1.0, "final_loss": 0.5, "mask_mean": 0.45, "lam": 0.1}
    assert solve_warnings(good, request_for(cfg), cfg.softmax, 0) == []
    bad = {"initial_loss": 0.1, "final_loss": 0.6, "mask_mean": 0.001, "lam": 0.1}
    rose, collapsed = solve_warnings(bad, request_for(cfg), cfg.softmax, 3)
    assert rose.startswith("layer 3: the softmax-aware solve ended at loss 0.6")
    assert "--softmax.lr (now 0.5)" in rose
    assert "collapsed (mean 0.001" in collapsed and "--softmax.lam (now 0.1)" in collapsed


def test_settings_checked_against_the_model_shapes():
    from jaxprune.config import replace
    from jaxprune.errors import ModelError
    from jaxprune.pipeline import PruneConfig, check_model

    c = tiny_config()
    sparsegpt = PruneConfig(method="sparsegpt", targets="all", pattern="4:8")
    check_model(replace(sparsegpt, sparsegpt={"blocksize": 16}), c)
    with pytest.raises(ModelError, match=r"sparsegpt.blocksize=6 is not a multiple of M=4"):
        check_model(replace(sparsegpt, pattern="2:4", sparsegpt={"blocksize": 6}), c)
    with pytest.raises(ModelError, match=r"the down projections .* take 48 inputs"):
        check_model(PruneConfig(method="wanda", targets="all", pattern="1:32"), c)
    with pytest.raises(ModelError, match=r"layers=\[2\]: model m has 2 layers"):
        check_model(PruneConfig(layers=(2,)), c, "m")


def test_learning_rate_and_layer_settings():
    from jaxprune.config import ConfigError, from_dict
    from jaxprune.pipeline import PruneConfig

    derived = from_dict(PruneConfig, {"softmax": {"optimizer": "gd", "lr": 0}})
    assert derived.softmax.lr == 0.0  # the derived step size
    for raw, match in [
        ({"softmax.lr": 0}, r"softmax.lr=0.0 cannot work with softmax.optimizer='adam'"),
        ({"softmax": {"lr": float("nan")}}, r"softmax.lr=nan: expected a finite number"),
        ({"layers": []}, r"layers=\[\]: give layer indices"),
        ({"layers": [-1]}, r"layers=\[-1\]"),
    ]:
        with pytest.raises(ConfigError, match=match):
            from_dict(PruneConfig, raw)

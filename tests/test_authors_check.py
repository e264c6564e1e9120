"""The authors' check maps a run's settings to the arguments of the authors' code
(benchmarks/authors_adapters.py), and refuses the settings their code does not have."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "authors_adapters.py"
_spec = importlib.util.spec_from_file_location("authors_adapters", _PATH)
adapters = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("authors_adapters", adapters)
_spec.loader.exec_module(adapters)


def cfg(method, pattern="unstructured", sparsity=0.5, **settings):
    """A run's flat settings as a metrics.json of the full protocol holds them."""
    out = {
        "method": method,
        "targets": "qk",
        "sparsity": sparsity,
        "pattern": pattern,
        "group": None,
        "layers": None,
        "calibration.protocol": "standard",
        "calibration.samples": None,
        "calibration.layer_inputs": "sequential",
        "sparsegpt.blocksize": 128,
        "sparsegpt.percdamp": 0.01,
    }
    return out | settings


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("wanda", {"sparsity_ratio": 0.6, "prune_n": 0, "prune_m": 0, "use_variant": False}),
        ("admm", {"sparsity_ratio": 0.6, "prune_n": 0, "prune_m": 0}),
        ("alps", {"sp": 0.6, "nm_n": 0, "nm_m": 0}),
    ],
)
def test_unstructured_passes_the_sparsity(method, expected):
    assert adapters.authors_arguments(cfg(method, sparsity=0.6), 32) == (expected, [])


def test_nm_flags_name_the_pruned_count_except_alps_which_names_the_kept():
    # Ours "1:4" keeps 1 of 4: Wanda, SparseGPT and D2Prune prune 3 (their topk marks the
    # pruned); ALPS keeps nm_n.
    assert adapters.authors_arguments(cfg("wanda", "1:4"), 32)[0]["prune_n"] == 3
    sparsegpt = adapters.authors_arguments(cfg("sparsegpt", "1:4"), 32)[0]
    assert (sparsegpt["prunen"], sparsegpt["prunem"], sparsegpt["sparsity"]) == (3, 4, 0.75)
    d2 = adapters.authors_arguments(cfg("d2prune", "1:4", **{"d2prune.sequences": 32}), 32)[0]
    assert (d2["prune_n"], d2["prune_m"]) == (3, 4)
    alps = adapters.authors_arguments(cfg("alps", "1:4"), 32)[0]
    assert (alps["nm_n"], alps["nm_m"], alps["sp"]) == (1, 4, 0.75)
    # 2:4 is the same in every convention; ADMM's main asserts sparsity 0.5 for N:M.
    admm = adapters.authors_arguments(cfg("admm", "2:4", sparsity=0.7), 32)[0]
    assert admm == {"sparsity_ratio": 0.5, "prune_n": 2, "prune_m": 4}


def test_admm_has_no_other_nm_than_two_of_four():
    with pytest.raises(ValueError, match="only 2:4"):
        adapters.authors_arguments(cfg("admm", "4:8"), 32)


@pytest.mark.parametrize(
    ("method", "key", "value"),
    [
        ("admm", "admm.rho", 2.0),
        ("admm", "admm.matrix_schedule", "cubic"),
        ("alps", "alps.max_iter", 50),
        ("d2prune", "d2prune.select", "kl"),
        ("d2prune", "d2prune.blocksize", 64),
    ],
)
def test_options_the_authors_hard_code_are_refused_by_name(method, key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        adapters.authors_arguments(cfg(method, **{key: value}), 32)


@pytest.mark.parametrize(
    "settings",
    [{"group": "output"}, {"layers": [0, 1]}, {"calibration.protocol": "paper"}],
)
def test_runs_without_a_counterpart_are_refused(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        adapters.authors_arguments(cfg("alps", **settings), 32)


def test_d2prune_takes_the_scripts_flags_and_notes_a_sequence_count_mismatch():
    args, notes = adapters.authors_arguments(cfg("d2prune", **{"d2prune.no_update": "k"}), 32)
    assert args == {
        "sparsity_ratio": 0.5,
        "prune_n": 0,
        "prune_m": 0,
        "s": 1500.0,
        "r1": 1.0,
        "r2": 0.0,
        "target_layer_names": ["self_attn.k_proj"],
    }
    # Our default evaluates their accumulators at the run's calibration count, as theirs does.
    assert notes == []
    # A run at another count (as the default was before: 128) is noted as not like for like.
    settings = {"d2prune.no_update": "k", "d2prune.sequences": 128}
    args, notes = adapters.authors_arguments(cfg("d2prune", **settings), 32)
    assert len(notes) == 1 and "d2prune.sequences=128" in notes[0]
    settings = {"d2prune.no_update": "none", "d2prune.sequences": 32}
    args, notes = adapters.authors_arguments(cfg("d2prune", **settings), 32)
    assert args["target_layer_names"] == [] and notes == []


def test_cuda_as_cpu_moves_to_the_cpu_while_it_runs_and_restores_tensor_to():
    torch = pytest.importorskip("torch")
    before = torch.Tensor.to
    with adapters.cuda_as_cpu():
        assert torch.zeros(2).to("cuda:0").device.type == "cpu"
        assert torch.zeros(2).to(device=torch.device("cuda", 0)).dtype == torch.float32
        assert torch.zeros(2).to(torch.float64).dtype == torch.float64
    assert torch.Tensor.to is before and "to" not in vars(torch.Tensor)

"""Configs: YAML onto frozen dataclasses, overrides, one clear error per bad key/type/value."""

import json

import pytest

from jaxprune.cli import main
from jaxprune.config import ConfigError, from_dict, parse_overrides
from jaxprune.synthetic import SyntheticConfig


def test_values_are_typed_and_tuples_frozen():
    cfg = from_dict(SyntheticConfig, {"steps": 10, "lams": [0.1, 1], "x_norm": 3})
    assert cfg.steps == 10 and cfg.lams == (0.1, 1.0) and cfg.x_norm == 3.0
    with pytest.raises(AttributeError):
        cfg.steps = 5


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"stepz": 10}, r"unknown key 'stepz'.*allowed keys: .*steps"),
        ({"steps": "ten"}, r"steps='ten': expected an integer"),
        ({"steps": 1.5}, r"expected an integer"),
        ({"causal": "yes"}, r"expected true or false"),
        ({"steps": 0}, r"steps=0 is out of range; allowed: \[1, 1000000\]"),
        ({"sparsities": [0.5, 1.2]}, r"sparsities=1.2 is out of range"),
        ({"lams": []}, r"lams must not be empty"),
        ({"pattern": "3:x"}, r"pattern='3:x'"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(SyntheticConfig, raw)


def test_n_m_patterns_stay_strings_in_yaml():
    assert parse_overrides(["pattern=2:4", "steps=0x10", "seed=-3"]) == {
        "pattern": "2:4",
        "steps": 16,
        "seed": -3,
    }


def test_overrides_parse_yaml_values():
    assert parse_overrides(["steps=5", "lams=[0.1, 0.2]", "out=a=b"]) == {
        "steps": 5,
        "lams": [0.1, 0.2],
        "out": "a=b",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("experiment: synthetic\nsteps: 5\n")
    assert main(["run", str(cfg), "--set", "colour=red"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'colour'" in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg.write_text("experiment: nope\n")
    assert main(["run", str(cfg)]) == 2
    assert "'experiment: nope' is not known" in capsys.readouterr().err


def test_synthetic_run_writes_plots_metrics_and_never_overwrites(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "experiment: synthetic\nn: 16\nd: 8\nbatch: 2\nheldout: 2\nlams: [0.05]\n"
        "step_scales: [1.0]\nsteps: 40\nref_factor: 2\nsparsities: [0.5]\nround_lams: [0.05]\n"
        f"out: {tmp_path / 'runs'}\nprogress: false\n"
    )
    assert main(["run", str(cfg)]) == 0
    assert main(["run", str(cfg)]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert {"convergence.png", "rounding.png"} <= {p.name for p in runs[0].iterdir()}
    assert metrics["runs"][0]["monotone"] is True
    assert metrics["runs"][0]["final_loss"] < metrics["runs"][0]["initial_loss"]
    kept = {r["method"]: r["measured_sparsity"] for r in metrics["rounding"]}
    assert all(abs(s - 0.5) < 1e-9 for s in kept.values())
    assert "Held-out relative attention error" in capsys.readouterr().out

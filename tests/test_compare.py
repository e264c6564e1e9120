"""Paired bootstrap of two runs on the same windows (PROTOCOL.md)."""

import math
from pathlib import Path

import numpy as np
import pytest

from jaxprune.compare import format_difference, paired_bootstrap


def run(nll, tokens):
    return {"window_nll": list(nll), "window_tokens": list(tokens)}


def test_observed_difference_is_the_token_weighted_perplexity_difference():
    tokens = [100, 50, 200]
    a = run([250.0, 150.0, 420.0], tokens)
    b = run([240.0, 140.0, 400.0], tokens)
    out = paired_bootstrap(a, b, resamples=200)
    expected = math.exp(820 / 350) - math.exp(780 / 350)
    assert out["difference"] == pytest.approx(expected, rel=1e-12)
    assert out["low"] <= out["difference"] <= out["high"]


def test_a_consistent_small_shift_is_significant_and_noise_is_not():
    rng = np.random.default_rng(1)
    tokens = np.full(32, 2047)
    # Windows differ a lot in difficulty; the run is uniformly 1% worse per window.
    base = rng.uniform(2.5, 4.0, size=32) * tokens
    shifted = base * 1.01
    out = paired_bootstrap(run(shifted, tokens), run(base, tokens))
    assert out["significant"] and out["low"] > 0
    # Unpaired noise of the same size in both directions: the interval covers zero.
    noisy = base * (1 + 0.01 * rng.choice([-1, 1], size=32))
    out = paired_bootstrap(run(noisy, tokens), run(base, tokens))
    assert out["low"] < 0 < out["high"] and not out["significant"]
    assert format_difference(out).startswith(("+", "-")) and not format_difference(out).endswith(
        "*"
    )


def test_protocol_resampling_is_reproducible():
    tokens = [10, 20, 30, 40]
    a, b = run([25, 61, 95, 130], tokens), run([24, 60, 90, 131], tokens)
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)
    # The resamples are numpy.random.default_rng(0) window indices, as PROTOCOL.md says.
    idx = np.random.default_rng(0).integers(0, 4, size=(10_000, 4))
    t = np.asarray(tokens)[idx].sum(1)
    diff = np.exp(np.asarray(a["window_nll"])[idx].sum(1) / t) - np.exp(
        np.asarray(b["window_nll"])[idx].sum(1) / t
    )
    assert paired_bootstrap(a, b)["low"] == pytest.approx(np.percentile(diff, 2.5))


def test_runs_on_different_windows_are_refused():
    with pytest.raises(ValueError, match="not evaluated on the same windows"):
        paired_bootstrap(run([1.0, 2.0], [5, 5]), run([1.0, 2.0, 3.0], [5, 5, 5]))
    with pytest.raises(ValueError, match="no per-window NLL"):
        paired_bootstrap({"perplexity": 3.0}, run([1.0], [5]))


def _metrics(folder, evaluation):
    folder.mkdir()
    (folder / "metrics.json").write_text(__import__("json").dumps({"evaluation": evaluation}))
    return str(folder)


def test_compare_command_prints_each_shared_set_and_refuses_bad_runs(tmp_path, capsys):
    import json

    from jaxprune.cli import main

    tokens = [100, 50, 200]
    a = {"perplexity": 11.0, **run([250.0, 150.0, 420.0], tokens)}
    b = {"perplexity": 10.0, **run([240.0, 140.0, 400.0], tokens)}
    paper = {"perplexity": 9.0, **run([1.0], [1])}
    first = _metrics(tmp_path / "a", {"wikitext2": a, "c4": b})
    second = _metrics(tmp_path / "b", {"wikitext2": b, "c4-paper": paper})
    assert main(["compare", first, str(Path(second) / "metrics.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["wikitext2"]  # the only set both evaluated
    assert out["wikitext2"]["difference"] == paired_bootstrap(a, b)["difference"]
    assert (out["wikitext2"]["run"], out["wikitext2"]["reference"]) == (11.0, 10.0)
    assert main(["compare", first, second]) == 0
    line = capsys.readouterr().out.strip()
    difference = format_difference(out["wikitext2"])
    assert line == (
        f"wikitext2: 11.000 against 10.000, difference {difference} "
        "(95% paired bootstrap over 3 windows)"
    )

    only_paper = _metrics(tmp_path / "c", {"c4-paper": paper})
    corrupt = tmp_path / "d"
    corrupt.mkdir()
    (corrupt / "metrics.json").write_text("{not json")
    shorter = _metrics(tmp_path / "e", {"wikitext2": {"perplexity": 1.0, **run([1.0], [1])}})
    for args, needle in [
        ([first, only_paper], "share no evaluation set"),
        ([first, str(tmp_path / "missing")], "no such file; give a run folder"),
        ([first, str(corrupt)], "not a readable metrics.json"),
        ([first, shorter], "wikitext2: the runs were not evaluated on the same windows"),
    ]:
        assert main(["compare", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxprune compare: error: ") and needle in err
        assert err.count("\n") == 1

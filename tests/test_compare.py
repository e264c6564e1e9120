"""Paired bootstrap of two runs on the same windows (PROTOCOL.md)."""

import math

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

"""Methods as plug-ins: a method defined only here registers, gets its own config section and
flags, runs end to end through ``jaxprune prune``, and serves as the other method of the
softmax-aware one, with no edit to the pipeline."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_run import jaxprune, prune_tiny, tiny_folders

from jaxprune.methods import registry
from jaxprune.methods.base import Layer, Method, Request

# A method that exists only in this test: it prunes the entries that come first in a random
# order (one threshold per matrix), and its section holds the order's seed.
PLUGIN = '''
import dataclasses, sys
import jax, jax.numpy as jnp
from jaxprune.masks import binarize
from jaxprune.methods import registry
from jaxprune.methods.base import Method, per_matrix


@dataclasses.dataclass(frozen=True)
class RandomOrderConfig:
    """Random order (a test plug-in)."""

    # Seed of the random order.
    seed: int = 0


def prune_matrix(w, stats, request, options):
    scores = jax.random.uniform(jax.random.key(options.seed), w.shape)
    keep = binarize(scores, request.sparsity, request.pattern, group="matrix")
    return jnp.where(keep, w, 0), keep


registry.register(Method(
    name="random",
    prune=per_matrix(prune_matrix),
    description="prune a random order",
    section=RandomOrderConfig,
    groups=("matrix",),
    prune_matrix=prune_matrix,
))
from jaxprune.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("plugin"))


def _run(tiny, *flags):
    return prune_tiny(tiny, *flags, script=PLUGIN)


def _dense_kernel(model_dir: Path, layer: int, name: str) -> np.ndarray:
    from jaxprune.loaders.resolve import load_model
    from jaxprune.models.llama import projection_kernels

    model, _ = load_model(str(model_dir))
    return np.asarray(projection_kernels(model.layers[layer])[name][...])


def _expected_keep(w: np.ndarray, seed: int) -> np.ndarray:
    scores = np.asarray(jax.random.uniform(jax.random.key(seed), w.shape))
    order = np.argsort(scores.reshape(-1), kind="stable")
    keep = np.ones(w.size, bool)
    keep[order[: w.size // 2]] = False
    return keep.reshape(w.shape)


def test_a_method_defined_in_a_test_runs_end_to_end(tiny):
    metrics, masks = _run(tiny, "--method", "random", "--targets", "attn", "--random.seed", "3")
    assert metrics["config"]["random"] == {"seed": 3}
    assert set(metrics["measured_sparsity"]) == {
        f"{li}.{k}" for li in range(4) for k in ("q", "k", "v", "o")
    }
    assert all(v == 0.5 for v in metrics["measured_sparsity"].values())
    # The masks are the plug-in's rule on the dense kernels (it reads no calibration).
    for li, name in ((0, "q"), (3, "o")):
        w = _dense_kernel(tiny[0], li, name)
        np.testing.assert_array_equal(masks[str(li)][name], _expected_keep(w, 3))
    assert "heldout_attention_error" in metrics["layers"][0]
    assert metrics["perplexity"]["wikitext2"] > 0


def test_the_softmax_method_hands_its_other_matrices_to_a_plugin(tiny):
    metrics, masks = _run(
        tiny,
        "--method",
        "softmax",
        "--targets",
        "attn",
        "--softmax.other-method",
        "random",
        "--random.seed",
        "5",
    )
    assert metrics["softmax_mask"] == "solve"
    # v and o follow the plug-in's rule; q and k come from the softmax-aware solve.
    w = _dense_kernel(tiny[0], 0, "v")
    np.testing.assert_array_equal(masks["0"]["v"], _expected_keep(w, 5))
    assert "calib_attention_error" in metrics["layers"][0]


def test_plugin_flags_and_errors(tiny):
    tmp = tiny[2]
    helped = jaxprune("prune", "--help", cwd=tmp, script=PLUGIN)
    assert helped.returncode == 0 and "--random.seed" in helped.stdout
    assert "random" in helped.stdout.split("--method")[1].split("\n")[0]
    wrong = jaxprune("prune", "--method", "randm", cwd=tmp, script=PLUGIN)
    assert wrong.returncode == 2
    assert "random" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


def test_registry_refuses_a_taken_name_and_a_late_section():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Options:
        """Options."""

        # A value.
        x: int = 0

    with pytest.raises(ValueError, match="registered already"):
        registry.register(Method(name="wanda", prune=lambda *a: None))
    import jaxprune.prune_config  # noqa: F401  (PruneConfig is built from the registry)

    with pytest.raises(ValueError, match=r"register it before importing jaxprune\.prune_config"):
        registry.register(Method(name="late", prune=lambda *a: None, section=Options))
    with pytest.raises(ValueError, match="is unknown: use one of"):
        registry.get("late")


def test_builtin_methods_share_one_entry_point():
    """Every built-in method prunes a Layer for a Request through ``Method.prune``."""
    from tiny_run import tiny_config

    from jaxprune.methods.stats import init_stats, update_stats

    c = tiny_config()
    rng = np.random.default_rng(0)
    dims = c.projection_inputs()
    weights = {
        "q": rng.normal(size=(dims["q"], c.num_heads * c.head_dim)),
        "k": rng.normal(size=(dims["k"], c.num_kv_heads * c.head_dim)),
    }
    x = rng.normal(size=(2, 16, c.hidden_size))
    stats = update_stats(init_stats(c.hidden_size), x.reshape(-1, c.hidden_size))
    layer = Layer(
        index=0,
        weights={k: jax.numpy.asarray(v, jax.numpy.float32) for k, v in weights.items()},
        stats={"q": stats, "k": stats},
        spec=c.attention_spec(0),
    )
    request = Request(targets=("q", "k"), sparsity=0.5, pattern="unstructured")
    for name in ("magnitude", "wanda", "sparsegpt"):
        method = registry.get(name)
        out = method.prune(layer, request, request.options_of(method))
        assert set(out.masks) == {"q", "k"}
        for k, keep in out.masks.items():
            assert keep.shape == weights[k].shape and keep.dtype == bool
            assert np.all(np.asarray(out.weights[k])[~np.asarray(keep)] == 0)
    dense = registry.get("dense")
    assert not dense.prunes and dense.prune(layer, request, None).masks == {}

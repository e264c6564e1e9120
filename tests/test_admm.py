"""ADMM pruning (method admm) against a reference written from its authors' code, not from ours.

``authors_admm`` follows fmfi-compbio/admm-pruning ``lib/admm.py`` (``AdmmPruner.fasterprune``,
with the ``percdamp=0.1`` that ``lib/prune.py``'s ``prune_admm`` passes) step by step, in float64,
in PyTorch's ``(d_out, d_in)`` weight layout, with the authors' mask convention (``True`` = kept
inside the loop), their selections (``topk`` of the whole matrix at the final sparsity; ``>=`` a
per-column sorted value for ``per_out``; the top 2 of every 4 inputs and a ``kthvalue`` over
the rest for 2:4) and their counting (``int(n * sparsity)``). It shares no selection code with
``jaxprune`` (no ``binarize``), so a change to our rules cannot make the two agree.

Checked by breaking our rules on purpose, then reverting: with ``GROUPS = ("output",
"matrix")`` in ``jaxprune/methods/admm.py`` (per output as the default) the unstructured
reference tests fail (the masks differ in 23-27% of the entries); with ``cubic=False`` for N:M
in ``_pruned_counts`` (the final sparsity from the first gradual iteration) both 2:4 tests fail.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_run import jaxprune, prune_tiny, tiny_folders

from jaxprune.methods import admm
from jaxprune.methods.registry import prune_matrix
from jaxprune.methods.stats import init_stats, update_stats


def problem(n=512, d_in=64, d_out=24, seed=0):
    """Correlated inputs with uneven feature scales, and outputs with very uneven norms (where a
    per-matrix threshold differs from a per-output one)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) @ rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    x = x * np.exp(rng.normal(size=d_in))
    w = rng.normal(size=(d_in, d_out)) * np.exp(1.5 * rng.normal(size=d_out))[None, :]
    return x.astype(np.float32), w.astype(np.float32)


def stats_of(x):
    return update_stats(init_stats(x.shape[1]), jnp.asarray(x))


# ------------------------------------------------------------ ADMM, as its authors wrote it


def authors_admm(
    weight,
    XX,
    sparsity,
    prune_n=0,
    prune_m=0,
    percdamp=0.1,
    iterative_prune=15,
    iters=20,
    per_out=False,
):
    """``weight``: (d_out, d_in); ``XX``: (d_in, d_in). Returns ``(new weight, pruned)``, both
    (d_out, d_in), ``pruned`` True where pruned. Like the authors' code, N:M is 2:4 only."""
    XX = np.array(XX, np.float64)
    norm = np.sqrt(np.diag(XX)) + 1e-8
    XX = XX / norm
    XX = (XX.T / norm).T
    W = (np.array(weight, np.float64) * norm).T  # (d_in, d_out): their W is input-major
    rho0 = percdamp * np.diag(XX).mean()
    diag = np.arange(XX.shape[0])
    XX[diag, diag] += rho0

    def two_of_four(A):  # True for the 2 largest of every 4 consecutive inputs of an output
        At = np.abs(A).T.reshape(-1, 4)
        top = np.zeros(At.shape, bool)
        order = np.argsort(At, axis=1)
        top[np.arange(At.shape[0]), order[:, 2]] = True
        top[np.arange(At.shape[0]), order[:, 3]] = True
        return top.reshape(A.T.shape).T

    def topk_matrix(A, k):  # prune the k smallest |A| of the whole matrix
        mask = np.ones(A.size, bool)
        mask[np.argsort(np.abs(A).ravel())[:k]] = False
        return mask.reshape(A.shape)

    def per_column(A, s):  # keep >= the int(d_in * s)-th smallest of each output column
        thres = np.sort(np.abs(A), axis=0)[int(A.shape[0] * s)]
        return np.abs(A) >= thres[None, :]

    if iterative_prune == 0:
        if prune_n != 0:
            mask = two_of_four(W)
        elif per_out:
            mask = per_column(W, sparsity)
        else:
            mask = topk_matrix(W, int(W.size * sparsity))
    if iters == 0:
        out = (W * mask).T / norm
        return out, ~mask.T

    rho = 1
    XY = XX @ W
    XX[diag, diag] += rho
    XXinv = np.linalg.inv(XX)
    U = np.zeros_like(W)
    for itt in range(iters):
        if iterative_prune > 0 and itt < iterative_prune:
            if prune_n != 0:
                sparsity = 0.5
                cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
                top = two_of_four(W + U)
                z2 = np.abs(W + U)
                z2[top] = np.inf
                thres = np.sort(z2.ravel())[int(W.size * cur_sparsity)]  # kthvalue(k + 1)
                mask = z2 >= thres
            else:
                cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
                if per_out:
                    mask = per_column(W + U, cur_sparsity)
                else:
                    mask = topk_matrix(W + U, int(W.size * sparsity))  # not cur_sparsity
        Z = (W + U) * mask
        U = U + (W - Z)
        W = XXinv @ (XY + rho * (Z - U))
    Z = (W + U) * mask
    return Z.T / norm, ~mask.T


def _ours(x, w, **kw):
    got, keep = prune_matrix("admm", jnp.asarray(w), stats_of(x), **kw)
    return np.asarray(got), np.asarray(keep)


def _hessian(x):
    return x.astype(np.float64).T @ x.astype(np.float64)


def _assert_matches(got, keep, ref, pruned):
    np.testing.assert_array_equal(keep.T, ~pruned)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got.T, ref, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize(("seed", "sparsity"), [(0, 0.5), (1, 0.5), (2, 0.7)])
def test_default_is_the_authors_admm(seed, sparsity):
    x, w = problem(seed=seed)
    ref, pruned = authors_admm(w.T, _hessian(x), sparsity)
    got, keep = _ours(x, w, sparsity=sparsity, pattern="unstructured")
    _assert_matches(got, keep, ref, pruned)
    # One threshold per matrix gives outputs unequal counts here, so this tells it from the
    # per-output rule.
    assert len(set(pruned.sum(axis=1).tolist())) > 1


@pytest.mark.parametrize("seed", [3, 4])
def test_two_four_is_the_authors_rule(seed):
    x, w = problem(seed=seed)
    ref, pruned = authors_admm(w.T, _hessian(x), 0.5, prune_n=2, prune_m=4)
    got, keep = _ours(x, w, pattern="2:4")
    _assert_matches(got, keep, ref, pruned)


def test_output_group_is_the_authors_per_out():
    x, w = problem(seed=5)
    ref, pruned = authors_admm(w.T, _hessian(x), 0.5, per_out=True)
    got, keep = _ours(x, w, sparsity=0.5, pattern="unstructured", group="output")
    _assert_matches(got, keep, ref, pruned)
    np.testing.assert_array_equal(pruned.sum(axis=1), 32)


@pytest.mark.parametrize(("pattern", "iters"), [("unstructured", 20), ("2:4", 20), ("2:4", 0)])
def test_one_mask_without_gradual_iterations_is_the_authors(pattern, iters):
    x, w = problem(seed=6)
    nm = (2, 4) if pattern == "2:4" else (0, 0)
    ref, pruned = authors_admm(w.T, _hessian(x), 0.5, *nm, iterative_prune=0, iters=iters)
    sparsity = None if nm[0] else 0.5
    got, keep = _ours(
        x, w, sparsity=sparsity, pattern=pattern, gradual_iterations=0, iterations=iters
    )
    _assert_matches(got, keep, ref, pruned)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_an_input_never_seen_is_pruned_as_the_authors_do(pattern):
    x, w = problem(seed=15)
    x[:, 5] = 0  # its norm is the authors' 1e-8: its scaled weights are the smallest
    nm = (2, 4) if pattern == "2:4" else (0, 0)
    ref, pruned = authors_admm(w.T, _hessian(x), 0.5, *nm)
    got, keep = _ours(x, w, sparsity=None if nm[0] else 0.5, pattern=pattern)
    assert np.isfinite(got).all()
    _assert_matches(got, keep, ref, pruned)
    if pattern == "unstructured":
        assert not keep[5].any()


# ------------------------------------------------------------ exact sparsity, zeros, errors


@pytest.mark.parametrize(
    ("pattern", "sparsity", "options"),
    [
        ("unstructured", 0.5, {}),
        ("unstructured", 0.3, {}),
        ("unstructured", 0.6, {"group": "output"}),
        ("row", 0.25, {}),
        ("unstructured", 0.5, {"matrix_schedule": "cubic"}),
        ("unstructured", 0.5, {"gradual_iterations": 0}),
        ("2:4", None, {}),
        ("4:8", None, {}),
        ("1:4", None, {}),
        ("2:4", None, {"gradual_iterations": 20}),
    ],
)
def test_exact_sparsity_and_zeros_where_pruned(pattern, sparsity, options):
    x, w = problem(seed=7)
    got, keep = _ours(x, w, sparsity=sparsity, pattern=pattern, **options)
    d_in, d_out = w.shape
    assert keep.dtype == bool and keep.shape == w.shape and got.dtype == w.dtype
    assert np.all(got[~keep] == 0)
    assert np.all(got[keep] != 0)  # the kept weights are updated, not zeroed
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        np.testing.assert_array_equal(keep.reshape(d_in // m, m, d_out).sum(axis=1), n)
    elif pattern == "row" or options.get("group") == "output":
        np.testing.assert_array_equal((~keep).sum(axis=0), int(sparsity * d_in))
    else:
        assert (~keep).sum() == int(sparsity * w.size)


def test_sparsity_zero_returns_the_weights():
    x, w = problem(seed=8)
    got, keep = _ours(x, w, sparsity=0.0, pattern="unstructured")
    assert keep.all()
    np.testing.assert_array_equal(got, w)


def test_cubic_matrix_schedule_is_an_option_and_differs():
    x, w = problem(seed=9)
    _, keep_full = _ours(x, w, sparsity=0.6, pattern="unstructured")
    _, keep_cubic = _ours(x, w, sparsity=0.6, pattern="unstructured", matrix_schedule="cubic")
    assert keep_full.sum() == keep_cubic.sum()
    assert (keep_full != keep_cubic).any()


def test_settings_that_cannot_work_are_refused():
    x, w = problem(seed=10, d_in=30)
    with pytest.raises(ValueError, match="gradual_iterations <= iterations"):
        admm.ADMMConfig(iterations=10)
    with pytest.raises(ValueError, match="not divisible by 4"):
        _ours(x, w, pattern="2:4")
    with pytest.raises(ValueError, match="group='block'"):
        _ours(x, w, sparsity=0.5, pattern="unstructured", group="block")
    with pytest.raises(ValueError, match="needs calibration statistics"):
        prune_matrix("admm", jnp.asarray(w), None, sparsity=0.5)


# ------------------------------------------------------------ the paper's claim


def _reconstruction_error(x, w, w_pruned):
    x = x.astype(np.float64)
    return np.linalg.norm(x @ w.astype(np.float64) - x @ np.asarray(w_pruned, np.float64))


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.5), ("2:4", None)])
def test_lower_reconstruction_error_than_wanda_and_sparsegpt(seed, pattern, sparsity):
    """The paper's claim (its Figure 1, and the perplexities it reports): ADMM's updates
    reconstruct a layer's outputs better than SparseGPT's approximate ones, and Wanda has no
    update. Measured here: ADMM's error is 0.75-0.8 of SparseGPT's (2:4), 0.65 (50%)."""
    x, w = problem(n=1024, d_in=128, d_out=64, seed=seed)
    stats = stats_of(x)
    errors = {
        name: _reconstruction_error(
            x, w, prune_matrix(name, jnp.asarray(w), stats, sparsity=sparsity, pattern=pattern)[0]
        )
        for name in ("admm", "wanda", "sparsegpt")
    }
    assert errors["admm"] < errors["sparsegpt"] < errors["wanda"], errors


# ------------------------------------------------------------ end to end, command line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("admm"))


def _run(tiny, *flags):
    return prune_tiny(tiny, *flags)


ATTN = {f"{li}.{k}" for li in range(4) for k in ("q", "k", "v", "o")}


def test_admm_end_to_end_unstructured(tiny):
    flags = ("--admm.iterations", "12", "--admm.gradual-iterations", "9")
    metrics, masks = _run(tiny, "--method", "admm", "--targets", "attn", *flags)
    assert metrics["config"]["admm"]["iterations"] == 12
    assert set(metrics["measured_sparsity"]) == ATTN
    assert all(v == 0.5 for v in metrics["measured_sparsity"].values())
    assert masks["0"]["q"].dtype == bool
    assert metrics["perplexity"]["wikitext2"] > 0


def test_admm_end_to_end_two_four(tiny):
    metrics, masks = _run(tiny, "--method", "admm", "--targets", "attn", "--pattern", "2:4")
    assert set(metrics["measured_sparsity"]) == ATTN
    assert all(v == 0.5 for v in metrics["measured_sparsity"].values())
    keep = np.asarray(masks["1"]["o"])
    np.testing.assert_array_equal(keep.reshape(-1, 4, keep.shape[1]).sum(axis=1), 2)


def test_admm_flags_in_help(tiny):
    helped = jaxprune("prune", "--help", cwd=tiny[2])
    assert helped.returncode == 0
    for flag in ("iterations", "gradual-iterations", "percdamp", "rho", "matrix-schedule"):
        assert f"--admm.{flag}" in helped.stdout
    assert "admm" in helped.stdout.split("--method")[1].split("\n")[0]
    wrong = jaxprune("prune", "--method", "admm", "--admm.gradual-iterations", "30", cwd=tiny[2])
    assert wrong.returncode == 2 and "gradual_iterations" in wrong.stderr


def test_registered_with_the_authors_group_first():
    method = admm.METHOD
    assert method.groups[0] == "matrix" and method.prune_matrix is admm.prune_matrix
    assert method.section is admm.ADMMConfig

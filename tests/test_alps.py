"""ALPS against a reference written from its authors' code, not from ours.

``authors_alps`` follows mazumder-lab/ALPS ``alps.py`` (``ALPS_prune.ALPS_admm`` and ``cg_batch``)
step by step, in float64 NumPy and in PyTorch's ``(d_out, d_in)`` layout: the ridge and the
unit-diagonal scaling of ``X^T X``, the top-k projection by ``topk(-D**2, numel - k)`` (a stable
argsort here), the rho schedule and both stopping tests, the projection of the last ``B`` and the
masked conjugate gradient. It shares no code with ``jaxprune`` (no ``binarize``), so a change to
our rules cannot make the two agree.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_run import jaxprune, prune_tiny, tiny_folders

from jaxprune.methods import alps
from jaxprune.methods.registry import prune_matrix
from jaxprune.methods.stats import init_stats, update_stats


def problem(n=256, d_in=32, d_out=12, seed=0):
    """Correlated inputs with uneven feature scales, outputs with very uneven norms."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) @ rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    x = x * np.exp(rng.normal(size=d_in))
    w = rng.normal(size=(d_in, d_out)) * np.exp(1.5 * rng.normal(size=d_out))[None, :]
    return x.astype(np.float32), w.astype(np.float32)


def stats_of(x):
    return update_stats(init_stats(x.shape[1]), jnp.asarray(x))


# ---------------------------------------------------------------- ALPS, as its authors wrote it


def authors_cg(A, Bm, A_supp, X0, rtol=1e-4, maxiter=10):
    """``cg_batch`` with ``M_bmm=None`` and ``atol=0``: ``(X, iterations)``."""
    X_k = X0
    R_k = (Bm - A @ X_k) * A_supp
    P_k = np.zeros_like(R_k)
    stopping = rtol * np.linalg.norm(Bm, axis=1)
    for k in range(1, maxiter + 1):
        Z_k = R_k
        if k == 1:
            P_k = Z_k
            R_k1, X_k1, Z_k1 = R_k, X_k, Z_k
        else:
            R_k2, Z_k2, P_k1 = R_k1, Z_k1, P_k
            R_k1, Z_k1, X_k1 = R_k, Z_k, X_k
            den = (R_k2 * Z_k2).sum(0)
            den[den == 0] = 1e-8
            beta = (R_k1 * Z_k1).sum(0) / den
            P_k = Z_k1 + beta[None, :] * P_k1
        den = (P_k * (A @ P_k)).sum(0)
        den[den == 0] = 1e-8
        alpha = (R_k1 * Z_k1).sum(0) / den
        X_k = X_k1 + alpha[None, :] * P_k
        R_k = (R_k1 - alpha[None, :] * (A @ P_k)) * A_supp
        if (np.linalg.norm(A @ X_k - Bm, axis=1) <= stopping).all():
            break
    return X_k, k


def authors_alps(
    W, XtX, sp, nm_n=0, nm_m=0, rho=0.1, max_iter=300, update_iter=3, switch_iter=30, log=None
):
    """``W``: (d_out, d_in); ``XtX``: (d_in, d_in). Returns ``(W_pruned, pruned, iterations,
    W_admm)``, ``W_admm`` the weights before the conjugate-gradient refit; ``log`` (a list)
    receives the branch taken at every support check."""
    log = [] if log is None else log
    W = np.array(W, np.float64)
    XtX = np.array(XtX, np.float64)
    diag = np.arange(XtX.shape[0])
    XtX[diag, diag] += 0.01 * np.mean(np.diag(XtX))
    X_norm = np.sqrt(np.diag(XtX)) + 1e-8
    XtX = XtX / X_norm
    XtX = (XtX.T / X_norm).T
    YtX = (W * X_norm) @ XtX
    B = (W * X_norm).T.copy()
    B_orig = B.copy()
    V = np.zeros_like(B)
    totp, num_cout = B.shape
    L, Q = np.linalg.eigh(XtX)
    XTX_inv = Q @ ((1 / (L + rho)) * Q).T
    init_rho = False
    k_spar = int(np.round((1 - sp) * B.size))
    if nm_n:
        k_spar = totp * num_cout * nm_n / nm_m

    def project(Z):
        if nm_n == 0:
            flat = Z.reshape(-1).copy()
            flat[np.argsort(flat**2, kind="stable")[: flat.size - k_spar]] = 0
            return flat.reshape(totp, num_cout)
        groups = Z.T.reshape(-1, nm_m).copy()
        idx = np.argsort(groups**2, axis=1, kind="stable")[:, : nm_m - nm_n]
        np.put_along_axis(groups, idx, 0.0, axis=1)
        return groups.reshape(num_cout, totp).T

    D = project(B)
    D_suppp = D == 0
    D_init = D.copy()
    for i_admm in range(max_iter):
        B = XTX_inv @ (YtX.T - V + rho * D)
        D = project((V + rho * B) / rho)
        D_supp = D == 0
        V = V + rho * (B - D)
        if (i_admm + 1) % update_iter == 0:
            supp_change = np.sum(D_supp != D_suppp)
            if supp_change / k_spar > 0.1:
                init_rho = True
                rho *= 1.3
                log.append("*1.3")
            elif supp_change / k_spar > 0.005:
                init_rho = True
                rho *= 1.2
                log.append("*1.2")
            elif supp_change > 0.5:
                if init_rho:
                    rho *= 1.1
                    log.append("*1.1")
                else:
                    rho /= 5
                    B = B_orig.copy()
                    D = D_init.copy()
                    V = np.zeros_like(B)
                    log.append("restart")
            else:
                if init_rho:
                    log.append("settled")
                    break
                rho /= 5
                log.append("/5")
            D_suppp = D_supp.copy()
            rho = min(rho, 1e6)
            XTX_inv = Q @ ((1 / (L + rho)) * Q).T
            if i_admm >= switch_iter and supp_change / k_spar < 0.0003:
                log.append("switch")
                break
    B = project(B)
    W_admm = B.T / X_norm
    B, _ = authors_cg(XtX, YtX.T, (B != 0).astype(np.float64), B)
    return B.T / X_norm, B.T == 0, i_admm + 1, W_admm


SMALL, WIDE = dict(d_in=32, d_out=12), dict(n=1024, d_in=96, d_out=80)


# (problem, pattern, sparsity, options, branches of the rho schedule the case goes through)
CASES = {
    "50%": (dict(seed=0, **SMALL), "unstructured", 0.5, {}, {"*1.3", "*1.2", "settled"}),
    "50%-b": (dict(seed=1, **SMALL), "unstructured", 0.5, {}, {"*1.3", "*1.2", "settled"}),
    "80%": (dict(seed=7, n=512, d_in=48, d_out=16), "unstructured", 0.8, {}, {"*1.3"}),
    "50%-wide": (dict(seed=1, **WIDE), "unstructured", 0.5, {}, {"*1.3", "*1.2", "*1.1"}),
    "stiff-start": (dict(seed=0, **WIDE), "unstructured", 0.5, {"rho": 3.0}, {"restart", "*1.1"}),
    "stiff-switch": (
        dict(seed=0, **SMALL),
        "unstructured",
        0.5,
        {"rho": 30.0, "switch_iter": 0},
        {"/5", "switch"},
    ),
    "2:4": (dict(seed=3, **SMALL), "2:4", None, {}, {"*1.3", "*1.2", "settled"}),
    "2:4-b": (dict(seed=4, **SMALL), "2:4", None, {}, {"settled"}),
    "2:4-wide": (dict(seed=2, **WIDE), "2:4", None, {}, {"*1.3", "*1.2", "settled"}),
}


@pytest.mark.parametrize("case", CASES)
def test_alps_is_the_authors_code(case):
    shape, pattern, sparsity, options, branches = CASES[case]
    x, w = problem(**shape)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    nm = dict(nm_n=2, nm_m=4) if pattern == "2:4" else {}
    log = []
    q, pruned, iters, _ = authors_alps(
        w.T, h, 0.5 if sparsity is None else sparsity, **nm, **options, log=log
    )
    assert branches <= set(log)
    got = alps.alps_solve(
        jnp.asarray(w), stats_of(x), sparsity=sparsity, pattern=pattern, **options
    )
    np.testing.assert_array_equal(np.asarray(got.keep).T, ~pruned)
    np.testing.assert_allclose(np.asarray(got.weight).T, q, rtol=2e-3, atol=2e-3 * np.abs(q).max())
    assert int(got.admm_iters) == iters < 300
    assert int(got.cg_iters) == 10  # the refit's residual test reads pruned entries too
    if pattern == "unstructured":
        # One top-k over the whole matrix gives outputs unequal counts (per output would not).
        assert len(set(pruned.sum(axis=1).tolist())) > 1


@pytest.mark.parametrize("case", ["50%", "50%-wide", "2:4-wide"])
def test_alps_admm_before_the_refit_is_the_authors(case):
    shape, pattern, sparsity, options, _ = CASES[case]
    x, w = problem(**shape)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    nm = dict(nm_n=2, nm_m=4) if pattern == "2:4" else {}
    _, pruned, _, q = authors_alps(w.T, h, 0.5 if sparsity is None else sparsity, **nm, **options)
    got = alps.alps_solve(
        jnp.asarray(w), stats_of(x), sparsity=sparsity, pattern=pattern, cg_iters=0, **options
    )
    np.testing.assert_array_equal(np.asarray(got.keep).T, ~pruned)
    np.testing.assert_allclose(np.asarray(got.weight).T, q, rtol=1e-4, atol=1e-4 * np.abs(q).max())
    assert int(got.cg_iters) == 0


def test_the_plugin_defaults_are_the_authors():
    solve = inspect.signature(alps.alps_solve).parameters
    section = {f.name: f.default for f in dataclasses.fields(alps.ALPSConfig)}
    assert section == {name: solve[name].default for name in section}
    assert alps.METHOD.groups[0] == solve["group"].default == "matrix"
    x, w = problem(seed=2)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    q, pruned, _, _ = authors_alps(w.T, h, 0.6)
    got, keep = prune_matrix("alps", jnp.asarray(w), stats_of(x), sparsity=0.6)
    np.testing.assert_array_equal(np.asarray(keep).T, ~pruned)
    np.testing.assert_allclose(np.asarray(got).T, q, rtol=2e-3, atol=2e-3 * np.abs(q).max())


# ---------------------------------------------------------------- patterns, counts and zeros


@pytest.mark.parametrize(
    ("pattern", "sparsity", "group", "zeros_per_output"),
    [
        ("unstructured", 0.3, "matrix", None),
        ("unstructured", 0.5, "matrix", None),
        ("unstructured", 0.9, "matrix", None),
        ("unstructured", 0.5, "output", 16),
        ("unstructured", 0.7, "output", 22),
        ("row", 0.5, None, 16),
        ("2:4", None, None, 16),
        ("1:4", None, None, 24),
        ("4:8", None, None, 16),
    ],
)
def test_exact_counts_and_zeros(pattern, sparsity, group, zeros_per_output):
    x, w = problem(seed=8)
    got, keep = prune_matrix(
        "alps", jnp.asarray(w), stats_of(x), sparsity=sparsity, pattern=pattern, group=group
    )
    got, keep = np.asarray(got), np.asarray(keep)
    assert keep.dtype == bool and keep.shape == w.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got[~keep], 0.0)
    assert np.all(got[keep] != 0)
    if zeros_per_output is not None:
        np.testing.assert_array_equal((~keep).sum(axis=0), zeros_per_output)
    else:
        assert (~keep).sum() == round(sparsity * w.size)
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        np.testing.assert_array_equal(keep.reshape(-1, m, w.shape[1]).sum(axis=1), n)


def test_projection_keeps_the_largest_and_breaks_ties_by_index():
    scores = jnp.asarray([[1.0, 0.0], [3.0, 2.0], [3.0, 2.0], [3.0, 5.0], [0.0, 2.0]])
    keep = np.asarray(alps._keep_top(scores, 2))
    np.testing.assert_array_equal(keep, [[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]])
    flat = np.asarray(alps._keep_top(scores.reshape(-1, 1), 4)).reshape(5, 2)
    np.testing.assert_array_equal(flat, [[0, 0], [1, 0], [1, 0], [1, 1], [0, 0]])


def test_equal_weights_still_give_exact_counts():
    x, _ = problem(seed=12)
    w = jnp.ones((32, 12), jnp.float32)
    for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
        got, keep = prune_matrix("alps", w, stats_of(x), sparsity=sparsity, pattern=pattern)
        assert np.asarray(keep).sum() == w.size // 2
        np.testing.assert_array_equal(np.asarray(got)[~np.asarray(keep)], 0.0)


def test_sparsity_zero_keeps_the_dense_weights():
    x, w = problem(seed=9)
    got, keep = prune_matrix("alps", jnp.asarray(w), stats_of(x), sparsity=0.0)
    assert np.asarray(keep).all()
    np.testing.assert_allclose(np.asarray(got), w, rtol=1e-3, atol=1e-3 * np.abs(w).max())


def test_bad_settings_are_refused():
    x, w = problem(seed=10)
    with pytest.raises(ValueError, match="group"):
        alps.alps_prune(
            jnp.asarray(w), stats_of(x), sparsity=0.5, pattern="unstructured", group="block"
        )
    with pytest.raises(ValueError, match="sparsity"):
        alps.alps_prune(jnp.asarray(w), stats_of(x), sparsity=1.0, pattern="unstructured")
    with pytest.raises(ValueError, match="statistics"):
        prune_matrix("alps", jnp.asarray(w), None, sparsity=0.5)


# ---------------------------------------------------------------- better than SparseGPT


@pytest.mark.parametrize(
    ("pattern", "sparsity"), [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)]
)
def test_reconstruction_error_below_sparsegpt(pattern, sparsity):
    x, w = problem(n=1024, d_in=64, d_out=48, seed=11)
    stats = stats_of(x)

    def error(name):
        got, _ = prune_matrix(name, jnp.asarray(w), stats, sparsity=sparsity, pattern=pattern)
        x64 = x.astype(np.float64)
        return np.linalg.norm(x64 @ w - x64 @ np.asarray(got, np.float64))

    assert error("alps") < error("sparsegpt")


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("alps"))


def _run(tiny, *flags):
    return prune_tiny(tiny, *flags)


def test_alps_runs_end_to_end(tiny):
    metrics, _ = _run(tiny, "--method", "alps", "--targets", "attn")
    assert metrics["config"]["alps"] == dataclasses.asdict(alps.ALPSConfig())
    assert set(metrics["measured_sparsity"]) == {
        f"{li}.{k}" for li in range(4) for k in ("q", "k", "v", "o")
    }
    assert all(v == 0.5 for v in metrics["measured_sparsity"].values())
    assert metrics["perplexity"]["wikitext2"] > 0


def test_alps_two_four_end_to_end(tiny):
    metrics, masks = _run(
        tiny, "--method", "alps", "--targets", "attn", "--pattern", "2:4", "--alps.cg-iters", "5"
    )
    assert metrics["config"]["alps"]["cg_iters"] == 5
    assert all(v == 0.5 for v in metrics["measured_sparsity"].values())
    keep = np.asarray(masks["0"]["q"])
    np.testing.assert_array_equal(keep.reshape(-1, 4, keep.shape[1]).sum(axis=1), 2)


def test_alps_flags_in_help(tiny):
    helped = jaxprune("prune", "--help", cwd=tiny[2])
    assert helped.returncode == 0
    for name in ("rho", "max-iter", "update-iter", "switch-iter", "percdamp", "cg-iters"):
        assert f"--alps.{name}" in helped.stdout
    assert "alps" in helped.stdout.split("--method")[1].split("\n")[0]

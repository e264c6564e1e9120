"""D2Prune against references written from its authors' code, not from ours.

The references follow cquxl/D2Prune ``prune/d2prune_utils.py`` step by step (``D2SparseGPT`` and
``D2Wanda``: ``add_batch`` one calibration sequence at a time, then ``fasterprune``), in float64
and in PyTorch's ``(d_out, d_in)`` layout, with the authors' mask convention (``True`` = pruned),
their ``prune_n`` (the count pruned in each group of ``prune_m``) and their counting rules. They
share no selection code with ``jaxprune`` (no ``binarize``), so a change to our rules cannot make
them agree.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_run import jaxprune, prune_tiny, tiny_folders

from jaxprune.methods import d2prune
from jaxprune.methods.base import Layer, Request
from jaxprune.methods.registry import prune_matrix
from jaxprune.methods.stats import init_stats, update_stats
from jaxprune.models.spec import AttentionSpec


def sequences(n_seq=4, length=24, d_in=32, seed=0, equal=False):
    """``n_seq`` calibration sequences ``(n_seq, length, d_in)`` of correlated inputs with uneven
    feature scales; each sequence has its own scale unless ``equal`` (then all are one copy)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    feat = np.exp(rng.normal(size=d_in))
    x = rng.normal(size=(1 if equal else n_seq, length, d_in)) @ mix * feat
    if equal:
        return np.repeat(x, n_seq, axis=0).astype(np.float32)
    return (x * np.exp(0.5 * rng.normal(size=(n_seq, 1, 1)))).astype(np.float32)


def weight(d_in=32, d_out=12, seed=0):
    """Outputs with very uneven row norms (so per-block and per-output thresholds differ)."""
    rng = np.random.default_rng(seed + 100)
    w = rng.normal(size=(d_in, d_out)) * np.exp(1.0 * rng.normal(size=d_out))[None, :]
    return w.astype(np.float32)


def stats_of(xs):
    return update_stats(init_stats(xs.shape[-1]), jnp.asarray(xs.reshape(-1, xs.shape[-1])))


# ---------------------------------------------------------------- the authors' code, restated


def authors_d2sparsegpt_stats(W, xs, s):
    """``D2SparseGPT.add_batch`` per sequence. ``W``: (d_out, d_in); ``xs``: (n, L, d_in).
    Returns ``(H, y_scaler_col, delta_x_scaler_row)``."""
    rows, columns = W.shape
    W = W.astype(np.float64)
    H = np.zeros((columns, columns))
    y = np.zeros(rows)
    dx = np.zeros(columns)
    nsamples = 0
    for x in xs.astype(np.float64):
        out = x @ W.T  # the dense layer's output on this sequence
        inp = x.T
        tmp = 1
        H *= nsamples / (nsamples + tmp)
        y *= nsamples / (nsamples + tmp)
        dx *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = np.sqrt(2 / nsamples) * inp
        H += inp @ inp.T
        y += np.linalg.norm(out, axis=0) / s
        dx += np.linalg.norm(inp, axis=1) / s
    return H, y, dx


def authors_d2wanda_stats(W, xs, s):
    """``D2Wanda.add_batch`` per sequence. Returns ``(scaler_row, y_scaler_col,
    delta_x_scaler_row)``."""
    rows, columns = W.shape
    W = W.astype(np.float64)
    scaler_row, y, dx = np.zeros(columns), np.zeros(rows), np.zeros(columns)
    for nsamples, x in enumerate(xs.astype(np.float64), start=1):  # nsamples after this one
        out = x @ W.T
        inp = x.T
        scaler_row *= (nsamples - 1) / nsamples
        y *= (nsamples - 1) / nsamples
        dx *= (nsamples - 1) / nsamples
        scaler_row += np.linalg.norm(inp, axis=1) ** 2 / nsamples
        y += np.linalg.norm(out, axis=0) / s
        dx += np.linalg.norm(inp, axis=1) / s
    return scaler_row, y, dx


def authors_d2sparsegpt(
    W, H, y, dx, sparsity, r1=1.0, r2=0.0, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01
):
    """``D2SparseGPT.fasterprune`` (``d2_sparsegpt`` on). Returns ``(W, mask)``, mask True =
    pruned."""
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    columns = W.shape[1]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[np.arange(columns), np.arange(columns)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # torch.linalg.cholesky(., upper=True)
    mask_all = np.zeros(W.shape, bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1**2 / np.diag(Hinv1).reshape((1, -1)) ** 2
            tmp += r1 * (y.reshape((-1, 1)) * np.abs(W1) * dx[i1:i2].reshape((1, -1)))
            tmp += -r2 * (W1**2) * dx[i1:i2].reshape((1, -1)) ** 2
            thresh = np.sort(tmp.flatten())[int(tmp.size * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = np.zeros(W1.shape, bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                g = W1[:, i : i + prune_m]
                tmp = g**2 / np.diag(Hinv1)[i : i + prune_m].reshape((1, -1)) ** 2
                gx = dx[i1:i2][i : i + prune_m].reshape((1, -1))
                tmp += r1 * (y.reshape((-1, 1)) * np.abs(g) * gx)
                tmp += -r2 * (g**2) * gx**2
                idx = np.argsort(tmp, axis=1, kind="stable")[:, :prune_n]
                np.put_along_axis(mask1[:, i : i + prune_m], idx, True, axis=1)
            q = w.copy()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        mask_all[:, i1:i2] = mask1
    return W, mask_all


def authors_d2wanda(W, scaler_row, y, dx, sparsity, r1=1.0, r2=0.0, prune_n=0, prune_m=0):
    """``D2Wanda.fasterprune`` (``d2_wanda`` on). Returns ``(W, mask)``, mask True = pruned."""
    W = np.array(W, np.float64)
    metric = np.abs(W) ** 2 * scaler_row.reshape((1, -1))
    metric += r1 * y.reshape((-1, 1)) * np.abs(W) * dx.reshape((1, -1))
    metric += -r2 * np.abs(W) ** 2 * dx.reshape((1, -1)) ** 2
    mask = np.zeros(metric.shape, bool)
    if prune_n != 0:
        for ii in range(metric.shape[1]):
            if ii % prune_m == 0:
                idx = np.argsort(metric[:, ii : ii + prune_m], axis=1, kind="stable")[:, :prune_n]
                np.put_along_axis(mask[:, ii : ii + prune_m], idx, True, axis=1)
    else:
        idx = np.argsort(metric, axis=-1, kind="stable")[:, : int(metric.shape[1] * sparsity)]
        np.put_along_axis(mask, idx, True, axis=1)
    W[mask] = 0
    return W, mask


# A scaling s at which both parts of the score move the masks on these small problems (the
# authors' 1500 suits 128 sequences of 4096 tokens).
S = 3.0


def _ours_d2sparsegpt(w, H, y, dx, **kw):
    got, keep = d2prune.d2_sparsegpt_prune(
        jnp.asarray(w), jnp.asarray(H, jnp.float32), jnp.asarray(dx), jnp.asarray(y), **kw
    )
    return np.asarray(got, np.float64).T, ~np.asarray(keep).T


# ---------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("sparsity", "blocksize", "r2"), [(0.5, 8, 0.0), (0.3, 12, 0.0), (0.6, 32, 0.5)]
)
def test_d2_sparsegpt_is_the_authors_block_rule(sparsity, blocksize, r2):
    xs, w = sequences(seed=1), weight(seed=1)
    H, y, dx = authors_d2sparsegpt_stats(w.T, xs, S)
    q, pruned = authors_d2sparsegpt(w.T, H, y, dx, sparsity, r2=r2, blocksize=blocksize)
    kw = dict(sparsity=sparsity, pattern="unstructured", blocksize=blocksize, r2=r2)
    got, ours = _ours_d2sparsegpt(w, H, y, dx, **kw)
    np.testing.assert_array_equal(ours, pruned)
    np.testing.assert_allclose(got, q, rtol=2e-3, atol=2e-3)
    assert np.all(got[pruned] == 0)
    # The activation term moves the mask here: without it (SparseGPT) the mask differs.
    _, plain = authors_d2sparsegpt(w.T, H, y, dx, sparsity, r1=0.0, blocksize=blocksize)
    assert (plain != pruned).any()


@pytest.mark.parametrize(("pattern", "prune_n"), [("2:4", 2), ("1:4", 3)])
def test_d2_sparsegpt_n_m_is_the_authors_rule(pattern, prune_n):
    xs, w = sequences(seed=2), weight(seed=2)
    H, y, dx = authors_d2sparsegpt_stats(w.T, xs, S)
    q, pruned = authors_d2sparsegpt(w.T, H, y, dx, 0, prune_n=prune_n, prune_m=4, blocksize=16)
    got, ours = _ours_d2sparsegpt(w, H, y, dx, pattern=pattern, blocksize=16)
    np.testing.assert_array_equal(ours, pruned)
    np.testing.assert_allclose(got, q, rtol=2e-3, atol=2e-3)
    _, plain = authors_d2sparsegpt(w.T, H, y, dx, 0, r1=0.0, prune_n=prune_n, prune_m=4)
    assert (plain != pruned).any()


@pytest.mark.parametrize(
    ("pattern", "sparsity", "prune_n"),
    [("unstructured", 0.5, 0), ("unstructured", 0.3, 0), ("2:4", None, 2)],
)
def test_d2_wanda_is_the_authors_rule(pattern, sparsity, prune_n):
    xs, w = sequences(seed=3), weight(seed=3)
    scaler, y, dx = authors_d2wanda_stats(w.T, xs, S)
    ref, pruned = authors_d2wanda(w.T, scaler, y, dx, sparsity, prune_n=prune_n, prune_m=4)
    got, keep = d2prune.d2_wanda_prune(
        jnp.asarray(w),
        jnp.asarray(scaler, jnp.float32),
        jnp.asarray(dx),
        jnp.asarray(y),
        sparsity=sparsity,
        pattern=pattern,
    )
    np.testing.assert_array_equal(np.asarray(keep).T, ~pruned)
    np.testing.assert_array_equal(np.asarray(got).T, ref.astype(np.float32))
    # Without the activation term (Wanda up to a square) the mask differs here.
    _, plain = authors_d2wanda(w.T, scaler, y, dx, sparsity, r1=0.0, prune_n=prune_n, prune_m=4)
    assert (plain != pruned).any()


# ---------------------------------------------------------------- the statistics of the plug-in


def test_terms_are_the_authors_accumulators_for_equal_sequences():
    xs, w = sequences(n_seq=5, equal=True, seed=4), weight(seed=4)
    terms = d2prune.authors_terms(jnp.asarray(w), stats_of(xs), sequences=5, s=S)
    H, y, dx = authors_d2sparsegpt_stats(w.T, xs, S)
    scaler, y_w, dx_w = authors_d2wanda_stats(w.T, xs, S)
    close = dict(rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(terms.hessian, H, **close)
    np.testing.assert_allclose(terms.x_sparsegpt, dx, **close)
    np.testing.assert_allclose(terms.y, y, **close)
    np.testing.assert_allclose(terms.sq_mean, scaler, **close)
    np.testing.assert_allclose(terms.x_wanda, dx_w, **close)
    np.testing.assert_allclose(y_w, y)


def test_terms_hessian_and_wanda_norms_are_exact_for_any_sequences():
    xs, w = sequences(n_seq=5, seed=5), weight(seed=5)
    terms = d2prune.authors_terms(jnp.asarray(w), stats_of(xs), sequences=5, s=S)
    H, _, dx = authors_d2sparsegpt_stats(w.T, xs, S)
    scaler, _, _ = authors_d2wanda_stats(w.T, xs, S)
    np.testing.assert_allclose(terms.hessian, H, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(terms.sq_mean, scaler, rtol=1e-4)
    # The running norms weight sequence j by j/n: with unequal sequences ours is an estimate.
    assert not np.allclose(terms.x_sparsegpt, dx, rtol=1e-3)


def _layer(xs_attn, seed=0, attention_inputs=None, spec=None):
    """A tiny layer (hidden 32, 4 query and 2 key/value heads of 8, MLP 48) with random kernels
    and the statistics of ``xs_attn`` for every input (a stand-in for each projection's own)."""
    rng = np.random.default_rng(seed)
    d, f = 32, 48
    shapes = dict(q=(d, 32), k=(d, 16), v=(d, 16), o=(32, d), gate=(d, f), up=(d, f), down=(f, d))
    weights = {t: rng.normal(size=sh) / np.sqrt(sh[0]) for t, sh in shapes.items()}
    # The MLP's inputs: one sequence repeated when the attention's are (equal sequences).
    equal = bool(np.all(xs_attn == xs_attn[:1]))
    mlp = rng.normal(size=(1 if equal else xs_attn.shape[0], xs_attn.shape[1], f))
    mlp = np.broadcast_to(mlp, (xs_attn.shape[0], *mlp.shape[1:])).astype(np.float32)
    stats = {t: stats_of(mlp if t == "down" else xs_attn) for t in shapes}
    return Layer(
        index=0,
        weights={t: jnp.asarray(v, jnp.float32) for t, v in weights.items()},
        stats=stats,
        spec=spec or AttentionSpec(n_heads=4, n_kv_heads=2, head_dim=8),
        attention_inputs=attention_inputs,
    ), {"x": xs_attn, "down": mlp}


def test_layer_default_is_the_authors_llama_script():
    """v by D2-Wanda without update, every other projection by D2-SparseGPT, the statistics
    from the authors' accumulators (equal sequences: the plug-in's are then exact)."""
    xs = sequences(n_seq=4, length=48, equal=True, seed=6)
    layer, inputs = _layer(xs, seed=6)
    opts = d2prune.D2PruneConfig(s=S, sequences=4)
    request = Request(targets=tuple(layer.weights), sparsity=0.5, pattern="unstructured")
    out = d2prune.prune(layer, request, opts)
    assert out.facts["d2prune_no_update"] == "v"
    for t, w in layer.weights.items():
        W = np.asarray(w, np.float64).T
        x = inputs["down"] if t == "down" else inputs["x"]
        if t == "v":
            ref, pruned = authors_d2wanda(W, *authors_d2wanda_stats(W, x, S), 0.5)
        else:
            ref, pruned = authors_d2sparsegpt(W, *authors_d2sparsegpt_stats(W, x, S), 0.5)
        np.testing.assert_array_equal(~np.asarray(out.masks[t]).T, pruned, err_msg=t)
        np.testing.assert_allclose(np.asarray(out.weights[t]).T, ref, rtol=2e-3, atol=2e-3)


def test_prune_matrix_is_d2_sparsegpt_through_the_registry():
    xs, w = sequences(n_seq=4, length=48, equal=True, seed=7), weight(seed=7)
    H, y, dx = authors_d2sparsegpt_stats(w.T, xs, S)
    _, pruned = authors_d2sparsegpt(w.T, H, y, dx, 0.5, blocksize=16)
    _, keep = prune_matrix(
        "d2prune",
        jnp.asarray(w),
        stats_of(xs),
        sparsity=0.5,
        pattern="unstructured",
        s=S,
        sequences=4,
        blocksize=16,
    )
    np.testing.assert_array_equal(~np.asarray(keep).T, pruned)


# ---------------------------------------------------------------- exact zeros and counts


ALL = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.mark.parametrize(
    ("pattern", "group", "targets"),
    [
        ("unstructured", None, ALL),
        ("unstructured", "output", ("q", "k", "v", "o")),
        ("2:4", None, ALL),
        ("1:4", None, ("q", "k")),
    ],
)
def test_zeros_and_counts_for_every_pattern(pattern, group, targets):
    xs = sequences(n_seq=3, length=40, seed=8)
    layer, _ = _layer(xs, seed=8)
    sparsity = None if ":" in pattern else 0.5
    request = Request(targets, sparsity, pattern, group=group, calibration_sequences=3)
    out = d2prune.prune(layer, request, d2prune.D2PruneConfig(blocksize=16))
    assert set(out.masks) == set(targets)
    for t, keep in out.masks.items():
        keep = np.asarray(keep)
        assert keep.dtype == bool and keep.shape == layer.weights[t].shape
        assert np.all(np.asarray(out.weights[t])[~keep] == 0)
        d_in = keep.shape[0]
        if ":" in pattern:
            n, m = map(int, pattern.split(":"))
            np.testing.assert_array_equal(keep.reshape(d_in // m, m, -1).sum(axis=1), n)
        elif group == "output" or t == "v":
            np.testing.assert_array_equal(keep.sum(axis=0), d_in // 2)
        else:
            # The authors' block threshold prunes int(numel * s) + 1 entries per block of 16.
            blocks = keep.reshape(d_in // 16, 16, -1)
            np.testing.assert_array_equal((~blocks).sum(axis=(1, 2)), 8 * keep.shape[1] + 1)


# ---------------------------------------------------------------- the attention-aware choice


def _np_probs(wq, wk, x, h=4, g=2, dh=8):
    """Causal attention probabilities ``(h, b, n, n)`` in float64 (no RoPE), query head ``i``
    on key head ``i // (h/g)``."""
    x = np.asarray(x, np.float64)
    q = (x @ np.asarray(wq, np.float64)).reshape(*x.shape[:2], h, dh)
    k = (x @ np.asarray(wk, np.float64)).reshape(*x.shape[:2], g, dh)
    k = np.repeat(k, h // g, axis=2)
    logits = np.einsum("bihd,bjhd->hbij", q, k) / np.sqrt(dh)
    n = x.shape[1]
    logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_kl(p_new, p):
    safe = np.where(
        p_new > 0,
        p_new * (np.log(np.where(p_new > 0, p_new, 1)) - np.log(np.where(p > 0, p, 1))),
        0,
    )
    return np.mean(safe.sum(axis=-1))  # fmt: skip


@pytest.mark.parametrize(("seed", "lowers"), [(0, False), (1, False), (4, True), (5, True)])
def test_kl_choice_never_raises_the_attention_kl_above_the_plain_update(seed, lowers):
    """With the paper's candidates (q, k or v left without update) and a large rho, the chosen
    configuration's attention KL against the dense attention is at most the plain update's
    (leaving v alone keeps the updated q and k), and lower where leaving q or k alone helps. On
    random problems that is rare (2 of 20 seeds of this one: updating q and k mostly lowers the
    KL); seeds 4 and 5 are two such cases. The KL is recomputed here in float64."""
    spec = AttentionSpec(n_heads=4, n_kv_heads=2, head_dim=8, rope_theta=None)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 24, 32))
    x[:, 0] += 8.0 * rng.normal(size=32) / np.sqrt(32)  # a dominant first token
    x = x.astype(np.float32)
    layer, _ = _layer(x, seed=seed, attention_inputs=jnp.asarray(x), spec=spec)
    layer.weights["q"] = 2.0 * layer.weights["q"]  # sharper attention
    request = Request(targets=("q", "k", "v", "o"), sparsity=0.6, pattern="unstructured")
    opts = d2prune.D2PruneConfig(select="kl", kl_weight=1e4, s=S, sequences=3)
    out = d2prune.prune(layer, request, opts)
    plain_opts = dataclasses.replace(opts, select="fixed", no_update="none")
    plain = d2prune.prune(layer, request, plain_opts)
    dense = _np_probs(layer.weights["q"], layer.weights["k"], x)
    kl = _np_kl(_np_probs(out.weights["q"], out.weights["k"], x), dense)
    kl_plain = _np_kl(_np_probs(plain.weights["q"], plain.weights["k"], x), dense)
    chosen = out.facts["d2prune_no_update"]
    candidates = out.facts["d2prune_candidates"]
    np.testing.assert_allclose(candidates[chosen]["kl"], kl, rtol=1e-3)
    np.testing.assert_allclose(candidates["v"]["kl"], kl_plain, rtol=1e-3)
    assert chosen == min(candidates, key=lambda c: candidates[c]["objective"])
    assert kl <= kl_plain * (1 + 1e-6)
    assert (chosen in ("q", "k") and kl < kl_plain * (1 - 1e-2)) == lowers


def test_the_sequence_count_defaults_to_the_runs_calibration_sequences():
    """The authors' accumulators count the windows they are given: without the option, the
    count is the request's (the pipeline's calibration sequences), not a fixed 128."""
    xs = sequences(n_seq=4, length=48, equal=True, seed=10)
    layer, _ = _layer(xs, seed=10)
    request = Request(targets=("q", "k"), sparsity=0.5, pattern="unstructured")
    own = d2prune.prune(layer, request.replace(calibration_sequences=4), d2prune.D2PruneConfig(s=S))
    four = d2prune.prune(layer, request, d2prune.D2PruneConfig(s=S, sequences=4))
    other = d2prune.prune(layer, request, d2prune.D2PruneConfig(s=S, sequences=128))
    for t in ("q", "k"):
        np.testing.assert_array_equal(np.asarray(own.masks[t]), np.asarray(four.masks[t]))
        np.testing.assert_array_equal(np.asarray(own.weights[t]), np.asarray(four.weights[t]))
    assert any(
        not np.array_equal(np.asarray(own.masks[t]), np.asarray(other.masks[t])) for t in "qk"
    )
    with pytest.raises(ValueError, match=r"d2prune\.sequences"):
        d2prune.prune(layer, request, d2prune.D2PruneConfig(s=S))


def test_kl_choice_needs_attention_inputs():
    layer, _ = _layer(sequences(n_seq=2, length=16, seed=9))
    request = Request(targets=("q", "k"), sparsity=0.5, pattern="unstructured")
    with pytest.raises(ValueError, match="attention inputs"):
        d2prune.prune(layer, request, d2prune.D2PruneConfig(select="kl"))
    assert d2prune.attention_inputs(d2prune.D2PruneConfig()) is None
    assert d2prune.attention_inputs(d2prune.D2PruneConfig(select="kl", samples=2)) == (2, 256)


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("d2prune"))


def _run(tiny, *flags):
    return prune_tiny(tiny, *flags)


def test_d2prune_runs_end_to_end(tiny):
    metrics, masks = _run(tiny, "--method", "d2prune", "--targets", "attn")
    assert metrics["config"]["d2prune"] == json.loads(
        json.dumps(dataclasses.asdict(d2prune.D2PruneConfig()))
    )
    sparsity = metrics["measured_sparsity"]
    assert set(sparsity) == {f"{li}.{k}" for li in range(4) for k in ("q", "k", "v", "o")}
    # v: D2-Wanda, 16 of 32 per output; q, k, o: one block of 32 inputs, one entry more.
    for li in range(4):
        assert sparsity[f"{li}.v"] == 0.5
        assert sparsity[f"{li}.q"] == sparsity[f"{li}.o"] == 513 / 1024
        assert sparsity[f"{li}.k"] == 257 / 512
        assert metrics["layers"][li]["d2prune_no_update"] == "v"
    np.testing.assert_array_equal(np.asarray(masks["0"]["v"]).sum(axis=0), 16)
    assert metrics["perplexity"]["wikitext2"] > 0


def test_d2prune_two_four_with_the_kl_choice_end_to_end(tiny):
    metrics, masks = _run(
        tiny,
        "--method",
        "d2prune",
        "--targets",
        "attn",
        "--pattern",
        "2:4",
        "--d2prune.select",
        "kl",
        "--d2prune.samples",
        "2",
        "--d2prune.seq-len",
        "16",
    )
    assert all(v == 0.5 for v in metrics["measured_sparsity"].values())
    keep = np.asarray(masks["0"]["q"])
    np.testing.assert_array_equal(keep.reshape(-1, 4, keep.shape[1]).sum(axis=1), 2)
    layer = metrics["layers"][0]
    assert layer["d2prune_no_update"] in ("q", "k", "v")
    assert set(layer["d2prune_candidates"]) == {"q", "k", "v"}


def test_d2prune_flags_in_help(tiny):
    helped = jaxprune("prune", "--help", cwd=tiny[2])
    assert helped.returncode == 0
    for name in ("s", "r1", "r2", "sequences", "select", "no-update", "candidates", "kl-weight"):
        assert f"--d2prune.{name}" in helped.stdout
    assert "d2prune" in helped.stdout.split("--method")[1].split("\n")[0]

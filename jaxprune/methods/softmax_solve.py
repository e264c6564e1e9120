"""The softmax-aware method on a real layer: masks on W_Q and W_K optimised against the attention
probabilities (the factored objective), then rounded to the requested pattern.

Choices (:class:`jaxprune.methods.softmax.SoftmaxConfig`, the ``softmax`` section of a run):
  * the attention term is divided by its dense scale ``1/2 sum_h mean_b ||P_h||_F^2`` so one
    lambda fits every layer (``normalize``);
  * start from ``M = 1`` (the paper) or from Wanda's ordering as quantile ranks in ``[0, 1]``
    (``init``), ranked within the same comparison group as the rounding (``group``: per matrix
    by default, the best full-protocol row; per output, as Wanda compares, with ``"output"``);
  * with ``normalize`` the regulariser is the mean of ``M^2`` (``||M||^2`` over its entry count);
  * lambda fixed, or chosen per layer as the grid value whose short solve leaves the relaxed
    mask's mean closest to the kept fraction (``lam_search``): a larger lambda pushes more entries
    towards zero, and the rounding then removes about the entries the solve already let go;
  * masks are kept in ``[0, 1]`` by projection; Adam by default (the entries' gradient scales are
    very uneven, which makes a single plain-GD step size slow);
  * rounding by the mask itself (``score="mask"``) or by ``|M ∘ W|``, per matrix (``group``
    ``"matrix"``, the default) or per output (Wanda's group); ties (entries the projection left at
    exactly 0 or 1) are ordered by Wanda's score as a second sort key (``tiebreak``), then by
    index;
  * optional weight update on the kept entries after rounding (``update``): SparseGPT's linear
    reconstruction, or ``softmax``: Adam on the kept q/k entries against the same attention term
    (:func:`reconstruct_qk_softmax`).

The gradient of the probability-form term (the default) is the closed form written by hand
(:mod:`jaxprune.objective_vjp`, equal to autodiff's to float rounding, tested), which skips the
causal upper triangle; the output form and the row-blocked term use autodiff.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import sharding
from jaxprune.masks import binarize, mask_scores, parse_nm
from jaxprune.methods import registry
from jaxprune.methods.base import Request
from jaxprune.methods.sparsegpt import sparsegpt_reconstruct
from jaxprune.methods.stats import InputStats
from jaxprune.methods.wanda import wanda_scores
from jaxprune.models.spec import AttentionSpec, QKExtras
from jaxprune.objective import (
    attention_output,
    head_values,
    mask_regulariser,
    qk_attention_term_blocked,
    qk_layer_probs,
    qk_pruning_loss,
)
from jaxprune.objective_vjp import qk_pruning_loss_vjp
from jaxprune.solvers import solve_masks


@partial(jax.jit, static_argnames=("spec", "query_idx"))
def _target(wq, wk, x, extras, *, spec, query_idx):
    idx = None if query_idx is None else jnp.asarray(query_idx)
    probs = qk_layer_probs(wq, wk, x, spec=spec, query_idx=idx, extras=extras)
    return probs, 0.5 * jnp.sum(jnp.mean(jnp.sum(probs * probs, axis=(-2, -1)), axis=1))


def mask_loss(
    m, w, x, target, scale, values, extras, lam, *, n_entries, query_idx, row_block, spec_kw
):
    """The mask solve's loss of one layer, ``(loss, aux)``: the attention term over ``scale``
    plus ``lam/2`` times the sum of ``M^2`` over ``n_entries`` (the direct form with the dense
    ``target``, the output form with ``values``, or the row-blocked form when ``row_block`` is
    set; ``extras`` are the layer's q/k biases and norm multipliers)."""
    if row_block is not None:
        attn = _blocked_term(m, w, x, row_block, spec_kw, extras)[0] / scale
        reg = mask_regulariser(m, lam, n_entries)
        return attn + reg, {"attention": attn, "reg": reg}
    return _layer_loss(
        m,
        w,
        x,
        values,
        lam=lam,
        target=target,
        attn_scale=scale,
        reg_scale=n_entries,
        query_idx=query_idx,
        extras=extras,
        **spec_kw,
    )


def _layer_loss(m, w, x, values, **kw):
    """:func:`jaxprune.objective.qk_pruning_loss`, whose probability form (``values`` None) takes
    its gradient from the hand-written backward pass (:mod:`jaxprune.objective_vjp`)."""
    if values is None:
        return qk_pruning_loss_vjp(m, w, x, **kw)
    return qk_pruning_loss(m, w, x, values=values, **kw)


@functools.cache
def _mask_loss(*, lam, n_entries, query_idx, row_block, shape):
    """The mask solve's loss ``(masks, (weights, x, target, scale, values, extras)) -> (loss,
    aux)``, one
    object per setting so that the solver's compilations are shared by every layer."""
    kw = dict(
        n_entries=n_entries,
        query_idx=None if query_idx is None else jnp.asarray(query_idx),
        row_block=row_block,
        spec_kw=dict(shape),
    )

    def loss_fn(m, data):
        return mask_loss(m, *data, lam, **kw)

    return loss_fn


@functools.cache
def _update_loss(query_idx, shape, row_block=None):
    """The weight update's loss ``(u, (start, keep, rms, x, target, scale, values, dense,
    extras)) -> (loss, aux)``: the kept weights are ``start + rms * u``, compared with the dense
    target (the row-blocked attention term against the ``dense`` kernels when ``row_block`` is
    set)."""
    spec_kw = dict(shape)
    idx = None if query_idx is None else jnp.asarray(query_idx)

    def loss_fn(u, data):
        w, kf, s, xx, t, sc, vals, dense, ex = data
        moved = {k: w[k] + s[k] * u[k] for k in w}
        if row_block is not None:
            term = qk_attention_term_blocked(
                kf, moved, xx, row_block=row_block, dense_weights=dense, extras=ex, **spec_kw
            )[0]
            attn = term / sc
            return attn, {"attention": attn, "reg": jnp.zeros_like(attn)}
        return _layer_loss(
            kf,
            moved,
            xx,
            vals,
            lam=0.0,
            target=t,
            attn_scale=sc,
            query_idx=idx,
            extras=ex,
            **spec_kw,
        )

    return loss_fn


@dataclasses.dataclass(frozen=True)
class SequenceBatch:
    """The attention term's data a solver step reads (``softmax.batch``): ``size`` of its
    sequences, step ``s`` taking sequences ``s * size, ..., s * size + size - 1`` (modulo their
    count), so consecutive steps walk through all of them in turn.

    ``form`` names the solve whose data tuple it slices: ``"mask"`` (:func:`_mask_loss`'s
    ``(weights, x, target, scale, values, extras)``), ``"layers"`` (the same with a leading
    layer axis on every array, and ``lam``, as :mod:`jaxprune.methods.softmax_layers` stacks
    them) or ``"update"`` (:func:`_update_loss`'s). The attention term is a mean over sequences
    and its scale is the dense mean over all of them, so a batch's term estimates the whole term
    without bias."""

    size: int
    form: str

    def __call__(self, data, step):
        if self.form == "update":
            start, keep, rms, x, target, scale, values, dense, extras = data
        else:
            weights, x, target, scale, values, extras, *lam = data
        # Sequences are axis 0 of x, axis 1 of the target (h, b, r, n) and of the values' first
        # member (h, b, n, dh); one further with a leading layer axis.
        shift = int(self.form == "layers")
        idx = (step * self.size + jnp.arange(self.size)) % x.shape[shift]
        x = jnp.take(x, idx, axis=shift)
        target = None if target is None else jnp.take(target, idx, axis=1 + shift)
        if values is not None:
            values = (jnp.take(values[0], idx, axis=1 + shift), values[1])
        if self.form == "update":
            return start, keep, rms, x, target, scale, values, dense, extras
        return (weights, x, target, scale, values, extras, *lam)


def sequence_batch(
    size: int | None, sequences: int, form: str = "mask", optimizer: str = "adam"
) -> SequenceBatch | None:
    """The minibatch of ``size`` of ``sequences`` in the ``form`` of :class:`SequenceBatch`,
    or ``None`` when every step reads all of them: no size set, one at least as large, or plain
    gradient descent, whose accept-or-halve rule compares losses on the same data."""
    if size is None or size >= sequences or optimizer == "gd":
        return None
    return SequenceBatch(size, form)


def _blocked_term(masks, weights, x, row_block, spec_kw, extras):
    return qk_attention_term_blocked(
        masks, weights, x, row_block=row_block, extras=extras, **spec_kw
    )


@jax.jit
def _output_scale(target, values):
    out = attention_output(target, *values)
    return 0.5 * jnp.mean(jnp.sum(out * out, axis=(-2, -1)))


def wanda_ranks(w, stats: InputStats, group: str = "output"):
    """Wanda's ordering as quantile ranks in ``[0, 1]`` (the warm start), within each output
    column (``group="output"``, Wanda's comparison) or over the whole matrix. Scaling the raw
    scores by their maximum instead puts most entries near 0, i.e. a nearly empty start."""
    score = wanda_scores(w, stats)
    if group == "output":
        ranks = jnp.argsort(jnp.argsort(score, axis=0, stable=True), axis=0, stable=True)
        return (ranks / (w.shape[0] - 1)).astype(w.dtype)
    flat = score.reshape(-1)
    ranks = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
    return (ranks / (flat.size - 1)).reshape(w.shape).astype(w.dtype)


def prune_qk_softmax(
    weights,
    x,
    stats,
    request: Request,
    opts,
    *,
    spec: AttentionSpec,
    value_weights=None,
    extras: QKExtras | None = None,
    progress=True,
    desc="softmax",
):
    """Optimises and rounds the q/k masks of one layer.

    Args:
      weights: ``{"q": (d, h*dh), "k": (d, g*dh)}`` dense kernels.
      x: attention inputs of the calibration subset ``(b, n, d)``.
      stats: ``InputStats`` of the layer's attention input (Wanda init and SparseGPT update).
      request: the run's request (seed, sparsity, pattern, group and the other sections).
      opts: the ``softmax`` section (:class:`jaxprune.methods.softmax.SoftmaxConfig`).
      spec: the layer's attention.
      value_weights: ``{"v", "o"}`` dense kernels of the layer, needed by ``term="output"``.
      extras: the layer's q/k/v biases and q/k norm multipliers (``None``: none).
      progress: show the solver's progress bar.
      desc: progress-bar label.

    Returns:
      ``(new_kernels, keep, info)``: pruned kernels and boolean keep-masks keyed ``"q"``/``"k"``,
      and per-layer facts (lambda, mask mean, losses, seconds).
    """
    start = time.perf_counter()
    spec_kw = dict(spec=spec)
    setup = solve_setup(weights, x, stats, request, opts, spec_kw, value_weights, extras)
    if mask_source(request, opts) != "solve":
        return _from_method(weights, x, stats, request, opts, setup, spec_kw, progress, desc, start)
    # One loss function object per setting (cached), so every layer reuses the compiled solver.
    loss_of = partial(
        _mask_loss,
        n_entries=setup.n_entries,
        query_idx=setup.query_idx,
        row_block=opts.row_block,
        shape=tuple(sorted(spec_kw.items())),
    )
    # Several devices: the solve's arrays are split over key/value groups (jaxprune.sharding).
    mesh = sharding.solve_mesh(spec.n_kv_heads)
    init, data = sharding.place_qk_solve(mesh, setup.init, setup.data)
    solve_kw = dict(data=data, progress=progress, **solve_options(opts, x.shape[0]))

    lam, searched = opts.lam, {}
    if opts.lam_search:
        for cand in opts.lam_grid:
            res = solve_masks(
                loss_of(lam=cand),
                init,
                steps=opts.search_steps,
                desc=f"{desc} lam={cand:g}",
                **solve_kw,
            )
            searched[cand] = float(np.mean([float(jnp.mean(m)) for m in res.masks.values()]))
        lam = min(searched, key=lambda c: abs(searched[c] - request.keep_fraction))
    if opts.stages > 1:
        res, masks, fixed = _staged_solve(
            loss_of(lam=lam), setup, weights, stats, request, opts, mesh, progress, desc
        )
    else:
        # The last read of the start (the search, if any, is done): the solve takes its buffers.
        res = solve_masks(
            loss_of(lam=lam), init, steps=opts.steps, desc=desc, donate_init=True, **solve_kw
        )
        masks, fixed = (res.masks if mesh is None else sharding.gather(res.masks)), None
    keep = round_masks(masks, weights, stats, request, opts, pruned=fixed)
    info = dict(
        lam=lam,
        lam_search=searched,
        mask_mean=float(np.mean([float(jnp.mean(m)) for m in masks.values()])),
        # At the start and the returned masks, on every sequence (with softmax.batch the
        # history holds each step's batch).
        initial_loss=res.initial_loss,
        final_loss=res.final_loss,
        final_attention_term=res.final_attention,
    )
    # The relaxed masks and the start are not needed by the update: freed before it runs (a
    # streaming run's peak is this layer's update).
    del masks, res, init, fixed
    setup = dataclasses.replace(setup, init=None)
    new, update_info = apply_update(
        weights, keep, x, stats, request, opts, setup, spec_kw, progress=progress, desc=desc
    )
    info |= dict(solve_seconds=time.perf_counter() - start, **update_info)
    return new, keep, info


def _staged_solve(loss_fn, setup, weights, stats, request, opts, mesh, progress, desc):
    """Staged rounding: ``opts.steps`` split over ``opts.stages`` solves. After each solve but
    the last, the lowest-scored entries, up to ``sparsity * stage / stages`` of each matrix (in
    the rounding's group, by its scores and tie-break), are fixed at zero: their mask entries
    and weights are zeroed in the next solve's start and data (the dense target stays), so the
    remaining entries adapt to the ones already gone.

    Returns:
      ``(last_result, masks, pruned)``: the last solve, its masks (fixed entries at zero) and
      the boolean ``{"q", "k"}`` entries fixed at zero, which the final rounding prunes first.
    """
    group = mask_group(request)
    pruned = {k: jnp.zeros(w.shape, bool) for k, w in weights.items()}
    masks = setup.init
    steps = [opts.steps // opts.stages + (i < opts.steps % opts.stages) for i in range(opts.stages)]
    for stage, n_steps in enumerate(steps, start=1):
        kept = {k: jnp.where(pruned[k], 0.0, w) for k, w in weights.items()}
        start = {k: jnp.where(pruned[k], 0.0, m) for k, m in masks.items()}
        placed, data = sharding.place_qk_solve(mesh, start, (kept, *setup.data[1:]))
        res = solve_masks(
            loss_fn,
            placed,
            data=data,
            steps=n_steps,
            progress=progress,
            desc=f"{desc} stage {stage}/{opts.stages}",
            **solve_options(opts, setup.data[1].shape[0]),
        )
        masks = res.masks if mesh is None else sharding.gather(res.masks)
        masks = {k: jnp.where(pruned[k], 0.0, m) for k, m in masks.items()}
        if stage < opts.stages:
            level = request.sparsity * stage / opts.stages
            pruned = {
                k: ~_round(masks[k], w, stats, opts, level, "unstructured", group, pruned[k])
                for k, w in weights.items()
            }
    return res, masks, pruned


def _from_method(weights, x, stats, request, opts, setup, spec_kw, progress, desc, start):
    """``softmax.mask=NAME`` (``sparsegpt``, ``alps``, ...): that method's masks and weights (its
    authors' rules for the pattern), then the softmax-aware update from those weights; no mask
    solve."""
    method = registry.get(mask_source(request, opts))
    pruned, keep = {}, {}
    # The method's own comparison group and options (its section of the run).
    baseline = request.replace(group=None)
    options = request.options_of(method)
    for k, w in weights.items():
        pruned[k], keep[k] = method.prune_matrix(w, stats, baseline, options)
    new, update_info = _softmax_update(
        weights, keep, x, request, opts, setup, spec_kw, progress, desc, start=pruned
    )
    before, after = update_info["update_attention_before"], update_info["update_attention_after"]
    info = dict(
        lam=opts.lam,
        lam_search={},
        mask_mean=float(np.mean([float(jnp.mean(m)) for m in keep.values()])),
        initial_loss=before,
        final_loss=after,
        final_attention_term=after,
        solve_seconds=time.perf_counter() - start,
        **update_info,
    )
    return new, keep, info


@dataclasses.dataclass(frozen=True)
class SolveSetup:
    """What one layer's mask solve starts from (:func:`solve_setup`).

    Attributes:
      init: the start masks, shaped like the kernels (``None`` when the mask is not solved).
      data: ``(weights, x, target, scale, values, extras)``, the data of the solve's loss
        (``target`` is ``None`` for the row-blocked term, ``values`` the output form's ``(V, O)``
        or ``None``, ``extras`` the layer's :class:`~jaxprune.models.spec.QKExtras`).
      query_idx: the sampled query rows (a tuple) or ``None`` for all.
      n_entries: the regulariser's divisor (the mask entry count with ``normalize``, else 1).
    """

    init: dict
    data: tuple
    query_idx: tuple[int, ...] | None
    n_entries: float


def solve_setup(
    weights, x, stats, request, opts, spec_kw, value_weights=None, extras=None
) -> SolveSetup:
    """The start point and loss data of one layer's mask solve (arguments as in
    :func:`prune_qk_softmax`; ``spec_kw`` holds the layer's attention shape)."""
    extras = QKExtras() if extras is None else extras
    n = x.shape[1]
    query_idx = None
    if opts.query_rows and opts.query_rows < n:
        rng = np.random.default_rng(request.seed)
        query_idx = tuple(int(i) for i in np.sort(rng.choice(n, opts.query_rows, replace=False)))
    blocked = opts.row_block is not None
    if blocked and query_idx is not None:
        raise ValueError(
            "softmax.row_block and softmax.query_rows exclude each other: set one of them."
        )
    if blocked and opts.term == "output":
        raise ValueError(
            "softmax.term=output needs the direct attention term: unset softmax.row_block."
        )
    values = None
    if opts.term == "output":
        if value_weights is None:
            raise ValueError("term=output needs the layer's v and o kernels (value_weights).")
        values = head_values(value_weights["v"], value_weights["o"], x, extras=extras, **spec_kw)
    if blocked:
        # No (n, n) target is kept: each block recomputes its dense rows (memory linear in n).
        ones = {k: jnp.ones_like(w) for k, w in weights.items()}
        target = None
        dense_scale = _blocked_term(ones, weights, x, opts.row_block, spec_kw, extras)[1]
    else:
        target, dense_scale = _target(
            weights["q"], weights["k"], x, extras, query_idx=query_idx, **spec_kw
        )
    if values is not None:
        dense_scale = _output_scale(target, values)
    scale = dense_scale if opts.normalize else jnp.ones(())

    # With normalize, the attention term is relative to its dense value and the regulariser is
    # the mean of M^2, so lam trades the two at the same scale in every layer and model.
    n_entries = sum(w.size for w in weights.values()) if opts.normalize else 1.0

    group = mask_group(request)
    if mask_source(request, opts) != "solve":
        init = None  # no mask solve: the mask comes from elsewhere
    elif opts.init == "wanda":
        init = {k: wanda_ranks(w, stats, group) for k, w in weights.items()}
    else:
        init = {k: jnp.ones_like(w) for k, w in weights.items()}
    data = (weights, x, target, scale, values, extras)
    return SolveSetup(init, data, query_idx, n_entries)


def solve_options(opts, sequences: int, form: str = "mask") -> dict:
    """The :func:`jaxprune.solvers.solve_masks` options of the mask solve on ``sequences``
    attention-term sequences (``form`` as :class:`SequenceBatch`'s)."""
    options = dict(
        optimizer=opts.optimizer,
        step_size=opts.lr,
        schedule=opts.schedule,
        project=True,
        chunk_steps=min(opts.steps, 25),
        minibatch=sequence_batch(opts.batch, sequences, form, opts.optimizer),
    )
    if opts.optimizer == "gd" and opts.lr <= 0:
        options["step_size"] = None
    return options


def mask_group(request: Request) -> str:
    """The rounding's comparison group: the request's, or per matrix (the default)."""
    return request.group or "matrix"


def mask_source(request: Request, opts) -> str:
    """Where the mask comes from (:func:`resolve_mask` of the run's settings)."""
    return resolve_mask(opts.mask, request.pattern, opts.update)


def resolve_mask(mask: str, pattern: str, update: str) -> str:
    """``softmax.mask`` with ``auto`` resolved to the best measured choice on the full protocol:
    ALPS's mask and weights at N:M patterns with the softmax update (at 2:4 it beats the start
    from SparseGPT's mask, which beats the solved mask), the solved mask otherwise (at 50%
    unstructured it beats the starts from SparseGPT's and from ALPS's mask)."""
    if mask != "auto":
        return mask
    return "alps" if parse_nm(pattern) is not None and update == "softmax" else "solve"


def _round(mask, w, stats, opts, sparsity, pattern, group, pruned=None):
    """The keep-mask of one matrix: its relaxed ``mask`` scored by ``opts.score`` and rounded
    to ``sparsity`` in ``pattern`` and ``group``; entries in ``pruned`` go first."""
    # Projection leaves many entries exactly at 0 or 1; Wanda's score orders those ties
    # (a second sort key, so it never reorders distinct mask values).
    tiebreak = wanda_scores(w, stats) if opts.tiebreak else None
    scores = mask_scores(mask, w, opts.score)
    if pruned is not None:
        scores = jnp.where(pruned, -jnp.inf, scores)
    return binarize(scores, sparsity, pattern, group=group, tiebreak=tiebreak)


def round_masks(masks, weights, stats, request, opts, pruned=None) -> dict:
    """The boolean keep-masks of solved ``masks``, rounded to the request's sparsity, pattern
    and group; entries in ``pruned`` (staged rounding's fixed zeros) are pruned first."""
    group = mask_group(request)
    return {
        k: _round(
            masks[k],
            w,
            stats,
            opts,
            request.sparsity,
            request.pattern,
            group,
            None if pruned is None else pruned[k],
        )
        for k, w in weights.items()
    }


def apply_update(weights, keep, x, stats, request, opts, setup, spec_kw, *, progress, desc):
    """The kept kernels after the weight update of ``opts.update``: ``(new_kernels,
    update_info)``."""
    if opts.update == "softmax":
        return _softmax_update(weights, keep, x, request, opts, setup, spec_kw, progress, desc)
    if opts.update == "sparsegpt":
        return {k: sparsegpt_reconstruct(w, stats, keep[k]) for k, w in weights.items()}, {}
    return {k: jnp.where(keep[k], w, 0) for k, w in weights.items()}, {}


def round_and_update(
    masks, weights, x, stats, request, opts, setup, spec_kw, *, progress, desc, pruned=None
):
    """:func:`round_masks`, then :func:`apply_update`.

    Returns:
      ``(new_kernels, keep, update_info)``.
    """
    keep = round_masks(masks, weights, stats, request, opts, pruned)
    new, update_info = apply_update(
        weights, keep, x, stats, request, opts, setup, spec_kw, progress=progress, desc=desc
    )
    return new, keep, update_info


def _softmax_update(weights, keep, x, request, opts, setup, spec_kw, progress, desc, start=None):
    """:func:`reconstruct_qk_softmax` with the solve's dense target and the config's settings."""
    _, _, target, scale, values, extras = setup.data
    return reconstruct_qk_softmax(
        weights,
        keep,
        x,
        target=target,
        attn_scale=scale,
        query_idx=setup.query_idx,
        values=values,
        row_block=opts.row_block,
        start=start,
        extras=extras,
        steps=opts.update_steps,
        lr=opts.update_lr,
        batch=opts.batch,
        progress=progress,
        desc=f"{desc} update",
        **spec_kw,
    )


def reconstruct_qk_softmax(
    weights,
    keep,
    x,
    *,
    target,
    attn_scale,
    steps,
    lr,
    spec: AttentionSpec,
    query_idx=None,
    values=None,
    row_block=None,
    start=None,
    extras=None,
    batch=None,
    progress=True,
    desc="update",
):
    """Softmax-aware weight reconstruction: with the masks fixed, Adam on the kept q/k entries
    against the attention term (the non-linear counterpart of SparseGPT's update).

    The kept weights are ``W + s U`` with ``U`` starting at 0 and ``s`` the RMS of ``W`` (per
    matrix), so one relative learning rate fits every layer; pruned entries stay exactly 0.

    Args:
      weights: dense kernels ``{"q": (d, h*dh), "k": (d, g*dh)}``.
      keep: boolean keep-masks, same keys and shapes.
      x: calibration attention inputs ``(b, n, d)``.
      target: the dense attention probabilities on ``x`` (as the mask solve used them).
      attn_scale: the attention term's divisor (its dense scale with ``normalize``).
      steps: Adam steps.
      lr: Adam learning rate on ``U`` (relative to the weight RMS).
      spec, query_idx, values: the layer's attention, the sampled query rows and the output
        form's values, as in :func:`jaxprune.objective.qk_pruning_loss`.
      row_block: compute the attention term over blocks of this many query rows
        (:func:`jaxprune.objective.qk_attention_term_blocked`; ``target`` is then unused).
      extras: the layer's q/k/v biases and q/k norm multipliers (``None``: none).
      start: kernels the update starts from (default ``weights`` under ``keep``; SparseGPT's
        updated kernels with ``softmax.mask=sparsegpt``); the target stays the dense one.
      batch: sequences each step reads (:class:`SequenceBatch`; ``None``: all of them).
      progress, desc: the solver's progress bar.

    Returns:
      ``(new_kernels, info)`` with the attention term before and after the update. An update
      whose attention term ends above its start (or is not finite) is rolled back: the kernels
      are ``start`` under ``keep``, ``update_attention_after`` equals the start's term, and
      ``update_attention_rejected`` holds the term the update reached.
    """
    spec_kw = dict(spec=spec)
    extras = QKExtras() if extras is None else extras
    keep_f = {k: v.astype(weights[k].dtype) for k, v in keep.items()}
    rms = {k: jnp.sqrt(jnp.mean(w * w)) for k, w in weights.items()}
    start = weights if start is None else start
    # Several devices: split by key/value group like the mask solve (jaxprune.sharding).
    mesh = sharding.solve_mesh(spec.n_kv_heads)
    place = partial(sharding.place, mesh)
    data = (
        place(start, "kernel"),
        place(keep_f, "kernel"),
        place(rms, "scalar"),
        place(x, "inputs"),
        place(target, "heads"),
        place(attn_scale, "scalar"),
        place(values, "heads"),
        place(weights, "kernel"),
        place(extras, "scalar"),
    )
    res = solve_masks(
        _update_loss(query_idx, tuple(sorted(spec_kw.items())), row_block),
        place({k: jnp.zeros_like(w) for k, w in weights.items()}, "kernel"),
        donate_init=True,
        steps=steps,
        data=data,
        optimizer="adam",
        step_size=lr,
        project=False,
        chunk_steps=min(steps, 25),
        minibatch=sequence_batch(batch, x.shape[0], "update"),
        progress=progress,
        desc=desc,
    )
    delta = res.masks if mesh is None else sharding.gather(res.masks)
    # The start's term on every sequence (the history's first is the first batch's).
    before, after = res.initial_loss, float(res.final_loss)
    if after <= before:
        new = {k: jnp.where(keep[k], w + rms[k] * delta[k], 0) for k, w in start.items()}
        return new, dict(update_attention_before=before, update_attention_after=after)
    # The update made the attention term worse (a step size far too large, or a non-finite
    # loss): keep the weights it started from, and say so (update_attention_rejected).
    new = {k: jnp.where(keep[k], w, 0) for k, w in start.items()}
    return new, dict(
        update_attention_before=before,
        update_attention_after=before,
        update_attention_rejected=after,
    )

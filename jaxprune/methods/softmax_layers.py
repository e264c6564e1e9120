"""The softmax-aware method on several layers at once (``layer_inputs: dense``).

When every layer is calibrated on the dense model's inputs, the layers' mask solves are
independent: their losses are stacked on a leading layer axis (``vmap`` of the one-layer loss)
and summed, so one solve moves every layer's masks. The gradient of the sum with respect to a
layer's masks is that layer's own gradient, and Adam and SGD act entry by entry, so each layer
ends where its own solve would (the same rounded masks, tested). Plain gradient descent
(``optimizer: gd``) is not batched: its step-size guard and derived step look at the whole loss,
so its layers are solved one after another instead.

The stack is split over the ``"layers"`` axis of a device mesh (:mod:`jaxprune.sharding`), padded
with copies of its last layer to a multiple of that axis, and cut into batches whose attention
probabilities fit a memory budget.
"""

from __future__ import annotations

import functools
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import sharding
from jaxprune.methods.base import Request
from jaxprune.methods.softmax_solve import (
    mask_loss,
    mask_source,
    prune_qk_softmax,
    round_and_update,
    solve_options,
    solve_setup,
)
from jaxprune.models.spec import QKExtras
from jaxprune.solvers import solve_masks

# Bytes of attention probabilities of one layer that a step keeps alive, as a multiple of one
# (h, b, r, n) array: the target, the pruned probabilities and their backward-pass companions.
_PROBS_COPIES = 8
# Memory budget of a batch where the device does not report its size (CPU).
_HOST_BUDGET_BYTES = 4 << 30


@functools.cache
def _stacked_loss(*, n_entries, query_idx, row_block, shape):
    """``(masks, (weights, x, target, scale, values, extras, lam)) -> (loss, aux)``, every array
    with a
    leading layer axis: the one-layer loss ``vmap``-ed over layers and summed (one object per
    setting, so every batch reuses the solver's compilations). ``per_layer`` gives the unsummed
    losses."""
    kw = dict(
        n_entries=n_entries,
        query_idx=None if query_idx is None else jnp.asarray(query_idx),
        row_block=row_block,
        spec_kw=dict(shape),
    )
    per_layer = jax.vmap(lambda m, data: mask_loss(m, *data, **kw))

    def loss_fn(m, data):
        losses, aux = per_layer(m, data)
        return jnp.sum(losses), {"attention": jnp.sum(aux["attention"])}

    return loss_fn, jax.jit(per_layer)


def layers_per_batch(setup, n_heads: int, row_block: int | None, devices: int) -> int:
    """How many layers one batch may hold: the budget (half the device memory where the device
    reports it, else 4 GiB) over a layer's estimated bytes, times the devices the batch is split
    over."""
    x = setup.data[1]
    b, n, _ = x.shape
    rows = row_block or (len(setup.query_idx) if setup.query_idx else n)
    per_layer = _PROBS_COPIES * n_heads * b * rows * n * x.dtype.itemsize
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    budget = limit // 2 if limit else _HOST_BUDGET_BYTES
    return max(1, budget // per_layer) * devices


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def prune_qk_softmax_layers(
    weights,
    xs,
    stats,
    request: Request,
    opts,
    *,
    spec,
    value_weights=None,
    extras=None,
    devices=None,
    max_layers=None,
    progress=True,
    desc="softmax",
):
    """Optimises and rounds the q/k masks of several independent layers together.

    Args:
      weights: one ``{"q": (d, h*dh), "k": (d, g*dh)}`` dict of dense kernels per layer.
      xs: each layer's calibration attention inputs ``(b, n, d)`` (the same shape for all).
      stats: each layer's ``InputStats`` of its attention input.
      request, opts: the run's request and its ``softmax`` section.
      spec: the layers' attention (the same for all).
      value_weights: one ``{"v", "o"}`` dict of dense kernels per layer (``term="output"``).
      extras: one :class:`~jaxprune.models.spec.QKExtras` per layer (``None``: none).
      devices: the devices to spread the layers over (default :func:`sharding.solve_devices`).
      max_layers: most layers per batch (default :func:`layers_per_batch`, from memory).
      progress, desc: the solver's progress bar.

    Returns:
      One ``(new_kernels, keep, info)`` per layer, as :func:`prune_qk_softmax` returns. In
      ``info``, ``initial_loss``, ``final_loss`` and ``final_attention_term`` are the layer's own,
      at the start and the returned masks; ``solve_seconds`` is the batch's time over its layers
      and ``batch_layers`` the number of layers solved together.
    """
    spec_kw = dict(spec=spec)
    values = value_weights or [None] * len(weights)
    extras = extras or [QKExtras()] * len(weights)
    layers = list(zip(weights, xs, stats, values, extras, strict=True))
    one = partial(
        prune_qk_softmax, request=request, opts=opts, progress=progress, desc=desc, **spec_kw
    )
    if (
        opts.optimizer == "gd"
        or opts.stages > 1  # staged rounding re-solves each layer on its own fixed zeros
        or mask_source(request, opts) != "solve"
        or len({x.shape for x in xs}) > 1
    ):
        return [one(w, x, s, value_weights=v, extras=e) for w, x, s, v, e in layers]
    setups = [solve_setup(w, x, s, request, opts, spec_kw, v, e) for w, x, s, v, e in layers]
    devices = sharding.solve_devices() if devices is None else list(devices)
    mesh = sharding.solve_mesh(spec.n_kv_heads, len(setups), devices)
    split = 1 if mesh is None else mesh.shape[sharding.LAYERS]
    size = max_layers or layers_per_batch(setups[0], spec.n_heads, opts.row_block, split)
    size = max(split, size // split * split)
    out = []
    for lo in range(0, len(setups), size):
        batch = setups[lo : lo + size]
        solved = _solve_batch(
            batch, request, opts, spec_kw, mesh, progress, f"{desc} x{len(batch)}"
        )
        for i, (masks, info) in enumerate(solved):
            w, x, s = weights[lo + i], xs[lo + i], stats[lo + i]
            new, keep, update_info = round_and_update(
                masks, w, x, s, request, opts, batch[i], spec_kw, progress=progress, desc=desc
            )
            out.append((new, keep, info | update_info))
    return out


def _solve_batch(setups, request, opts, spec_kw, mesh, progress, desc):
    """The stacked solve of a batch of layers: ``[(masks, info)]`` per layer."""
    start = time.perf_counter()
    n = len(setups)
    split = 1 if mesh is None else mesh.shape[sharding.LAYERS]
    # Copies of the last layer fill the stack to a multiple of the layer axis; dropped after.
    padded = setups + [setups[-1]] * (-n % split)
    loss_fn, per_layer = _stacked_loss(
        n_entries=padded[0].n_entries,
        query_idx=padded[0].query_idx,
        row_block=opts.row_block,
        shape=tuple(sorted(spec_kw.items())),
    )
    init = _stack([s.init for s in padded])
    weights, x, target, scale, values, extras = (
        _stack(part) if part[0] is not None else None
        for part in zip(*(s.data for s in padded), strict=True)
    )

    def solve(lams, steps, label):
        lam = jnp.asarray(lams, scale.dtype)
        m, data = sharding.place_qk_solve(
            mesh, init, (weights, x, target, scale, values, extras, lam), stacked=True
        )
        res = solve_masks(
            loss_fn,
            m,
            data=data,
            steps=steps,
            progress=progress,
            desc=label,
            **solve_options(opts, x.shape[1], "layers"),
        )
        return res, m, data

    def mask_means(masks):
        means = [np.asarray(jnp.mean(v, axis=tuple(range(1, v.ndim)))) for v in masks.values()]
        return np.mean(means, axis=0)

    lams, searched = np.full(len(padded), opts.lam), [{} for _ in padded]
    if opts.lam_search:
        for cand in opts.lam_grid:
            res, _, _ = solve(np.full(len(padded), cand), opts.search_steps, f"{desc} lam={cand:g}")
            for i, mean in enumerate(mask_means(res.masks)):
                searched[i][cand] = float(mean)
        want = request.keep_fraction
        lams = np.array([min(s, key=lambda c, s=s: abs(s[c] - want)) for s in searched])
    res, placed_init, data = solve(lams, opts.steps, desc)
    first = per_layer(placed_init, data)[0]
    last, last_aux = per_layer(res.masks, data)
    masks = res.masks if mesh is None else sharding.gather(res.masks)
    means = mask_means(masks)
    seconds = (time.perf_counter() - start) / n
    out = []
    for i in range(n):
        info = dict(
            lam=float(lams[i]),
            lam_search=searched[i],
            mask_mean=float(means[i]),
            initial_loss=float(first[i]),
            final_loss=float(last[i]),
            final_attention_term=float(last_aux["attention"][i]),
            solve_seconds=seconds,
            batch_layers=n,
        )
        out.append(({k: v[i] for k, v in masks.items()}, info))
    return out

"""Prune a model layer by layer (PROTOCOL.md): calibrate layer l on the inputs that the already
pruned layers 0..l-1 produce, prune the chosen projections, move on. With ``layer_inputs: dense``
every layer is calibrated on the dense model's inputs instead (one dense forward captures them
all), and the softmax-aware solves of the layers run together (:mod:`jaxprune.softmax_layers`).

Memory is bounded by one layer's activations for the calibration set: the residual stream of
every calibration chunk is kept (``N x T x d``), and the wider captures of a layer (``o_in``,
``down_in``) exist for one chunk at a time, folded into ``InputStats`` as they come.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxprune import layerwise
from jaxprune.baselines import init_stats, prune_matrix, update_stats
from jaxprune.errors import ModelError, ResumeError
from jaxprune.masks import parse_nm
from jaxprune.model import Llama, LlamaConfig, projection_kernels
from jaxprune.prune_config import TARGETS, PruneConfig
from jaxprune.softmax_layers import prune_qk_softmax_layers
from jaxprune.softmax_prune import attention_error, layer_errors, prune_qk_softmax
from jaxprune.solvers import SolveDivergedError


def _input_dims(c: LlamaConfig) -> dict[str, int]:
    # Inputs of each projection (the axis N:M groups and SparseGPT blocks run along).
    hidden, heads = c.hidden_size, c.num_heads * c.head_dim
    dims = dict.fromkeys(("q", "k", "v", "gate", "up"), hidden)
    return dims | {"o": heads, "down": c.intermediate_size}


def check_model(cfg: PruneConfig, c: LlamaConfig, model_name: str | None = None) -> None:
    """Checks the settings against the loaded model's shapes, before any calibration.

    Raises:
      ModelError: a layer index beyond the model, an N:M pattern whose M does not divide a pruned
        matrix's inputs, or a SparseGPT block size that splits N:M groups.
    """
    name = model_name or cfg.model
    if cfg.layers is not None and max(cfg.layers) >= c.num_layers:
        raise ModelError(
            f"layers={list(cfg.layers)}: model {name} has {c.num_layers} layers, indices 0 to "
            f"{c.num_layers - 1}; give indices in that range."
        )
    nm = parse_nm(cfg.pattern)
    if nm is None or cfg.method == "dense":
        return
    m = nm[1]
    dims = _input_dims(c)
    for target in TARGETS[cfg.targets]:
        if dims[target] % m:
            good = [
                f"{k}:{2 * k}" for k in (1, 2, 4, 8) if all(d % (2 * k) == 0 for d in dims.values())
            ]
            raise ModelError(
                f"pattern={cfg.pattern}: the {target} projections of {name} take {dims[target]} "
                f"inputs, which do not split into groups of {m}; choose an M dividing "
                f"{dims[target]} (such as {' or '.join(good[:2]) or '1:1'})."
            )
    uses_sparsegpt = cfg.method == "sparsegpt" or (
        cfg.method == "softmax"
        and cfg.softmax.other_method == "sparsegpt"
        and set(TARGETS[cfg.targets]) - {"q", "k"}
    )
    if uses_sparsegpt and cfg.sparsegpt.blocksize % m:
        small = [t for t in TARGETS[cfg.targets] if cfg.sparsegpt.blocksize < dims[t]]
        if small:
            raise ModelError(
                f"sparsegpt.blocksize={cfg.sparsegpt.blocksize} is not a multiple of M={m} "
                f"(pattern {cfg.pattern}); SparseGPT's blocks would split N:M groups: use a "
                f"multiple of {m}."
            )


def _solve_warnings(info: dict, cfg: PruneConfig, li: int) -> list[str]:
    """Warnings about a softmax-aware solve that did not do its job: its loss ended above its
    start, or its relaxed mask collapsed towards zero (rounding then keeps arbitrary entries)."""
    out = []
    if info["final_loss"] > info["initial_loss"]:
        out.append(
            f"layer {li}: the softmax-aware solve ended at loss {info['final_loss']:.4g}, above "
            f"its start {info['initial_loss']:.4g}; lower --softmax.lr (now {cfg.softmax.lr:g}) "
            "or try --softmax.optimizer gd --softmax.lr 0 (derived step size, monotone)."
        )
    keep = 1.0 - (cfg.sparsity_or_none if cfg.sparsity_or_none is not None else _nm_pruned(cfg))
    if info["mask_mean"] < 0.1 * keep:
        out.append(
            f"layer {li}: the relaxed mask collapsed (mean {info['mask_mean']:.3g} for a kept "
            f"fraction {keep:.3g}), so its rounding is near arbitrary; lower --softmax.lam (now "
            f"{info.get('lam', cfg.softmax.lam):g}) or --softmax.lr (now {cfg.softmax.lr:g})."
        )
    return out


def _nm_pruned(cfg: PruneConfig) -> float:
    n, m = parse_nm(cfg.pattern)
    return 1.0 - n / m


def _diverged(err: SolveDivergedError, cfg: PruneConfig, li: int) -> SolveDivergedError:
    # The solver's advice names its own arguments; the user sets them with --softmax.lr and
    # --softmax.optimizer.
    what = re.split(r"[;.]\s+[Uu]se a smaller step_size", str(err))[0]
    return SolveDivergedError(
        f"layer {li}: {what}; use a smaller --softmax.lr than {cfg.softmax.lr:g} (optimizer "
        f"{cfg.softmax.optimizer}), or --softmax.optimizer gd --softmax.lr 0 for the derived step "
        "size, which cannot diverge."
    )


def calibration_chunks(tokens, micro_batch: int) -> list[np.ndarray]:
    """``(N, T)`` windows -> chunks of ``micro_batch`` rows; a list of 1-D sequences -> one chunk
    each (the paper protocol's sequences differ in length)."""
    if isinstance(tokens, np.ndarray) and tokens.ndim == 2:
        return [tokens[i : i + micro_batch] for i in range(0, len(tokens), micro_batch)]
    return [np.asarray(t)[None] for t in tokens]


def _peak_memory_bytes() -> dict[str, int]:
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def prune_model(
    model: Llama,
    calib_chunks: list[np.ndarray],
    heldout_chunks: list[np.ndarray],
    cfg: PruneConfig,
    store=None,
) -> dict[str, Any]:
    """Prunes ``model`` in place, layer by layer.

    Args:
      model: the dense model (its kernels are overwritten).
      calib_chunks: calibration token chunks ``(b, t)``.
      heldout_chunks: held-out token chunks for the per-layer attention error (may be empty).
      cfg: the run's settings.
      store: optional ``jaxprune.resume.LayerStore``: every pruned layer is saved there as it
        finishes, and the layers it already holds are restored instead of pruned again (their
        outputs are recomputed, so the remaining layers see the bits of an uninterrupted run).

    Returns:
      ``{"masks": {layer: {name: bool array}}, "layers": [per-layer facts], "seconds": ...,
      "resumed_layers": [restored layer indices]}``.
    """
    c = model.config
    if cfg.method == "dense":
        return {"masks": {}, "layers": [], "seconds": 0.0, **_peak_memory_bytes()}
    targets = TARGETS[cfg.targets]
    shape_kw = dict(
        n_heads=c.num_heads,
        n_kv_heads=c.num_kv_heads,
        rope_theta=c.rope_theta,
        rope_scaling=c.rope_scaling,
    )
    start = time.perf_counter()
    hs = layerwise.embed_chunks(model, calib_chunks)
    longest = max(h.shape[1] for h in hs)
    held = layerwise.embed_chunks(model, heldout_chunks)
    ropes = {}

    def rope(t):
        if t not in ropes:
            ropes[t] = model.rope(t)
        return ropes[t]

    update = jax.jit(update_stats)
    masks, layers = {}, []
    pruned = [
        li for li in range(c.num_layers) if targets and (cfg.layers is None or li in cfg.layers)
    ]
    done = set(store.saved_layers()) if store is not None else set()
    if done and sorted(done) != pruned[: len(done)]:
        raise ResumeError(
            f"the saved layers {sorted(done)} in {store.directory} are not the first of the "
            f"layers this run prunes ({pruned}); the run folder is mixed up, start a new run."
        )
    names = tuple(sorted({layerwise.INPUT_OF[t] for t in targets}))
    calibrated, solved = {}, {}
    if cfg.calibration.layer_inputs == "dense":
        todo = [li for li in pruned if li not in done]
        calibrated, solved = _independent_layers(
            model, hs, rope, todo, names, cfg, longest, update, shape_kw
        )
        hs = []  # no layer needs the pruned model's calibration outputs
    bar = tqdm(
        range(c.num_layers),
        desc=f"prune {cfg.method}",
        unit="layer",
        disable=None if cfg.progress else True,
    )
    for li in bar:
        layer = model.layers[li]
        graphdef, state = nnx.split(layer)
        kernels = projection_kernels(layer)
        if li in done:
            like = {
                "masks": {n: jax.ShapeDtypeStruct(kernels[n][...].shape, bool) for n in targets},
                "kernels": {n: kernels[n][...] for n in targets},
            }
            masks[li], saved, info = store.restore(li, like)
            for name, w in saved.items():
                kernels[name][...] = jnp.asarray(w)
            layers.append(info)
            # Later layers need this layer's outputs unless they are all restored too.
            if all(later in done for later in range(li + 1, c.num_layers)):
                continue
            graphdef, state = nnx.split(layer)
            hs = [layerwise.apply_layer(graphdef, state, h, *rope(h.shape[1])) for h in hs]
            held = [layerwise.apply_layer(graphdef, state, h, *rope(h.shape[1])) for h in held]
            continue
        dense_qk = {k: jnp.asarray(kernels[k][...]) for k in ("q", "k")}
        dense_attn = dense_qk | {k: jnp.asarray(kernels[k][...]) for k in ("v", "o")}
        info: dict[str, Any] = {"layer": li}
        if li in pruned:
            stats, soft_x = calibrated.pop(li, None) or _calibrate(
                graphdef, state, hs, rope, names, cfg, longest, update
            )
            new = {}
            rest = list(targets)
            if cfg.method == "softmax":
                x = _stack_prefixes(soft_x, cfg.softmax.seq_len)
                try:
                    # Independent layers were solved together (before this loop).
                    qk_new, keep, soft_info = solved.pop(li, None) or prune_qk_softmax(
                        dense_qk,
                        x,
                        stats["attn_in"],
                        cfg,
                        value_weights={k: jnp.asarray(kernels[k][...]) for k in ("v", "o")},
                        progress=cfg.progress,
                        desc=f"layer {li} softmax",
                        **shape_kw,
                    )
                except SolveDivergedError as err:
                    raise _diverged(err, cfg, li) from err
                new.update(qk_new)
                masks[li] = dict(keep)
                info |= soft_info
                info["warnings"] = _solve_warnings(soft_info, cfg, li)
                for warning in info["warnings"]:
                    tqdm.write(f"jaxprune: warning: {warning}", file=sys.stderr)
                info["softmax_tokens"] = list(x.shape[:2])
                info["calib_attention_error"] = float(
                    attention_error(dense_qk["q"], dense_qk["k"], new["q"], new["k"], x, **shape_kw)
                )
                rest = [t for t in targets if t not in ("q", "k")]
            method = cfg.softmax.other_method if cfg.method == "softmax" else cfg.method
            opts = (
                {"blocksize": cfg.sparsegpt.blocksize, "percdamp": cfg.sparsegpt.percdamp}
                if method == "sparsegpt"
                else {}
            )
            # The other matrices of the softmax-aware method use their method's own group.
            group = cfg.group if method == cfg.method else None
            for name in rest:
                w = jnp.asarray(kernels[name][...])
                new[name], keep = prune_matrix(
                    method,
                    w,
                    stats[layerwise.INPUT_OF[name]],
                    sparsity=cfg.sparsity_or_none,
                    pattern=cfg.pattern,
                    group=group,
                    **opts,
                )
                masks.setdefault(li, {})[name] = keep
            for name, w in new.items():
                kernels[name][...] = w
            graphdef, state = nnx.split(layer)
            info["sparsity"] = {n: float(1.0 - jnp.mean(masks[li][n])) for n in targets}
        if held:
            now = {k: kernels[k][...] for k in ("q", "k", "v", "o")}
            errs = []
            for h in held:
                x = layerwise.capture_layer(graphdef, state, h, *rope(h.shape[1]), ("attn_in",))[
                    "attn_in"
                ]
                errs.append([float(e) for e in layer_errors(dense_attn, now, x, **shape_kw)])
            info["heldout_attention_error"], info["heldout_output_error"] = (
                float(e) for e in np.mean(errs, axis=0)
            )
        if store is not None and li in pruned:
            store.save(li, masks[li], {n: kernels[n][...] for n in targets}, info)
        hs = [layerwise.apply_layer(graphdef, state, h, *rope(h.shape[1])) for h in hs]
        held = [layerwise.apply_layer(graphdef, state, h, *rope(h.shape[1])) for h in held]
        layers.append(info)
    bar.close()
    jax.block_until_ready(hs)
    return {
        "masks": masks,
        "layers": layers,
        "seconds": time.perf_counter() - start,
        "resumed_layers": sorted(done),
        **_peak_memory_bytes(),
    }


def _calibrate(graphdef, state, hs, rope, names, cfg, longest, update):
    """A layer's input statistics (``{name: InputStats}``) and its softmax-aware attention
    inputs (a list of ``(b, t, d)`` prefixes) from the calibration chunks' inputs ``hs``."""
    stats = {n: None for n in names}
    soft_x, soft_count = [], 0
    for h in hs:
        caps = layerwise.capture_layer(graphdef, state, h, *rope(h.shape[1]), names)
        for n in names:
            stats[n] = update(
                stats[n] if stats[n] is not None else init_stats(caps[n].shape[-1]), caps[n]
            )
        want = cfg.softmax.samples - soft_count
        if cfg.method == "softmax" and want > 0 and h.shape[1] >= min(cfg.softmax.seq_len, longest):
            take = caps["attn_in"][:want, : cfg.softmax.seq_len]
            soft_x.append(take)
            soft_count += take.shape[0]
    return stats, soft_x


def _independent_layers(model, hs, rope, todo, names, cfg, longest, update, shape_kw):
    """``layer_inputs: dense``: one forward of the dense model captures the calibration of every
    layer in ``todo``, and the softmax-aware q/k solves of those layers run together
    (:func:`jaxprune.softmax_layers.prune_qk_softmax_layers`).

    Returns:
      ``({layer: (stats, softmax inputs)}, {layer: (new q/k kernels, keep, info)})``, the second
      empty for the baselines.
    """
    calibrated = {}
    for li in range(max(todo, default=-1) + 1):
        graphdef, state = nnx.split(model.layers[li])
        if li in todo:
            calibrated[li] = _calibrate(graphdef, state, hs, rope, names, cfg, longest, update)
        if li < max(todo):
            hs = [layerwise.apply_layer(graphdef, state, h, *rope(h.shape[1])) for h in hs]
    if cfg.method != "softmax" or not todo:
        return calibrated, {}
    kernels = [projection_kernels(model.layers[li]) for li in todo]
    try:
        results = prune_qk_softmax_layers(
            [{k: jnp.asarray(kern[k][...]) for k in ("q", "k")} for kern in kernels],
            [_stack_prefixes(calibrated[li][1], cfg.softmax.seq_len) for li in todo],
            [calibrated[li][0]["attn_in"] for li in todo],
            cfg,
            value_weights=[{k: jnp.asarray(kern[k][...]) for k in ("v", "o")} for kern in kernels],
            progress=cfg.progress,
            desc=f"layers {todo[0]}-{todo[-1]} softmax",
            **shape_kw,
        )
    except SolveDivergedError as err:
        raise _diverged(err, cfg, f"{todo[0]}-{todo[-1]} (solved together)") from err
    return calibrated, dict(zip(todo, results, strict=True))


def _stack_prefixes(xs: list[jax.Array], seq_len: int) -> jax.Array:
    """Stacks calibration prefixes of ``seq_len`` tokens. Sequences shorter than that (paper
    protocol) are left out; if every one is shorter, the longest ones' common length is used."""
    t = seq_len if any(x.shape[1] >= seq_len for x in xs) else max(x.shape[1] for x in xs)
    return jnp.concatenate([x[:, :t] for x in xs if x.shape[1] >= t], axis=0)

"""Prune a model layer by layer (PROTOCOL.md): calibrate layer l on the inputs that the already
pruned layers 0..l-1 produce, hand it to the run's method, write the result back, move on. With
``layer_inputs: dense`` every layer is calibrated on the dense model's inputs instead (one dense
forward captures them all), and a method that can prune independent layers together
(``Method.prune_layers``) gets them all at once.

The loop knows no method: it finds ``cfg.method`` in :mod:`jaxprune.methods.registry`, gives it
each layer as a :class:`jaxprune.methods.base.Layer` and the run as a
:class:`jaxprune.methods.base.Request` with the method's own config section, and collects its
:class:`jaxprune.methods.base.Pruned` weights, masks and facts.

Memory is bounded by one layer's activations for the calibration set: the residual stream of
every calibration chunk is kept (``N x T x d``), and the wider captures of a layer (``o_in``,
``down_in``) exist for one chunk at a time, folded into ``InputStats`` as they come.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxprune import layerwise
from jaxprune.errors import ModelError, ResumeError
from jaxprune.masks import parse_nm
from jaxprune.methods import registry
from jaxprune.methods.base import Layer, Request
from jaxprune.methods.stats import init_stats, update_stats
from jaxprune.models.llama import projection_kernels
from jaxprune.objective import layer_errors
from jaxprune.prune_config import TARGETS, PruneConfig


def request_for(cfg: PruneConfig) -> Request:
    """What the run asks of its method (the same for every layer)."""
    return Request(
        targets=TARGETS[cfg.targets],
        sparsity=cfg.sparsity_or_none,
        pattern=cfg.pattern,
        group=cfg.group,
        seed=cfg.seed,
        progress=cfg.progress,
        sections={m.name: getattr(cfg, m.name) for m in registry.methods() if m.section},
    )


def check_model(cfg: PruneConfig, c, model_name: str | None = None) -> None:
    """Checks the settings against the loaded model's shapes, before any calibration.

    Raises:
      ModelError: a layer index beyond the model, an N:M pattern whose M does not divide a pruned
        matrix's inputs, or a method's own setting that does not fit them (such as a SparseGPT
        block size that splits N:M groups).
    """
    name = model_name or cfg.model
    if cfg.layers is not None and max(cfg.layers) >= c.num_layers:
        raise ModelError(
            f"layers={list(cfg.layers)}: model {name} has {c.num_layers} layers, indices 0 to "
            f"{c.num_layers - 1}; give indices in that range."
        )
    method = registry.get(cfg.method)
    nm = parse_nm(cfg.pattern)
    if nm is None or not method.prunes:
        return
    m = nm[1]
    dims = c.projection_inputs()
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
    if method.check is not None:
        request = request_for(cfg)
        try:
            method.check(request, request.options_of(method), dims)
        except ValueError as err:
            raise ModelError(str(err)) from err


def calibration_chunks(tokens, micro_batch: int) -> list[np.ndarray]:
    """``(N, T)`` windows -> chunks of ``micro_batch`` rows; a list of 1-D sequences -> one chunk
    each (the paper protocol's sequences differ in length)."""
    if isinstance(tokens, np.ndarray) and tokens.ndim == 2:
        return [tokens[i : i + micro_batch] for i in range(0, len(tokens), micro_batch)]
    return [np.asarray(t)[None] for t in tokens]


def _peak_memory_bytes() -> dict[str, int]:
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def prune_model(
    model,
    calib_chunks: list[np.ndarray],
    heldout_chunks: list[np.ndarray],
    cfg: PruneConfig,
    store=None,
    layers=None,
    keep_masks: bool = True,
) -> dict[str, Any]:
    """Prunes ``model`` in place, layer by layer, with the method ``cfg.method`` names.

    Args:
      model: the dense model (its kernels are overwritten); with ``layers`` a
        :class:`jaxprune.streaming.StreamedLayers`, that source's ``model``, whose decoder layers
        hold weights only while open.
      calib_chunks: calibration token chunks ``(b, t)``.
      heldout_chunks: held-out token chunks for the per-layer attention error (may be empty).
      cfg: the run's settings.
      store: optional ``jaxprune.resume.LayerStore``: every pruned layer is saved there as it
        finishes, and the layers it already holds are restored instead of pruned again (their
        outputs are recomputed, so the remaining layers see the bits of an uninterrupted run).
      layers: where each decoder layer comes from (default: ``model``'s own,
        :class:`jaxprune.layerwise.ModelLayers`); each is opened when its turn comes and closed
        when the next layer's inputs are computed.
      keep_masks: return every layer's masks; without, each layer's masks leave memory once
        ``store`` holds them (the report keeps their sparsity).

    Returns:
      ``{"masks": {layer: {name: bool array}}, "sparsity": {"layer.name": pruned fraction},
      "layers": [per-layer facts], "seconds": ..., "resumed_layers": [restored layer
      indices]}``.
    """
    c = model.config
    layers = layers if layers is not None else layerwise.ModelLayers(model)
    method = registry.get(cfg.method)
    if not method.prunes:
        return {"masks": {}, "sparsity": {}, "layers": [], "seconds": 0.0, **_peak_memory_bytes()}
    if cfg.calibration.layer_inputs == "dense" and not layers.in_memory:
        raise ModelError(
            "calibration.layer_inputs=dense calibrates every layer at once, which needs the whole "
            "model in memory; use layer_inputs sequential, or stream false."
        )
    request = request_for(cfg).replace(calibration_sequences=sum(len(c) for c in calib_chunks))
    options = request.options_of(method)
    targets = request.targets
    start = time.perf_counter()
    hs = layers.embed(calib_chunks)
    held = layers.embed(heldout_chunks)
    contexts = {}

    def context(li, t):
        # What layer li takes beside its input for t tokens (its RoPE tables), made once.
        if (li, t) not in contexts:
            contexts[li, t] = model.layer_context(li, t)
        return contexts[li, t]

    calib = _Calibration(
        context=context,
        names=tuple(sorted({layerwise.INPUT_OF[t] for t in targets})),
        attention_inputs=method.attention_inputs(options),
        longest=max(h.shape[1] for h in hs),
    )
    masks, facts, sparsity = {}, [], {}
    pruned = [
        li for li in range(c.num_layers) if targets and (cfg.layers is None or li in cfg.layers)
    ]
    done = set(store.saved_layers()) if store is not None else set()
    if done and sorted(done) != pruned[: len(done)]:
        raise ResumeError(
            f"the saved layers {sorted(done)} in {store.directory} are not the first of the "
            f"layers this run prunes ({pruned}); the run folder is mixed up, start a new run."
        )
    calibrated, solved = {}, {}
    if cfg.calibration.layer_inputs == "dense":
        # Every layer is calibrated on the dense model's inputs (one forward), so the layers are
        # independent: a method that can prune them together does so here.
        todo = [li for li in pruned if li not in done]
        calibrated = _dense_calibration(model, hs, todo, calib)
        hs = []  # no layer needs the pruned model's calibration outputs
        if method.prune_layers is not None and todo:
            views = [_layer_view(model, li, calibrated.pop(li), targets) for li in todo]
            solved = dict(zip(todo, method.prune_layers(views, request, options), strict=True))
    bar = tqdm(
        range(c.num_layers),
        desc=f"prune {cfg.method}",
        unit="layer",
        disable=None if cfg.progress else True,
    )
    for li in bar:
        layer = layers.open(li)
        graphdef, state = nnx.split(layer)
        kernels = projection_kernels(layer)
        if li in done:
            like = {
                "masks": {n: jax.ShapeDtypeStruct(kernels[n][...].shape, bool) for n in targets},
                "kernels": {n: kernels[n][...] for n in targets},
            }
            masks[li], saved, info = store.restore(li, like)
            sparsity |= _sparsity(li, masks, keep_masks)
            for name, w in saved.items():
                kernels[name][...] = jnp.asarray(w)
            facts.append(info)
            # Later layers need this layer's outputs unless they are all restored too.
            if all(later in done for later in range(li + 1, c.num_layers)):
                layers.close(li)
                continue
            graphdef, state = nnx.split(layer)
            hs = [layerwise.apply_layer(graphdef, state, h, *context(li, h.shape[1])) for h in hs]
            held = [
                layerwise.apply_layer(graphdef, state, h, *context(li, h.shape[1])) for h in held
            ]
            layers.close(li, (hs, held))
            continue
        # The dense attention kernels, for the held-out error only (not copied without it).
        dense_attn = {k: _f32(kernels[k][...]) for k in ("q", "k", "v", "o")} if held else None
        info: dict[str, Any] = {"layer": li}
        if li in pruned:
            result = solved.pop(li, None)
            if result is None:
                found = calibrated.pop(li, None) or _calibrate(li, graphdef, state, hs, calib)
                result = method.prune(_layer_view(model, li, found, targets), request, options)
            for warning in result.facts.get("warnings", []):
                tqdm.write(f"jaxprune: warning: {warning}", file=sys.stderr)
            info |= result.facts
            masks[li] = dict(result.masks)
            for name, w in result.weights.items():
                # Methods return float32; the model keeps its own dtype.
                kernels[name][...] = jnp.asarray(w, kernels[name][...].dtype)
            graphdef, state = nnx.split(layer)
            info["sparsity"] = {n: float(1.0 - jnp.mean(masks[li][n])) for n in targets}
        if held:
            now = {k: _f32(kernels[k][...]) for k in ("q", "k", "v", "o")}
            kw = dict(spec=c.attention_spec(li), extras=model.attention_extras(li))
            errs = []
            for h in held:
                x = layerwise.capture_layer(
                    graphdef, state, h, *context(li, h.shape[1]), ("attn_in",)
                )["attn_in"]
                errs.append([float(e) for e in layer_errors(dense_attn, now, _f32(x), **kw)])
            info["heldout_attention_error"], info["heldout_output_error"] = (
                float(e) for e in np.mean(errs, axis=0)
            )
        if store is not None and li in pruned:
            store.save(li, masks[li], {n: kernels[n][...] for n in targets}, info)
        if li in pruned:
            sparsity |= _sparsity(li, masks, keep_masks or store is None)
        hs = [layerwise.apply_layer(graphdef, state, h, *context(li, h.shape[1])) for h in hs]
        held = [layerwise.apply_layer(graphdef, state, h, *context(li, h.shape[1])) for h in held]
        facts.append(info)
        layers.close(li, (hs, held))
        # Drop this layer's arrays before the next one is opened (a streamed layer's weights
        # would otherwise live beside the next one's).
        layer = graphdef = state = kernels = dense_attn = result = None
    bar.close()
    jax.block_until_ready(hs)
    return {
        "masks": masks,
        "sparsity": sparsity,
        "layers": facts,
        "seconds": time.perf_counter() - start,
        "resumed_layers": sorted(done),
        **_peak_memory_bytes(),
    }


def _sparsity(li: int, masks: dict, keep: bool) -> dict[str, float]:
    """The pruned fraction of each of layer ``li``'s masks (``{"li.name": fraction}``); the
    masks leave ``masks`` unless ``keep``."""
    out = {f"{li}.{k}": float(1.0 - np.mean(np.asarray(v))) for k, v in masks[li].items()}
    if not keep:
        del masks[li]
    return out


@dataclasses.dataclass(frozen=True)
class _Calibration:
    """What the calibration of a layer collects: the statistics of the inputs ``names`` and,
    when the method asks for them, ``attention_inputs = (sequences, tokens)`` of attention
    inputs. ``context(li, t)`` gives what layer ``li`` takes beside its input for ``t`` tokens
    (its RoPE tables)."""

    context: Any
    names: tuple[str, ...]
    attention_inputs: tuple[int, int] | None
    longest: int


def _calibrate(li: int, graphdef, state, hs, calib: _Calibration):
    """A layer's input statistics (``{capture name: InputStats}``) and its stacked attention
    inputs (``None`` unless asked for) from the calibration chunks' inputs ``hs``."""
    stats = {n: None for n in calib.names}
    update = _update_stats
    prefixes, count = [], 0
    samples, seq_len = calib.attention_inputs or (0, 0)
    for h in hs:
        ctx = calib.context(li, h.shape[1])
        caps = layerwise.capture_layer(graphdef, state, h, *ctx, calib.names)
        for n in calib.names:
            stats[n] = update(
                stats[n] if stats[n] is not None else init_stats(caps[n].shape[-1]), caps[n]
            )
        want = samples - count
        if want > 0 and h.shape[1] >= min(seq_len, calib.longest):
            take = _f32(caps["attn_in"][:want, :seq_len])
            prefixes.append(take)
            count += take.shape[0]
    return stats, (_stack_prefixes(prefixes, seq_len) if prefixes else None)


_update_stats = jax.jit(update_stats)


def _f32(x) -> jax.Array:
    """``x`` in float32, the dtype every method computes in (a bfloat16 model's kernels and
    activations are widened, exactly)."""
    return jnp.asarray(x, jnp.float32)


class WidenedKernels(Mapping):
    """A layer's prunable kernels in float32, each widened on a method's first read of it and
    kept for the next: a q/k method on a bfloat16 layer does not copy the MLP into float32.

    Reads the kernels' current values, so it is used while the layer is still dense (inside
    the method's call)."""

    def __init__(self, kernels: dict):
        self._kernels = kernels
        self._widened: dict[str, jax.Array] = {}

    def __getitem__(self, name: str) -> jax.Array:
        if name not in self._widened:
            self._widened[name] = _f32(self._kernels[name][...])
        return self._widened[name]

    def __iter__(self):
        return iter(self._kernels)

    def __len__(self) -> int:
        return len(self._kernels)


def _layer_view(model, li: int, calibrated, targets) -> Layer:
    """Layer ``li`` as a method sees it: its dense kernels, the statistics of each target's
    input, its attention spec and its calibration attention inputs."""
    stats, x = calibrated
    kernels = projection_kernels(model.layers[li])
    return Layer(
        index=li,
        weights=WidenedKernels(kernels),
        stats={t: stats[layerwise.INPUT_OF[t]] for t in targets},
        spec=model.config.attention_spec(li),
        attention_inputs=x,
        extras=model.attention_extras(li),
    )


def _dense_calibration(model, hs, todo, calib: _Calibration) -> dict:
    """``layer_inputs: dense``: one forward of the dense model captures the calibration of every
    layer in ``todo``: ``{layer: (stats, attention inputs)}``."""
    calibrated = {}
    for li in range(max(todo, default=-1) + 1):
        graphdef, state = nnx.split(model.layers[li])
        if li in todo:
            calibrated[li] = _calibrate(li, graphdef, state, hs, calib)
        if li < max(todo):
            hs = [
                layerwise.apply_layer(graphdef, state, h, *calib.context(li, h.shape[1]))
                for h in hs
            ]
    return calibrated


def _stack_prefixes(xs: list[jax.Array], seq_len: int) -> jax.Array:
    """Stacks calibration prefixes of ``seq_len`` tokens. Sequences shorter than that (paper
    protocol) are left out; if every one is shorter, the longest ones' common length is used."""
    t = seq_len if any(x.shape[1] >= seq_len for x in xs) else max(x.shape[1] for x in xs)
    return jnp.concatenate([x[:, :t] for x in xs if x.shape[1] >= t], axis=0)

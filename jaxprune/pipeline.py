"""Prune a model layer by layer (PROTOCOL.md): calibrate layer l on the inputs that the already
pruned layers 0..l-1 produce, prune the chosen projections, move on. With ``layer_inputs: dense``
every layer is calibrated on the dense model's inputs instead (one dense forward captures them
all), and the softmax-aware solves of the layers run together (:mod:`jaxprune.softmax_layers`).

Memory is bounded by one layer's activations for the calibration set: the residual stream of
every calibration chunk is kept (``N x T x d``), and the wider captures of a layer (``o_in``,
``down_in``) exist for one chunk at a time, folded into ``InputStats`` as they come.
"""

from __future__ import annotations

import dataclasses
import math
import re
import resource
import sys
import time
from dataclasses import field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxprune import layerwise
from jaxprune.baselines import GROUPS as BASELINE_GROUPS
from jaxprune.baselines import METHODS as BASELINES
from jaxprune.baselines import init_stats, prune_matrix, update_stats
from jaxprune.errors import ModelError, ResumeError
from jaxprune.masks import parse_nm
from jaxprune.model import Llama, LlamaConfig, projection_kernels
from jaxprune.softmax_layers import prune_qk_softmax_layers
from jaxprune.softmax_prune import attention_error, output_error, prune_qk_softmax
from jaxprune.solvers import SolveDivergedError

METHODS = ("dense", *BASELINES, "softmax")
# Comparison groups per method; the first is the default (the authors' own for the baselines).
# The softmax-aware method rounds per matrix by default: its full-protocol row beat the per-output
# one (README, "Head-to-head on the full protocol").
METHOD_GROUPS = {**BASELINE_GROUPS, "softmax": ("matrix", "output"), "dense": ()}
TARGETS = {
    "qk": ("q", "k"),
    "attn": ("q", "k", "v", "o"),
    "all": ("q", "k", "v", "o", "gate", "up", "down"),
}


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """One pruning run: model, method, targets, pattern, data and evaluation."""

    # Model: "smollm2-135m", a .gguf path, a Hugging Face folder, or a hub id.
    model: str = "smollm2-135m"
    # Pruning method.
    method: str = field(default="wanda", metadata={"choices": METHODS})
    # Matrices pruned in every layer: qk, attn (q, k, v, o) or all (attention and MLP).
    targets: str = field(default="qk", metadata={"choices": tuple(TARGETS)})
    # Fraction pruned in every pruned matrix (ignored for N:M patterns).
    sparsity: float = field(default=0.5, metadata={"range": (0.0, 0.99)})
    # unstructured, or N:M such as 2:4 (at most N kept in every M consecutive inputs).
    pattern: str = "unstructured"
    # Unstructured comparison group (None: the method's own default): output (Wanda's), block
    # (SparseGPT's) or matrix (magnitude's, and the softmax-aware rounding, start and tie-break).
    group: str | None = field(default=None, metadata={"choices": ("output", "block", "matrix")})
    # Calibration data: standard (C4 windows) or paper (C4 documents 0-7, own sequences).
    protocol: str = field(default="standard", metadata={"choices": ("standard", "paper")})
    # Calibration sequences (None: 32 standard, 8 paper).
    calib_samples: int | None = field(default=None, metadata={"range": (1, 4096)})
    # Tokens per calibration sequence.
    calib_seq_len: int = field(default=2048, metadata={"range": (16, 32768)})
    # Calibration sequences per forward chunk (memory vs speed).
    micro_batch: int = field(default=4, metadata={"range": (1, 1024)})
    # Baseline for the matrices the softmax-aware method does not handle (v, o, MLP).
    other_method: str = field(default="sparsegpt", metadata={"choices": BASELINES})
    # SparseGPT block size and dampening.
    blocksize: int = field(default=128, metadata={"range": (1, 65536)})
    percdamp: float = field(default=0.01, metadata={"range": (0.0, 10.0)})
    # Softmax-aware: calibration sequences used in the attention term (the first ones).
    softmax_samples: int = field(default=4, metadata={"range": (1, 4096)})
    # Softmax-aware: tokens of each of those sequences (a causal prefix).
    softmax_seq_len: int = field(default=256, metadata={"range": (2, 32768)})
    # Softmax-aware: random query rows per sequence in the attention term (None: all).
    query_rows: int | None = field(default=None, metadata={"range": (1, 32768)})
    # Softmax-aware: lambda (with normalize, relative to the dense attention scale).
    lam: float = field(default=0.1, metadata={"range": (0.0, None)})
    # Softmax-aware: choose lambda per layer so the mask mean is near the kept fraction.
    lam_search: bool = False
    # Softmax-aware: candidate lambdas of the search.
    lam_grid: tuple[float, ...] = field(
        default=(0.01, 0.03, 0.1, 0.3, 1.0), metadata={"range": (0.0, None)}
    )
    # Softmax-aware: steps of each short solve in the search.
    search_steps: int = field(default=30, metadata={"range": (1, 100000)})
    # Softmax-aware: start point, wanda (Wanda's ordering as ranks in [0, 1], the best measured)
    # or ones (the paper's M = 1).
    init: str = field(default="wanda", metadata={"choices": ("ones", "wanda")})
    # Softmax-aware: optimiser (gd with lr <= 0 derives the step size).
    optimizer: str = field(default="adam", metadata={"choices": ("gd", "sgd", "adam")})
    # Softmax-aware: learning rate / step size.
    lr: float = 0.01
    # Softmax-aware: learning-rate schedule.
    schedule: str = field(default="constant", metadata={"choices": ("constant", "cosine")})
    # Softmax-aware: solver steps per layer.
    steps: int = field(default=80, metadata={"range": (1, 1_000_000)})
    # Softmax-aware: divide the attention term by its dense scale.
    normalize: bool = True
    # Softmax-aware: round by the mask (mask) or by |M * W| (mask_times_weight).
    score: str = field(default="mask", metadata={"choices": ("mask", "mask_times_weight")})
    # Softmax-aware: break ties of the rounding by Wanda's score (a second sort key).
    tiebreak: bool = True
    # Softmax-aware: after rounding, update the kept q/k weights: none, sparsegpt (its linear
    # reconstruction) or softmax (Adam on the same attention loss, the mask fixed).
    update: str = field(default="none", metadata={"choices": ("none", "sparsegpt", "softmax")})
    # Softmax-aware: what the attention term compares, probs (the paper's: each head's attention
    # probabilities) or output (the attention block's output sum_h P_h V_h O_h, dense V and O).
    term: str = field(default="probs", metadata={"choices": ("probs", "output")})
    # Softmax-aware: compute the attention term over blocks of this many query rows (memory
    # linear in softmax_seq_len, the same loss; None: the direct form, faster at short lengths).
    row_block: int | None = field(default=None, metadata={"range": (1, 32768)})
    # Softmax-aware update=softmax: Adam steps on the kept weights.
    update_steps: int = field(default=40, metadata={"range": (1, 1_000_000)})
    # Softmax-aware update=softmax: learning rate, relative to each matrix's weight RMS.
    update_lr: float = field(default=0.01, metadata={"range": (0.0, None)})
    # Prune only these layer indices (None: every layer), for ablations and quick looks.
    layers: tuple[int, ...] | None = None
    # Inputs each layer is calibrated on: sequential (those the already pruned layers produce,
    # the protocol) or dense (the dense model's: the layers' solves are independent, so they run
    # together, vmapped over layers and split over the devices).
    layer_inputs: str = field(default="sequential", metadata={"choices": ("sequential", "dense")})
    # Held-out sequences (C4 evaluation documents) for the per-layer attention error.
    heldout_samples: int = field(default=2, metadata={"range": (0, 256)})
    # Evaluation sets: wikitext2, c4 (the standard protocol) and/or c4-paper; [] skips evaluation.
    eval_data: tuple[str, ...] = ("wikitext2", "c4")
    # Evaluation windows per set (None: all of WikiText-2 / the protocol's 32 for C4).
    eval_windows: int | None = field(default=32, metadata={"range": (1, 100000)})
    # Tokens per evaluation window.
    eval_seq_len: int = field(default=2048, metadata={"range": (16, 32768)})
    # Evaluation batch size.
    eval_batch: int = field(default=1, metadata={"range": (1, 1024)})
    # Data folder (None: $JAXPRUNE_DATA or ../shared/data).
    data_dir: str | None = None
    # Random seed (query-row sampling).
    seed: int = 0
    # Folder of the run's outputs (a fresh timestamped folder is made inside).
    out: str = "runs/prune"
    # Save the pruned parameters with orbax (masks are always saved).
    save_params: bool = True
    # Show progress bars.
    progress: bool = True

    def __post_init__(self):
        if self.pattern == "row":
            raise ValueError("pattern='row' is now pattern='unstructured' with group='output'.")
        nm = parse_nm(self.pattern)
        if nm is None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity} is impossible: give a fraction in [0, 1).")
        for name in self.eval_data:
            if name not in ("wikitext2", "c4", "c4-paper"):
                raise ValueError(f"eval_data entry {name!r}: use wikitext2, c4 or c4-paper.")
        if not math.isfinite(self.lr) or (self.optimizer != "gd" and self.lr <= 0):
            raise ValueError(
                f"lr={self.lr} cannot work with optimizer={self.optimizer!r}: give a positive "
                "finite learning rate such as 0.01 (only optimizer gd takes lr <= 0, for the "
                "derived step size 1/L)."
            )
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(
                f"layers={list(self.layers)}: give layer indices from 0 (such as [0, 1]), or "
                "leave it unset (null) for every layer."
            )
        allowed = METHOD_GROUPS.get(self.method, ())
        if self.group is not None and self.group not in allowed:
            raise ValueError(
                f"group={self.group!r} does not apply to method {self.method!r}: "
                f"use one of {allowed} (or leave it unset for the authors' default)."
            )

    @property
    def group_or_default(self) -> str | None:
        """The comparison group the method uses (``None`` for dense)."""
        groups = METHOD_GROUPS[self.method]
        return self.group if self.group is not None else (groups[0] if groups else None)

    @property
    def sparsity_or_none(self) -> float | None:
        """The sparsity to pass to ``binarize`` (None for N:M, which fixes it)."""
        return None if parse_nm(self.pattern) else self.sparsity


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
        and cfg.other_method == "sparsegpt"
        and set(TARGETS[cfg.targets]) - {"q", "k"}
    )
    if uses_sparsegpt and cfg.blocksize % m:
        small = [t for t in TARGETS[cfg.targets] if cfg.blocksize < dims[t]]
        if small:
            raise ModelError(
                f"blocksize={cfg.blocksize} is not a multiple of M={m} (pattern {cfg.pattern}); "
                f"SparseGPT's blocks would split N:M groups: use a multiple of {m}."
            )


def _solve_warnings(info: dict, cfg: PruneConfig, li: int) -> list[str]:
    """Warnings about a softmax-aware solve that did not do its job: its loss ended above its
    start, or its relaxed mask collapsed towards zero (rounding then keeps arbitrary entries)."""
    out = []
    if info["final_loss"] > info["initial_loss"]:
        out.append(
            f"layer {li}: the softmax-aware solve ended at loss {info['final_loss']:.4g}, above "
            f"its start {info['initial_loss']:.4g}; lower --lr (now {cfg.lr:g}) or try "
            "--optimizer gd --lr 0 (derived step size, monotone)."
        )
    keep = 1.0 - (cfg.sparsity_or_none if cfg.sparsity_or_none is not None else _nm_pruned(cfg))
    if info["mask_mean"] < 0.1 * keep:
        out.append(
            f"layer {li}: the relaxed mask collapsed (mean {info['mask_mean']:.3g} for a kept "
            f"fraction {keep:.3g}), so its rounding is near arbitrary; lower --lam (now "
            f"{info.get('lam', cfg.lam):g}) or --lr (now {cfg.lr:g})."
        )
    return out


def _nm_pruned(cfg: PruneConfig) -> float:
    n, m = parse_nm(cfg.pattern)
    return 1.0 - n / m


def _diverged(err: SolveDivergedError, cfg: PruneConfig, li: int) -> SolveDivergedError:
    # The solver's advice names its own arguments; the user sets them with --lr and --optimizer.
    what = re.split(r"[;.]\s+[Uu]se a smaller step_size", str(err))[0]
    return SolveDivergedError(
        f"layer {li}: {what}; use a smaller --lr than {cfg.lr:g} (optimizer {cfg.optimizer}), "
        "or --optimizer gd --lr 0 for the derived step size, which cannot diverge."
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
    if cfg.layer_inputs == "dense":
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
                x = _stack_prefixes(soft_x, cfg.softmax_seq_len)
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
            method = cfg.other_method if cfg.method == "softmax" else cfg.method
            opts = (
                {"blocksize": cfg.blocksize, "percdamp": cfg.percdamp}
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
            errs, out_errs = [], []
            for h in held:
                x = layerwise.capture_layer(graphdef, state, h, *rope(h.shape[1]), ("attn_in",))[
                    "attn_in"
                ]
                errs.append(
                    float(
                        attention_error(
                            dense_qk["q"],
                            dense_qk["k"],
                            kernels["q"][...],
                            kernels["k"][...],
                            x,
                            **shape_kw,
                        )
                    )
                )
                now = {k: kernels[k][...] for k in ("q", "k", "v", "o")}
                out_errs.append(float(output_error(dense_attn, now, x, **shape_kw)))
            info["heldout_attention_error"] = float(np.mean(errs))
            info["heldout_output_error"] = float(np.mean(out_errs))
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
        want = cfg.softmax_samples - soft_count
        if cfg.method == "softmax" and want > 0 and h.shape[1] >= min(cfg.softmax_seq_len, longest):
            take = caps["attn_in"][:want, : cfg.softmax_seq_len]
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
            [_stack_prefixes(calibrated[li][1], cfg.softmax_seq_len) for li in todo],
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

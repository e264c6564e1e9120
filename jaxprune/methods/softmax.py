"""The softmax-aware method (Liang et al., ICLR 2025) as a plug-in: masks on ``W_Q`` and ``W_K``
optimised against each head's attention probabilities, rounded to the pattern, then (by default)
the kept q/k weights refitted to the same attention term; the layer's other target matrices go to
another registered method (``other_method``, ALPS by default).

The solve itself is :mod:`jaxprune.methods.softmax_solve` (one layer) and
:mod:`jaxprune.methods.softmax_layers` (independent layers together); this module holds the
method's options, its entry points, the composition with the other method, and what it reports.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field

from jaxprune.masks import parse_nm
from jaxprune.methods import registry
from jaxprune.methods.base import Layer, Method, Pruned, Request
from jaxprune.methods.softmax_layers import prune_qk_softmax_layers
from jaxprune.methods.softmax_solve import mask_source, prune_qk_softmax, resolve_mask
from jaxprune.objective import attention_error
from jaxprune.solvers import SolveDivergedError

# The projections the softmax-aware objective prunes; the other targets go to other_method.
QK = ("q", "k")
# The rounding's comparison groups; the first is the default (its full-protocol row beat the
# per-output one).
GROUPS = ("matrix", "output")


def matrix_methods() -> tuple[str, ...]:
    """The registered methods that prune one matrix at a time (choices of ``other_method``)."""
    return tuple(m.name for m in registry.methods() if m.prune_matrix is not None)


@dataclasses.dataclass(frozen=True)
class SoftmaxConfig:
    """The softmax-aware method (method softmax): its attention term, solve, rounding, update."""

    # Calibration sequences used in the attention term (the first ones; at most the calibration
    # set's). 16 with batch 4 is the best measured at the cost of the earlier 4 sequences.
    samples: int = field(default=16, metadata={"range": (1, 4096)})
    # Tokens of each of those sequences (a causal prefix).
    seq_len: int = field(default=256, metadata={"range": (2, 32768)})
    # Sequences of the attention term each solver step reads (None: all softmax.samples). Each
    # step takes the next batch in turn, so the solve sees every sequence at the cost of batch.
    # Adam and SGD only: optimizer gd reads every sequence in every step (its accept-or-halve
    # rule compares losses on the same data).
    batch: int | None = field(default=4, metadata={"range": (1, 4096)})
    # Random query rows per sequence in the attention term (None: all).
    query_rows: int | None = field(default=None, metadata={"range": (1, 32768)})
    # Compute the attention term over blocks of this many query rows (memory linear in seq_len,
    # the same loss; None: the direct form, faster at short lengths).
    row_block: int | None = field(default=None, metadata={"range": (1, 32768)})
    # Lambda (with normalize, relative to the dense attention scale).
    lam: float = field(default=0.1, metadata={"range": (0.0, None)})
    # Choose lambda per layer so the mask mean is near the kept fraction.
    lam_search: bool = False
    # Candidate lambdas of the search.
    lam_grid: tuple[float, ...] = field(
        default=(0.01, 0.03, 0.1, 0.3, 1.0), metadata={"range": (0.0, None)}
    )
    # Steps of each short solve in the search.
    search_steps: int = field(default=30, metadata={"range": (1, 100000)})
    # Where the mask comes from: solve (the relaxed mask solve, then rounding), the name of a
    # registered per-matrix method such as sparsegpt or alps (its mask and weights, its authors'
    # rules; no mask solve, then the update from there) or auto (the best measured: alps
    # for N:M patterns with update=softmax, else solve; metrics.json records it as softmax_mask).
    mask: str = "auto"
    # Start point: wanda (Wanda's ordering as ranks in [0, 1], the best measured) or ones (the
    # paper's M = 1).
    init: str = field(default="wanda", metadata={"choices": ("ones", "wanda")})
    # Optimiser (gd with lr <= 0 derives the step size).
    optimizer: str = field(default="adam", metadata={"choices": ("gd", "sgd", "adam")})
    # Learning rate / step size.
    lr: float = 0.01
    # Learning-rate schedule.
    schedule: str = field(default="constant", metadata={"choices": ("constant", "cosine")})
    # Solver steps per layer.
    steps: int = field(default=80, metadata={"range": (1, 1_000_000)})
    # Staged rounding: split the steps into this many solves; after each but the last, the
    # lowest-scored entries up to sparsity * stage / stages are fixed at zero (their weights
    # removed from the next solve). 1: one solve, then one rounding (the paper's).
    stages: int = field(default=1, metadata={"range": (1, 1000)})
    # Divide the attention term by its dense scale.
    normalize: bool = True
    # Round by the mask (mask) or by |M * W| (mask_times_weight).
    score: str = field(default="mask", metadata={"choices": ("mask", "mask_times_weight")})
    # Break ties of the rounding by Wanda's score (a second sort key).
    tiebreak: bool = True
    # After rounding, update the kept q/k weights: softmax (Adam on the same attention loss, the
    # mask fixed; the default, the best measured variant), sparsegpt (its linear reconstruction)
    # or none (the paper's method stops at the rounded mask).
    update: str = field(default="softmax", metadata={"choices": ("none", "sparsegpt", "softmax")})
    # What the attention term compares: probs (the paper's: each head's attention probabilities)
    # or output (the attention block's output sum_h P_h V_h O_h, dense V and O).
    term: str = field(default="probs", metadata={"choices": ("probs", "output")})
    # update=softmax: Adam steps on the kept weights.
    update_steps: int = field(default=40, metadata={"range": (1, 1_000_000)})
    # update=softmax: learning rate, relative to each matrix's weight RMS.
    update_lr: float = field(default=0.01, metadata={"range": (0.0, None)})
    # Method of the matrices the softmax-aware method does not handle (v, o, MLP): any
    # registered method that prunes one matrix at a time (magnitude, wanda, sparsegpt, alps,
    # ...). ALPS, the best measured: on the full protocol it beats SparseGPT there by 2.9 / 3.6
    # perplexity at attn 50% and 6.6 / 12.3 at all 50% (at all, 2.2x the prune time, loaded).
    other_method: str = "alps"

    def __post_init__(self):
        other = registry.get(self.other_method)
        if other.prune_matrix is None:
            raise ValueError(
                f"softmax.other_method={self.other_method!r} does not prune one matrix at a "
                f"time; use one of {list(matrix_methods())}."
            )
        if not math.isfinite(self.lr) or (self.optimizer != "gd" and self.lr <= 0):
            raise ValueError(
                f"softmax.lr={self.lr} cannot work with softmax.optimizer={self.optimizer!r}: "
                "give a positive finite learning rate such as 0.01 (only optimizer gd takes "
                "lr <= 0, for the derived step size 1/L)."
            )
        if self.mask not in ("auto", "solve", *matrix_methods()):
            raise ValueError(
                f"softmax.mask={self.mask!r} is not allowed; choose auto, solve or a method that "
                f"prunes one matrix at a time: {', '.join(matrix_methods())}."
            )
        if self.stages > self.steps:
            raise ValueError(
                f"softmax.stages={self.stages} is more than softmax.steps={self.steps}: each "
                "stage needs at least one step; lower --softmax.stages or raise --softmax.steps."
            )
        if self.stages > 1 and self.row_block is not None:
            raise ValueError(
                "softmax.stages > 1 needs the direct attention term (the row-blocked term "
                "recomputes its dense rows from the weights a stage removes): unset "
                "softmax.row_block or set softmax.stages 1."
            )
        if self.mask not in ("auto", "solve") and self.update != "softmax":
            raise ValueError(
                f"softmax.mask={self.mask} with softmax.update={self.update} is {self.mask} "
                f"itself: use --method {self.mask}, or set --softmax.update softmax to fit its "
                "weights to the softmax."
            )


def attention_inputs(opts: SoftmaxConfig) -> tuple[int, int]:
    """The calibration attention inputs the solve needs: ``(sequences, tokens)``."""
    return opts.samples, opts.seq_len


def prune(layer: Layer, request: Request, opts: SoftmaxConfig) -> Pruned:
    """One layer: the q/k solve, then the other targets with ``other_method``."""
    qk = {k: layer.weights[k] for k in QK}
    try:
        new, keep, info = prune_qk_softmax(
            qk,
            layer.attention_inputs,
            layer.stats["q"],
            request,
            opts,
            spec=layer.spec,
            value_weights=_value_weights(layer, opts),
            extras=layer.extras,
            progress=request.progress,
            desc=f"layer {layer.index} softmax",
        )
    except SolveDivergedError as err:
        raise diverged(err, opts, layer.index) from err
    return _with_other_targets(layer, request, opts, new, keep, info)


def prune_layers(layers: list[Layer], request: Request, opts: SoftmaxConfig) -> list[Pruned]:
    """Independent layers (calibrated on the dense model's inputs): the q/k solves of the layers
    that share an attention spec run together (:mod:`jaxprune.methods.softmax_layers`)."""
    out = {}
    for spec in dict.fromkeys(layer.spec for layer in layers):
        group = [layer for layer in layers if layer.spec == spec]
        first, last = group[0].index, group[-1].index
        try:
            results = prune_qk_softmax_layers(
                [{k: layer.weights[k] for k in QK} for layer in group],
                [layer.attention_inputs for layer in group],
                [layer.stats["q"] for layer in group],
                request,
                opts,
                spec=spec,
                value_weights=[_value_weights(layer, opts) for layer in group],
                extras=[layer.extras for layer in group],
                progress=request.progress,
                desc=f"layers {first}-{last} softmax",
            )
        except SolveDivergedError as err:
            raise diverged(err, opts, f"{first}-{last} (solved together)") from err
        for layer, (new, keep, info) in zip(group, results, strict=True):
            out[layer.index] = _with_other_targets(layer, request, opts, new, keep, info)
    return [out[layer.index] for layer in layers]


def _value_weights(layer: Layer, opts: SoftmaxConfig) -> dict | None:
    """The dense v and o kernels where the attention term needs them (``term="output"``);
    otherwise not read, so a bfloat16 layer's v and o are not widened for nothing."""
    return {k: layer.weights[k] for k in ("v", "o")} if opts.term == "output" else None


def _with_other_targets(layer, request, opts, new, keep, info) -> Pruned:
    """The solved q/k result with its facts, and the layer's other targets pruned by
    ``other_method`` in that method's own comparison group and options."""
    x = layer.attention_inputs
    info["warnings"] = solve_warnings(info, request, opts, layer.index)
    info["softmax_tokens"] = list(x.shape[:2])
    dense = {k: layer.weights[k] for k in QK}
    info["calib_attention_error"] = float(
        attention_error(
            dense["q"], dense["k"], new["q"], new["k"], x, spec=layer.spec, extras=layer.extras
        )
    )
    weights, masks = dict(new), dict(keep)
    rest = tuple(t for t in request.targets if t not in QK)
    if rest:
        other = registry.get(opts.other_method)
        sub = request.replace(targets=rest, group=None)
        done = other.prune(layer, sub, sub.options_of(other))
        weights.update(done.weights)
        masks.update(done.masks)
    return Pruned(weights, masks, info)


def check(request: Request, opts: SoftmaxConfig, input_dims) -> None:
    """Staged rounding's pattern, and the other method's checks on the matrices it gets."""
    staged = opts.stages > 1 and mask_source(request, opts) == "solve"
    if staged and parse_nm(request.pattern) is not None:
        raise ValueError(
            f"softmax.stages={opts.stages} rounds to growing unstructured sparsities and cannot "
            f"stage the {request.pattern} pattern: set --softmax.stages 1 for N:M patterns."
        )
    rest = tuple(t for t in request.targets if t not in QK)
    other = registry.get(opts.other_method)
    if rest and other.check is not None:
        sub = request.replace(targets=rest, group=None)
        other.check(sub, sub.options_of(other), input_dims)


def summary(request: Request, opts: SoftmaxConfig) -> dict:
    """Run-level facts for ``metrics.json``: where the mask came from (``auto`` resolved)."""
    return {"softmax_mask": mask_source(request, opts)}


def solve_warnings(info: dict, request: Request, opts: SoftmaxConfig, li: int) -> list[str]:
    """Warnings about a solve that did not do its job: a weight update that was rolled back, a
    mask solve that never moved or whose loss ended above its start, or a relaxed mask that
    collapsed towards zero (rounding then keeps arbitrary entries)."""
    out = []
    if "update_attention_rejected" in info:
        out.append(
            f"layer {li}: the weight update raised the attention term from "
            f"{info['update_attention_before']:.4g} to {info['update_attention_rejected']:.4g}, "
            f"so it was rolled back and the rounded weights are kept; lower "
            f"--softmax.update-lr (now {opts.update_lr:g}) or --softmax.update-steps."
        )
    if info["final_loss"] == info["initial_loss"] and "update_attention_rejected" not in info:
        out.append(
            f"layer {li}: the softmax-aware solve never moved from its start (loss "
            f"{info['initial_loss']:.4g}): every step was rejected or had no effect, so the mask "
            f"is its start's rounding; lower --softmax.lr (now {opts.lr:g}) or try "
            "--softmax.optimizer gd --softmax.lr 0 (derived step size)."
        )
    if info["final_loss"] > info["initial_loss"]:
        out.append(
            f"layer {li}: the softmax-aware solve ended at loss {info['final_loss']:.4g}, above "
            f"its start {info['initial_loss']:.4g}; lower --softmax.lr (now {opts.lr:g}) "
            "or try --softmax.optimizer gd --softmax.lr 0 (derived step size, monotone)."
        )
    keep = request.keep_fraction
    if info["mask_mean"] < 0.1 * keep:
        out.append(
            f"layer {li}: the relaxed mask collapsed (mean {info['mask_mean']:.3g} for a kept "
            f"fraction {keep:.3g}), so its rounding is near arbitrary; lower --softmax.lam (now "
            f"{info.get('lam', opts.lam):g}) or --softmax.lr (now {opts.lr:g})."
        )
    return out


def diverged(err: SolveDivergedError, opts: SoftmaxConfig, li) -> SolveDivergedError:
    """The solver's divergence error with the flags that set its step (the solver's own advice
    names its function arguments)."""
    what = re.split(r"[;.]\s+[Uu]se a smaller step_size", str(err))[0]
    return SolveDivergedError(
        f"layer {li}: {what}; use a smaller --softmax.lr than {opts.lr:g} (optimizer "
        f"{opts.optimizer}), or --softmax.optimizer gd --softmax.lr 0 for the derived step "
        "size, which cannot diverge."
    )


METHOD = Method(
    name="softmax",
    prune=prune,
    description="softmax-aware masks on q/k (Liang et al. 2025), other targets by other_method",
    section=SoftmaxConfig,
    groups=GROUPS,
    attention_inputs=attention_inputs,
    check=check,
    prune_layers=prune_layers,
    summary=summary,
)

__all__ = ["METHOD", "QK", "SoftmaxConfig", "resolve_mask"]

"""The settings of one pruning run: ``PruneConfig`` and its sections.

A run reads as "this method with these options": the top level names the model, the method, what
is pruned and how much; ``calibration``, ``eval`` and one section per method (``softmax``,
``sparsegpt``) hold the rest. In YAML a section is a mapping (``softmax: {lam: 0.03}``) or dotted
keys (``softmax.lam: 0.03``); on the command line it is a dotted flag (``--softmax.lam 0.03``).

Runs stored before the sections existed hold flat keys (``lam``, ``calib_samples``);
:data:`MOVED_KEYS` maps each one to its new place, so :func:`flat_settings` reads old and new
stored configs alike (the table reuses old rows, ``--resume`` reads old run folders), while a
config or flag that still uses an old key is refused with one line naming the new one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, ClassVar

from jaxprune.baselines import GROUPS as BASELINE_GROUPS
from jaxprune.baselines import METHODS as BASELINES
from jaxprune.masks import parse_nm

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
EVAL_SETS = ("wikitext2", "c4", "c4-paper")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data: the inputs every pruned layer is fitted to."""

    # standard (C4 windows) or paper (C4 documents 0-7, own sequences).
    protocol: str = field(default="standard", metadata={"choices": ("standard", "paper")})
    # Calibration sequences (None: 32 standard, 8 paper).
    samples: int | None = field(default=None, metadata={"range": (1, 4096)})
    # Tokens per calibration sequence.
    seq_len: int = field(default=2048, metadata={"range": (16, 32768)})
    # Calibration sequences per forward chunk (memory vs speed).
    micro_batch: int = field(default=4, metadata={"range": (1, 1024)})
    # Inputs each layer is calibrated on: sequential (those the already pruned layers produce,
    # the protocol) or dense (the dense model's: the layers' solves are independent, so they run
    # together, vmapped over layers and split over the devices).
    layer_inputs: str = field(default="sequential", metadata={"choices": ("sequential", "dense")})


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation: perplexity after pruning, and the per-layer held-out attention error."""

    # Evaluation sets: wikitext2, c4 (the standard protocol) and/or c4-paper; [] skips evaluation.
    data: tuple[str, ...] = ("wikitext2", "c4")
    # Evaluation windows per set (None: all of WikiText-2 / the protocol's 32 for C4).
    windows: int | None = field(default=32, metadata={"range": (1, 100000)})
    # Tokens per evaluation window.
    seq_len: int = field(default=2048, metadata={"range": (16, 32768)})
    # Evaluation batch size.
    batch: int = field(default=1, metadata={"range": (1, 1024)})
    # Held-out sequences (C4 evaluation documents) for the per-layer attention error.
    heldout_samples: int = field(default=2, metadata={"range": (0, 256)})

    def __post_init__(self):
        for name in self.data:
            if name not in EVAL_SETS:
                raise ValueError(f"eval.data entry {name!r}: use wikitext2, c4 or c4-paper.")


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT (method sparsegpt, or softmax.other_method sparsegpt)."""

    # Inputs per block of the OBS updates.
    blocksize: int = field(default=128, metadata={"range": (1, 65536)})
    # Dampening added to the Hessian's diagonal, relative to its mean.
    percdamp: float = field(default=0.01, metadata={"range": (0.0, 10.0)})


@dataclasses.dataclass(frozen=True)
class SoftmaxConfig:
    """The softmax-aware method (method softmax): its attention term, solve, rounding, update."""

    # Calibration sequences used in the attention term (the first ones).
    samples: int = field(default=4, metadata={"range": (1, 4096)})
    # Tokens of each of those sequences (a causal prefix).
    seq_len: int = field(default=256, metadata={"range": (2, 32768)})
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
    # Where the mask comes from: solve (the relaxed mask solve, then rounding), sparsegpt
    # (SparseGPT's mask and weights, authors' rules; no mask solve, then the update from there)
    # or auto (the best measured: sparsegpt for N:M patterns with update=softmax, else solve;
    # metrics.json records the choice as softmax_mask).
    mask: str = field(default="auto", metadata={"choices": ("auto", "solve", "sparsegpt")})
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
    # Baseline for the matrices the softmax-aware method does not handle (v, o, MLP).
    other_method: str = field(default="sparsegpt", metadata={"choices": BASELINES})

    def __post_init__(self):
        if not math.isfinite(self.lr) or (self.optimizer != "gd" and self.lr <= 0):
            raise ValueError(
                f"softmax.lr={self.lr} cannot work with softmax.optimizer={self.optimizer!r}: "
                "give a positive finite learning rate such as 0.01 (only optimizer gd takes "
                "lr <= 0, for the derived step size 1/L)."
            )
        if self.mask == "sparsegpt" and self.update != "softmax":
            raise ValueError(
                f"softmax.mask=sparsegpt with softmax.update={self.update} is SparseGPT itself: "
                "use --method sparsegpt, or set --softmax.update softmax to fit SparseGPT's "
                "weights to the softmax."
            )


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """One pruning run: model, method, targets, pattern; calibration, evaluation and the
    methods' own options in their sections."""

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
    # Prune only these layer indices (None: every layer), for ablations and quick looks.
    layers: tuple[int, ...] | None = None
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
    # Sections (their flags are dotted: --calibration.samples, --softmax.lam).
    # Calibration data.
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # Evaluation after pruning.
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The softmax-aware method's options.
    softmax: SoftmaxConfig = field(default_factory=SoftmaxConfig)
    # SparseGPT's options.
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)

    # Flat keys of the configs before the sections (still in stored runs) -> their new place.
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "protocol": "calibration.protocol",
        "calib_samples": "calibration.samples",
        "calib_seq_len": "calibration.seq_len",
        "micro_batch": "calibration.micro_batch",
        "layer_inputs": "calibration.layer_inputs",
        "eval_data": "eval.data",
        "eval_windows": "eval.windows",
        "eval_seq_len": "eval.seq_len",
        "eval_batch": "eval.batch",
        "heldout_samples": "eval.heldout_samples",
        "blocksize": "sparsegpt.blocksize",
        "percdamp": "sparsegpt.percdamp",
        "softmax_samples": "softmax.samples",
        "softmax_seq_len": "softmax.seq_len",
        **{
            key: f"softmax.{key}"
            for key in (
                "query_rows",
                "row_block",
                "lam",
                "lam_search",
                "lam_grid",
                "search_steps",
                "init",
                "optimizer",
                "lr",
                "schedule",
                "steps",
                "normalize",
                "score",
                "tiebreak",
                "update",
                "term",
                "update_steps",
                "update_lr",
                "other_method",
            )
        },
    }

    def __post_init__(self):
        if self.pattern == "row":
            raise ValueError("pattern='row' is now pattern='unstructured' with group='output'.")
        nm = parse_nm(self.pattern)
        if nm is None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity} is impossible: give a fraction in [0, 1).")
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
    def softmax_mask(self) -> str:
        """Where the softmax-aware method's mask comes from (``softmax.mask`` with auto
        resolved)."""
        return resolve_mask(self.softmax.mask, self.pattern, self.softmax.update)

    @property
    def group_or_default(self) -> str | None:
        """The comparison group the method uses (``None`` for dense)."""
        groups = METHOD_GROUPS[self.method]
        return self.group if self.group is not None else (groups[0] if groups else None)

    @property
    def sparsity_or_none(self) -> float | None:
        """The sparsity to pass to ``binarize`` (None for N:M, which fixes it)."""
        return None if parse_nm(self.pattern) else self.sparsity


def resolve_mask(mask: str, pattern: str, update: str) -> str:
    """``softmax.mask`` with auto resolved to the best measured choice on the full protocol
    (README): SparseGPT's mask at N:M patterns with the softmax update (it beats the solved mask
    at 2:4), the solved mask otherwise (it wins at 50% unstructured)."""
    if mask != "auto":
        return mask
    return "sparsegpt" if parse_nm(pattern) is not None and update == "softmax" else "solve"


def flat_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A stored run's settings as one flat mapping of dotted keys (``softmax.lam``).

    Reads both forms a ``metrics.json`` or ``run.json`` may hold: the nested one (``{"softmax":
    {"lam": 0.1}}``) and the flat one of runs stored before the sections (``{"lam": 0.1}``, each
    old key moved to its place by :data:`PruneConfig.MOVED_KEYS`). Already flat dotted mappings
    come back unchanged, so the result can be compared key by key.
    """
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{key}."))
        else:
            out[PruneConfig.MOVED_KEYS.get(key, key)] = value
    return out


def _dotted(mapping: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out

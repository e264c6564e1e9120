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
from dataclasses import field
from typing import Any, ClassVar

from jaxprune.masks import parse_nm
from jaxprune.methods import registry

# The registered methods when this module is first imported (the choices of --method).
METHODS = registry.names()
# Comparison groups per method; the first is the default (the authors' own for the baselines,
# per matrix for the softmax-aware rounding).
METHOD_GROUPS = {m.name: m.groups for m in registry.methods()}
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
class RunConfig:
    """One pruning run: model, method, targets, pattern; calibration and evaluation in their
    sections. :class:`PruneConfig` adds one section per registered method that has options."""

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
    # Prune one decoder layer at a time from disk, never holding the whole model (the pruned
    # layers go to the run folder's pruned/): true, false, or auto (stream when the model's
    # float32 parameters exceed stream_threshold_gib).
    stream: bool | str = field(default="auto", metadata={"choices": ("auto", True, False)})
    # GiB of float32 parameters above which stream auto streams (8: a 2-billion-parameter model,
    # whose in-memory load peaks near twice that).
    stream_threshold_gib: float = field(default=8.0, metadata={"range": (0.0, None)})
    # Dtype of the model's parameters and activations: float32 or bfloat16 (calibration
    # statistics, the mask solve and the weight updates run in float32 either way).
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16")})
    # Show progress bars.
    progress: bool = True
    # Sections (their flags are dotted: --calibration.samples, --softmax.lam).
    # Calibration data.
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # Evaluation after pruning.
    eval: EvalConfig = field(default_factory=EvalConfig)

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

    # Settings added after runs were stored whose default is not what those runs computed with:
    # a stored config without the key read as this value (flat_settings), so it matches and
    # resumes only as what it ran.
    LEGACY_VALUES: ClassVar[dict[str, Any]] = {"softmax.batch": None}

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
        allowed = registry.get(self.method).groups
        if self.group is not None and self.group not in allowed:
            raise ValueError(
                f"group={self.group!r} does not apply to method {self.method!r}: "
                f"use one of {allowed} (or leave it unset for the authors' default)."
            )

    @property
    def group_or_default(self) -> str | None:
        """The comparison group the method uses (``None`` for dense)."""
        groups = registry.get(self.method).groups
        return self.group if self.group is not None else (groups[0] if groups else None)

    @property
    def sparsity_or_none(self) -> float | None:
        """The sparsity to pass to ``binarize`` (None for N:M, which fixes it)."""
        return None if parse_nm(self.pattern) else self.sparsity


def _build_prune_config() -> type:
    """``PruneConfig``: :class:`RunConfig` plus one section per registered method with options
    (``softmax``, ``sparsegpt``, ...), named after the method."""
    sections = [
        (m.name, m.section, field(default_factory=m.section))
        for m in registry.methods()
        if m.section is not None
    ]
    cls = dataclasses.make_dataclass("PruneConfig", sections, bases=(RunConfig,), frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = RunConfig.__doc__.replace(":class:`PruneConfig` adds", "It adds")
    cls.__qualname__ = "PruneConfig"
    return cls


PruneConfig = _build_prune_config()


def flat_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A stored run's settings as one flat mapping of dotted keys (``softmax.lam``).

    Reads both forms a ``metrics.json`` or ``run.json`` may hold: the nested one (``{"softmax":
    {"lam": 0.1}}``) and the flat one of runs stored before the sections (``{"lam": 0.1}``, each
    old key moved to its place by :data:`PruneConfig.MOVED_KEYS`). Already flat dotted mappings
    come back unchanged, so the result can be compared key by key. A key of
    :data:`PruneConfig.LEGACY_VALUES` missing beside others of its section gets the value the
    runs before it computed with.
    """
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{key}."))
        else:
            out[PruneConfig.MOVED_KEYS.get(key, key)] = value
    # A stored config with the key's section but not the key ran before it existed.
    for key, value in PruneConfig.LEGACY_VALUES.items():
        section = key.split(".")[0] + "."
        if key not in out and any(k.startswith(section) for k in out):
            out[key] = value
    return out


def _dotted(mapping: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out

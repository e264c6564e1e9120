"""What every pruning method takes and gives: one layer in, new weights, masks and facts out.

A method is a :class:`Method`: a name, its config section (a frozen dataclass, or ``None``), and
one entry point ``prune(layer, request, options) -> Pruned``. The pipeline builds the
:class:`Layer` (dense kernels, calibration statistics, and the attention inputs a method asks
for) and the :class:`Request` (what the run prunes and how much), calls the entry point, and
writes the result back. It never names a method or reads a method's section.

Kernels are input-major, ``y = x @ w`` with ``w`` of shape ``(d_in, d_out)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jaxtyping import Array, Bool, Float

from jaxprune.masks import parse_nm
from jaxprune.methods.stats import InputStats
from jaxprune.models.spec import AttentionSpec, QKExtras

# One matrix: (w, its input statistics, request, options) -> (pruned w, keep).
MatrixFn = Callable[[jax.Array, InputStats | None, "Request", Any], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Request:
    """What the run asks of a method, the same for every layer.

    Attributes:
      targets: the projections to prune in each layer (``"q"``, ``"k"``, ``"v"``, ``"o"``,
        ``"gate"``, ``"up"``, ``"down"``).
      sparsity: fraction pruned in every matrix, or ``None`` for an N:M pattern (which fixes it).
      pattern: ``"unstructured"`` or ``"N:M"``.
      group: the unstructured comparison group asked for, or ``None`` for the method's default
        (:meth:`Method.group`).
      seed: random seed (for methods that sample).
      progress: show progress bars.
      sections: every registered method's config section by method name, so that a method may
        hand some matrices to another one (:meth:`options_of`).
      calibration_sequences: the number of calibration sequences the statistics were summed over
        (``None`` where the caller does not say; set by the pipeline).
    """

    targets: tuple[str, ...]
    sparsity: float | None
    pattern: str
    group: str | None = None
    seed: int = 0
    progress: bool = False
    sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    calibration_sequences: int | None = None

    @property
    def keep_fraction(self) -> float:
        """The fraction of each pruned matrix's entries that stay."""
        nm = parse_nm(self.pattern)
        return nm[0] / nm[1] if nm is not None else 1.0 - self.sparsity

    def options_of(self, method: Method) -> Any:
        """``method``'s section in this run (its defaults when the run has none)."""
        if method.section is None:
            return None
        return self.sections.get(method.name) or method.section()

    def replace(self, **changes) -> Request:
        """A copy with some attributes changed."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class Layer:
    """One decoder layer as a method sees it.

    Attributes:
      index: the layer's position in the model.
      weights: the dense kernels of every prunable projection of the layer, by name, in float32
        (a mapping: the pipeline widens a kernel when it is first read).
      stats: the calibration statistics of each target's input, by projection name (``q``, ``k``
        and ``v`` share one object, as do ``gate`` and ``up``).
      spec: the layer's attention, as the objective recomputes it.
      attention_inputs: the calibration attention inputs ``(b, n, d)`` (after the input norm)
        when the method asked for them (:attr:`Method.attention_inputs`), else ``None``.
      extras: the layer's q/k/v biases and q/k norm multipliers, as the model applies them
        (all ``None`` for Llama).
    """

    index: int
    weights: Mapping[str, Float[Array, "d_in d_out"]]
    stats: dict[str, InputStats]
    spec: AttentionSpec
    attention_inputs: Float[Array, "b n d"] | None = None
    extras: QKExtras = dataclasses.field(default_factory=QKExtras)


@dataclasses.dataclass
class Pruned:
    """A method's result for one layer.

    Attributes:
      weights: the new kernels of the pruned projections.
      masks: their boolean keep-masks (``True`` = kept), same keys and shapes.
      facts: per-layer facts for ``metrics.json`` (JSON-able); a ``"warnings"`` list is printed
        by the pipeline and kept in the run's warnings.
    """

    weights: dict[str, jax.Array]
    masks: dict[str, Bool[Array, "d_in d_out"]]
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    """A pruning method as the pipeline and the command line see it.

    Attributes:
      name: what ``--method`` takes.
      prune: the entry point ``(layer, request, options) -> Pruned``; ``options`` is the
        method's section of the run (``None`` without a section).
      description: one line for ``--help`` and the docs.
      section: the config dataclass of the method's options (its flags are
        ``--NAME.FIELD``), or ``None``.
      groups: the unstructured comparison groups it accepts; the first is its default.
      attention_inputs: ``options -> (sequences, tokens)`` of calibration attention inputs the
        method needs in :attr:`Layer.attention_inputs`, or ``None`` for none.
      check: ``(request, options, input_dims) -> None``, raising ``ValueError`` for settings
        that do not fit the model's shapes (``input_dims``: inputs of each projection).
      prune_layers: optional ``(layers, request, options) -> [Pruned]`` for layers that are
        independent (calibrated on the dense model's inputs), when solving them together beats
        one at a time.
      prune_matrix: for methods that prune each matrix on its own, ``(w, stats, request,
        options) -> (w_pruned, keep)``; other methods may hand matrices to it.
      summary: ``(request, options) -> dict`` of run-level facts for ``metrics.json``.
      prunes: ``False`` for the dense reference, which the pipeline neither calibrates nor
        calls.
    """

    name: str
    prune: Callable[[Layer, Request, Any], Pruned]
    description: str = ""
    section: type | None = None
    groups: tuple[str, ...] = ()
    attention_inputs: Callable[[Any], tuple[int, int] | None] = lambda options: None
    check: Callable[[Request, Any, Mapping[str, int]], None] | None = None
    prune_layers: Callable[[list[Layer], Request, Any], list[Pruned]] | None = None
    prune_matrix: MatrixFn | None = None
    summary: Callable[[Request, Any], dict] = lambda request, options: {}
    prunes: bool = True

    def group(self, request: Request) -> str | None:
        """The comparison group this method uses for ``request`` (its default when unset)."""
        if request.group is not None:
            return request.group
        return self.groups[0] if self.groups else None


def per_matrix(prune_matrix: MatrixFn) -> Callable[[Layer, Request, Any], Pruned]:
    """The layer entry point of a method that prunes each target matrix on its own."""

    def prune(layer: Layer, request: Request, options: Any) -> Pruned:
        weights, masks = {}, {}
        for name in request.targets:
            w = layer.weights[name]
            weights[name], masks[name] = prune_matrix(w, layer.stats.get(name), request, options)
        return Pruned(weights, masks)

    return prune

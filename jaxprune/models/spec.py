"""The description of one layer's attention that pruning code reads instead of the model family.

The objective (:mod:`jaxprune.objective`, :mod:`jaxprune.objective_vjp`) and the softmax-aware
method recompute a layer's attention probabilities from its q/k kernels and its attention input.
Everything that recomputation needs beyond the kernels is in an :class:`AttentionSpec`, which each
model family builds per layer (``config.attention_spec(layer)``). A new family with a new
attention feature adds a field here and its handling in the objective once, for every family,
never a branch on the family's name.
"""

from __future__ import annotations

import dataclasses
import math

from jaxprune.rope import Llama3RopeScaling


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention shape and numerics, as the pruning objective recomputes them.

    Frozen, so it hashes and can be a static argument of a jitted function.
    """

    # Query heads ``h``.
    n_heads: int
    # Key/value heads ``g`` (grouped-query attention: query head ``i`` uses ``i // (h/g)``).
    n_kv_heads: int
    # Features per head ``dh``.
    head_dim: int
    # RoPE base, or None for no rotary embedding.
    rope_theta: float | None = 10000.0
    # Llama 3 RoPE frequency scaling, or None for plain RoPE.
    rope_scaling: Llama3RopeScaling | None = None
    # Multiplier of the scores ``q . k`` (None: ``1 / sqrt(head_dim)``).
    query_scale: float | None = None

    def __post_init__(self):
        for name in ("n_heads", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionSpec.{name} must be a positive int, got {value!r}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"AttentionSpec: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}."
            )

    @property
    def scale(self) -> float:
        """The multiplier of the attention scores."""
        return 1.0 / math.sqrt(self.head_dim) if self.query_scale is None else self.query_scale

    @property
    def q_width(self) -> int:
        """Outputs of the query projection, ``h * dh``."""
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Outputs of the key (and value) projection, ``g * dh``."""
        return self.n_kv_heads * self.head_dim

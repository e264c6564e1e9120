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
from typing import NamedTuple

import jax

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
    # Epsilon of the per-head RMSNorm on q and k between the projection and RoPE (Gemma 3,
    # Qwen3), or None for no q/k norm; its weights are the layer's ``q_norm``/``k_norm``.
    qk_norm_eps: float | None = None
    # Keys a query attends to at most, itself included (sliding-window layers), or None.
    window: int | None = None

    def __post_init__(self):
        for name in ("n_heads", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionSpec.{name} must be a positive int, got {value!r}.")
        if self.window is not None and self.window < 1:
            raise ValueError(f"AttentionSpec.window must be positive or None, got {self.window}.")
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


class QKExtras(NamedTuple):
    """A layer's arrays that shape its queries, keys and values beside the kernels, exactly as
    the model applies them; a family without them leaves them ``None`` (Llama has none).

    The objective never prunes or fits them: biases are added after the (pruned) projection,
    and the norm multipliers scale the per-head RMS-normalised q and k before RoPE (the family's
    effective multiplier, such as Gemma's ``1 + w``).
    """

    # Query bias (h*dh,).
    q_bias: jax.Array | None = None
    # Key bias (g*dh,).
    k_bias: jax.Array | None = None
    # Value bias (g*dh,) (the output form of the term and the output error).
    v_bias: jax.Array | None = None
    # Multiplier of the per-head q RMSNorm (dh,) (with spec.qk_norm_eps).
    q_norm: jax.Array | None = None
    # Multiplier of the per-head k RMSNorm (dh,).
    k_norm: jax.Array | None = None


def check_window(owner: str, window) -> None:
    """Raises ``ValueError`` unless a config's ``sliding_window`` is a positive int or None."""
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"{owner}.sliding_window must be a positive int or None, got {window!r}.")

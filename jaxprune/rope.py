"""Rotary position embeddings, one implementation for the model and the objective.

Layout: Hugging Face ``rotate_half`` (the first half of each head's features pairs with the second
half). GGUF files store Q/K rows permuted for interleaved pairs; the GGUF loader undoes that
permutation so that this one layout serves every weight source.

Frequencies: plain RoPE ``1 / theta^(2i/dh)``, optionally rescaled as Llama 3 does
(:class:`Llama3RopeScaling`, Hugging Face ``rope_type: "llama3"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3's RoPE frequency scaling (``rope_type: "llama3"``).

    Frequencies whose wavelength exceeds ``original_max_position_embeddings / low_freq_factor``
    are divided by ``factor``; those with a wavelength below
    ``original_max_position_embeddings / high_freq_factor`` are kept; the ones in between are
    blended linearly in ``original_max_position_embeddings / wavelength``. Frozen, so it hashes
    and can be a static argument of a jitted function.
    """

    # Divisor of the low frequencies (8 for Llama 3.1, 32 for Llama 3.2).
    factor: float
    # Wavelengths above original_max_position_embeddings / low_freq_factor are fully divided.
    low_freq_factor: float
    # Wavelengths below original_max_position_embeddings / high_freq_factor are left unchanged.
    high_freq_factor: float
    # Context length of pretraining before the scaling (8192 for Llama 3.1 and 3.2).
    original_max_position_embeddings: int

    def __post_init__(self):
        if not self.factor >= 1.0:
            raise ValueError(f"Llama3RopeScaling.factor must be >= 1, got {self.factor!r}.")
        if not 0.0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "Llama3RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"low_freq_factor={self.low_freq_factor!r}, "
                f"high_freq_factor={self.high_freq_factor!r}."
            )
        orig = self.original_max_position_embeddings
        if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
            raise ValueError(
                "Llama3RopeScaling.original_max_position_embeddings must be a positive int, "
                f"got {orig!r}."
            )

    @classmethod
    def from_hf(cls, scaling: dict[str, Any], max_position_embeddings: int | None = None):
        """Reads a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict of type ``llama3``.

        Args:
          scaling: the dict; ``rope_type`` (or ``type``) and ``rope_theta`` are ignored here.
          max_position_embeddings: used when ``original_max_position_embeddings`` is absent,
            as ``transformers`` does.

        Returns:
          The scaling. Raises ``ValueError`` naming the missing key.
        """
        orig = scaling.get("original_max_position_embeddings", max_position_embeddings)
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in scaling]
        if orig is None:
            missing.append("original_max_position_embeddings")
        if missing:
            raise ValueError(
                f"llama3 RoPE scaling {scaling} lacks the keys {missing}; a Llama 3 config.json "
                "has factor, low_freq_factor, high_freq_factor, original_max_position_embeddings."
            )
        return cls(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(orig),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``rope_scaling`` dict (``rope_type: "llama3"``) of this scaling."""
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> Float[Array, " half"]:
    """Inverse frequencies (radians per position) of the ``dh/2`` rotary pairs, in float32.

    Args:
      head_dim: features per head ``dh`` (even).
      theta: RoPE base (``rope_theta``).
      scaling: optional Llama 3 rescaling of the frequencies.

    Returns:
      ``(dh/2,)`` inverse frequencies, highest first.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    orig = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    # Fraction of the original frequency kept: 0 for long wavelengths (fully divided by factor),
    # 1 for short ones, linear in orig / wavelength in between.
    smooth = (orig / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1.0 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(
        wavelength > orig / scaling.low_freq_factor, inv_freq / scaling.factor, blended
    )
    return jnp.where(wavelength < orig / scaling.high_freq_factor, inv_freq, scaled)


def rope_cos_sin(
    positions: Int[Array, " n"],
    head_dim: int,
    theta: float,
    dtype=jnp.float32,
    scaling: Llama3RopeScaling | None = None,
) -> tuple[Float[Array, "n dh"], Float[Array, "n dh"]]:
    """Cosines and sines of the rotary angles.

    Args:
      positions: token positions, shape ``(n,)``.
      head_dim: features per head ``dh`` (even).
      theta: RoPE base (``rope_theta``).
      dtype: dtype of the returned tables.
      scaling: optional Llama 3 frequency scaling (the model config's ``rope_scaling``).

    Returns:
      ``(cos, sin)``, each ``(n, dh)``, the ``dh/2`` frequencies repeated for both halves.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rope_tables(
    n: int,
    head_dim: int,
    theta: float,
    dtype=jnp.float32,
    scaling: Llama3RopeScaling | None = None,
) -> tuple[Float[Array, "n dh"], Float[Array, "n dh"]]:
    """:func:`rope_cos_sin` of positions ``0 .. n-1``, computed when the caller is traced.

    Inside ``jit`` the tables are then constants of the compiled function. Computed in the graph,
    XLA fuses the ``cos``/``sin`` into every elementwise consumer and evaluates them once per
    element of the rotated queries and keys: that made RoPE 17% of the objective's
    loss-and-gradient step (``benchmarks/objective_step.py``). The same float32 operations as
    :func:`rope_cos_sin`, run eagerly: equal to the in-graph tables up to float32 rounding (tested).
    """
    with jax.ensure_compile_time_eval():
        return rope_cos_sin(jnp.arange(n), head_dim, theta, dtype=dtype, scaling=scaling)


def apply_rope(
    x: Float[Array, "... n dh"], cos: Float[Array, "n dh"], sin: Float[Array, "n dh"]
) -> Float[Array, "... n dh"]:
    """Rotates ``x`` by the angles in ``cos``/``sin`` (``rotate_half`` layout).

    Args:
      x: features with the token axis second to last, shape ``(..., n, dh)``.
      cos: cosine table ``(n, dh)`` from :func:`rope_cos_sin`.
      sin: sine table ``(n, dh)``.

    Returns:
      The rotated features, same shape and dtype as ``x``.
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    lead = (1,) * (x.ndim - 2)
    cos = cos.reshape(lead + cos.shape).astype(x.dtype)
    sin = sin.reshape(lead + sin.shape).astype(x.dtype)
    return x * cos + rotated * sin

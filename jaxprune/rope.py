"""Rotary position embeddings, one implementation for the model and the objective.

Layout: Hugging Face ``rotate_half`` (the first half of each head's features pairs with the second
half). GGUF files store Q/K rows permuted for interleaved pairs; the GGUF loader undoes that
permutation so that this one layout serves every weight source.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rope_cos_sin(
    positions: Int[Array, " n"], head_dim: int, theta: float, dtype=jnp.float32
) -> tuple[Float[Array, "n dh"], Float[Array, "n dh"]]:
    """Cosines and sines of the rotary angles.

    Args:
      positions: token positions, shape ``(n,)``.
      head_dim: features per head ``dh`` (even).
      theta: RoPE base (``rope_theta``).
      dtype: dtype of the returned tables.

    Returns:
      ``(cos, sin)``, each ``(n, dh)``, the ``dh/2`` frequencies repeated for both halves.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


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

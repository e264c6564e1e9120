"""Layer-at-a-time forward passes over calibration chunks (memory: one layer's activations).

The model's own ``DecoderLayer`` is reused through ``nnx.split``/``nnx.merge``, so pruning code
captures exactly the activations the forward uses. Every layer of a model shares one graph
definition, so each function compiles once per chunk shape.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.models.llama import DecoderLayer, Llama

# Which captured activation feeds each prunable projection.
INPUT_OF = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o": "o_in",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down": "down_in",
}


@partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state).embed(tokens)


@partial(jax.jit, static_argnums=0)
def apply_layer(graphdef, state, h, cos, sin):
    """``h -> layer(h)`` for one layer given as ``nnx.split`` parts."""
    return nnx.merge(graphdef, state)(h, cos, sin)


@partial(jax.jit, static_argnums=(0, 5))
def capture_layer(graphdef, state, h, cos, sin, names: tuple[str, ...]):
    """The named captures of one layer (``attn_in``, ``o_in``, ``mlp_in``, ``down_in``).

    When only ``attn_in`` is asked for, just the input norm runs (the q/k/v inputs need no more).
    """
    layer: DecoderLayer = nnx.merge(graphdef, state)
    if set(names) <= {"attn_in"}:
        return {"attn_in": layer.input_layernorm(h)}
    _, caps = layer(h, cos, sin, capture=True)
    return {n: caps[n] for n in names}


def embed_chunks(model: Llama, chunks: list) -> list[jax.Array]:
    """Token chunks ``(b, t)`` -> embeddings ``(b, t, d)``, chunk by chunk."""
    graphdef, state = nnx.split(model)
    return [_embed(graphdef, state, jnp.asarray(c, jnp.int32)) for c in chunks]


class ModelLayers:
    """Where :func:`jaxprune.pipeline.prune_model` finds each decoder layer: here, in the model
    held in memory. :class:`jaxprune.streaming.StreamedLayers` is the other source, reading each
    layer from disk when its turn comes.

    A source embeds token chunks, opens layer ``li`` (its module, whose kernels the caller may
    rewrite) and closes it when the caller is done with it.
    """

    # Every layer is in memory at once (what calibrating all layers on dense inputs needs).
    in_memory = True

    def __init__(self, model: Llama):
        self.model = model

    def embed(self, chunks: list) -> list[jax.Array]:
        """Token chunks ``(b, t)`` -> embeddings ``(b, t, d)``."""
        return embed_chunks(self.model, chunks)

    def open(self, li: int) -> DecoderLayer:
        """Decoder layer ``li``."""
        return self.model.layers[li]

    def close(self, li: int, pending=()) -> None:
        """Done with layer ``li`` (it stays in the model; ``pending``, the arrays computed from
        it, need no wait)."""
        del li, pending

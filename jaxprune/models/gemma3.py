"""The Gemma 3 text decoder in Flax NNX, with the same surface as :mod:`jaxprune.models.llama`.

Architecture (Hugging Face ``Gemma3ForCausalLM``, ``model_type: gemma3_text``): token embedding
scaled by ``sqrt(hidden_size)``, ``num_layers`` decoder layers, a final RMSNorm and the output head
tied to the embedding. Each layer is

    h = h + post_attention_layernorm(attn(input_layernorm(h)))
    h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

with grouped-query attention whose queries and keys get a per-head RMSNorm (``q_norm``,
``k_norm``) before RoPE, scores scaled by ``query_pre_attn_scalar ** -0.5``, and a GeGLU MLP
(tanh GELU). Layers alternate between sliding-window attention (a query sees itself and the
``sliding_window - 1`` keys before it; RoPE base ``rope_local_theta``) and global attention (every
earlier key; RoPE base ``rope_theta``): by default the layers ``l`` with ``(l + 1) % 6 == 0`` are
global.

Conventions (as in :mod:`jaxprune.models.llama`):
  * Linear kernels are input-major, ``y = x @ kernel`` of shape ``(d_in, d_out)``, with no bias.
  * Gemma's RMSNorm multiplies by ``1 + weight`` in float32; ``weight`` is stored as Hugging Face
    stores it (zero-centred, without the ``+1``), and the GGUF loader subtracts the ``1`` that
    llama.cpp's files include.
  * RoPE comes from :mod:`jaxprune.rope` and the masked softmax (causal, sliding window) from
    :mod:`jaxprune.attention`, the functions the pruning objective uses.
  * ``DecoderLayer.__call__(h, cos, sin, capture=True)`` returns the captures of Llama's layer, so
    the pruning pipeline needs no Gemma branch; ``Gemma3.layer_context(layer, t)`` gives each layer
    its own RoPE tables.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxprune.attention import blocked_causal_attention, grouped_probs

# Llama's generic helpers, re-exported: they need only `hidden`/`head` (the chunked NLL, whose
# (t, 262144) logits are never held whole) and Llama's projection names, which Gemma shares.
from jaxprune.models.llama import PROJECTIONS as PROJECTIONS
from jaxprune.models.llama import QUERY_BLOCK, linear
from jaxprune.models.llama import logits_fn as logits_fn
from jaxprune.models.llama import make_forward as make_forward
from jaxprune.models.llama import projection_kernels as projection_kernels
from jaxprune.models.llama import token_nll as token_nll
from jaxprune.models.spec import AttentionSpec, QKExtras
from jaxprune.rope import apply_rope, rope_tables

SLIDING = "sliding_attention"
GLOBAL = "full_attention"
# Hugging Face's default: every sixth layer is global.
SLIDING_WINDOW_PATTERN = 6


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Shape and numerics of a Gemma 3 text decoder."""

    model_type: ClassVar[str] = "gemma3_text"

    # Number of tokens in the vocabulary (rows of the embedding).
    vocab_size: int
    # Width of the residual stream ``d``.
    hidden_size: int
    # Width of the GeGLU MLP's hidden layer.
    intermediate_size: int
    # Number of decoder layers.
    num_layers: int
    # Number of query heads ``h``.
    num_heads: int
    # Number of key/value heads ``g`` (grouped-query attention; ``h`` must be a multiple of it).
    num_kv_heads: int
    # Features per head ``dh`` (even, for rotary embeddings).
    head_dim: int
    # RoPE base of the global layers (Hugging Face ``rope_theta``).
    rope_theta: float = 1_000_000.0
    # RoPE base of the sliding-window layers (Hugging Face ``rope_local_base_freq``).
    rope_local_theta: float = 10_000.0
    # Keys a query of a sliding layer sees, itself included.
    sliding_window: int = 512
    # Per layer, "sliding_attention" or "full_attention"; None: global where (l + 1) % 6 == 0.
    layer_types: tuple[str, ...] | None = None
    # The scores are multiplied by query_pre_attn_scalar ** -0.5.
    query_pre_attn_scalar: float = 256.0
    # Epsilon inside every RMSNorm's square root (the q/k norms' too).
    rms_norm_eps: float = 1e-6
    # Whether the output head reuses the token embedding (Gemma 3 ties them).
    tie_embeddings: bool = True
    # Longest context the model was trained for (only written back to config.json).
    max_position_embeddings: int = 32_768
    # Id of the BOS token, which Gemma expects in front of every sequence.
    bos_token_id: int = 2
    # Id of the EOS token.
    eos_token_id: int = 1
    # Id of the padding token.
    pad_token_id: int = 0

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "sliding_window",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Gemma3Config.{name} must be a positive int, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Gemma3Config.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention."
            )
        if self.head_dim % 2:
            raise ValueError(f"Gemma3Config.head_dim must be even for RoPE, got {self.head_dim}.")
        if not self.query_pre_attn_scalar > 0:
            raise ValueError(
                "Gemma3Config.query_pre_attn_scalar must be positive, got "
                f"{self.query_pre_attn_scalar!r}."
            )
        types = self.layer_types
        if types is None:
            types = tuple(
                GLOBAL if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else SLIDING
                for i in range(self.num_layers)
            )
        types = tuple(types)
        bad = sorted({t for t in types if t not in (SLIDING, GLOBAL)})
        if len(types) != self.num_layers or bad:
            raise ValueError(
                f"Gemma3Config.layer_types must hold {self.num_layers} entries, each "
                f"{SLIDING!r} or {GLOBAL!r}; got {len(types)} entries"
                + (f" with {bad}" if bad else "")
                + "."
            )
        # A frozen dataclass: store the explicit tuple, so equal configs compare equal.
        object.__setattr__(self, "layer_types", types)

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` attends within the sliding window."""
        return self.layer_types[layer] == SLIDING

    def layer_rope_theta(self, layer: int) -> float:
        """The RoPE base of decoder layer ``layer``."""
        return self.rope_local_theta if self.is_sliding(layer) else self.rope_theta

    def layer_window(self, layer: int) -> int | None:
        """Keys a query of layer ``layer`` sees at most, itself included (None: all before it)."""
        return self.sliding_window if self.is_sliding(layer) else None

    @property
    def query_scale(self) -> float:
        """The multiplier of the attention scores, ``query_pre_attn_scalar ** -0.5``."""
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def window_bos(self) -> int:
        """The token every evaluation and calibration window starts with (PROTOCOL.md: Gemma
        is trained with BOS and is far off without one)."""
        return self.bos_token_id

    def projection_inputs(self) -> dict[str, int]:
        """Inputs of each prunable projection (the axis N:M groups and SparseGPT blocks run
        along)."""
        dims = dict.fromkeys(("q", "k", "v", "gate", "up"), self.hidden_size)
        return dims | {"o": self.num_heads * self.head_dim, "down": self.intermediate_size}

    def attention_spec(self, layer: int) -> AttentionSpec:
        """The attention of decoder layer ``layer`` as pruning code recomputes it: its RoPE base,
        the query scale, the q/k norm and, on sliding layers, the window."""
        return AttentionSpec(
            n_heads=self.num_heads,
            n_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.layer_rope_theta(layer),
            query_scale=self.query_scale,
            qk_norm_eps=self.rms_norm_eps,
            window=self.layer_window(layer),
        )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Gemma3Config:
        """Reads a Hugging Face ``config.json`` dict of a Gemma 3 text model.

        Args:
          hf: the parsed ``config.json`` (``Gemma3ForCausalLM``, model_type ``gemma3_text``), in
            the transformers 4 layout (``rope_theta``, ``rope_local_base_freq``) or the
            transformers 5 one (``rope_parameters`` per layer type).

        Returns:
          The matching config. Raises ``ValueError`` naming the key when a required key is
          missing or the file asks for a feature this model does not implement (biases, logit
          softcapping, scaled RoPE, bidirectional attention, another activation).
        """
        if "text_config" in hf:
            raise ValueError(
                "config.json describes a multimodal Gemma 3 (model_type 'gemma3' with a "
                "text_config); jaxprune loads the text decoder only (model_type 'gemma3_text', "
                "Gemma3ForCausalLM), such as google/gemma-3-270m or -1b."
            )
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks the Gemma 3 keys {missing}; is this Gemma 3?")
        if hf.get("attention_bias"):
            raise ValueError("config.json asks for attention biases; the Gemma 3 model has none.")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ValueError(
                f"config.json hidden_activation={act!r}; only gelu_pytorch_tanh is supported."
            )
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is not None:
                raise ValueError(
                    f"config.json {key}={hf[key]!r}; Gemma 3 has no softcapping and jaxprune "
                    "implements none (Gemma 2 checkpoints are not supported)."
                )
        if hf.get("use_bidirectional_attention"):
            raise ValueError(
                "config.json use_bidirectional_attention=true; only causal attention is supported."
            )
        theta, local_theta = _rope_bases(hf)
        heads = hf["num_attention_heads"]
        layers = hf["num_hidden_layers"]
        types = hf.get("layer_types")
        if types is None:
            pattern = int(hf.get("sliding_window_pattern") or SLIDING_WINDOW_PATTERN)
            types = [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(layers)]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=theta,
            rope_local_theta=local_theta,
            sliding_window=int(hf.get("sliding_window") or 4096),
            layer_types=tuple(types),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            max_position_embeddings=int(hf.get("max_position_embeddings") or 32_768),
            bos_token_id=int(_first(hf.get("bos_token_id"), 2)),
            eos_token_id=int(_first(hf.get("eos_token_id"), 1)),
            pad_token_id=int(_first(hf.get("pad_token_id"), 0)),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``Gemma3ForCausalLM`` ``config.json`` dict of this config.

        Returns:
          The dict in the transformers 4 layout (``rope_theta``, ``rope_local_base_freq``,
          ``layer_types`` at the top level), which transformers 5 also reads.
        """
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_local_base_freq": self.rope_local_theta,
            "rope_scaling": None,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            # transformers' config takes an int (every Gemma 3 size has an integral one).
            "query_pre_attn_scalar": _integral(self.query_pre_attn_scalar),
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "attention_bias": False,
            "use_bidirectional_attention": False,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }


def _integral(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _first(value, default):
    """A token id from config.json, which may be a list (several EOS ids) or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else value


def _rope_bases(hf: dict[str, Any]) -> tuple[float, float]:
    """``(global base, sliding base)`` from either transformers layout; refuses scaled RoPE."""
    params = hf.get("rope_parameters") or {}
    per_type = {k: params.get(k) or {} for k in (GLOBAL, SLIDING)}
    scaling = hf.get("rope_scaling") or {}
    for where, p in (
        ("rope_scaling", scaling),
        *((f"rope_parameters.{k}", v) for k, v in per_type.items()),
    ):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"config.json {where} has rope_type {kind!r}; only plain RoPE (rope_type "
                "'default') is implemented for Gemma 3, as the 270M and 1B models use."
            )
    theta = hf.get("rope_theta", per_type[GLOBAL].get("rope_theta", 1_000_000.0))
    local = hf.get("rope_local_base_freq", per_type[SLIDING].get("rope_theta", 10_000.0))
    return float(theta), float(local)


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm ``x / rms(x) * (1 + weight)``, all in float32, then cast back (as
    transformers' ``Gemma3RMSNorm``: the product is taken before the cast, unlike Llama's)."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        # Zero-centred, as Hugging Face stores it: the identity scale is weight = 0.
        self.weight = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def scale(self) -> Float[Array, " d"]:
        """The effective multiplier ``1 + weight`` in float32."""
        return 1.0 + self.weight[...].astype(jnp.float32)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale().reshape((1,) * (x.ndim - 1) + (x.shape[-1],))
        return (normed * scale).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query causal self-attention with q/k RMSNorm, RoPE and an optional window."""

    def __init__(self, config: Gemma3Config, layer: int, dtype, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        # Static (part of the graph definition): sliding and global layers compile apart.
        self.window = c.layer_window(layer)
        self.query_scale = c.query_scale
        self.q_proj = linear(c.hidden_size, c.num_heads * c.head_dim, dtype, rngs)
        self.k_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, dtype, rngs)
        self.v_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, dtype, rngs)
        self.o_proj = linear(c.num_heads * c.head_dim, c.hidden_size, dtype, rngs)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)

    def _qkv(self, x, cos, sin):
        b, t, _ = x.shape
        h, g, dh = self.num_heads, self.num_kv_heads, self.head_dim
        # Per-head norm on (b, t, heads, dh), then heads to axis 1 for apply_rope.
        q = self.q_norm(self.q_proj(x).reshape(b, t, h, dh)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(b, t, g, dh)).transpose(0, 2, 1, 3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).reshape(b, t, g, dh).transpose(0, 2, 1, 3)
        # Query head i uses key/value head i // (h/g): split h as (g, h/g), group-major.
        return q.reshape(b, g, h // g, t, dh), k, v

    def _scale(self, logits):
        # Scaled in the activation dtype, as transformers does.
        return logits * jnp.asarray(self.query_scale, logits.dtype)

    def _probs(self, q, k, dtype, query_positions=None):
        # Softmax in float32 (as transformers does) so bf16 weights do not degrade the rows.
        return grouped_probs(q, k, self._scale, query_positions, self.window).astype(dtype)

    def __call__(
        self, x: Float[Array, "b t d"], cos: Float[Array, "t dh"], sin: Float[Array, "t dh"]
    ) -> tuple[Float[Array, "b t d"], Float[Array, "b t hdh"]]:
        """Attention output and the input of ``o_proj``.

        Query rows go in blocks of ``QUERY_BLOCK``, each against only the keys it can see: those
        up to its last row and, on a sliding layer, from ``window - 1`` before its first row. No
        ``(t, t)`` score matrix is formed, and a sliding layer's cost is linear in ``t``.

        Args:
          x: normed hidden states ``(b, t, d)``.
          cos: RoPE cosines ``(t, dh)`` (this layer's base).
          sin: RoPE sines ``(t, dh)``.

        Returns:
          ``(out (b, t, d), o_in (b, t, h*dh))``.
        """
        q, k, v = self._qkv(x, cos, sin)
        out = blocked_causal_attention(
            q,
            k,
            v,
            scale_logits=self._scale,
            window=self.window,
            block=QUERY_BLOCK,
            logit_scale=self.query_scale,
        )
        return self.o_proj(out), out

    def probs(
        self, x: Float[Array, "b t d"], cos: Float[Array, "t dh"], sin: Float[Array, "t dh"]
    ) -> Float[Array, "b h t t"]:
        """The attention probabilities ``(b, h, t, t)`` of every query head."""
        b, t, _ = x.shape
        q, k, _ = self._qkv(x, cos, sin)
        return self._probs(q, k, x.dtype).reshape(b, self.num_heads, t, t)


class MLP(nnx.Module):
    """GeGLU MLP ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, config: Gemma3Config, dtype, rngs: nnx.Rngs):
        self.gate_proj = linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.up_proj = linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.down_proj = linear(config.intermediate_size, config.hidden_size, dtype, rngs)

    def __call__(
        self, x: Float[Array, "b t d"]
    ) -> tuple[Float[Array, "b t d"], Float[Array, "b t f"]]:
        """Returns ``(out (b, t, d), down_in (b, t, f))``."""
        # transformers' gelu_pytorch_tanh is the tanh approximation of GELU.
        down_in = jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x)
        return self.down_proj(down_in), down_in


class DecoderLayer(nnx.Module):
    """Gemma 3 layer: ``h + post_norm(attn(norm(h)))``, then ``h + post_norm(mlp(norm(h)))``."""

    def __init__(self, config: Gemma3Config, layer: int, dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, dtype)
        self.self_attn = Attention(config, layer, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(d, eps, dtype)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, dtype)
        self.mlp = MLP(config, dtype, rngs)
        self.post_feedforward_layernorm = RMSNorm(d, eps, dtype)

    def __call__(
        self,
        h: Float[Array, "b t d"],
        cos: Float[Array, "t dh"],
        sin: Float[Array, "t dh"],
        capture: bool = False,
    ) -> Float[Array, "b t d"] | tuple[Float[Array, "b t d"], dict[str, jax.Array]]:
        """Applies the layer.

        Args:
          h: residual stream ``(b, t, d)``.
          cos: RoPE cosines ``(t, dh)`` for positions ``0..t-1``, of this layer's base
            (:meth:`Gemma3.layer_context`).
          sin: RoPE sines ``(t, dh)``.
          capture: also return the activations pruning calibrates on.

        Returns:
          ``h_out (b, t, d)``; with ``capture``, ``(h_out, captures)`` where ``captures`` holds
          ``"attn_in"`` (b, t, d): normed input of q/k/v; ``"o_in"`` (b, t, h*dh): input of
          ``o_proj``; ``"mlp_in"`` (b, t, d): normed input of gate/up; ``"down_in"`` (b, t, f):
          input of ``down_proj``; ``"probs"`` (b, h, t, t): attention probabilities.
        """
        attn_in = self.input_layernorm(h)
        attn_out, o_in = self.self_attn(attn_in, cos, sin)
        h = h + self.post_attention_layernorm(attn_out)
        mlp_in = self.pre_feedforward_layernorm(h)
        mlp_out, down_in = self.mlp(mlp_in)
        h = h + self.post_feedforward_layernorm(mlp_out)
        if not capture:
            return h
        captures = {
            "attn_in": attn_in,
            "o_in": o_in,
            "mlp_in": mlp_in,
            "down_in": down_in,
            # Computed apart from the blocked forward; jit drops it when no caller reads it.
            "probs": self.self_attn.probs(attn_in, cos, sin),
        }
        return h, captures


class Gemma3(nnx.Module):
    """The decoder: ``head(layers(embed(tokens)))``."""

    def __init__(self, config: Gemma3Config, dtype=jnp.float32, *, rngs: nnx.Rngs):
        """Builds a randomly initialised model.

        Args:
          config: model shape.
          dtype: dtype of parameters and activations.
          rngs: random streams for the initial weights (loaders replace them).
        """
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [DecoderLayer(config, i, dtype, rngs) for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if config.tie_embeddings
            else linear(config.hidden_size, config.vocab_size, dtype, rngs)
        )

    def embed(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        """Token embeddings times ``sqrt(hidden_size)`` ``(b, t, d)``; the factor is rounded to
        the activation dtype first, as transformers does (25.25 instead of 25.298 in bf16)."""
        e = self.embed_tokens(tokens)
        return e * jnp.asarray(math.sqrt(self.config.hidden_size), jnp.float32).astype(e.dtype)

    def attention_extras(self, layer: int) -> QKExtras:
        """The q/k norm multipliers of decoder layer ``layer`` as the objective applies them:
        ``1 + weight`` in float32, ``(dh,)`` each (Gemma has no biases)."""
        attn = self.layers[layer].self_attn
        return QKExtras(q_norm=attn.q_norm.scale(), k_norm=attn.k_norm.scale())

    def layer_context(self, layer: int, t: int) -> tuple[jax.Array, ...]:
        """What decoder layer ``layer`` takes beside its input for ``t`` tokens: the RoPE
        tables ``(cos, sin)`` ``(t, dh)`` of its base (local or global)."""
        c = self.config
        return rope_tables(t, c.head_dim, c.layer_rope_theta(layer), dtype=jnp.float32)

    def head(self, h: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """Final norm and output head: logits ``(b, t, vocab)``."""
        h = self.norm(h)
        if self.lm_head is None:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def hidden(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        """The residual stream after the last layer ``(b, t, d)`` (before the final norm)."""
        t = tokens.shape[1]
        tables = {}  # one pair of RoPE tables per base
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            theta = self.config.layer_rope_theta(i)
            if theta not in tables:
                tables[theta] = self.layer_context(i, t)
            h = layer(h, *tables[theta])
        return h

    def __call__(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t v"]:
        """Next-token logits ``(b, t, vocab)`` of the token ids ``(b, t)``."""
        return self.head(self.hidden(tokens))


# (Hugging Face name, model state path, whether PyTorch's (out, in) weight is transposed into the
# model's (in, out) kernel). "{i}" is the layer index. The loaders read this table
# (jaxprune.loaders.params); norm weights are zero-centred in both places.
HF_PARAMS: list[tuple[str, str, bool]] = [
    ("model.embed_tokens.weight", "embed_tokens.embedding", False),
    ("model.norm.weight", "norm.weight", False),
    ("lm_head.weight", "lm_head.kernel", True),
    *[
        (f"model.layers.{{i}}.{n}.weight", f"layers.{{i}}.{n}.weight", False)
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "self_attn.q_norm",
            "self_attn.k_norm",
        )
    ],
    *[
        (
            f"model.layers.{{i}}.self_attn.{p}_proj.weight",
            f"layers.{{i}}.self_attn.{p}_proj.kernel",
            True,
        )
        for p in ("q", "k", "v", "o")
    ],
    *[
        (f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers.{{i}}.mlp.{p}_proj.kernel", True)
        for p in ("gate", "up", "down")
    ],
]

"""A Llama-family decoder in Flax NNX, written so that pruning can read and rewrite its kernels.

Architecture: token embedding, ``num_layers`` pre-norm decoder layers (RMSNorm, grouped-query
attention with rotary embeddings, RMSNorm, SwiGLU MLP), a final RMSNorm and the output head
(optionally tied to the embedding). It matches Hugging Face ``LlamaForCausalLM`` numerically.

Conventions:
  * Linear kernels are input-major, ``y = x @ kernel`` with ``kernel`` of shape ``(d_in, d_out)``,
    and have no bias (the families built on Llama add the attention biases their config names).
    Loaders transpose PyTorch's ``(out, in)`` weights on the way in (:data:`HF_PARAMS`).
  * Rotary embeddings come from :mod:`jaxprune.rope` and the causal softmax from
    :mod:`jaxprune.attention`, the same functions the pruning objective uses, so the objective
    sees exactly the attention the model computes.
  * ``DecoderLayer.__call__(..., capture=True)`` also returns the inputs of every projection and
    the attention probabilities, so calibration code never duplicates the forward pass.
  * The attention reads the layer's :class:`~jaxprune.models.spec.AttentionSpec`, the description
    the pruning objective reads too: Qwen2 (:mod:`jaxprune.models.qwen2`), Qwen3 and Mistral are
    this model with another config (biases, a q/k norm, a sliding window).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxprune.attention import blocked_causal_attention, grouped_probs
from jaxprune.kernels import head_nll as fused_head
from jaxprune.kernels import matmul as fused_matmul
from jaxprune.models.spec import AttentionSpec, QKExtras
from jaxprune.rope import Llama3RopeScaling, apply_rope, rope_tables

# Names of the projections that pruning may touch, in the order a layer applies them.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# Query rows per attention block (each block sees only the keys up to its last row).
QUERY_BLOCK = 256
# Tokens per chunk of the output head in the NLL (the full (t, vocab) logits are never kept).
NLL_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder.

    Families built on Llama's layers (Qwen2, Qwen3, Mistral) subclass it: they add their fields,
    override :meth:`attention_spec` and :attr:`attention_biases`, and read and write their own
    ``config.json`` keys around :meth:`hf_fields` and :meth:`hf_common`.
    """

    # Hugging Face model_type, architecture and the family's name in messages.
    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"
    family_name: ClassVar[str] = "Llama"

    # Number of tokens in the vocabulary (rows of the embedding).
    vocab_size: int
    # Width of the residual stream ``d``.
    hidden_size: int
    # Width of the SwiGLU MLP's hidden layer.
    intermediate_size: int
    # Number of decoder layers.
    num_layers: int
    # Number of query heads ``h``.
    num_heads: int
    # Number of key/value heads ``g`` (grouped-query attention; ``h`` must be a multiple of it).
    num_kv_heads: int
    # Features per head ``dh`` (even, for rotary embeddings).
    head_dim: int
    # Base of the rotary embedding frequencies.
    rope_theta: float = 10000.0
    # Epsilon inside every RMSNorm's square root.
    rms_norm_eps: float = 1e-5
    # Whether the output head reuses the transposed token embedding.
    tie_embeddings: bool = False
    # Llama 3 RoPE frequency scaling, or None for plain RoPE.
    rope_scaling: Llama3RopeScaling | None = None

    def __post_init__(self):
        cls = type(self).__name__
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{cls}.{name} must be a positive int, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{cls}.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention."
            )
        if self.head_dim % 2:
            raise ValueError(f"{cls}.head_dim must be even for RoPE, got {self.head_dim}.")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise ValueError(
                f"{cls}.rope_scaling must be a jaxprune.rope.Llama3RopeScaling or None, got "
                f"{self.rope_scaling!r}; use {cls}.from_hf_config to read a config.json dict."
            )

    def projection_inputs(self) -> dict[str, int]:
        """Inputs of each prunable projection (the axis N:M groups and SparseGPT blocks run
        along)."""
        dims = dict.fromkeys(("q", "k", "v", "gate", "up"), self.hidden_size)
        return dims | {"o": self.num_heads * self.head_dim, "down": self.intermediate_size}

    @property
    def attention_biases(self) -> tuple[str, ...]:
        """The attention projections (of ``"q", "k", "v", "o"``) that add a bias: none in a
        Llama."""
        return ()

    def attention_spec(self, layer: int) -> AttentionSpec:
        """The attention of decoder layer ``layer`` as pruning code recomputes it, and as the
        model's :class:`Attention` computes it (the same in every layer of a Llama)."""
        del layer  # every Llama layer attends alike
        return AttentionSpec(
            n_heads=self.num_heads,
            n_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
        )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Reads a Hugging Face ``config.json`` dict of a Llama-architecture model.

        Args:
          hf: the parsed ``config.json`` (``LlamaForCausalLM`` keys).

        Returns:
          The matching config. Raises ``ValueError`` naming the key when a required key is
          missing or when the file asks for a feature this model does not implement (biases,
          RoPE scaling other than none or ``llama3``, an activation other than SiLU).
        """
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("config.json asks for attention/MLP biases; the Llama model has none.")
        return cls(**cls.hf_fields(hf))

    @classmethod
    def hf_fields(cls, hf: dict[str, Any]) -> dict[str, Any]:
        """The fields of :class:`LlamaConfig` from a ``config.json`` dict, which every family
        built on Llama shares (shape, RoPE, norm epsilon, tied head).

        Args:
          hf: the parsed ``config.json``.

        Returns:
          ``{field: value}``. Raises ``ValueError`` naming the key when a required key is missing,
          the activation is not SiLU or the RoPE scaling is other than none or ``llama3``.
        """
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(
                f"config.json lacks the {cls.family_name} keys {missing}; is this a "
                f"{cls.family_name} model?"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"config.json hidden_act={hf['hidden_act']!r}; only silu is supported."
            )
        # transformers 4 writes rope_scaling, transformers 5 rope_parameters; read both, since a
        # scaled RoPE (e.g. Llama 3's "llama3" type) changes the low frequencies at every length.
        rope_scaling = None
        for key in ("rope_scaling", "rope_parameters"):
            scaling = hf.get(key) or {}
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "llama3":
                found = Llama3RopeScaling.from_hf(scaling, hf.get("max_position_embeddings"))
                if rope_scaling is not None and found != rope_scaling:
                    raise ValueError(
                        f"config.json rope_scaling and rope_parameters disagree: {rope_scaling} "
                        f"vs {found}; keep one of them."
                    )
                rope_scaling = found
            elif kind != "default":
                raise ValueError(
                    f"config.json {key} has rope_type {kind!r}, which is not supported; only "
                    "plain RoPE (rope_type 'default') and 'llama3' are implemented."
                )
        heads = hf["num_attention_heads"]
        # transformers 5 moved rope_theta into rope_parameters; read either place.
        theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``LlamaForCausalLM`` ``config.json`` dict of this config.

        Returns:
          The dict in the transformers 4 layout (``rope_theta`` and ``rope_scaling`` at the top
          level), which transformers 5 also reads.
        """
        return self.hf_common() | {"attention_bias": False, "mlp_bias": False}

    def hf_common(self) -> dict[str, Any]:
        """The ``config.json`` keys every family built on Llama writes alike: the class and
        ``model_type`` of the config's family, the shape, RoPE, norm epsilon and tied head."""
        scaling = self.rope_scaling
        # transformers warns unless the scaled context exceeds the original one; Llama 3 models
        # ship max_position_embeddings = factor * original, so write that.
        max_positions = (
            8192
            if scaling is None
            else int(scaling.factor * scaling.original_max_position_embeddings)
        )
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if scaling is None else scaling.to_hf(),
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": max_positions,
            "torch_dtype": "float32",
        }


class RMSNorm(nnx.Module):
    """``x / rms(x) * weight``, with the statistics in float32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Cast before scaling, in the order transformers' LlamaRMSNorm uses, so bf16 runs match.
        weight = self.weight[...].reshape((1,) * (x.ndim - 1) + (x.shape[-1],))
        return weight * normed.astype(x.dtype)


def linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    """A projection ``y = x @ kernel (+ bias)``; in float32 on a CPU its product runs in the fused
    matmul kernel (:mod:`jaxprune.kernels.matmul`, XLA's elsewhere and for the derivatives)."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=dtype,
        dot_general=fused_matmul.dot_general,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings, as the layer's
    :class:`~jaxprune.models.spec.AttentionSpec` describes it: a Llama's plain attention, and the
    features of the families built on it (projection biases, a per-head q/k RMSNorm between the
    projection and RoPE, a sliding window)."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs, layer: int = 0):
        c = config
        spec = c.attention_spec(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        # Static (part of the graph definition): layers with and without a window compile apart.
        self.window = spec.window
        q_width, kv_width, biased = spec.q_width, spec.kv_width, c.attention_biases
        self.q_proj = linear(c.hidden_size, q_width, dtype, rngs, "q" in biased)
        self.k_proj = linear(c.hidden_size, kv_width, dtype, rngs, "k" in biased)
        self.v_proj = linear(c.hidden_size, kv_width, dtype, rngs, "v" in biased)
        self.o_proj = linear(q_width, c.hidden_size, dtype, rngs, "o" in biased)
        eps = spec.qk_norm_eps
        self.q_norm = None if eps is None else RMSNorm(c.head_dim, eps, dtype)
        self.k_norm = None if eps is None else RMSNorm(c.head_dim, eps, dtype)

    def _qkv(self, x, cos, sin):
        b, t, _ = x.shape
        h, g, dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(b, t, h, dh)
        k = self.k_proj(x).reshape(b, t, g, dh)
        if self.q_norm is not None:  # per head, before RoPE (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        # Heads to axis 1 so the token axis is second to last, as apply_rope expects.
        q = apply_rope(q.transpose(0, 2, 1, 3), cos, sin)
        k = apply_rope(k.transpose(0, 2, 1, 3), cos, sin)
        v = self.v_proj(x).reshape(b, t, g, dh).transpose(0, 2, 1, 3)
        # Query head i uses key/value head i // (h/g): split h as (g, h/g), group-major.
        return q.reshape(b, g, h // g, t, dh), k, v

    def _scale(self, logits):
        return logits / math.sqrt(self.head_dim)

    def _probs(self, q, k, dtype, query_positions=None):
        # Softmax in float32 (as transformers does) so bf16 weights do not degrade the rows.
        return grouped_probs(q, k, self._scale, query_positions, self.window).astype(dtype)

    def __call__(
        self, x: Float[Array, "b t d"], cos: Float[Array, "t dh"], sin: Float[Array, "t dh"]
    ) -> tuple[Float[Array, "b t d"], Float[Array, "b t hdh"]]:
        """Attention output and the input of ``o_proj``.

        Query rows go in blocks of ``QUERY_BLOCK``, each against only the keys it can see: those
        up to its last row and, with a window, from ``window - 1`` before its first row. The
        masked upper triangle of the score matrix is never computed (about 40% of the attention
        work and memory at 2048 tokens), no ``(t, t)`` matrix is kept, and a windowed layer's
        cost is linear in ``t``.

        Args:
          x: normed hidden states ``(b, t, d)``.
          cos: RoPE cosines ``(t, dh)``.
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
            logit_scale=1 / math.sqrt(self.head_dim),
        )
        return self.o_proj(out), out

    def probs(
        self, x: Float[Array, "b t d"], cos: Float[Array, "t dh"], sin: Float[Array, "t dh"]
    ) -> Float[Array, "b h t t"]:
        """The attention probabilities ``(b, h, t, t)`` of every query head."""
        b, t, _ = x.shape
        q, k, _ = self._qkv(x, cos, sin)
        return self._probs(q, k, x.dtype).reshape(b, self.num_heads, t, t)

    def extras(self) -> QKExtras:
        """The arrays beside the kernels that shape q, k and v, as the objective applies them:
        the q/k/v biases and the q/k norm multipliers in float32, ``None`` where the layer has
        none."""

        def value(param):
            return None if param is None else param[...].astype(jnp.float32)

        return QKExtras(
            q_bias=value(self.q_proj.bias),
            k_bias=value(self.k_proj.bias),
            v_bias=value(self.v_proj.bias),
            q_norm=value(self.q_norm and self.q_norm.weight),
            k_norm=value(self.k_norm and self.k_norm.weight),
        )


class MLP(nnx.Module):
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
        self.gate_proj = linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.up_proj = linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.down_proj = linear(config.intermediate_size, config.hidden_size, dtype, rngs)

    def __call__(
        self, x: Float[Array, "b t d"]
    ) -> tuple[Float[Array, "b t d"], Float[Array, "b t f"]]:
        """Returns ``(out (b, t, d), down_in (b, t, f))``."""
        down_in = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(down_in), down_in


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs, layer: int = 0):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

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
          cos: RoPE cosines ``(t, dh)`` for positions ``0..t-1``.
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
        h = h + attn_out
        mlp_in = self.post_attention_layernorm(h)
        mlp_out, down_in = self.mlp(mlp_in)
        h = h + mlp_out
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


class Llama(nnx.Module):
    """The decoder: ``head(layers(embed(tokens)))``."""

    def __init__(self, config: LlamaConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
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
            [DecoderLayer(config, dtype, rngs, i) for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if config.tie_embeddings
            else linear(config.hidden_size, config.vocab_size, dtype, rngs)
        )

    def embed(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        """Token embeddings ``(b, t, d)``."""
        return self.embed_tokens(tokens)

    def rope(self, t: int) -> tuple[Float[Array, "t dh"], Float[Array, "t dh"]]:
        """RoPE ``(cos, sin)`` tables ``(t, dh)`` for positions ``0..t-1``."""
        c = self.config
        return rope_tables(t, c.head_dim, c.rope_theta, dtype=jnp.float32, scaling=c.rope_scaling)

    def attention_extras(self, layer: int) -> QKExtras:
        """The q/k/v biases and q/k norm multipliers of decoder layer ``layer`` (a Llama has
        none: all ``None``)."""
        return self.layers[layer].self_attn.extras()

    def layer_context(self, layer: int, t: int) -> tuple[jax.Array, ...]:
        """What decoder layer ``layer`` takes beside its input for ``t`` tokens: the RoPE
        tables ``(cos, sin)`` (the same for every Llama layer)."""
        del layer
        return self.rope(t)

    def head(self, h: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """Final norm and output head: logits ``(b, t, vocab)``."""
        h = self.norm(h)
        if self.lm_head is None:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def hidden(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        """The residual stream after the last layer ``(b, t, d)`` (before the final norm)."""
        cos, sin = self.rope(tokens.shape[1])
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h

    def __call__(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t v"]:
        """Next-token logits ``(b, t, vocab)`` of the token ids ``(b, t)``."""
        return self.head(self.hidden(tokens))


def projection_kernels(layer: DecoderLayer) -> dict[str, nnx.Param]:
    """The prunable kernels of one layer, keyed ``"q","k","v","o","gate","up","down"``.

    Each value is the layer's own ``nnx.Param`` (input-major, ``(d_in, d_out)``), so assigning
    ``kernels["q"][...] = new`` rewrites the model in place.
    """
    attn, mlp = layer.self_attn, layer.mlp
    modules = {
        "q": attn.q_proj,
        "k": attn.k_proj,
        "v": attn.v_proj,
        "o": attn.o_proj,
        "gate": mlp.gate_proj,
        "up": mlp.up_proj,
        "down": mlp.down_proj,
    }
    return {name: modules[name].kernel for name in PROJECTIONS}


def _token_nll(model: Llama, tokens: Int[Array, "b t"]) -> Float[Array, "b t-1"]:
    return head_nll(model, model.hidden(tokens), tokens)


def head_nll(model, h: Float[Array, "b t d"], tokens: Int[Array, "b t"]) -> Float[Array, "b t-1"]:
    """Next-token NLLs ``(b, t-1)`` of ``tokens`` from the residual stream ``h`` after the last
    layer: the model's final norm and head, in chunks of tokens, so (chunk, vocab) logits exist
    at a time instead of (t, vocab). On a CPU in float32 the head and the NLL run in the fused
    kernel of :mod:`jaxprune.kernels.head_nll` (no logits are written), unless
    ``JAXPRUNE_CPU_KERNELS=xla``; its derivatives are the chunked computation's."""
    h, targets = h[:, :-1], tokens[:, 1:]
    weight = head_weight(model)
    if weight is not None and fused_head.applies(h, weight):
        b, t, d = h.shape
        flat = targets.reshape(b * t)
        normed = model.norm(h).reshape(b * t, d)
        reference = lambda normed, weight: _chunked_nll(  # noqa: E731
            lambda x: x @ weight.T, normed[None], flat[None]
        )[0]
        return fused_head.head_nll(normed, weight, flat, reference).reshape(b, t)
    return _chunked_nll(model.head, h, targets)


def head_weight(model) -> jax.Array | None:
    """The output head as ``(vocab, d)`` (the tied embedding table, or the head's kernel
    transposed), or None for a head with a bias."""
    if model.lm_head is None:
        return model.embed_tokens.embedding[...]
    if model.lm_head.bias is not None:
        return None
    return model.lm_head.kernel[...].T


def _chunked_nll(head, h, targets):
    """NLLs from ``head`` (hidden states to logits) in chunks of ``NLL_CHUNK`` tokens."""
    out = []
    for start in range(0, h.shape[1], NLL_CHUNK):
        logits = head(h[:, start : start + NLL_CHUNK]).astype(jnp.float32)
        tgt = targets[:, start : start + NLL_CHUNK, None]
        picked = jnp.take_along_axis(logits, tgt, axis=-1)[..., 0]
        out.append(jax.nn.logsumexp(logits, axis=-1) - picked)
    return jnp.concatenate(out, axis=1)


@partial(jax.jit, static_argnums=0)
def token_nll(graphdef: nnx.GraphDef, state: nnx.State, tokens: Int[Array, "b t"]) -> jax.Array:
    """Pure, jit-compiled next-token negative log-likelihoods.

    Args:
      graphdef: from ``nnx.split(model)`` (static: one compile per model structure).
      state: the matching parameter state.
      tokens: token ids ``(b, t)``.

    Returns:
      ``nll (b, t-1)`` in float32: ``nll[:, i] = -log p(tokens[:, i+1] | tokens[:, :i+1])``.
    """
    return _token_nll(nnx.merge(graphdef, state), tokens)


@partial(jax.jit, static_argnums=0)
def logits_fn(graphdef: nnx.GraphDef, state: nnx.State, tokens: Int[Array, "b t"]) -> jax.Array:
    """Pure, jit-compiled forward pass: logits ``(b, t, vocab)`` of ``tokens (b, t)``."""
    return nnx.merge(graphdef, state)(tokens)


def make_forward(model: Llama):
    """Splits ``model`` once and returns a jitted ``tokens (b, t) -> logits (b, t, vocab)``."""
    graphdef, state = nnx.split(model)
    return partial(logits_fn, graphdef, state)


# (Hugging Face name, model state path, whether PyTorch's (out, in) weight is transposed into the
# model's (in, out) kernel). "{i}" is the layer index. The loaders read this table
# (jaxprune.loaders.params) for Llama and the families built on it: a row whose parameter a model
# lacks (a bias, a q/k norm) matches no slot of it, so such a tensor in a file is reported as
# unknown.
HF_PARAMS: list[tuple[str, str, bool]] = [
    ("model.embed_tokens.weight", "embed_tokens.embedding", False),
    ("model.norm.weight", "norm.weight", False),
    ("lm_head.weight", "lm_head.kernel", True),
    *[
        (f"model.layers.{{i}}.{n}.weight", f"layers.{{i}}.{n}.weight", False)
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_norm",
            "self_attn.k_norm",
        )
    ],
    *[
        (
            f"model.layers.{{i}}.self_attn.{p}_proj.{kind}",
            f"layers.{{i}}.self_attn.{p}_proj.{slot}",
            kind == "weight",
        )
        for p in ("q", "k", "v", "o")
        for kind, slot in (("weight", "kernel"), ("bias", "bias"))
    ],
    *[
        (f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers.{{i}}.mlp.{p}_proj.kernel", True)
        for p in ("gate", "up", "down")
    ],
]

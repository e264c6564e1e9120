"""The Qwen3 family (dense models): a Llama with a per-head RMSNorm on queries and keys.

Hugging Face ``Qwen3ForCausalLM`` (``model_type: qwen3``) is :mod:`jaxprune.models.llama`'s decoder
whose attention normalises each head of the projected queries and keys with an RMSNorm of its own
(``q_norm``, ``k_norm``: ``x / rms(x) * weight`` over ``head_dim``, as Llama's norm) after the
projection and before RoPE; ``head_dim`` is explicit (128 in the released models, not
``hidden_size / heads``). ``attention_bias: true`` adds a bias to all four attention projections
(false in the released models). The norm's epsilon is in each layer's
:class:`~jaxprune.models.spec.AttentionSpec` and its multipliers reach the pruning objective
through ``Qwen3.attention_extras``; sliding windows are read as Qwen2's
(:mod:`jaxprune.models.qwen2`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jaxprune.models.llama import HF_PARAMS as HF_PARAMS
from jaxprune.models.llama import PROJECTIONS as PROJECTIONS
from jaxprune.models.llama import Llama
from jaxprune.models.llama import logits_fn as logits_fn
from jaxprune.models.llama import make_forward as make_forward
from jaxprune.models.llama import projection_kernels as projection_kernels
from jaxprune.models.llama import token_nll as token_nll
from jaxprune.models.qwen2 import Qwen2Config
from jaxprune.models.spec import AttentionSpec


@dataclasses.dataclass(frozen=True)
class Qwen3Config(Qwen2Config):
    """Shape and numerics of a Qwen3 decoder: :class:`~jaxprune.models.qwen2.Qwen2Config`'s, with
    the q/k norm and the attention biases as ``attention_bias`` says."""

    model_type: ClassVar[str] = "qwen3"
    architecture: ClassVar[str] = "Qwen3ForCausalLM"
    family_name: ClassVar[str] = "Qwen3"

    # Whether the q, k, v and o projections add a bias (config.json attention_bias).
    attention_bias: bool = False

    @property
    def attention_biases(self) -> tuple[str, ...]:
        """All four attention projections with ``attention_bias``, else none."""
        return ("q", "k", "v", "o") if self.attention_bias else ()

    def attention_spec(self, layer: int) -> AttentionSpec:
        """Qwen2's attention spec (RoPE, window) with the q/k norm, whose epsilon is the model's
        ``rms_norm_eps``."""
        return dataclasses.replace(super().attention_spec(layer), qk_norm_eps=self.rms_norm_eps)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Qwen3Config:
        """Reads a Hugging Face ``config.json`` dict of a dense Qwen3 model.

        Args:
          hf: the parsed ``config.json`` (``Qwen3ForCausalLM`` keys; a missing ``head_dim`` is
            ``hidden_size / num_attention_heads``).

        Returns:
          The matching config. Raises ``ValueError`` naming the key when a required key is
          missing or the file asks for what the model does not implement (RoPE scaling other
          than none or ``llama3``, an activation other than SiLU).
        """
        return cls(
            **cls.hf_fields(hf),
            **cls.window_fields(hf),
            attention_bias=bool(hf.get("attention_bias", False)),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``Qwen3ForCausalLM`` ``config.json`` dict of this config."""
        return self.hf_common() | self.window_keys() | {"attention_bias": self.attention_bias}


class Qwen3(Llama):
    """The Qwen3 decoder: :class:`~jaxprune.models.llama.Llama`'s layers built from a
    :class:`Qwen3Config` (q/k norm, optional biases and sliding windows)."""

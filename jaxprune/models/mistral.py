"""The Mistral family: a Llama whose every layer attends within a sliding window.

Hugging Face ``MistralForCausalLM`` (``model_type: mistral``) is :mod:`jaxprune.models.llama`'s
decoder where a query sees itself and the ``sliding_window - 1`` keys before it in every layer
(``sliding_window: null``, as in Mistral 7B v0.2 and later, means all earlier keys). ``head_dim``
may be explicit (Mistral NeMo: 128 with ``hidden_size / heads = 160``). The window is in each
layer's :class:`~jaxprune.models.spec.AttentionSpec`, so the pruning objective masks as the model
does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jaxprune.models.llama import HF_PARAMS as HF_PARAMS
from jaxprune.models.llama import PROJECTIONS as PROJECTIONS
from jaxprune.models.llama import Llama, LlamaConfig
from jaxprune.models.llama import logits_fn as logits_fn
from jaxprune.models.llama import make_forward as make_forward
from jaxprune.models.llama import projection_kernels as projection_kernels
from jaxprune.models.llama import token_nll as token_nll
from jaxprune.models.spec import AttentionSpec, check_window


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    """Shape and numerics of a Mistral decoder: :class:`LlamaConfig`'s and the window."""

    model_type: ClassVar[str] = "mistral"
    architecture: ClassVar[str] = "MistralForCausalLM"
    family_name: ClassVar[str] = "Mistral"

    # Keys a query sees in every layer, itself included; None: all earlier keys.
    sliding_window: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_window(type(self).__name__, self.sliding_window)

    def attention_spec(self, layer: int) -> AttentionSpec:
        """Llama's attention spec with the window (the same in every layer)."""
        return dataclasses.replace(super().attention_spec(layer), window=self.sliding_window)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> MistralConfig:
        """Reads a Hugging Face ``config.json`` dict of a Mistral model.

        Args:
          hf: the parsed ``config.json`` (``MistralForCausalLM`` keys).

        Returns:
          The matching config. Raises ``ValueError`` naming the key when a required key is
          missing or the file asks for what the model does not implement (biases, RoPE scaling
          other than none or ``llama3``, an activation other than SiLU, layers of different
          attention types).
        """
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("config.json asks for attention/MLP biases; Mistral has none.")
        types = set(hf.get("layer_types") or ())
        if len(types) > 1:
            # MistralForCausalLM ignores layer_types; a file that mixes them wants another model
            # (Ministral), which would compute something else than what it asks for.
            raise ValueError(
                f"config.json layer_types mixes {sorted(types)}; MistralForCausalLM attends alike "
                "in every layer, and alternating layers (Ministral) are not supported."
            )
        window = hf.get("sliding_window")
        return cls(**cls.hf_fields(hf), sliding_window=None if window is None else int(window))

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``MistralForCausalLM`` ``config.json`` dict of this config."""
        return self.hf_common() | {"sliding_window": self.sliding_window}


class Mistral(Llama):
    """The Mistral decoder: :class:`~jaxprune.models.llama.Llama`'s layers built from a
    :class:`MistralConfig` (a sliding window in every layer)."""

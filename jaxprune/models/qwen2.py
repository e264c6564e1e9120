"""The Qwen2 family (Qwen2, Qwen2.5): a Llama with biases on the query, key and value projections.

Hugging Face ``Qwen2ForCausalLM`` (``model_type: qwen2``) is :mod:`jaxprune.models.llama`'s decoder
with ``q_proj``, ``k_proj`` and ``v_proj`` adding a bias (``o_proj`` has none). The biases are
never pruned: they are added after the (pruned) projection, as the model adds them, and the
pruning objective receives them through ``Qwen2.attention_extras`` (:class:`QKExtras`).

``config.json`` may turn on sliding-window attention (``use_sliding_window``, usually false): the
layers ``layer_types`` names ``sliding_attention`` (by default those from ``max_window_layers`` on)
then see the ``sliding_window`` keys up to themselves, as transformers computes it. The window is
part of each layer's :class:`~jaxprune.models.spec.AttentionSpec`, so the objective masks alike.
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

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    """Shape and numerics of a Qwen2 decoder: :class:`LlamaConfig`'s, the window and which layers
    use it."""

    model_type: ClassVar[str] = "qwen2"
    architecture: ClassVar[str] = "Qwen2ForCausalLM"
    family_name: ClassVar[str] = "Qwen2"

    # Keys a query of a sliding layer sees, itself included; None: no layer slides
    # (config.json use_sliding_window false, as in every released Qwen2 and Qwen2.5).
    sliding_window: int | None = None
    # Per layer, "sliding_attention" or "full_attention"; None: every layer full.
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        check_window(name, self.sliding_window)
        types = tuple(self.layer_types or (FULL,) * self.num_layers)
        bad = sorted({t for t in types if t not in (SLIDING, FULL)})
        if len(types) != self.num_layers or bad:
            raise ValueError(
                f"{name}.layer_types must hold {self.num_layers} entries, each {SLIDING!r} or "
                f"{FULL!r}; got {len(types)} entries" + (f" with {bad}" if bad else "") + "."
            )
        # A frozen dataclass: store the explicit tuple, so equal configs compare equal.
        object.__setattr__(self, "layer_types", types)

    @property
    def attention_biases(self) -> tuple[str, ...]:
        """Qwen2 adds a bias to the query, key and value projections (not to the output one)."""
        return ("q", "k", "v")

    def layer_window(self, layer: int) -> int | None:
        """Keys a query of layer ``layer`` sees at most, itself included (None: all before it)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def attention_spec(self, layer: int) -> AttentionSpec:
        """Llama's attention spec with this layer's window."""
        return dataclasses.replace(super().attention_spec(layer), window=self.layer_window(layer))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Qwen2Config:
        """Reads a Hugging Face ``config.json`` dict of a Qwen2 model.

        Args:
          hf: the parsed ``config.json`` (``Qwen2ForCausalLM`` keys).

        Returns:
          The matching config. Raises ``ValueError`` naming the key when a required key is
          missing or the file asks for what the model does not implement (RoPE scaling other
          than none or ``llama3``, an activation other than SiLU).
        """
        return cls(**cls.hf_fields(hf), **cls.window_fields(hf))

    @staticmethod
    def window_fields(hf: dict[str, Any]) -> dict[str, Any]:
        """``sliding_window`` and ``layer_types`` from a Qwen2 or Qwen3 ``config.json``, as
        transformers resolves them: the window only with ``use_sliding_window``, and without
        ``layer_types`` the layers from ``max_window_layers`` on slide."""
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        layers = hf["num_hidden_layers"]
        types = hf.get("layer_types")
        if types is None:
            first = hf.get("max_window_layers", 28)
            types = [SLIDING if window is not None and i >= first else FULL for i in range(layers)]
        if window is None and SLIDING in types:
            # transformers fails on such a file (sliding layers without a window).
            raise ValueError(
                "config.json layer_types names sliding_attention layers but sliding windows are "
                f"off (use_sliding_window={hf.get('use_sliding_window')!r}, sliding_window="
                f"{hf.get('sliding_window')!r}); set use_sliding_window and sliding_window, or "
                "mark every layer full_attention."
            )
        return {
            "sliding_window": None if window is None else int(window),
            "layer_types": tuple(types),
        }

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``Qwen2ForCausalLM`` ``config.json`` dict of this config."""
        return self.hf_common() | self.window_keys()

    def window_keys(self) -> dict[str, Any]:
        """The ``config.json`` keys of the sliding window, as transformers reads them back."""
        sliding = [i for i, t in enumerate(self.layer_types) if t == SLIDING]
        return {
            "use_sliding_window": self.sliding_window is not None,
            "sliding_window": self.sliding_window,
            # Only read when layer_types is absent; written consistent with it where it can be.
            "max_window_layers": sliding[0] if sliding else self.num_layers,
            "layer_types": list(self.layer_types),
        }


class Qwen2(Llama):
    """The Qwen2 decoder: :class:`~jaxprune.models.llama.Llama`'s layers built from a
    :class:`Qwen2Config` (q/k/v biases, optional sliding windows)."""

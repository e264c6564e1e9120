"""Model families, one module each (``llama``, ``qwen2``, ``qwen3``, ``mistral``, ``gemma3``): the
decoder in Flax NNX, its config, and the per-layer :class:`~jaxprune.models.spec.AttentionSpec`
that pruning code reads. Qwen2, Qwen3 and Mistral are Llama's decoder with another config (q/k/v
biases, a q/k norm, a sliding window); Gemma 3 has layers of its own.

:data:`FAMILIES` maps a checkpoint's ``model_type`` to its family module; :func:`family` imports
it on demand, so reading a spec does not import every family. :data:`CLASSES` names each family
module's config class (with ``from_hf_config``/``to_hf_config``) and model class, which is all the
loaders need to know of a family; a family module may also hold its own Hugging Face parameter
table (``HF_PARAMS``, see :mod:`jaxprune.loaders.params`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import jax.numpy as jnp

# The dtypes a model's parameters and activations may take (``--dtype``). Calibration statistics,
# the mask solves and the weight updates run in float32 whatever the model's dtype.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Hugging Face model_type (or GGUF architecture) -> the module of its family.
FAMILIES = {
    "llama": "jaxprune.models.llama",
    "qwen2": "jaxprune.models.qwen2",
    "qwen3": "jaxprune.models.qwen3",
    "mistral": "jaxprune.models.mistral",
    "gemma3_text": "jaxprune.models.gemma3",
    # llama.cpp's architecture name for the Gemma 3 text decoder.
    "gemma3": "jaxprune.models.gemma3",
}
# Family module -> the names of its config class and its model class.
CLASSES = {
    "jaxprune.models.llama": ("LlamaConfig", "Llama"),
    "jaxprune.models.qwen2": ("Qwen2Config", "Qwen2"),
    "jaxprune.models.qwen3": ("Qwen3Config", "Qwen3"),
    "jaxprune.models.mistral": ("MistralConfig", "Mistral"),
    "jaxprune.models.gemma3": ("Gemma3Config", "Gemma3"),
}


def family(model_type: str) -> ModuleType:
    """The family module of a checkpoint's ``model_type``.

    Raises:
      ValueError: an unsupported ``model_type``, naming the supported ones.
    """
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; jaxprune implements the families "
            f"{', '.join(sorted(FAMILIES))}."
        )
    return importlib.import_module(FAMILIES[model_type])


def config_class(model_type: str) -> type:
    """The config class of a checkpoint's ``model_type`` (``ValueError`` as :func:`family`)."""
    module = family(model_type)
    return getattr(module, CLASSES[module.__name__][0])


def model_class(config) -> type:
    """The model class (an ``nnx.Module``) of a family's config instance."""
    module = importlib.import_module(type(config).__module__)
    if module.__name__ not in CLASSES:
        raise ValueError(
            f"{type(config).__name__} is not the config of a registered model family; "
            f"known families: {', '.join(sorted(CLASSES))}."
        )
    return getattr(module, CLASSES[module.__name__][1])

"""Model families, one module each (``llama``): the decoder in Flax NNX, its config, and the
per-layer :class:`~jaxprune.models.spec.AttentionSpec` that pruning code reads.

:data:`FAMILIES` maps a checkpoint's ``model_type`` to its family module; :func:`family` imports
it on demand, so reading a spec does not import every family.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Hugging Face model_type -> the module of its family.
FAMILIES = {"llama": "jaxprune.models.llama"}


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

"""Hugging Face tensor names and layout <-> the parameters of a model family's NNX model.

One table per family maps each Hugging Face tensor name (PyTorch layout, linear weights
``(out, in)``) to a path in the model's NNX state and says whether it is transposed: the family
module's ``HF_PARAMS`` (:data:`jaxprune.models.llama.HF_PARAMS`, which the families built on Llama
share, :data:`jaxprune.models.gemma3.HF_PARAMS`); the family comes from the config's class. Loading
fills an abstract model built with ``nnx.eval_shape`` (no random weights are ever materialised)
and reports every mismatch at once, so a wrong checkpoint is diagnosed in one run instead of one
error per attempt.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from jaxprune.models import model_class
from jaxprune.models.llama import HF_PARAMS as LLAMA_PARAMS
from jaxprune.models.llama import Llama, LlamaConfig


class WeightLoadError(UserError, ValueError):
    """The tensors do not fit the model; the message lists every problem found."""

    def __init__(self, problems: list[str], family: str = "Llama"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{len(problems)} problem(s) loading weights into the {family} model:\n{lines}\n"
            "Check that config.json (or the GGUF metadata) matches the weight files."
        )


def _transpose(w: np.ndarray) -> np.ndarray:
    # PyTorch nn.Linear stores (out, in); the model multiplies x @ kernel with (in, out).
    return np.ascontiguousarray(w.T)


def _same(w: np.ndarray) -> np.ndarray:
    return w


# Buffers some checkpoints carry that the model recomputes; present or not, they are ignored.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _rules(model_cls: type) -> tuple[list, list]:
    """``(HF -> model, model -> HF)`` rules of a family: its module's ``HF_PARAMS`` table of
    ``(HF name, state path, transposed)`` (Llama's for a module without one). The transforms are
    their own inverses (identity or transpose), so the table serves both directions."""
    module = importlib.import_module(model_cls.__module__)
    table = getattr(module, "HF_PARAMS", LLAMA_PARAMS)
    rows = [(hf, path, _transpose if transposed else _same) for hf, path, transposed in table]
    return (
        [(_pattern(hf), path, fn) for hf, path, fn in rows],
        [(_pattern(path), hf, fn) for hf, path, fn in rows],
    )


def _translate(name: str, rules) -> tuple[str, Callable] | None:
    for pattern, template, fn in rules:
        match = pattern.fullmatch(name)
        if match:
            index = match.groupdict().get("i")
            return (template if index is None else template.replace("{i}", index)), fn
    return None


def _path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def model_from_tensors(
    config: LlamaConfig, tensors: dict[str, np.ndarray], dtype=jnp.float32
) -> Llama:
    """Builds the model of ``config``'s family (:class:`Llama`, ``Gemma3``, ...) holding the given
    Hugging Face tensors.

    Args:
      config: the model's shape (its class decides the family).
      tensors: Hugging Face names -> arrays in PyTorch layout, e.g.
        ``model.layers.{i}.self_attn.q_proj.weight`` of shape ``(out, in)``,
        ``model.embed_tokens.weight`` ``(vocab, d)``; ``lm_head.weight`` may be absent when the
        embeddings are tied (and is accepted there only if it equals the embedding).
      dtype: dtype of the model's parameters.

    Returns:
      The model. Raises :class:`WeightLoadError` listing every missing tensor, tensor of the wrong
      shape, and unknown name.
    """
    model_cls = model_class(config)
    hf_to_model, model_to_hf = _rules(model_cls)
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    slots = {_path_key(path): (path, var) for path, var in nnx.to_flat_state(state)}

    problems, filled, misfit = [], {}, set()
    for name in sorted(tensors):
        if _IGNORED.fullmatch(name):
            continue
        value = np.asarray(tensors[name])
        hit = _translate(name, hf_to_model)
        if name == "lm_head.weight" and config.tie_embeddings:
            embed = tensors.get("model.embed_tokens.weight")
            # transformers' state_dict() lists the tied head too; harmless when it is the same.
            if embed is None or embed.shape != value.shape or not np.array_equal(embed, value):
                problems.append(
                    "lm_head.weight is present and differs from model.embed_tokens.weight but "
                    "the config ties them (tie_word_embeddings=true); untie the config or drop it"
                )
            continue
        if hit is None or hit[0] not in slots:
            problems.append(
                f"unknown tensor {name} {value.shape}: the model has no such parameter "
                f"(num_layers={config.num_layers}, tie_embeddings={config.tie_embeddings})"
            )
            continue
        key, fn = hit
        expected = slots[key][1].shape
        if fn(value).shape != expected:
            pt_expected = expected[::-1] if fn is _transpose else expected
            problems.append(
                f"wrong shape for {name}: got {value.shape}, expected {pt_expected} "
                "(PyTorch layout)"
            )
            misfit.add(key)
            continue
        filled[key] = fn(value)
    for key in slots:
        if key not in filled and key not in misfit:
            hf_name = _translate(key, model_to_hf)[0]
            problems.append(f"missing tensor {hf_name} (model parameter {key})")
    if problems:
        raise WeightLoadError(problems, model_cls.__name__)

    flat = [
        (path, var.replace(jnp.asarray(filled[key], dtype=dtype)))
        for key, (path, var) in slots.items()
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def tensors_from_model(model: Llama) -> dict[str, np.ndarray]:
    """The inverse of :func:`model_from_tensors`: Hugging Face names, PyTorch layout.

    Args:
      model: a :class:`Llama` or another family's model (possibly pruned).

    Returns:
      Hugging Face name -> NumPy array (linear weights ``(out, in)``); no ``lm_head.weight``
      when the embeddings are tied, as Hugging Face checkpoints store them.
    """
    _, model_to_hf = _rules(type(model))
    _, state = nnx.split(model)
    tensors = {}
    for path, var in nnx.to_flat_state(state):
        key = _path_key(path)
        hit = _translate(key, model_to_hf)
        if hit is None:
            raise ValueError(f"model parameter {key} has no Hugging Face name in the loader table.")
        name, fn = hit
        tensors[name] = np.ascontiguousarray(fn(np.asarray(var[...])))
    return tensors


def hf_name(model_cls: type, key: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
    """The Hugging Face name of one model parameter and the layout transform between the two.

    Args:
      model_cls: the family's model class (:class:`Llama`, ``Gemma3``, ...).
      key: the parameter's dotted state path, such as ``layers.3.self_attn.q_proj.kernel``.

    Returns:
      ``(name, transform)``: ``model.layers.3.self_attn.q_proj.weight`` and the transform (a
      transpose or the identity, its own inverse) that turns either layout into the other; or
      ``None`` when the table has no such parameter.
    """
    return _translate(key, _rules(model_cls)[1])

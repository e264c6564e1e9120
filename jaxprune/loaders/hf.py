"""Hugging Face model folders: ``config.json`` plus one or several ``*.safetensors`` files.

Reads the layout ``transformers`` writes (a single ``model.safetensors``, or shards listed by
``model.safetensors.index.json``) and writes a folder that ``transformers`` loads
(``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``MistralForCausalLM``,
``Gemma3ForCausalLM``), so a pruned model can leave jaxprune for any Hugging Face tool. The family
comes from ``config.json``'s ``model_type`` (:data:`jaxprune.models.FAMILIES`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from jaxprune.loaders.params import tensors_from_model
from jaxprune.models import FAMILIES, config_class
from jaxprune.models.llama import Llama, LlamaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# config.json model types whose architecture a jaxprune model family implements exactly.
MODEL_TYPES = tuple(FAMILIES)
# config.json "architectures" entries -> model_type, for configs that lack model_type.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "Gemma3ForCausalLM": "gemma3_text",
}


class WeightFileError(OSError):
    """A weight or config file is missing, truncated or not in the expected format."""


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise _damaged(path, err) from err


def _model_type(hf_config: dict, config_path: Path) -> str:
    """The family key of a config.json; refuses another architecture (GPT-2, Phi, ...), whose
    tensors could load into the wrong places or whose layers compute something else."""
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if model_type is None and archs:
        model_type = _ARCHITECTURES.get(archs[0], archs[0])
    elif model_type is None:
        model_type = "llama"  # the oldest Llama configs name neither
    if model_type not in MODEL_TYPES:
        raise WeightFileError(
            f"{config_path} describes a {model_type!r} model; jaxprune implements the model "
            f"types {', '.join(map(repr, MODEL_TYPES))} (Llama 2/3, SmolLM2, TinyLlama, ...; "
            "Qwen2/2.5; dense Qwen3; Mistral; Gemma 3 text decoders). Pass a model of one of "
            "these families."
        )
    return model_type


def read_hf_folder(path: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Reads a Hugging Face folder of a supported family (Llama, Qwen2, Qwen3, Mistral, Gemma 3
    text).

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` plus the shards it names.

    Returns:
      ``(config, tensors)``: the family's config (:class:`LlamaConfig`, ``Qwen2Config``, ...);
      tensors keyed by Hugging Face name in PyTorch layout, in the dtype the files store
      (bfloat16 arrives as ``ml_dtypes.bfloat16``).
    """
    folder = Path(path)
    config = read_hf_config(folder)
    files = weight_files(folder)
    tensors = {}
    for shard in sorted(set(files.values())):
        tensors.update(_read_safetensors(folder / shard))
    return config, tensors


def read_hf_config(folder: Path):
    """The family's config (:class:`LlamaConfig`, ``Gemma3Config``, ...) from a Hugging Face
    folder's ``config.json``.

    Raises:
      WeightFileError: no or unreadable ``config.json``, or a family jaxprune lacks.
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightFileError(f"{folder} has no config.json; it is no Hugging Face model folder.")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise WeightFileError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(hf_config, dict):
        raise WeightFileError(f"{config_path} holds no JSON object; it is no model config.")
    model_type = _model_type(hf_config, config_path)
    try:
        return config_class(model_type).from_hf_config(hf_config)
    except (ValueError, TypeError, KeyError) as err:
        raise WeightFileError(f"{config_path}: {err}") from err


def weight_files(folder: Path) -> dict[str, str]:
    """Which safetensors file of a Hugging Face folder holds each tensor, from the files'
    headers and the index (no tensor data is read).

    Returns:
      Tensor name -> file name inside ``folder``.

    Raises:
      WeightFileError: no weights, a damaged index or header, a shard the index names that is
        absent, or a tensor the index lists that no shard holds.
    """
    if (folder / SINGLE_FILE).is_file():
        return dict.fromkeys(_tensor_names(folder / SINGLE_FILE), SINGLE_FILE)
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise WeightFileError(
            f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors weights are "
            "read (convert PyTorch .bin files with transformers' save_pretrained)."
        )
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightFileError(
            f"{index_path} is not a safetensors index (no weight_map): {err}"
        ) from err
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (folder / s).is_file()]
    if absent:
        raise WeightFileError(f"{index_path} names shards that are not in {folder}: {absent}")
    files = {}
    for shard in shards:
        files.update(dict.fromkeys(_tensor_names(folder / shard), shard))
    unlisted = sorted(set(weight_map) - set(files))
    if unlisted:
        raise WeightFileError(
            f"{index_path} lists tensors that no shard contains (first few: {unlisted[:5]})."
        )
    return files


def _tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header."""
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise _damaged(path, err) from err


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors file's header (no data is read)."""
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            keys = f.keys()  # a safe_open handle is not iterable
            return {name: tuple(f.get_slice(name).get_shape()) for name in keys}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise _damaged(path, err) from err


def read_tensors(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Some tensors of one safetensors file, in the dtype it stores, read one at a time from the
    memory-mapped file (the mapping is closed on return, so the pages it touched leave the
    process's resident memory)."""
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in names}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise _damaged(path, err) from err


def _damaged(path: Path, err: BaseException) -> WeightFileError:
    size = path.stat().st_size if path.exists() else 0
    return WeightFileError(
        f"cannot read safetensors file {path} ({size} bytes): {err}. The file is truncated "
        "or corrupt; download or write it again."
    )


def write_hf_folder(
    model: Llama, path: str | Path, tokenizer=None, max_shard_bytes: int | None = None
) -> Path:
    """Writes ``model`` as a folder that ``transformers`` loads (``LlamaForCausalLM``,
    ``Qwen2ForCausalLM``, ...: the class ``config.json`` names).

    Args:
      model: the model to save (tied models store no ``lm_head.weight``, as transformers does).
      path: destination folder (created).
      tokenizer: optional ``tokenizers.Tokenizer``, saved as ``tokenizer.json``.
      max_shard_bytes: if given, split the weights into shards of at most about this size with a
        ``model.safetensors.index.json``; otherwise write one ``model.safetensors``.

    Returns:
      The folder path.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors_from_model(model)
    hf_config = model.config.to_hf_config()
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    # transformers checks this metadata key to know the tensors are PyTorch-layout.
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        safetensors.numpy.save_file(tensors, folder / SINGLE_FILE, metadata=metadata)
    else:
        shards, current, size = [], {}, 0
        for name, value in tensors.items():
            if current and size + value.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = value
            size += value.nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, folder / file, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
            "weight_map": weight_map,
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    # safetensors creates its files with mode 0600; give them config.json's (0666 less the umask).
    for file in folder.glob("*.safetensors"):
        shutil.copymode(folder / "config.json", file)
    return folder

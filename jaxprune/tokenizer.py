"""Tokenizers rebuilt from a GGUF file's metadata, or read from ``tokenizer.json``.

A GGUF file of a Llama-family model carries its tokenizer as metadata (``tokenizer.ggml.*``): the
vocabulary in id order, the BPE merges in rank order, the token types, the special ids and the
name of the pre-tokenizer. This module turns that metadata into a ``tokenizers.Tokenizer`` so the
project needs no second download; the result must reproduce the Hugging Face tokenizer of the same
model, and on WikiText-2 it round-trips the text exactly.

Gemma's files hold a SentencePiece BPE vocabulary instead (``tokenizer.ggml.model = "llama"``,
tokens with scores, byte-fallback tokens ``<0x00>``..``<0xFF>``, no merges): the merges are
rebuilt from the vocabulary as transformers' GGUF converter does, so both tokenize alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

# Token types of llama.cpp's vocabulary (gguf.TokenType): control tokens are special (never split,
# skipped when decoding), user-defined ones are added tokens that decode as text.
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

# The `tokenizer.ggml.model` values this module can rebuild: GPT-2 style byte-level BPE.
_MODELS = ("gpt2",)
# Architectures whose SentencePiece BPE vocabulary (`tokenizer.ggml.model = "llama"`) this module
# rebuilds: Gemma's layout (no prefix space, byte fallback, whitespace-run tokens).
_SENTENCEPIECE_ARCHS = ("gemma", "gemma2", "gemma3")
# SentencePiece's word-boundary mark, which stands for a space inside tokens.
_SPACE = "\u2581"


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The Hugging Face pre-tokenizer for a llama.cpp ``tokenizer.ggml.pre`` name."""
    # add_prefix_space=False: these models do not prepend a space to the first word; use_regex
    # applies the GPT-2 split regex, which is what llama.cpp's "gpt2"-style splitting does.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM splits every digit into its own piece before the GPT-2 regex (llama.cpp's
        # LLAMA_VOCAB_PRE_TYPE_SMOLLM; the Hugging Face tokenizer.json has Digits then ByteLevel).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    raise ValueError(
        f"tokenizer.ggml.pre={pre!r} is not supported; this loader knows 'smollm', 'gpt2' and "
        "'default'. Load the model's tokenizer.json with load_tokenizer(path) instead."
    )


def _decoded_fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a GGUF file as plain Python values."""
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        # The architecture decides how a SentencePiece vocabulary is rebuilt.
        if name.startswith("tokenizer.") or name == "general.architecture":
            out[name] = field.contents()
    return out


def _require(fields: Mapping[str, Any], name: str) -> Any:
    if name not in fields:
        raise ValueError(
            f"the GGUF metadata has no {name!r}, so its tokenizer cannot be rebuilt; use a GGUF "
            "file converted with a recent llama.cpp, or load a tokenizer.json with load_tokenizer."
        )
    return fields[name]


def tokenizer_from_gguf(reader_or_fields: gguf.GGUFReader | Mapping[str, Any]) -> Tokenizer:
    """Rebuilds the tokenizer stored in a GGUF file's metadata.

    Args:
      reader_or_fields: an open ``gguf.GGUFReader``, or a mapping from metadata key (for example
        ``"tokenizer.ggml.tokens"``) to its decoded value (lists of ``str``/``int``, ``str``,
        ``int``, ``bool``), as ``GGUFReader.fields[key].contents()`` gives.

    Returns:
      A byte-level BPE ``tokenizers.Tokenizer`` with the file's vocabulary (``V`` tokens, ids in
      file order), merges, special tokens, pre-tokenizer and byte-level decoder; for a Gemma file
      (``general.architecture`` gemma/gemma2/gemma3 with ``tokenizer.ggml.model = "llama"``) the
      SentencePiece BPE of :func:`sentencepiece_from_gguf`. BOS/EOS are added to encodings only
      when the metadata says so (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``).

    Raises:
      ValueError: the metadata lacks a needed key, or describes a tokenizer type or pre-tokenizer
        this function cannot rebuild.
    """
    if isinstance(reader_or_fields, gguf.GGUFReader):
        fields = _decoded_fields(reader_or_fields)
    elif isinstance(reader_or_fields, Mapping):
        fields = reader_or_fields
    else:
        raise TypeError(
            f"tokenizer_from_gguf takes a gguf.GGUFReader or a mapping of metadata, not "
            f"{type(reader_or_fields).__name__}; open the file with gguf.GGUFReader(path) first."
        )

    kind = _require(fields, "tokenizer.ggml.model")
    if kind == "llama" and fields.get("general.architecture") in _SENTENCEPIECE_ARCHS:
        return sentencepiece_from_gguf(fields)
    if kind not in _MODELS:
        raise ValueError(
            f"tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE: {_MODELS}, and "
            f"the SentencePiece vocabulary of {_SENTENCEPIECE_ARCHS} files); load the model's "
            "tokenizer.json with load_tokenizer(path) instead."
        )
    tokens = list(_require(fields, "tokenizer.ggml.tokens"))
    merges_text = list(_require(fields, "tokenizer.ggml.merges"))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(
            f"tokenizer.ggml.tokens holds {len(tokens) - len(vocab)} duplicate tokens; the file's "
            "vocabulary is corrupt, fetch the model file again."
        )

    merges = []
    for rank, merge in enumerate(merges_text):
        # Byte-level tokens never contain a literal space (it is mapped to "Ġ"), so the single
        # space in a merge line separates its two halves unambiguously.
        left, sep, right = merge.partition(" ")
        if not sep or " " in right or not left or not right:
            raise ValueError(
                f"tokenizer.ggml.merges[{rank}]={merge!r} is not of the form 'left right'; the "
                "file's merges are corrupt, fetch the model file again."
            )
        merges.append((left, right))

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()

    _add_typed_tokens(tokenizer, fields, tokens)
    _add_bos_eos(tokenizer, fields, tokens)
    return tokenizer


def _add_typed_tokens(
    tokenizer: Tokenizer, fields: Mapping[str, Any], tokens: list[str], user=None
):
    """Control tokens as special tokens and user-defined tokens (those ``user(id)`` accepts, all
    by default) as added tokens, from ``tokenizer.ggml.token_type``. They keep their ids because
    they are already in the vocabulary."""
    types = fields.get("tokenizer.ggml.token_type")
    if types is None:
        return
    types = np.asarray(types)
    if types.shape != (len(tokens),):
        raise ValueError(
            f"tokenizer.ggml.token_type has {types.size} entries for {len(tokens)} tokens; the "
            "file's vocabulary is corrupt, fetch the model file again."
        )
    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i in np.flatnonzero(types == _CONTROL)
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == _USER_DEFINED)
            if user is None or user(i)
        ]
    )


def _add_bos_eos(tokenizer: Tokenizer, fields: Mapping[str, Any], tokens: list[str]) -> None:
    """Adds BOS/EOS to single and pair encodings when the metadata asks for them."""
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        specials = []
        pieces = []
        for flag, key in (
            (add_bos, "tokenizer.ggml.bos_token_id"),
            (add_eos, "tokenizer.ggml.eos_token_id"),
        ):
            if flag:
                token_id = int(_require(fields, key))
                specials.append((tokens[token_id], token_id))
                pieces.append(tokens[token_id])
        bos = [pieces[0]] if add_bos else []
        eos = [pieces[-1]] if add_eos else []
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]),
            # The second sequence and its specials carry type id 1, as transformers writes them.
            pair=" ".join([*bos, "$A", *eos, *(f"{p}:1" for p in (*bos, "$B", *eos))]),
            special_tokens=specials,
        )


def sentencepiece_from_gguf(fields: Mapping[str, Any]) -> Tokenizer:
    """Rebuilds a Gemma GGUF file's SentencePiece BPE tokenizer as a ``tokenizers.Tokenizer``.

    The file lists tokens with scores and types but no merges. As transformers' GGUF converter
    does (``gemma_tokenizer``), the merges are every split of a token into two tokens, ranked by
    the merged token's position in the file (then the longer left piece first), and a token of
    two or more spaces is spelled with ``"▁"`` as the rest of the vocabulary is. The position is
    the rank the scores encode: in Gemma 3's file every normal token's score is minus its rank
    (strictly decreasing in file order); only the control and user-defined tokens carry a flat
    ``-1000``, which would push the whitespace-run tokens behind thousands of merges. Spaces
    become ``"▁"`` (no prefix space is added), unknown characters fall back to the byte tokens
    ``<0x00>``..``<0xFF>``, control tokens are special and user-defined tokens (``"\n"``,
    ``"\n\n"``, HTML tags, ...) are matched whole.

    Args:
      fields: metadata key -> decoded value, as ``tokenizer_from_gguf`` takes
        (``tokenizer.ggml.tokens``, ``token_type``, ``unknown_token_id``, BOS/EOS ids and flags).

    Returns:
      The tokenizer: ``V`` tokens with the file's ids, BOS added when
      ``tokenizer.ggml.add_bos_token`` says so, and a decoder back to text.

    Raises:
      ValueError: a needed key is missing, or the vocabulary has duplicate tokens.
    """
    raw = list(_require(fields, "tokenizer.ggml.tokens"))
    # Runs of spaces are stored with real spaces; the normalizer turns text spaces into "▁".
    tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in raw]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(
            f"tokenizer.ggml.tokens holds {len(tokens) - len(vocab)} duplicate tokens; the file's "
            "vocabulary is corrupt, fetch the model file again."
        )
    merges = [
        (token[:cut], token[cut:])
        for token in tokens
        for cut in range(len(token) - 1, 0, -1)
        if token[:cut] in vocab and token[cut:] in vocab
    ]
    unk = tokens[int(fields.get("tokenizer.ggml.unknown_token_id", vocab.get("<unk>", 0)))]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    # As transformers' GemmaTokenizer (a no-op after the normalizer, kept for identical output).
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Respelled whitespace runs are ordinary BPE tokens, not matched whole.
    _add_typed_tokens(tokenizer, fields, tokens, user=lambda i: tokens[i] == raw[i])
    _add_bos_eos(tokenizer, fields, tokens)
    return tokenizer


class BosTokenizer:
    """A tokenizer whose protocol windows start with BOS (PROTOCOL.md, Gemma 3).

    ``tokenizers.Tokenizer`` cannot be subclassed (it is a Rust type), so this wrapper forwards
    every attribute to the wrapped tokenizer and adds :attr:`window_bos`, which
    :mod:`jaxprune.data` reads to put BOS in front of each evaluation and calibration window.
    """

    def __init__(self, tokenizer: Tokenizer, window_bos: int):
        """Wraps ``tokenizer``; ``window_bos`` is the id that starts every window."""
        self.tokenizer = tokenizer
        # The token id in front of every evaluation and calibration window.
        self.window_bos = int(window_bos)

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __repr__(self) -> str:
        return f"BosTokenizer(window_bos={self.window_bos}, {self.tokenizer!r})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Reads a Hugging Face ``tokenizer.json``.

    Args:
      path: the ``tokenizer.json`` file.

    Returns:
      The ``tokenizers.Tokenizer`` it describes.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file is not a valid ``tokenizer.json``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer file at {path}; pass the path of the model's tokenizer.json."
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust library raises a bare Exception for every parse failure
        try:
            json.loads(path.read_text(encoding="utf-8"))
            why = str(err)
        except (UnicodeDecodeError, json.JSONDecodeError) as json_err:
            why = f"not JSON ({json_err})"
        raise ValueError(
            f"{path} is not a valid tokenizer.json: {why}. Download the model's tokenizer.json "
            "again."
        ) from err

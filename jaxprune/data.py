"""Evaluation and calibration text, and the token windows of the protocol (``PROTOCOL.md``).

The texts are read from a data folder (a setting: ``$JAXPRUNE_DATA``, else ``../shared/data``
beside the project root) holding the WikiText-2 test split as JSON lines and C4 validation
documents as (gzipped) JSON lines, in the layouts the dataset hub serves, so a user with the hub's
files and the project's machines use one code path.

Every text is tokenized without BOS (the tokenizer is asked for no special tokens). For a model
trained with BOS (Gemma 3, PROTOCOL.md) every window is BOS followed by ``seq_len - 1`` text tokens
instead: the loaders signal it with the tokenizer's ``window_bos`` attribute
(:class:`jaxprune.tokenizer.BosTokenizer`), or a caller passes ``bos=``. Without either, the
windows are exactly the plain ``seq_len``-token slices.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from jaxprune.errors import DataError, DataFileError

WIKITEXT_FILE = "wikitext-2-raw-v1-test.jsonl"
# The project's 2,000-document extract first, then the hub's shard (whose first 2,000 documents
# are not the same ones, so results differ between the two; the protocol's split holds for both).
C4_FILES = (
    "c4-validation-2k.json.gz",
    "c4-validation.00000-of-00008.json.gz",
    "c4-validation-2k.json",
    "c4-validation.00000-of-00008.json",
)
DATASETS = ("wikitext2", "c4")
PROTOCOLS = ("standard", "paper")

# The protocol's document split of C4 and its window counts.
C4_CALIBRATION_DOCS = (0, 1000)
C4_EVAL_DOCS = (1000, 2000)
C4_EVAL_WINDOWS = 32
STANDARD_CALIBRATION_SAMPLES = 32
PAPER_CALIBRATION_DOCS = 8
PAPER_EVAL_DOCS = (1000, 1128)


class TextTokenizer(Protocol):
    """What this module needs of a tokenizer (``tokenizers.Tokenizer`` satisfies it)."""

    def encode(self, sequence: str, add_special_tokens: bool = ...):  # -> has `.ids`
        ...


def default_data_dir() -> Path:
    """The folder with the evaluation text.

    Returns:
      ``$JAXPRUNE_DATA`` when set, else ``shared/data`` next to the project's root folder.

    Raises:
      FileNotFoundError: the folder does not exist; the message says how to set it.
    """
    env = os.environ.get("JAXPRUNE_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataFileError(
                f"JAXPRUNE_DATA={env!r} is not a folder; point it at the folder holding "
                f"{WIKITEXT_FILE} and {C4_FILES[0]}."
            )
        return path
    # jaxprune/data.py -> project root -> its parent, where the shared folder sits.
    path = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    if not path.is_dir():
        raise DataFileError(
            f"no data folder: JAXPRUNE_DATA is not set and {path} does not exist. Set "
            f"JAXPRUNE_DATA to a folder holding {WIKITEXT_FILE} (WikiText-2 raw test split as "
            f"JSON lines) and {C4_FILES[0]} or the hub's {C4_FILES[1]}."
        )
    return path


def _data_dir(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataFileError(
            f"data_dir={str(data_dir)!r} is not a folder; pass (with --data-dir) the folder "
            f"holding {WIKITEXT_FILE} and {C4_FILES[0]}, or leave it unset for the default."
        )
    return path


def _open_text(path: Path) -> io.TextIOBase:
    # Decide on gzip by the magic bytes, not the name, so a renamed file still reads.
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_texts(path: Path) -> Iterator[str]:
    """The ``"text"`` of every JSON line of ``path``, lazily; bad rows raise naming the line."""
    with _open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    text = row["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DataError(
                        f"{path} line {lineno} is not a JSON object with a 'text' field "
                        f"({type(err).__name__}: {err}); the file is damaged, replace it."
                    ) from err
                if not isinstance(text, str):
                    raise DataError(
                        f"{path} line {lineno}: 'text' is {type(text).__name__}, not a string; "
                        "the file is damaged, replace it."
                    )
                yield text
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise DataError(
                f"{path} cannot be read ({type(err).__name__}: {err}); it is truncated or "
                "damaged, replace it."
            ) from err


def read_wikitext(data_dir: str | Path | None = None) -> str:
    """The WikiText-2 (raw) test split as the protocol's single evaluation string.

    Args:
      data_dir: folder holding ``wikitext-2-raw-v1-test.jsonl``; None for :func:`default_data_dir`.

    Returns:
      The rows' texts joined with ``"\\n\\n"`` (1,294,336 characters for the real split).

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: a row is not ``{"text": str}``.
    """
    path = _data_dir(data_dir) / WIKITEXT_FILE
    if not path.is_file():
        raise DataFileError(
            f"{path} does not exist; put the WikiText-2 raw test split there as JSON lines "
            '{"text": ...} (one row per line, empty rows included).'
        )
    return "\n\n".join(_json_texts(path))


def require_files(datasets, data_dir: str | Path | None = None) -> dict[str, Path]:
    """Checks that the files a run will read exist, before any work starts.

    Args:
      datasets: names among ``"wikitext2"``, ``"c4"`` and ``"c4-paper"`` (C4's file).
      data_dir: the data folder; None for :func:`default_data_dir`.

    Returns:
      Dataset name -> the file that will be read.

    Raises:
      DataFileError: the folder or a file is missing; the message names it and the fix.
    """
    folder = _data_dir(data_dir)
    out = {}
    for name in dict.fromkeys(datasets):
        if name == "wikitext2":
            path = folder / WIKITEXT_FILE
            if not path.is_file():
                raise DataFileError(
                    f"{path} does not exist; put the WikiText-2 raw test split there as JSON "
                    "lines, or point --data-dir at the folder that holds it."
                )
            out[name] = path
        elif name in ("c4", "c4-paper"):
            out[name] = _c4_path(folder)
        else:
            raise DataError(f"dataset {name!r}: use one of {(*DATASETS, 'c4-paper')}.")
    return out


def _c4_path(data_dir: Path) -> Path:
    for name in C4_FILES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataFileError(
        f"no C4 file in {data_dir}; expected one of {list(C4_FILES)} (C4 'en' validation "
        "documents as JSON lines with a 'text' field, gzipped or not), or point --data-dir at the "
        "folder that holds one."
    )


def read_c4(
    data_dir: str | Path | None = None, start: int = 0, stop: int | None = None
) -> list[str]:
    """C4 validation documents ``start`` to ``stop - 1`` in file order.

    Args:
      data_dir: folder holding one of :data:`C4_FILES`; None for :func:`default_data_dir`.
      start: index of the first document.
      stop: one past the last document; None reads to the end of the file.

    Returns:
      The documents' texts.

    Raises:
      FileNotFoundError: no C4 file in the folder.
      ValueError: a bad range, or the file has fewer than ``stop`` documents.
    """
    if start < 0 or (stop is not None and stop < start):
        raise DataError(f"read_c4(start={start}, stop={stop}): need 0 <= start <= stop.")
    path = _c4_path(_data_dir(data_dir))
    docs = []
    n_read = 0
    for i, text in enumerate(_json_texts(path)):
        n_read = i + 1
        if stop is not None and i >= stop:
            break
        if i >= start:
            docs.append(text)
    if stop is not None and n_read < stop:
        raise DataError(
            f"{path} holds {n_read} documents but documents {start}..{stop - 1} were asked for; "
            "use a C4 file with more documents or a smaller range."
        )
    return docs


def _tokens(tokenizer: TextTokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` without BOS/EOS, as int32."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def window_bos(tokenizer: TextTokenizer, bos: int | None = None) -> int | None:
    """The token id every window starts with: ``bos`` when given, else the tokenizer's
    ``window_bos`` attribute (set by the loaders for Gemma 3), else None (plain windows)."""
    if bos is None:
        bos = getattr(tokenizer, "window_bos", None)
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int | np.integer)):
        raise DataError(f"bos={bos!r}: must be a token id (int) or None.")
    return None if bos is None else int(bos)


def _text_len(seq_len: int, bos: int | None) -> int:
    """Text tokens per window: all of ``seq_len``, or one less when BOS leads it."""
    if bos is not None and seq_len < 2:
        raise DataError(f"seq_len={seq_len}: a window with BOS needs at least 2 tokens.")
    return seq_len if bos is None else seq_len - 1


def _with_bos(windows: np.ndarray, bos: int | None) -> np.ndarray:
    """``windows (N, L)`` with a BOS column in front when ``bos`` is set: ``(N, L + 1)``."""
    if bos is None:
        return windows
    return np.concatenate([np.full((len(windows), 1), bos, np.int32), windows], axis=1)


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int | np.integer) or value < 1):
        raise DataError(f"{name}={value!r}: must be a positive int (or None for the default).")


def window_starts(n_tokens: int, seq_len: int, n_samples: int) -> np.ndarray:
    """The protocol's random window starts: ``default_rng(0).integers(0, n_tokens - seq_len)``.

    Args:
      n_tokens: length of the tokenized text.
      seq_len: window length ``T``.
      n_samples: number of windows ``N``.

    Returns:
      ``(N,)`` int64 starts, each in ``[0, n_tokens - seq_len)``.
    """
    if n_tokens <= seq_len:
        raise DataError(
            f"the calibration text has {n_tokens} tokens, not more than seq_len={seq_len}; use a "
            "shorter seq_len or more documents."
        )
    return np.random.default_rng(0).integers(0, n_tokens - seq_len, size=n_samples)


def calibration_windows(
    tokenizer: TextTokenizer,
    protocol: str = "standard",
    n_samples: int | None = None,
    seq_len: int = 2048,
    data_dir: str | Path | None = None,
    bos: int | None = None,
) -> np.ndarray | list[np.ndarray]:
    """The calibration token windows of the protocol.

    ``standard``: C4 documents 0-999 joined with ``"\\n\\n"`` and tokenized once; ``N`` windows
    of ``seq_len`` at the starts of :func:`window_starts` (windows may overlap). With BOS (see
    :func:`window_bos`) each window is BOS and ``seq_len - 1`` text tokens, the starts drawn the
    same way for that length.
    ``paper``: :func:`paper_calibration_sequences`. C4 documents are mostly shorter than 2,048
    tokens (documents 0-7 of the project's file have 76 to 2,041), so these sequences are ragged
    and come back as a list.

    Args:
      tokenizer: the model's tokenizer.
      protocol: ``"standard"`` or ``"paper"``.
      n_samples: number of windows ``N``; None for the protocol's 32 (standard) or 8 (paper).
      seq_len: window length ``T``; shorter than 2048 for fast runs.
      data_dir: folder of the C4 file; None for :func:`default_data_dir`.
      bos: the token id in front of every window; None for the tokenizer's ``window_bos``
        attribute when it has one, else no BOS.

    Returns:
      standard: ``(N, T)`` int32 token ids. paper: ``N`` int32 arrays of shape ``(T_i,)``,
      ``T_i <= T``.

    Raises:
      ValueError: unknown protocol or bad sizes.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"protocol={protocol!r}: use one of {PROTOCOLS}.")
    if protocol == "paper":
        return paper_calibration_sequences(tokenizer, n_samples, seq_len, data_dir, bos=bos)
    _positive("n_samples", n_samples)
    _positive("seq_len", seq_len)
    bos = window_bos(tokenizer, bos)
    n = STANDARD_CALIBRATION_SAMPLES if n_samples is None else n_samples
    tokens = _tokens(tokenizer, "\n\n".join(read_c4(data_dir, *C4_CALIBRATION_DOCS)))
    length = _text_len(seq_len, bos)
    starts = window_starts(tokens.size, length, n)
    return _with_bos(tokens[starts[:, None] + np.arange(length)], bos)


def paper_calibration_sequences(
    tokenizer: TextTokenizer,
    n_samples: int | None = None,
    seq_len: int = 2048,
    data_dir: str | Path | None = None,
    bos: int | None = None,
) -> list[np.ndarray]:
    """The paper calibration's sequences: C4 documents 0..N-1, each cut to ``seq_len`` (with
    BOS: BOS and the document's first ``seq_len - 1`` tokens).

    Args:
      tokenizer: the model's tokenizer.
      n_samples: number of documents ``N``; None for the protocol's 8.
      seq_len: the most tokens kept per document.
      data_dir: folder of the C4 file; None for :func:`default_data_dir`.
      bos: the token id in front of every sequence, as in :func:`calibration_windows`.

    Returns:
      ``N`` int32 arrays of shape ``(T_i,)`` with ``T_i <= seq_len``.
    """
    _positive("n_samples", n_samples)
    _positive("seq_len", seq_len)
    n = PAPER_CALIBRATION_DOCS if n_samples is None else n_samples
    return _documents(tokenizer, read_c4(data_dir, 0, n), seq_len, window_bos(tokenizer, bos))


def _documents(
    tokenizer: TextTokenizer, docs: list[str], seq_len: int, bos: int | None
) -> list[np.ndarray]:
    """Each document's first ``seq_len`` tokens, or BOS and its first ``seq_len - 1``."""
    length = _text_len(seq_len, bos)
    return [_with_bos(_tokens(tokenizer, doc)[None, :length], bos)[0] for doc in docs]


def _split_windows(
    tokens: np.ndarray, seq_len: int, n_windows: int | None, what: str
) -> np.ndarray:
    available = tokens.size // seq_len  # the tail shorter than a window is dropped
    n = available if n_windows is None else n_windows
    if n > available:
        raise DataError(
            f"{what} has {tokens.size} tokens, {available} windows of {seq_len}; asked for "
            f"n_windows={n_windows}. Ask for at most {available} or use None for all."
        )
    return tokens[: n * seq_len].reshape(n, seq_len)


def eval_windows(
    tokenizer: TextTokenizer,
    dataset: str,
    n_windows: int | None,
    seq_len: int = 2048,
    data_dir: str | Path | None = None,
    bos: int | None = None,
) -> np.ndarray:
    """Non-overlapping perplexity windows of the protocol.

    ``wikitext2``: the whole WikiText-2 test string tokenized without BOS, cut into consecutive
    windows (the tail dropped). ``c4``: C4 documents 1000-1999 joined with ``"\\n\\n"``, cut the
    same way. With BOS (see :func:`window_bos`) the string is cut into consecutive
    ``seq_len - 1``-token slices and each gets BOS in front: every text token is predicted.

    Args:
      tokenizer: the model's tokenizer.
      dataset: ``"wikitext2"`` or ``"c4"``.
      n_windows: the first ``N`` windows; None for the protocol's count (all of WikiText-2's,
        C4's first 32).
      seq_len: window length ``T``.
      data_dir: folder of the text files; None for :func:`default_data_dir`.
      bos: the token id in front of every window, as in :func:`calibration_windows`.

    Returns:
      ``(N, T)`` int32 token ids.

    Raises:
      ValueError: unknown dataset, or more windows asked for than the text holds.
    """
    if dataset not in DATASETS:
        raise DataError(f"dataset={dataset!r}: use one of {DATASETS}.")
    _positive("n_windows", n_windows)
    _positive("seq_len", seq_len)
    bos = window_bos(tokenizer, bos)
    length = _text_len(seq_len, bos)
    if dataset == "wikitext2":
        windows = _split_windows(
            _tokens(tokenizer, read_wikitext(data_dir)), length, n_windows, "WikiText-2"
        )
        return _with_bos(windows, bos)
    tokens = _tokens(tokenizer, "\n\n".join(read_c4(data_dir, *C4_EVAL_DOCS)))
    windows = _split_windows(
        tokens,
        length,
        C4_EVAL_WINDOWS if n_windows is None else n_windows,
        "C4 documents 1000-1999",
    )
    return _with_bos(windows, bos)


def paper_eval_sequences(
    tokenizer: TextTokenizer,
    data_dir: str | Path | None = None,
    seq_len: int = 2048,
    bos: int | None = None,
) -> list[np.ndarray]:
    """The paper evaluation's sequences: C4 documents 1000-1127, each cut to ``seq_len`` (with
    BOS: BOS and the document's first ``seq_len - 1`` tokens).

    Args:
      tokenizer: the model's tokenizer.
      data_dir: folder of the C4 file; None for :func:`default_data_dir`.
      seq_len: the most tokens kept per document.
      bos: the token id in front of every sequence, as in :func:`calibration_windows`.

    Returns:
      128 int32 arrays of shape ``(T_i,)`` with ``T_i <= seq_len`` (documents differ in length;
      weight each by its number of predicted tokens).
    """
    _positive("seq_len", seq_len)
    bos = window_bos(tokenizer, bos)
    return _documents(tokenizer, read_c4(data_dir, *PAPER_EVAL_DOCS), seq_len, bos)

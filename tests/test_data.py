"""Text readers and the protocol's token windows.

Fast tests use a byte tokenizer (one id per UTF-8 byte) on small files written to a temporary
folder, so the window rules are checked exactly; the real files and the real tokenizer are
checked against the facts in ``shared/data/README.md`` and ``PROTOCOL.md``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pytest

from jaxprune import data

WIKITEXT_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


class ByteTokenizer:
    """One token per UTF-8 byte; records whether special tokens were asked for."""

    def __init__(self):
        self.calls = []

    def encode(self, text: str, add_special_tokens: bool = True):
        self.calls.append(add_special_tokens)
        return types.SimpleNamespace(ids=list(text.encode("utf-8")))


def _write_jsonl(path: Path, texts: list[str], gz: bool = False) -> None:
    lines = "".join(json.dumps({"text": t, "url": "u"}) + "\n" for t in texts)
    if gz:
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path.write_text(lines, encoding="utf-8")


@pytest.fixture
def small_dir(tmp_path) -> Path:
    """WikiText rows and 2,000 C4 documents whose text encodes their index."""
    _write_jsonl(tmp_path / data.WIKITEXT_FILE, ["", " = A = \n", "", " b c \n"])
    _write_jsonl(
        tmp_path / "c4-validation-2k.json.gz", [f"doc{i:04d}" for i in range(2000)], gz=True
    )
    return tmp_path


# --- Settings and readers ---------------------------------------------------------------------


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPRUNE_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.setenv("JAXPRUNE_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"JAXPRUNE_DATA=.*absent.* is not a folder"):
        data.default_data_dir()
    monkeypatch.delenv("JAXPRUNE_DATA")
    beside = Path(data.__file__).resolve().parents[2] / "shared" / "data"
    if beside.is_dir():
        assert data.default_data_dir() == beside
    else:
        with pytest.raises(FileNotFoundError, match="Set JAXPRUNE_DATA"):
            data.default_data_dir()


def test_read_wikitext_small(small_dir):
    assert data.read_wikitext(small_dir) == "\n\n = A = \n\n\n\n\n b c \n"


def test_read_wikitext_real_file_matches_its_checksum():
    text = data.read_wikitext()
    assert len(text) == 1_294_336
    assert text.startswith("\n\n = Robert Boulter = \n")
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == WIKITEXT_SHA256


def test_read_c4_ranges(small_dir):
    assert data.read_c4(small_dir, 3, 6) == ["doc0003", "doc0004", "doc0005"]
    assert len(data.read_c4(small_dir)) == 2000
    assert data.read_c4(small_dir, 1999) == ["doc1999"]
    with pytest.raises(ValueError, match=r"holds 2000 documents but documents 10..2000"):
        data.read_c4(small_dir, 10, 2001)
    with pytest.raises(ValueError, match="need 0 <= start <= stop"):
        data.read_c4(small_dir, 5, 2)


@pytest.mark.parametrize("name", data.C4_FILES)
def test_read_c4_accepts_local_and_hub_files(tmp_path, name):
    _write_jsonl(tmp_path / name, ["first", "second"], gz=name.endswith(".gz"))
    assert data.read_c4(tmp_path) == ["first", "second"]


def test_read_c4_real_file():
    docs = data.read_c4()
    assert len(docs) == 2000
    assert sum(len(d) for d in docs) == 4_223_732


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no C4 file in .*c4-validation-2k.json.gz"):
        data.read_c4(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"wikitext-2-raw-v1-test.jsonl does not exist"):
        data.read_wikitext(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data_dir=.*absent.* is not a folder"):
        data.read_wikitext(tmp_path / "absent")
    (tmp_path / data.WIKITEXT_FILE).write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object with a 'text' field"):
        data.read_wikitext(tmp_path)
    whole = gzip.compress(b'{"text": "a"}\n' * 1000)
    (tmp_path / "c4-validation-2k.json.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        data.read_c4(tmp_path)


# --- Windows (byte tokenizer) -----------------------------------------------------------------


def test_standard_calibration_follows_the_rng_rule(small_dir):
    tok = ByteTokenizer()
    windows = data.calibration_windows(tok, n_samples=5, seq_len=16, data_dir=small_dir)
    tokens = np.frombuffer("\n\n".join(f"doc{i:04d}" for i in range(1000)).encode(), np.uint8)
    starts = np.random.default_rng(0).integers(0, tokens.size - 16, size=5)
    assert windows.shape == (5, 16) and windows.dtype == np.int32
    for row, start in zip(windows, starts, strict=True):
        np.testing.assert_array_equal(row, tokens[start : start + 16])
    assert tok.calls == [False]  # one tokenization, without BOS
    # The default count is the protocol's 32, and the first starts do not depend on the count.
    default = data.calibration_windows(tok, seq_len=16, data_dir=small_dir)
    assert default.shape == (32, 16)
    np.testing.assert_array_equal(
        data.window_starts(tokens.size, 16, 32)[:1], data.window_starts(tokens.size, 16, 5)[:1]
    )


def test_paper_calibration_is_ragged_documents(small_dir):
    seqs = data.calibration_windows(ByteTokenizer(), "paper", seq_len=5, data_dir=small_dir)
    assert [bytes(s.astype(np.uint8)).decode() for s in seqs] == [
        f"doc{i:04d}"[:5] for i in range(8)
    ]
    seqs = data.calibration_windows(ByteTokenizer(), "paper", 3, seq_len=100, data_dir=small_dir)
    assert [s.size for s in seqs] == [7, 7, 7] and all(s.dtype == np.int32 for s in seqs)


def test_eval_windows_counts_and_tail(small_dir):
    tok = ByteTokenizer()
    text = data.read_wikitext(small_dir)  # 20 bytes
    windows = data.eval_windows(tok, "wikitext2", None, seq_len=3, data_dir=small_dir)
    assert windows.shape == (6, 3) and windows.dtype == np.int32  # 20 // 3, tail of 2 dropped
    np.testing.assert_array_equal(windows.ravel(), np.frombuffer(text.encode()[:18], np.uint8))
    assert data.eval_windows(tok, "wikitext2", 2, seq_len=3, data_dir=small_dir).shape == (2, 3)
    with pytest.raises(ValueError, match="6 windows of 3; asked for n_windows=7"):
        data.eval_windows(tok, "wikitext2", 7, seq_len=3, data_dir=small_dir)
    c4 = data.eval_windows(tok, "c4", None, seq_len=9, data_dir=small_dir)
    joined = "\n\n".join(f"doc{i:04d}" for i in range(1000, 2000)).encode()
    assert c4.shape == (32, 9)
    np.testing.assert_array_equal(c4.ravel(), np.frombuffer(joined[: 32 * 9], np.uint8))


def test_paper_eval_sequences(small_dir):
    seqs = data.paper_eval_sequences(ByteTokenizer(), small_dir, seq_len=4)
    assert len(seqs) == 128
    assert bytes(seqs[0].astype(np.uint8)) == b"doc1" and seqs[-1].shape == (4,)


def test_bad_arguments(small_dir):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"dataset='ptb': use one of \('wikitext2', 'c4'\)"):
        data.eval_windows(tok, "ptb", None, data_dir=small_dir)
    with pytest.raises(ValueError, match=r"protocol='wanda': use one of \('standard', 'paper'\)"):
        data.calibration_windows(tok, "wanda", data_dir=small_dir)
    with pytest.raises(ValueError, match="n_windows=0: must be a positive int"):
        data.eval_windows(tok, "c4", 0, data_dir=small_dir)
    with pytest.raises(ValueError, match="seq_len=-1: must be a positive int"):
        data.calibration_windows(tok, seq_len=-1, data_dir=small_dir)
    with pytest.raises(ValueError, match="has 8998 tokens, not more than seq_len=20000"):
        data.calibration_windows(tok, seq_len=20_000, data_dir=small_dir)


# --- Windows of the real data with the default model's tokenizer --------------------------------


@pytest.fixture(scope="module")
def smollm(default_model_path):
    import gguf

    from jaxprune.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(gguf.GGUFReader(default_model_path))


@pytest.mark.slow
def test_real_wikitext_windows(smollm):
    windows = data.eval_windows(smollm, "wikitext2", None)
    assert windows.shape == (148, 2048)  # 304,978 tokens
    assert data.eval_windows(smollm, "wikitext2", 32).shape == (32, 2048)


@pytest.mark.slow
def test_real_c4_windows(smollm):
    calib = data.calibration_windows(smollm)
    assert calib.shape == (32, 2048) and calib.dtype == np.int32
    # 502,057 tokens in documents 0-999; the starts follow the rng rule.
    tokens = np.asarray(
        smollm.encode("\n\n".join(data.read_c4(stop=1000)), add_special_tokens=False).ids
    )
    assert tokens.size == 502_057
    starts = np.random.default_rng(0).integers(0, tokens.size - 2048, size=32)
    np.testing.assert_array_equal(calib, tokens[starts[:, None] + np.arange(2048)])
    assert data.eval_windows(smollm, "c4", None).shape == (32, 2048)
    paper = data.calibration_windows(smollm, "paper")
    assert [s.size for s in paper] == [2041, 76, 313, 292, 392, 480, 255, 758]
    sequences = data.paper_eval_sequences(smollm)
    assert len(sequences) == 128 and max(s.size for s in sequences) <= 2048

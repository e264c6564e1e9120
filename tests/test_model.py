"""The Llama model and its loaders against Hugging Face ``transformers`` (PyTorch), no downloads.

Every test builds a tiny random ``LlamaForCausalLM``, moves its ``state_dict`` into our model with
the loader, and compares outputs; the loader, the folder reader/writer and the hub resolution are
exercised on files written into ``tmp_path``.
"""

from __future__ import annotations

import json
import math
import re
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxprune.loaders.hf import WeightFileError, read_hf_folder, write_hf_folder
from jaxprune.loaders.params import WeightLoadError, model_from_tensors, tensors_from_model
from jaxprune.loaders.resolve import ModelNotFoundError, load_model
from jaxprune.models.llama import LlamaConfig, make_forward, projection_kernels, token_nll
from jaxprune.perplexity import perplexity

VOCAB = 97


def hf_model(num_kv_heads: int = 2, tied: bool = False, seed: int = 0, **overrides):
    """A tiny random Hugging Face Llama (eager attention, so it can return probabilities).

    ``overrides`` replace or add ``transformers.LlamaConfig`` fields (e.g. RoPE scaling).
    """
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=8,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    config = transformers.LlamaConfig(**(fields | overrides))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    # Random init leaves the norm weights at one; perturb them so a wrong mapping shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours_from(model):
    config = LlamaConfig.from_hf_config(model.config.to_dict())
    return model_from_tensors(config, state_numpy(model))


def tokens(b: int = 2, t: int = 11, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t)).astype(np.int32)


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_logits_match_transformers(num_kv_heads, tied):
    ref = hf_model(num_kv_heads, tied)
    ours = ours_from(ref)
    assert (ours.lm_head is None) == tied
    toks = tokens()
    np.testing.assert_allclose(
        np.asarray(make_forward(ours)(toks)), hf_logits(ref, toks), atol=1e-5, rtol=1e-5
    )


def small_config(**overrides) -> LlamaConfig:
    """A tiny ``LlamaConfig`` for config-only tests; ``overrides`` replace its fields."""
    fields = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=12,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
    )
    return LlamaConfig(**(fields | overrides))


def test_config_round_trip():
    config = small_config(
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=1e5,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
    )
    assert LlamaConfig.from_hf_config(config.to_hf_config()) == config
    hf = transformers.LlamaConfig(**config.to_hf_config())
    assert LlamaConfig.from_hf_config(hf.to_dict()) == config


def test_config_rejects_bad_grouping():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        small_config(num_heads=4, num_kv_heads=3)


def test_config_rejects_scaled_rope():
    hf = small_config().to_hf_config()
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 32.0, "rope_theta": 5e5}
    with pytest.raises(ValueError, match="rope_type 'yarn', which is not supported"):
        LlamaConfig.from_hf_config(hf)


def test_captures_match_transformers_activations():
    ref = hf_model(num_kv_heads=2)
    ours = ours_from(ref)
    toks = tokens(t=9)
    layer_idx = 1
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
    with torch.no_grad():
        out = ref(torch.tensor(toks, dtype=torch.long), output_attentions=True)
    for hook in hooks:
        hook.remove()

    cos, sin = ours.rope(toks.shape[1])
    h = ours.embed(jnp.asarray(toks))
    for layer in ours.layers[:layer_idx]:
        h = layer(h, cos, sin)
    h_out, captures = ours.layers[layer_idx](h, cos, sin, capture=True)
    assert np.allclose(ours.layers[layer_idx](h, cos, sin), h_out)

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
    # The prunable kernels applied to the captured inputs give the layer's own projections.
    q = captures["attn_in"] @ projection_kernels(ours.layers[layer_idx])["q"][...]
    np.testing.assert_allclose(np.asarray(q), seen["q"], atol=1e-5)


def test_projection_kernels_write_through():
    ours = ours_from(hf_model())
    layer = ours.layers[0]
    kernels = projection_kernels(layer)
    assert list(kernels) == ["q", "k", "v", "o", "gate", "up", "down"]
    shapes = {name: kernels[name].shape for name in kernels}
    assert shapes == {
        "q": (32, 32),
        "k": (32, 16),
        "v": (32, 16),
        "o": (32, 32),
        "gate": (32, 48),
        "up": (32, 48),
        "down": (48, 32),
    }
    before = np.asarray(ours(jnp.asarray(tokens())))
    kernels["v"][...] = jnp.zeros(shapes["v"])
    assert not np.asarray(layer.self_attn.v_proj.kernel[...]).any()
    assert not np.allclose(np.asarray(ours(jnp.asarray(tokens()))), before)


def torch_nll(model, toks: np.ndarray) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the count of predicted tokens, by PyTorch."""
    logits = torch.tensor(hf_logits(model, toks[None]), dtype=torch.float64)[0, :-1]
    target = torch.tensor(toks[1:], dtype=torch.long)
    return float(torch.nn.functional.cross_entropy(logits, target, reduction="sum")), len(target)


def test_perplexity_of_windows_matches_torch():
    ref = hf_model(num_kv_heads=1, tied=True)
    windows = tokens(b=5, t=16, seed=3)
    totals = [torch_nll(ref, w) for w in windows]
    expected_nll = sum(s for s, _ in totals) / sum(n for _, n in totals)
    # batch_size 2 over 5 windows also covers the padded last batch.
    result = perplexity(ours_from(ref), windows, batch_size=2, progress=False)
    assert result["windows"] == 5 and result["tokens"] == 5 * 15
    assert result["nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_nll), rel=1e-5)


def test_perplexity_of_variable_lengths_is_token_weighted():
    ref = hf_model()
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, VOCAB, n).astype(np.int32) for n in (7, 300, 20, 2, 33)]
    totals = [torch_nll(ref, s) for s in sequences]
    expected_nll = sum(s for s, _ in totals) / sum(n for _, n in totals)
    result = perplexity(ours_from(ref), sequences, batch_size=2, progress=False)
    assert result["tokens"] == sum(len(s) - 1 for s in sequences)
    assert result["nll"] == pytest.approx(expected_nll, rel=1e-5)


def test_token_nll_is_jitted_pure_function():
    ours = ours_from(hf_model())
    graphdef, state = nnx.split(ours)
    toks = tokens(b=1, t=12)
    nll = np.asarray(token_nll(graphdef, state, jnp.asarray(toks)))
    assert nll.shape == (1, 11)
    assert float(nll.sum()) == pytest.approx(torch_nll(hf_model(), toks[0])[0], rel=1e-5)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.mark.parametrize("tied", [False, True])
def test_hf_folder_round_trip_and_transformers_loads_it(tmp_path, tied):
    ref = hf_model(num_kv_heads=2, tied=tied)
    ours = ours_from(ref)
    folder = write_hf_folder(ours, tmp_path / "model", tokenizer=tiny_tokenizer())
    assert ("lm_head.weight" in state_numpy(ref)) and (
        ("lm_head.weight" in tensors_from_model(ours)) != tied
    )
    config, tensors = read_hf_folder(folder)
    assert config == ours.config
    written = tensors_from_model(ours)
    assert set(tensors) == set(written)
    for name in tensors:
        np.testing.assert_array_equal(tensors[name], written[name])

    loaded = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    toks = tokens(seed=5)
    np.testing.assert_allclose(
        hf_logits(loaded, toks), np.asarray(make_forward(ours)(toks)), atol=1e-5, rtol=1e-5
    )

    model, tokenizer = load_model(str(folder))
    assert tokenizer.encode("w3 w5 zz").ids == [3, 5, VOCAB - 1]
    np.testing.assert_allclose(
        np.asarray(make_forward(model)(toks)), np.asarray(make_forward(ours)(toks)), atol=0
    )


def test_sharded_folder(tmp_path):
    ours = ours_from(hf_model())
    folder = write_hf_folder(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (folder / "model.safetensors").exists()
    _, tensors = read_hf_folder(folder)
    written = tensors_from_model(ours)
    assert set(tensors) == set(written)
    for name in tensors:
        np.testing.assert_array_equal(tensors[name], written[name])
    loaded = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    toks = tokens()
    np.testing.assert_allclose(
        hf_logits(loaded, toks), np.asarray(make_forward(ours)(toks)), atol=1e-5, rtol=1e-5
    )


def test_weight_load_error_lists_every_problem():
    ref = hf_model()
    config = LlamaConfig.from_hf_config(ref.config.to_dict())
    tensors = state_numpy(ref)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 32), np.float32)
    tensors["model.layers.7.self_attn.q_proj.weight"] = np.zeros((32, 32), np.float32)
    tensors["model.visual.proj"] = np.zeros(3, np.float32)
    with pytest.raises(WeightLoadError) as info:
        model_from_tensors(config, tensors)
    problems = info.value.problems
    assert len(problems) == 4, problems
    message = str(info.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in message
    assert (
        "wrong shape for model.layers.0.self_attn.k_proj.weight: got (5, 32), expected (16, 32)"
        in message
    )
    assert "unknown tensor model.layers.7.self_attn.q_proj.weight" in message
    assert "unknown tensor model.visual.proj" in message


def test_tied_config_rejects_a_different_lm_head():
    ref = hf_model(tied=False)
    hf_config = ref.config.to_dict() | {"tie_word_embeddings": True}
    with pytest.raises(WeightLoadError, match=r"lm_head\.weight is present and differs"):
        model_from_tensors(LlamaConfig.from_hf_config(hf_config), state_numpy(ref))


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = write_hf_folder(ours_from(hf_model()), tmp_path / "broken")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=r"model\.safetensors .*truncated or corrupt"):
        read_hf_folder(folder)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ours_from(hf_model()).config.to_hf_config()))
    with pytest.raises(WeightFileError, match=r"neither model\.safetensors nor"):
        read_hf_folder(tmp_path)


def test_hub_id_while_offline_gives_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An empty cache, so nothing can be found locally either.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ModelNotFoundError,
        match=re.escape(
            "cannot reach the Hugging Face hub to fetch HuggingFaceTB/SmolLM2-135M; pass a local "
            "folder or .gguf path"
        ),
    ):
        load_model("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize("spec", ["./missing-folder", "missing.gguf", "not a model"])
def test_unknown_local_spec(spec):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(spec)


def test_eval_command_json(tmp_path, monkeypatch, capsys):
    from jaxprune import cli

    folder = write_hf_folder(ours_from(hf_model()), tmp_path / "m", tokenizer=tiny_tokenizer())
    windows = tokens(b=3, t=8, seed=9)
    calls = []

    def eval_windows(tokenizer, dataset, n_windows, seq_len=2048, data_dir=None):
        calls.append((dataset, n_windows, seq_len, data_dir))
        return windows

    # The data module is another component; the command only needs its eval_windows interface.
    monkeypatch.setitem(
        sys.modules,
        "jaxprune.data",
        types.SimpleNamespace(eval_windows=eval_windows, require_files=lambda *a, **k: {}),
    )
    code = cli.main(
        [
            "eval",
            "--model",
            str(folder),
            "--data",
            "c4",
            "--windows",
            "3",
            "--seq-len",
            "8",
            "--batch-size",
            "2",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert calls == [("c4", 3, 8, None)]
    assert result["windows"] == 3 and result["tokens"] == 21 and result["data"] == "c4"
    expected = perplexity(load_model(str(folder))[0], windows, progress=False)
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)

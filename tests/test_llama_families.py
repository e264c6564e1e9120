"""The families built on Llama's layers (Qwen2, Qwen3, Mistral) against Hugging Face
``transformers`` (PyTorch), no downloads.

Each case is a tiny random ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or ``MistralForCausalLM``
(2 layers, hidden 64, 4 query and 2 key/value heads) saved as a Hugging Face folder. Every bias
and norm weight is perturbed well away from its initial value, and sequences (13 tokens) are
longer than the windows (5), so a missing bias, a norm in the wrong place or a missing window
changes the logits and the probabilities far beyond the tolerances; the probability test also
checks that removing the family's feature breaks the match.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tiny_run import TINY_FLAGS, VOCAB, jaxprune, prune_attention_of, write_tiny_data

from jaxprune.loaders.hf import read_hf_folder
from jaxprune.loaders.params import model_from_tensors
from jaxprune.loaders.resolve import load_model
from jaxprune.models import config_class
from jaxprune.models.llama import make_forward, projection_kernels
from jaxprune.models.mistral import MistralConfig
from jaxprune.models.qwen2 import Qwen2Config
from jaxprune.models.qwen3 import Qwen3Config
from jaxprune.models.spec import QKExtras
from jaxprune.outputs import export_hf_folder

T = 13
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=1000.0,
    attn_implementation="eager",
)
# case -> (transformers config class, model class, our config class, config overrides).
CASES = {
    # q/k/v biases, tied head (as Qwen2.5 0.5B).
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", Qwen2Config, dict(tie_word_embeddings=True)),
    # Sliding windows turned on: layer 0 full, layer 1 within 5 keys.
    "qwen2-window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        Qwen2Config,
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
    # q/k norm; an explicit head_dim (4 x 8 is not the hidden size).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", Qwen3Config, dict(head_dim=8)),
    # attention_bias: biases on q, k, v and o.
    "qwen3-bias": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        Qwen3Config,
        dict(head_dim=8, attention_bias=True, tie_word_embeddings=True),
    ),
    # A window of 5 in every layer; an explicit head_dim.
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        MistralConfig,
        dict(head_dim=8, sliding_window=5),
    ),
}
# One case per family for the slower tests.
FAMILY_CASES = ("qwen2", "qwen3", "mistral")


def hf_model(case: str, seed: int = 0):
    """The case's tiny random transformers model, eager (so it returns its probabilities)."""
    config_cls, model_cls, _, overrides = CASES[case]
    config = getattr(transformers, config_cls)(**(BASE | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.add_(0.5 * torch.randn_like(param))
            elif "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """``(name, transformers model, folder it is saved in)``."""
    ref = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    ref.save_pretrained(folder)
    return request.param, ref, folder


def tokens(b: int = 2, t: int = T, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t)).astype(np.int32)


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()


def ours_from(case_name: str, seed: int = 0):
    """Our model holding the weights of the case's transformers model, and that model."""
    ref = hf_model(case_name, seed)
    config = CASES[case_name][2].from_hf_config(ref.config.to_dict())
    tensors = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    return model_from_tensors(config, tensors), ref


# --- The model against transformers -------------------------------------------------------------


def test_folder_loads_with_transformers_logits(case):
    name, ref, folder = case
    model, tokenizer = load_model(str(folder))
    assert type(model).__name__ + "Config" == CASES[name][2].__name__ and tokenizer is None
    toks = tokens()
    np.testing.assert_allclose(
        np.asarray(make_forward(model)(toks)), hf_logits(ref, toks), atol=1e-4, rtol=1e-4
    )
    c = model.config
    spec = c.attention_spec(1)
    # Without head_dim in the config (transformers' Qwen2), hidden_size / heads.
    head_dim = CASES[name][3].get("head_dim", 16)
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim) == (4, 2, head_dim)
    extras = model.attention_extras(1)
    has_bias = {"qwen2": True, "qwen2-window": True, "qwen3-bias": True}.get(name, False)
    assert (extras.q_bias is not None) == (extras.v_bias is not None) == has_bias
    assert (extras.q_norm is not None) == name.startswith("qwen3") == (spec.qk_norm_eps == 1e-6)
    assert spec.window == {"qwen2-window": 5, "mistral": 5}.get(name)
    assert c.attention_spec(0).window == (5 if name == "mistral" else None)


def test_export_round_trip_loads_in_transformers(case, tmp_path):
    _, ref, folder = case
    model, _ = load_model(str(folder))
    # Zero every other entry of every attention kernel, as masks would, so that the export is
    # not the file read.
    for layer in model.layers:
        for name, kernel in projection_kernels(layer).items():
            if name in ("q", "k", "v", "o"):
                keep = jnp.arange(kernel[...].size).reshape(kernel[...].shape) % 2 == 0
                kernel[...] = jnp.where(keep, kernel[...], 0.0)
    toks = tokens(seed=3)
    expected = np.asarray(make_forward(model)(toks))
    assert np.abs(expected - hf_logits(ref, toks)).max() > 1e-2
    out = export_hf_folder(model, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == ref.config.model_type
    assert written["architectures"] == [type(ref).__name__]
    config, _ = read_hf_folder(out)
    assert config == model.config
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(ref)
    for key in ("layer_types", "sliding_window", "attention_bias"):
        assert getattr(loaded.config, key, None) == getattr(ref.config, key, None), key
    np.testing.assert_allclose(hf_logits(loaded, toks), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mistral", "qwen2-window"])
def test_blocked_window_attention_matches_transformers(name, monkeypatch):
    # Query blocks of 4 with a window of 5: blocks start past the window's reach, so each block's
    # key slice starts late, and a window spans several blocks.
    from jaxprune.models import llama

    monkeypatch.setattr(llama, "QUERY_BLOCK", 4)
    model, ref = ours_from(name, seed=3)
    toks = tokens(b=1, t=23, seed=4)
    # A fresh jit (no cache shared with the default block size).
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda state, toks: nnx.merge(graphdef, state)(toks))(state, toks)
    np.testing.assert_allclose(np.asarray(logits), hf_logits(ref, toks), atol=1e-4, rtol=1e-4)


def test_objective_probabilities_equal_the_models(case):
    """The objective, from each layer's spec and extras alone, recomputes the probabilities the
    model computes (and transformers returns): biases enter the projections, the q/k norm sits
    between the projection and RoPE, the window is part of the mask. Without the family's
    feature they differ."""
    from jaxprune.objective import qk_layer_probs

    name, ref, folder = case
    model, _ = load_model(str(folder))
    toks = tokens()
    with torch.no_grad():
        theirs = ref(torch.tensor(toks, dtype=torch.long), output_attentions=True).attentions
    h = model.embed(jnp.asarray(toks))
    for li, layer in enumerate(model.layers):
        cos, sin = model.layer_context(li, T)
        h_next, caps = layer(h, cos, sin, capture=True)
        np.testing.assert_allclose(np.asarray(caps["probs"]), theirs[li].numpy(), atol=1e-5)
        kernels = projection_kernels(layer)
        spec, extras = model.config.attention_spec(li), model.attention_extras(li)
        kw = dict(wq=kernels["q"][...], wk=kernels["k"][...], x=caps["attn_in"])
        probs = np.asarray(qk_layer_probs(**kw, spec=spec, extras=extras)).transpose(1, 0, 2, 3)
        np.testing.assert_allclose(probs, np.asarray(caps["probs"]), atol=2e-6)
        # Every layer of every case has a bias, a norm or a window; without them, Llama's
        # probabilities are far from the model's.
        plain = dataclasses.replace(spec, window=None, qk_norm_eps=None)
        assert plain != spec or extras.q_bias is not None
        without = qk_layer_probs(**kw, spec=plain, extras=QKExtras())
        gap = np.abs(np.asarray(without).transpose(1, 0, 2, 3) - probs).max()
        assert gap > 1e-2, (name, li, gap)
        h = h_next


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_hand_written_gradient_equals_autodiff_on_each_family(name):
    """The hand-written backward pass on a real layer's spec and extras (float64)."""
    from jaxprune.objective import qk_layer_probs, qk_pruning_loss
    from jaxprune.objective_vjp import qk_pruning_loss_vjp

    model, _ = ours_from(name)
    layer = model.layers[1]
    # 12 tokens: the hand-written pass's 4 causal blocks divide them.
    h = model.embed(jnp.asarray(tokens(t=12)))
    x32 = layer.input_layernorm(model.layers[0](h, *model.rope(12)))
    spec, extras32 = model.config.attention_spec(1), model.attention_extras(1)
    kernels = projection_kernels(layer)
    rng = np.random.default_rng(1)
    jax.config.update("jax_enable_x64", True)
    try:

        def f64(a):
            return None if a is None else jnp.asarray(np.asarray(a), jnp.float64)

        extras = QKExtras(*(f64(a) for a in extras32))
        w = {k: f64(kernels[k][...]) for k in ("q", "k")}
        x = f64(x32)
        m = {k: jnp.asarray(rng.uniform(size=v.shape)) for k, v in w.items()}
        target = qk_layer_probs(w["q"], w["k"], x, spec=spec, extras=extras)
        kw = dict(lam=0.2, spec=spec, target=target, attn_scale=1.3, extras=extras)
        ref_value, ref_grad = jax.jit(
            jax.value_and_grad(lambda m: qk_pruning_loss(m, w, x, **kw)[0])
        )(m)
        value, grad = jax.jit(
            jax.value_and_grad(lambda m: qk_pruning_loss_vjp(m, w, x, causal_blocks=4, **kw)[0])
        )(m)
        np.testing.assert_allclose(value, ref_value, rtol=1e-10)
        for k in ("q", "k"):
            np.testing.assert_allclose(grad[k], ref_grad[k], rtol=1e-8, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)


# --- Config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_config_round_trips(name):
    ref = hf_model(name)
    cls = CASES[name][2]
    assert config_class(ref.config.model_type) is cls
    config = cls.from_hf_config(ref.config.to_dict())
    assert cls.from_hf_config(config.to_hf_config()) == config
    hf = getattr(transformers, CASES[name][0])(**config.to_hf_config())
    assert cls.from_hf_config(hf.to_dict()) == config


@pytest.mark.parametrize(
    ("cls", "change", "message"),
    [
        (
            Qwen2Config,
            {"layer_types": ["full_attention", "sliding_attention"]},
            "sliding windows are off",
        ),
        (Qwen2Config, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (Qwen3Config, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        (MistralConfig, {"layer_types": ["sliding_attention", "full_attention"]}, "Ministral"),
        (MistralConfig, {"attention_bias": True}, "Mistral has none"),
    ],
)
def test_config_refuses_what_it_does_not_implement(cls, change, message):
    hf = hf_model(cls.model_type).config.to_dict() | change
    with pytest.raises(ValueError, match=message):
        cls.from_hf_config(hf)


# --- Pruning each family --------------------------------------------------------------------------

METHODS = ["magnitude", "wanda", "sparsegpt", "softmax", "admm", "alps", "d2prune"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FAMILY_CASES)
def test_every_method_prunes_each_family(name, method):
    model, _ = ours_from(name)
    fixed = {k: v for k, v in nnx_state(model).items() if "bias" in k or "norm" in k}
    prune_attention_of(model, method, tokens)
    # Biases and norms are never pruned or refitted.
    for key, value in nnx_state(model).items():
        if key in fixed:
            np.testing.assert_array_equal(value, fixed[key], err_msg=key)
    assert np.all(np.isfinite(np.asarray(make_forward(model)(tokens()))))


def nnx_state(model) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, path)): np.asarray(var[...])
        for path, var in nnx.to_flat_state(nnx.state(model))
    }


def test_prune_command_exports_a_qwen3_that_transformers_loads(tmp_path):
    """``jaxprune prune --export-hf`` on a Qwen3 folder with a tokenizer, as a user runs it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    ref = hf_model("qwen3-bias")
    folder = tmp_path / "model"
    ref.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    data = write_tiny_data(tmp_path / "data")
    export = tmp_path / "export"
    argv = ["prune", "--model", str(folder), "--data-dir", str(data), "--out", str(tmp_path / "r")]
    done = jaxprune(
        *argv,
        *TINY_FLAGS,
        "--method",
        "wanda",
        "--targets",
        "qk",
        "--save-params",
        "false",
        "--export-hf",
        str(export),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    loaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(loaded) is transformers.Qwen3ForCausalLM
    q = loaded.model.layers[0].self_attn.q_proj
    assert np.mean(q.weight.detach().numpy() == 0) == 0.5
    np.testing.assert_array_equal(
        q.bias.detach().numpy(), ref.model.layers[0].self_attn.q_proj.bias.detach().numpy()
    )
    ours, _ = load_model(str(export))
    toks = tokens(seed=4)
    np.testing.assert_allclose(
        hf_logits(loaded, toks), np.asarray(make_forward(ours)(toks)), atol=1e-4, rtol=1e-4
    )

"""Evaluation throughput (predicted tokens per second): jaxprune's JAX model vs transformers.

Both implementations get the same weights (ours written as a Hugging Face folder and loaded with
``LlamaForCausalLM.from_pretrained``), the same token windows and the same work (logits and the
next-token NLL), on the same machine in one run. Repeats alternate between the two so drift in
machine load hits both alike; the median of each is reported with the ratio.

  python benchmarks/eval_throughput.py                      # default model (GGUF, cached)
  python benchmarks/eval_throughput.py --tiny               # tiny random model, no files needed
  python benchmarks/eval_throughput.py --model gemma3-270m  # any family (FLOPs: full causal)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _tiny_model():
    from jaxprune.models.llama import Llama, LlamaConfig

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        rope_theta=10000.0,
        tie_embeddings=True,
    )
    return Llama(config, rngs=nnx.Rngs(0))


def _unblocked_nll():
    """The NLL with one full (t, t) softmax per head and full (t, vocab) logits: the forward
    before query blocking and head chunking, for a side-by-side comparison."""
    from jaxprune.models import llama as model_lib

    def nll(graphdef, state, tokens):
        # Read at trace time, so this compiled function keeps the direct form.
        saved = model_lib.QUERY_BLOCK, model_lib.NLL_CHUNK
        model_lib.QUERY_BLOCK = model_lib.NLL_CHUNK = 1 << 30
        try:
            return model_lib._token_nll(nnx.merge(graphdef, state), tokens)
        finally:
            model_lib.QUERY_BLOCK, model_lib.NLL_CHUNK = saved

    return jax.jit(nll, static_argnums=0)


def _xla_nll():
    """The NLL with XLA's blocked attention and chunked head instead of the fused CPU kernels,
    for a side-by-side comparison (the setting is read when the function is traced)."""
    from jaxprune.kernels import loading
    from jaxprune.models import llama as model_lib

    def nll(graphdef, state, tokens):
        with loading.setting("xla"):
            return model_lib._token_nll(nnx.merge(graphdef, state), tokens)

    return jax.jit(nll, static_argnums=0)


def _xla_matmul_nll():
    """The NLL with the fused attention and head but XLA's products in the projections (the
    matmul kernel's minimum row count raised past any batch while tracing), to measure what the
    matmul kernel adds."""
    from unittest import mock

    from jaxprune.kernels import matmul
    from jaxprune.models import llama as model_lib

    def nll(graphdef, state, tokens):
        with mock.patch.object(matmul, "MIN_ROWS", 1 << 62):
            return model_lib._token_nll(nnx.merge(graphdef, state), tokens)

    return jax.jit(nll, static_argnums=0)


def _time_ours(graphdef, state, batches, token_nll=None) -> tuple[float, float]:
    if token_nll is None:
        from jaxprune.models.llama import token_nll

    start = time.perf_counter()
    total = 0.0
    for batch in batches:
        # float() waits for the device, so the timing covers the whole computation.
        total += float(jnp.sum(token_nll(graphdef, state, batch)))
    return time.perf_counter() - start, total


def forward_flops(config, batch: int, seq_len: int) -> float:
    """FLOPs of one causal forward with the output head, counted by hand: 2 per multiply-add
    of every projection, MLP and output-head matmul, plus the scores and the probabilities times
    values over the causal half only (``t (t + 1) / 2`` query-key pairs per head; sliding
    windows are not subtracted, so a windowed model's count is an upper bound)."""
    d, f = config.hidden_size, config.intermediate_size
    hd = config.head_dim
    q = config.num_heads * hd
    kv = config.num_kv_heads * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    weights = config.num_layers * per_layer + config.vocab_size * d
    pairs = seq_len * (seq_len + 1) / 2
    attention = config.num_layers * config.num_heads * 2 * (2 * pairs * hd)
    return batch * (2 * weights * seq_len + attention)


def _time_matmul(m: int = 2048) -> float:
    """FLOP/s of an ``m x m`` by ``m x m`` ``jnp.dot`` (the machine's matmul speed)."""
    a = jnp.ones((m, m), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(3):
        dot(a, a).block_until_ready()
    return 3 * 2 * m**3 / (time.perf_counter() - start)


def _time_torch(model, batches) -> tuple[float, float]:
    import torch

    start = time.perf_counter()
    total = 0.0
    with torch.inference_mode():
        for batch in batches:
            logits = model(batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model spec for load_model")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random model instead")
    parser.add_argument("--windows", type=int, default=4, help="windows per timed pass")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per implementation")
    parser.add_argument(
        "--unblocked", action="store_true", help="also time our direct (unblocked) forward"
    )
    args = parser.parse_args()

    import torch
    import transformers

    from jaxprune.loaders.hf import write_hf_folder

    if args.tiny:
        model = _tiny_model()
    else:
        from jaxprune.loaders.resolve import load_model

        model = load_model(args.model)[0]
    config = model.config
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_folder(model, tmp)
        # The folder's config names the architecture (Llama, Qwen, Mistral, Gemma 3).
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()

    rng = np.random.default_rng(0)
    windows = rng.integers(0, config.vocab_size, (args.windows, args.seq_len)).astype(np.int32)
    starts = range(0, args.windows, args.batch_size)
    ours_batches = [jnp.asarray(windows[s : s + args.batch_size]) for s in starts]
    torch_batches = [
        torch.tensor(windows[s : s + args.batch_size], dtype=torch.long) for s in starts
    ]
    if len({b.shape for b in ours_batches}) > 1:
        parser.error("--windows must be a multiple of --batch-size (one compiled shape)")
    tokens = args.windows * (args.seq_len - 1)

    graphdef, state = nnx.split(model)
    # Warm-up: compilation for ours, allocator and kernel selection for torch.
    _, nll_ours = _time_ours(graphdef, state, ours_batches[:1])
    _, nll_torch = _time_torch(hf, torch_batches[:1])
    direct = _unblocked_nll() if args.unblocked else None
    if direct is not None:
        _time_ours(graphdef, state, ours_batches[:1], direct)
    from jaxprune.kernels import causal_attention, head_nll

    probe = jnp.zeros((1, 1, 1, 1, config.head_dim), jnp.float32)
    fused = causal_attention.applies(probe, None) or head_nll.applies(
        probe[0, 0, 0], probe[0, 0, 0]
    )
    xla = _xla_nll() if fused else None
    from jaxprune.kernels import matmul

    rows = jnp.zeros((args.batch_size * args.seq_len, 1), jnp.float32)
    matmul_on = matmul.applies(rows, rows[:1], (((1,), (0,)), ((), ())), None)
    xla_matmul = _xla_matmul_nll() if matmul_on else None
    for other in (xla, xla_matmul):
        if other is not None:
            _time_ours(graphdef, state, ours_batches[:1], other)
    ours_s, torch_s, direct_s, xla_s, xla_matmul_s, dot_flops = [], [], [], [], [], []
    for _ in range(args.repeats):
        ours_s.append(_time_ours(graphdef, state, ours_batches)[0])
        torch_s.append(_time_torch(hf, torch_batches)[0])
        dot_flops.append(_time_matmul())
        if direct is not None:
            direct_s.append(_time_ours(graphdef, state, ours_batches, direct)[0])
        if xla is not None:
            xla_s.append(_time_ours(graphdef, state, ours_batches, xla)[0])
        if xla_matmul is not None:
            xla_matmul_s.append(_time_ours(graphdef, state, ours_batches, xla_matmul)[0])

    ours_tps = tokens / statistics.median(ours_s)
    torch_tps = tokens / statistics.median(torch_s)
    print(
        f"model: {'tiny random' if args.tiny else args.model} ({config.num_layers} layers, "
        f"hidden {config.hidden_size}); {args.windows} windows x {args.seq_len} tokens, "
        f"batch {args.batch_size}, {args.repeats} interleaved repeats"
    )
    print(
        f"jax backend: {jax.default_backend()} ({jax.device_count()} device(s)); "
        f"torch threads: {torch.get_num_threads()}"
    )
    kernels = "XLA's (no fused kernel here)"
    if xla is not None:
        kernels = "fused (attention, head NLL" + (", matmul)" if matmul_on else ")")
    print(f"jaxprune CPU kernels: {kernels}")
    print(f"first-batch NLL sum: jaxprune {nll_ours:.3f}, transformers {nll_torch:.3f}")
    for name, tps, times in (
        ("jaxprune (JAX)", ours_tps, ours_s),
        ("transformers (torch)", torch_tps, torch_s),
    ):
        print(f"{name:22s} {tps:10.1f} tokens/s  (median {statistics.median(times):.3f} s)")
    print(f"ratio jaxprune / transformers: {ours_tps / torch_tps:.2f}")
    # What the speeds mean against the machine: the hand-counted forward FLOPs per second, as a
    # fraction of a large matmul's FLOP/s measured between the same repeats.
    flops = forward_flops(config, args.batch_size, args.seq_len) * len(ours_batches)
    peak = statistics.median(dot_flops)
    print(
        f"forward: {flops / tokens / 1e6:.0f} MFLOP per predicted token (hand count, causal); "
        f"jnp.dot 2048^3: {peak / 1e9:.1f} GFLOP/s"
    )
    for name, times in (("jaxprune", ours_s), ("transformers", torch_s)):
        rate = flops / statistics.median(times)
        print(f"{name:22s} {rate / 1e9:6.1f} GFLOP/s = {rate / peak:.2f} of matmul")
    need = 1.5 * flops / statistics.median(torch_s)
    print(f"1.5x transformers would need {need / 1e9:.1f} GFLOP/s = {need / peak:.2f} of matmul")
    if direct_s:
        direct_tps = tokens / statistics.median(direct_s)
        print(f"{'jaxprune unblocked':22s} {direct_tps:10.1f} tokens/s")
        print(f"ratio blocked / unblocked: {ours_tps / direct_tps:.2f}")
    if xla_s:
        xla_tps = tokens / statistics.median(xla_s)
        print(f"{'jaxprune, XLA only':22s} {xla_tps:10.1f} tokens/s (JAXPRUNE_CPU_KERNELS=xla)")
        print(f"ratio XLA only / transformers: {xla_tps / torch_tps:.2f}")
        print(f"ratio fused / XLA only: {ours_tps / xla_tps:.2f}")
    if xla_matmul_s:
        other_tps = tokens / statistics.median(xla_matmul_s)
        print(f"{'jaxprune, XLA matmul':22s} {other_tps:10.1f} tokens/s (fused attention and head)")
        print(f"ratio XLA matmul / transformers: {other_tps / torch_tps:.2f}")
        print(f"ratio with / without the matmul kernel: {ours_tps / other_tps:.2f}")


if __name__ == "__main__":
    main()

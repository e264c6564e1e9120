"""The fused CPU kernels against XLA's forms, side by side in one run, at the protocol's shapes.

Times one layer's attention (SmolLM2-135M's heads at 1 x 2048; Gemma 3 270M's with and without
its 512-key window) and the output head's NLL over 2047 tokens (SmolLM2's 49,152 x 576 head),
each compiled, best of ``--repeats``, alternating the two forms; prints the maximum difference.

  python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp

from jaxprune.attention import blocked_causal_attention
from jaxprune.kernels import loading
from jaxprune.models import llama as model_lib


def _compiled(fn, setting: str):
    """``fn`` jit-compiled with ``JAXPRUNE_CPU_KERNELS=setting`` (read while tracing)."""

    def traced(*args):
        with loading.setting(setting):
            return fn(*args)

    return jax.jit(traced)


def _best(fn, args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def _attention_case(g, r, dh, window, t=2048):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (1, g, r, t, dh))
    k = jax.random.normal(keys[1], (1, g, t, dh))
    v = jax.random.normal(keys[2], (1, g, t, dh))
    scale = 1 / math.sqrt(dh)

    def fn(q, k, v):
        return blocked_causal_attention(
            q,
            k,
            v,
            scale_logits=lambda x: x * scale,
            window=window,
            block=model_lib.QUERY_BLOCK,
            logit_scale=scale,
        )

    return fn, (q, k, v)


class _Head:
    """What ``head_nll`` reads of a model: a final norm (here the identity) and a tied head."""

    lm_head = None

    def __init__(self, weight):
        self.embed_tokens = type("Embed", (), {"embedding": weight})()

    @staticmethod
    def norm(h):
        return h

    def head(self, h):
        return h @ self.embed_tokens.embedding.T


def _head_case(vocab=49152, d=576, t=2048):
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    weight = 0.05 * jax.random.normal(keys[0], (vocab, d))
    h = jax.random.normal(keys[1], (1, t, d))
    tokens = jax.random.randint(keys[1], (1, t), 0, vocab)

    def fn(weight, h):
        return model_lib.head_nll(_Head(weight), h, tokens)

    return fn, (weight, h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per form")
    args = parser.parse_args()
    cases = {
        "attention, SmolLM2 layer (9 q / 3 kv heads of 64), 1 x 2048": _attention_case(
            3, 3, 64, None
        ),
        "attention, Gemma 3 global layer (4 q / 1 kv of 256), 1 x 2048": _attention_case(
            1, 4, 256, None
        ),
        "attention, Gemma 3 local layer (window 512), 1 x 2048": _attention_case(1, 4, 256, 512),
        "head NLL, SmolLM2 (49,152 x 576), 2047 tokens": _head_case(),
    }
    print(f"jax backend: {jax.default_backend()}; CPUs: {os.cpu_count()}")
    print(f"{'case':64s} {'fused ms':>9s} {'XLA ms':>9s} {'XLA / fused':>11s} {'max |diff|':>11s}")
    for name, (fn, inputs) in cases.items():
        fused, xla = _compiled(fn, "fused"), _compiled(fn, "xla")
        diff = float(jnp.max(jnp.abs(fused(*inputs) - xla(*inputs))))
        fused_s, xla_s = [], []
        for _ in range(2):  # alternate, so drift in load hits both alike
            fused_s.append(_best(fused, inputs, args.repeats))
            xla_s.append(_best(xla, inputs, args.repeats))
        f, x = min(fused_s), min(xla_s)
        print(f"{name:64s} {f * 1e3:9.1f} {x * 1e3:9.1f} {x / f:11.2f} {diff:11.2e}")


if __name__ == "__main__":
    main()

"""Perplexity: ``exp`` of the mean next-token negative log-likelihood over all predicted tokens.

Two inputs, one definition:
  * an ``(N, T)`` array of equal windows (WikiText-2 / C4 windows of the protocol): every window
    predicts ``T - 1`` tokens;
  * a list of variable-length sequences (the paper protocol's C4 documents): each predicts
    ``len - 1`` tokens and the mean is token-weighted.

Variable-length sequences are right-padded to a few bucket lengths. With causal attention a
position never sees the padding after it, so padding changes no prediction; it only bounds the
number of distinct shapes, hence of compilations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxprune.models.llama import Llama, token_nll

# Variable-length sequences are padded up to a multiple of this many tokens.
BUCKET = 256


def _batches(sequences: list[np.ndarray], batch_size: int):
    """Yields ``(tokens (batch_size, L), lengths (batch_size,), indices)`` grouped by bucket;
    ``indices`` are the real rows' positions in ``sequences``."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(BUCKET * math.ceil(len(sequences[i]) / BUCKET), []).append(i)
    for padded_len, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            tokens = np.zeros((batch_size, padded_len), np.int32)
            lengths = np.zeros((batch_size,), np.int64)
            for row, i in enumerate(chunk):
                tokens[row, : len(sequences[i])] = sequences[i]
                lengths[row] = len(sequences[i])
            yield tokens, lengths, chunk


def _window_batches(windows: np.ndarray, batch_size: int):
    n, t = windows.shape
    for start in range(0, n, batch_size):
        chunk = windows[start : start + batch_size]
        # Pad the last batch to the full batch size so every call reuses one compilation.
        tokens = np.zeros((batch_size, t), np.int32)
        tokens[: len(chunk)] = chunk
        lengths = np.zeros((batch_size,), np.int64)
        lengths[: len(chunk)] = t
        yield tokens, lengths, list(range(start, start + len(chunk)))


def perplexity(
    model: Llama,
    windows: np.ndarray | Sequence[np.ndarray],
    batch_size: int = 4,
    progress: bool = True,
    token_nlls: Callable[[list[np.ndarray]], Iterator[np.ndarray]] | None = None,
) -> dict[str, float | int]:
    """Perplexity of ``model`` on token windows or variable-length sequences.

    Args:
      model: the model to evaluate (unused with ``token_nlls``).
      windows: token ids, either an ``(N, T)`` integer array or a sequence of 1-D integer arrays
        of any lengths (token-weighted mean).
      batch_size: sequences per forward pass.
      progress: show a tqdm bar (on stderr).
      token_nlls: computes the next-token NLLs ``(b, t-1)`` of a list of token batches
        ``(b, t)``, yielding one array per batch in order (default: ``model``'s forward, batch
        by batch; a streamed model passes
        :meth:`jaxprune.streaming.StreamedLayers.token_nlls`).

    Returns:
      ``{"perplexity": exp(nll), "nll": mean next-token NLL (nats), "windows": N,
      "tokens": number of predicted tokens, "window_nll": summed NLL of each window (in input
      order), "window_tokens": predicted tokens of each window, "seconds": wall time including
      compilation}``. The per-window sums are what paired comparisons of two runs resample.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(windows, np.ndarray) and windows.ndim == 2:
        if windows.shape[1] < 2:
            raise ValueError(f"windows need at least 2 tokens to predict one, got {windows.shape}.")
        n_seqs = windows.shape[0]
        make_batches = lambda b: _window_batches(windows.astype(np.int32), b)  # noqa: E731
    else:
        sequences = [np.asarray(s, np.int32).reshape(-1) for s in windows]
        n_seqs = len(sequences)
        make_batches = lambda b: _batches(sequences, b)  # noqa: E731
    if n_seqs == 0:
        raise ValueError("no windows to evaluate; check the dataset and the window count.")
    # A batch larger than the number of sequences would only compute padding.
    batch_size = min(batch_size, n_seqs)
    batches = list(make_batches(batch_size))
    if token_nlls is None:
        graphdef, state = nnx.split(model)

        def token_nlls(batch_tokens):
            for tokens in batch_tokens:
                yield token_nll(graphdef, state, jnp.asarray(tokens))

    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    window_nll = np.zeros(n_seqs, np.float64)
    window_tokens = np.zeros(n_seqs, np.int64)
    bar = tqdm(total=n_seqs, unit="window", desc="perplexity", disable=not progress)
    nlls = token_nlls([tokens for tokens, _, _ in batches])
    for (_, lengths, indices), nll in zip(batches, nlls, strict=True):
        nll = np.asarray(nll, np.float64)
        # nll[:, i] predicts token i + 1; sequence r has lengths[r] - 1 predictions.
        valid = np.arange(nll.shape[1])[None, :] < (lengths[:, None] - 1)
        per_row = np.sum(nll, axis=1, where=valid)
        window_nll[indices] = per_row[: len(indices)]
        window_tokens[indices] = valid.sum(axis=1)[: len(indices)]
        total_nll += float(per_row.sum())
        total_tokens += int(valid.sum())
        bar.update(len(indices))
        if total_tokens:
            bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    bar.close()
    if total_tokens == 0:
        raise ValueError("every sequence is shorter than 2 tokens; nothing to predict.")
    mean_nll = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "windows": n_seqs,
        "tokens": total_tokens,
        "window_nll": window_nll.tolist(),
        "window_tokens": window_tokens.tolist(),
        "seconds": time.perf_counter() - start,
    }

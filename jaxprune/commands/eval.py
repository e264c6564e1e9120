"""Perplexity of a dense model: jaxprune eval --model smollm2-135m --data wikitext2 --windows 32.

Loads the model (default model, .gguf file, Hugging Face folder or hub id), builds the protocol's
evaluation windows and prints the perplexity, or one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import json

from jaxprune.models import DTYPES

DATASETS = ("wikitext2", "c4")


def _windows_arg(value: str) -> int | None:
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"--windows must be a positive integer or 'all', got {value!r}"
        )
    return n


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m, a .gguf file, a Hugging Face folder or a hub id",
    )
    parser.add_argument("--data", choices=DATASETS, default="wikitext2", help="evaluation text")
    parser.add_argument(
        "--windows",
        type=_windows_arg,
        default=32,
        help="number of windows (32 = protocol 'quick'; 'all' = the protocol's full count)",
    )
    parser.add_argument("--seq-len", type=_positive, default=2048, help="tokens per window")
    parser.add_argument("--batch-size", type=_positive, default=4, help="windows per forward pass")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the evaluation text files (default: ../shared/data)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="parameter and activation dtype"
    )
    parser.add_argument(
        "--stream",
        choices=["auto", "true", "false"],
        default="auto",
        help="read one decoder layer at a time from disk instead of loading the model (auto: "
        "when its float32 parameters exceed --stream-threshold-gib)",
    )
    parser.add_argument(
        "--stream-threshold-gib",
        type=float,
        default=8.0,
        help="GiB of float32 parameters above which --stream auto streams",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    from jaxprune import streaming
    from jaxprune.data import eval_windows, require_files
    from jaxprune.errors import ModelError
    from jaxprune.loaders.lazy import open_weights
    from jaxprune.loaders.resolve import load_model, locate
    from jaxprune.perplexity import perplexity

    # Errors of bad input (no such model, no network, a corrupt file, missing data) are reported
    # in one line by jaxprune.cli.run_command. The data file is checked before the model loads.
    require_files([args.data], args.data_dir)
    path = locate(args.model)
    weights = open_weights(path)
    stream = {"true": True, "false": False}.get(args.stream, "auto")
    token_nlls = None
    if streaming.should_stream(stream, args.stream_threshold_gib, weights.param_bytes):
        # One decoder layer at a time from disk, every window carried through it together.
        source = streaming.StreamedLayers(weights, dtype=DTYPES[args.dtype])
        model, tokenizer, token_nlls = None, weights.tokenizer, source.token_nlls
    else:
        model, tokenizer = load_model(str(path), dtype=DTYPES[args.dtype])
    if tokenizer is None:
        raise ModelError(
            f"{args.model} has no tokenizer.json; put the model's tokenizer.json in its folder."
        )
    windows = eval_windows(
        tokenizer, args.data, args.windows, seq_len=args.seq_len, data_dir=args.data_dir
    )
    result = perplexity(
        model, windows, batch_size=args.batch_size, progress=not args.json, token_nlls=token_nlls
    )
    result.update(
        model=args.model,
        data=args.data,
        seq_len=args.seq_len,
        dtype=args.dtype,
        stream=token_nlls is not None,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.model} on {args.data}: perplexity {result['perplexity']:.4f} "
            f"({result['windows']} windows, {result['tokens']} predicted tokens, "
            f"{result['seconds']:.1f} s)"
        )
    return 0

"""Prune a model: jaxprune prune --model smollm2-135m --method wanda --targets qk --sparsity 0.5.

Every field of ``PruneConfig`` is a flag (``--calib-samples 8``, ``--lam-search true``); values
are read as YAML and validated like a config file. ``--config FILE`` loads a YAML file first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jaxprune.config import ConfigError, from_dict, load_yaml, yaml_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxprune.pipeline import PruneConfig

    parser.add_argument("--config", help="YAML file of PruneConfig keys (flags override it)")
    for f in dataclasses.fields(PruneConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            metavar="VALUE",
            help=f"default: {f.default!r}",
        )
    parser.add_argument("--json", action="store_true", help="print one JSON object of metrics")
    parser.add_argument(
        "--export-hf", metavar="DIR", help="also write the pruned model as a Hugging Face folder"
    )


def main(args: argparse.Namespace) -> int:
    from jaxprune.job import run_job, summary
    from jaxprune.pipeline import PruneConfig

    try:
        raw = load_yaml(args.config) if args.config else {}
        for f in dataclasses.fields(PruneConfig):
            value = getattr(args, f.name)
            if value is not None:
                raw[f.name] = value if f.name in ("model", "out", "data_dir") else yaml_value(value)
        cfg = from_dict(PruneConfig, raw, source="jaxprune prune")
    except ConfigError as err:
        print(f"jaxprune prune: error: {err}", file=sys.stderr)
        return 2
    metrics = run_job(cfg, export_hf=args.export_hf)
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "layers"}, default=float))
    else:
        print(summary(metrics))
    return 0

"""Prune a model: jaxprune prune --model smollm2-135m --method wanda --targets qk --sparsity 0.5.

Every field of ``PruneConfig`` is a flag (``--calib-samples 8``, ``--lam-search true``); values
are read as YAML (numbers as Python writes them: ``--lr 1e-3``) and validated like a config file.
``--config FILE`` loads a YAML file first. A stopped run continues with ``--resume RUN_DIR`` and
the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from jaxprune.config import from_dict, load_yaml, yaml_text, yaml_value

# Fields whose flag values are taken as text, not parsed as YAML (paths and names).
TEXT_FIELDS = ("model", "out", "data_dir")


def _metavar(field: dataclasses.Field, hint) -> str:
    if "choices" in field.metadata:
        return "{" + ",".join(map(str, field.metadata["choices"])) + "}"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        return "LIST"
    return {bool: "true|false", int: "INT", float: "FLOAT"}.get(hint, "TEXT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxprune.config import field_help
    from jaxprune.pipeline import PruneConfig

    parser.add_argument("--config", help="YAML file of PruneConfig keys (flags override it)")
    descriptions = field_help(PruneConfig)
    hints = typing.get_type_hints(PruneConfig)
    for f in dataclasses.fields(PruneConfig):
        text = descriptions.get(f.name, "")
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            metavar=_metavar(f, hints[f.name]),
            help=f"{text} Default: {yaml_text(f.default)}".strip().replace("%", "%%"),
        )
    parser.add_argument("--json", action="store_true", help="print one JSON object of metrics")
    parser.add_argument(
        "--export-hf", metavar="DIR", help="also write the pruned model as a Hugging Face folder"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let --export-hf replace an earlier export in its folder",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its next layer (give the same flags as the run did)",
    )


def main(args: argparse.Namespace) -> int:
    from jaxprune.job import run_job, summary
    from jaxprune.pipeline import PruneConfig

    # Config errors are reported in one line by jaxprune.cli.run_command.
    raw = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(PruneConfig):
        value = getattr(args, f.name)
        if value is not None:
            flag = f"--{f.name.replace('_', '-')}"
            raw[f.name] = value if f.name in TEXT_FIELDS else yaml_value(value, what=flag)
    cfg = from_dict(PruneConfig, raw, source="jaxprune prune")
    metrics = run_job(
        cfg, export_hf=args.export_hf, overwrite=args.overwrite, resume_dir=args.resume
    )
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "layers"}, default=float))
    else:
        print(summary(metrics))
    return 0

"""Prune a model: jaxprune prune --model smollm2-135m --method wanda --targets qk --sparsity 0.5.

Every field of ``PruneConfig`` is a flag, its sections' fields dotted (``--softmax.lam 0.03``,
``--calibration.samples 8``, ``--softmax.lam-search true``); values are read as YAML (numbers as
Python writes them: ``--softmax.lr 1e-3``) and validated like a config file. ``--config FILE``
loads a YAML file first. A stopped run continues with ``--resume RUN_DIR`` and the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from jaxprune.config import flatten, from_dict, load_yaml, yaml_value

# Fields whose flag values are taken as text, not parsed as YAML (paths and names).
TEXT_FIELDS = ("model", "out", "data_dir")


def flag(key: str) -> str:
    """The flag of a dotted config key: ``softmax.lam_search`` -> ``--softmax.lam-search``."""
    return "--" + key.replace("_", "-")


def _metavar(field: dataclasses.Field, hint) -> str:
    if "choices" in field.metadata:
        from jaxprune.config import yaml_text

        return "{" + ",".join(map(yaml_text, field.metadata["choices"])) + "}"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        return "LIST"
    return {bool: "true|false", int: "INT", float: "FLOAT"}.get(hint, "TEXT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxprune.config import field_help, leaf_fields, yaml_text
    from jaxprune.prune_config import PruneConfig

    parser.add_argument("--config", help="YAML file of PruneConfig keys (flags override it)")
    groups, descriptions = {}, {}
    for key, f, hint, owner in leaf_fields(PruneConfig):
        section = key.rpartition(".")[0]
        if section not in groups:
            doc = (owner.__doc__ or "").split("\n\n")[0]
            groups[section] = parser.add_argument_group(
                f"{section} (--{section}.KEY)" if section else "run",
                " ".join(doc.split()) if section else None,
            )
        if owner not in descriptions:
            descriptions[owner] = field_help(owner)
        text = descriptions[owner].get(f.name, "")
        groups[section].add_argument(
            flag(key),
            dest=key,
            default=None,
            metavar=_metavar(f, hint),
            help=f"{text} Default: {yaml_text(f.default)}".strip().replace("%", "%%"),
        )
    parser.moved_flags = {flag(old): flag(new) for old, new in PruneConfig.MOVED_KEYS.items()}
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


def config_from_args(args: argparse.Namespace):
    """The ``PruneConfig`` of parsed flags (over ``--config``'s file, if given).

    Raises:
      ConfigError: a bad key or value, in one line naming its flag.
    """
    from jaxprune.config import leaf_fields
    from jaxprune.prune_config import PruneConfig

    # The file's keys are checked on their own first, so that an unknown one names the file.
    path = getattr(args, "config", None)
    raw = flatten(PruneConfig, load_yaml(path), source=path) if path else {}
    for key, *_ in leaf_fields(PruneConfig):
        value = getattr(args, key, None)
        if value is not None:
            raw[key] = value if key in TEXT_FIELDS else yaml_value(value, what=flag(key))
    return from_dict(PruneConfig, raw, source="jaxprune prune")


def main(args: argparse.Namespace) -> int:
    from jaxprune.job import run_job, summary

    # Config errors are reported in one line by jaxprune.cli.run_command.
    cfg = config_from_args(args)
    metrics = run_job(
        cfg, export_hf=args.export_hf, overwrite=args.overwrite, resume_dir=args.resume
    )
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "layers"}, default=float))
    else:
        print(summary(metrics))
    return 0

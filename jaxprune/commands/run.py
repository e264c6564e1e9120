"""Run an experiment config: jaxprune run experiments/configs/NAME.yaml [--set key=value ...]."""

from __future__ import annotations

import argparse
import importlib

from jaxprune.config import ConfigError, from_dict, load_yaml, parse_overrides

# `experiment:` value in a config -> (module, config class, run function, summary function).
EXPERIMENTS = {
    "synthetic": ("jaxprune.synthetic", "SyntheticConfig", "run", "summary"),
    "table": ("jaxprune.table", "TableConfig", "run", "summary"),
    "prune": ("jaxprune.job", "PruneConfig", "run_job", "summary"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config under experiments/configs/")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (YAML value); repeatable",
    )


def main(args: argparse.Namespace) -> int:
    # Config errors (and every other user error) are reported in one line by
    # jaxprune.cli.run_command.
    raw = load_yaml(args.config)
    raw.update(parse_overrides(args.overrides))
    name = raw.pop("experiment", None)
    if name not in EXPERIMENTS:
        raise ConfigError(
            f"{args.config}: 'experiment: {name}' is not known; use one of {sorted(EXPERIMENTS)}."
        )
    module_name, cls_name, run_name, summary_name = EXPERIMENTS[name]
    module = importlib.import_module(module_name)
    cfg = from_dict(getattr(module, cls_name), raw, source=args.config)
    metrics = getattr(module, run_name)(cfg)
    print(getattr(module, summary_name)(metrics))
    return 0

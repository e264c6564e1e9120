"""The ``jaxprune`` command line: one sub-command per module under ``jaxprune/commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command name -> module with `add_arguments(parser)` and `main(args) -> int`.
COMMANDS = {
    "run": "jaxprune.commands.run",
    "eval": "jaxprune.commands.eval",
    "prune": "jaxprune.commands.prune",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, path in COMMANDS.items():
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name != path:
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return modules[args.command].main(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``jaxprune`` command line: one sub-command per module under ``jaxprune/commands``.

Every command fails the same way: bad input (a missing or corrupt file, an unsupported model, a
setting that cannot work, no network) prints one line ``jaxprune <command>: error: ...`` and exits
with status 2; only a bug shows a traceback, and ``--debug`` shows it for any error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command name -> module with `add_arguments(parser)` and `main(args) -> int`.
COMMANDS = {
    "run": "jaxprune.commands.run",
    "eval": "jaxprune.commands.eval",
    "prune": "jaxprune.commands.prune",
    "compare": "jaxprune.commands.compare",
}

# Exit status of a user error (argparse's own for a bad command line).
USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and a near flag suggested.

    Flags are never abbreviated: ``--eval.window`` is an unknown flag that names
    ``--eval.windows``, not silently that flag (an abbreviation would change meaning, or become
    ambiguous, whenever a field is added).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unknown_arguments(self, extras: list[str]):
        """Stops on the first argument no flag takes, naming the flag it moved to (``moved_flags``,
        set by a command) or else the nearest flag."""
        from jaxprune.config import nearest

        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        moved = getattr(self, "moved_flags", {})
        for token in extras:
            if token.startswith("-"):
                name = token.split("=", 1)[0]
                if name.replace("_", "-") in moved:
                    self.error(f"flag {name} moved to {moved[name.replace('_', '-')]}")
                near = nearest(name.replace("_", "-"), flags)
                hint = f"; did you mean {near}?" if near else ""
                self.error(f"unknown flag {name}{hint}")
        self.error(f"unexpected argument {extras[0]!r} (a flag's value needs its flag before it)")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="jaxprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules, parsers = {}, {}
    for name, path in COMMANDS.items():
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name != path:
                raise
            continue
        modules[name] = module
        parsers[name] = sub.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(parsers[name])
        parsers[name].add_argument(
            "--debug", action="store_true", help="show the full traceback of any error"
        )
    args, extras = parser.parse_known_args(argv)
    if extras:
        parsers[args.command].unknown_arguments(extras)
    return run_command(args.command, modules[args.command].main, args)


def run_command(name: str, fn, args: argparse.Namespace) -> int:
    """Runs ``fn(args)``; a user error becomes one line on stderr and exit status 2."""
    from jaxprune.errors import is_user_error, one_line
    from jaxprune.sharding import maybe_initialize

    try:
        # $JAXPRUNE_DISTRIBUTED=1: each process of a multi-host run joins the others before JAX
        # picks its devices (jaxprune.sharding).
        maybe_initialize()
        return fn(args)
    except KeyboardInterrupt as err:
        if getattr(args, "debug", False):
            raise
        notes = " ".join(getattr(err, "__notes__", ()))
        print(f"jaxprune {name}: interrupted{'; ' + notes if notes else ''}", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False) or not is_user_error(err):
            raise
        prefix = f"jaxprune {name}: "  # config errors may already name the command
        print(f"{prefix}error: {one_line(err).removeprefix(prefix)}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())

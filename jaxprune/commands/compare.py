"""Paired difference of two runs: jaxprune compare RUN REFERENCE.

RUN and REFERENCE are run folders (or their ``metrics.json``) of ``jaxprune prune`` evaluated on
the same windows. For every evaluation set both have, prints both perplexities and the
difference RUN - REFERENCE with its 95% paired bootstrap interval over the windows (PROTOCOL.md,
"Comparing two runs"); a star marks an interval that excludes zero. ``--json`` prints one JSON
object instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxprune.errors import DataError, DataFileError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (or its metrics.json)")
    parser.add_argument("reference", help="run folder (or its metrics.json) compared against")
    parser.add_argument(
        "--resamples", type=int, default=10_000, help="bootstrap resamples (PROTOCOL.md: 10,000)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def read_metrics(path: str) -> dict:
    """A run's ``metrics.json``, from the run folder or the file itself."""
    file = Path(path)
    if file.is_dir():
        file = file / "metrics.json"
    if not file.is_file():
        raise DataFileError(
            f"{file}: no such file; give a run folder of jaxprune prune (it holds metrics.json) "
            "or the metrics.json itself."
        )
    try:
        metrics = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: not a readable metrics.json ({err}); run the job again.") from err
    if not isinstance(metrics, dict) or not isinstance(metrics.get("evaluation"), dict):
        raise DataError(f"{file}: holds no evaluation; was the run evaluated (--eval.data)?")
    return metrics


def compare(run: dict, reference: dict, resamples: int = 10_000) -> dict:
    """``{set: {"run", "reference", **paired_bootstrap}}`` for every evaluation set of both."""
    from jaxprune.compare import paired_bootstrap

    shared = [d for d in run["evaluation"] if d in reference["evaluation"]]
    if not shared:
        raise DataError(
            f"the runs share no evaluation set (run: {sorted(run['evaluation'])}, reference: "
            f"{sorted(reference['evaluation'])}); compare runs evaluated on the same data."
        )
    out = {}
    for d in shared:
        a, b = run["evaluation"][d], reference["evaluation"][d]
        try:
            cmp = paired_bootstrap(a, b, resamples=resamples)
        except ValueError as err:
            raise DataError(f"{d}: {err}") from err
        out[d] = {"run": a["perplexity"], "reference": b["perplexity"], **cmp}
    return out


def main(args: argparse.Namespace) -> int:
    from jaxprune.compare import format_difference

    if args.resamples < 1:
        raise DataError(f"--resamples {args.resamples}: give a positive count such as 10000.")
    result = compare(read_metrics(args.run), read_metrics(args.reference), args.resamples)
    if args.json:
        print(json.dumps(result))
        return 0
    for d, c in result.items():
        print(
            f"{d}: {c['run']:.3f} against {c['reference']:.3f}, difference "
            f"{format_difference(c)} (95% paired bootstrap over {c['windows']} windows)"
        )
    return 0

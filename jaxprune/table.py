"""The head-to-head table: several pruning runs under one protocol, one Markdown table, plots.

Each row is a ``PruneConfig`` (the shared ``base`` plus the row's own keys) run by the same code as
``jaxprune prune``, whose exact command the table prints. Rows already measured with the same
settings in ``out`` are reused, so a stopped table resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path

from jaxprune import plots, results
from jaxprune.config import ConfigError, from_dict, to_dict
from jaxprune.pipeline import PruneConfig


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """Rows of the head-to-head comparison."""

    # PruneConfig keys shared by every row.
    base: dict = field(default_factory=dict)
    # The rows: each a mapping with "name" and PruneConfig keys.
    rows: tuple[dict, ...] = field(default=(), metadata={"nonempty": True})
    # Folder of the table (rows' run folders go in out/runs).
    out: str = "runs/table"
    # Rows whose held-out attention error per layer is plotted (by name; empty: all qk rows).
    attention_rows: tuple[str, ...] = ()

    def __post_init__(self):
        names = [r.get("name") for r in self.rows]
        if any(not isinstance(n, str) or not n for n in names):
            raise ValueError("every row needs a non-empty 'name'.")
        if len(set(names)) != len(names):
            raise ValueError(f"row names must be unique, got {names}.")
        unknown = [n for n in self.attention_rows if n not in names]
        if unknown:
            raise ValueError(f"attention_rows {unknown} name no row; rows are {names}.")
        for cfg in self.row_configs().values():
            del cfg  # building them validates every row

    def row_configs(self) -> dict[str, PruneConfig]:
        """Validated configs of the rows, by name."""
        out = {}
        for row in self.rows:
            raw = {**self.base, **{k: v for k, v in row.items() if k != "name"}}
            raw["out"] = str(Path(self.out) / "runs")
            try:
                out[row["name"]] = from_dict(PruneConfig, raw, source=f"row {row['name']!r}")
            except ConfigError as err:
                message = str(err).removeprefix(f"row {row['name']!r}: ")
                raise ValueError(f"row {row['name']!r}: {message}") from err
        return out


def _reusable(out: Path, cfg: PruneConfig) -> dict | None:
    for path in sorted((out / "runs").glob("*/metrics.json"), reverse=True):
        metrics = json.loads(path.read_text())
        if metrics.get("config") == json.loads(json.dumps(to_dict(cfg))):
            return metrics
    return None


def run(cfg: TableConfig) -> dict:
    """Runs (or reuses) every row, then writes ``table.md``, ``table.json`` and the plots."""
    from jaxprune.job import command_for, run_job, summary

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, row_cfg in cfg.row_configs().items():
        command = command_for(row_cfg)
        metrics = _reusable(out, row_cfg)
        if metrics is None:
            print(f"[table] {name}: {command}", flush=True)
            metrics = run_job(row_cfg, command=command)
            print(f"[table] {name}: {summary(metrics)}", flush=True)
        else:
            print(f"[table] {name}: reusing {metrics['run_dir']}", flush=True)
        rows.append({"name": name, **metrics})
        _write(out, rows, cfg)
    return {
        "rows": rows,
        "out": str(out),
        "files": ["table.md", "table.json", "perplexity.png", "attention_error.png"],
    }


def _write(out: Path, rows: list[dict], cfg: TableConfig) -> None:
    datasets = list(dict.fromkeys(k for r in rows for k in r["perplexity"]))
    headers = [
        "row",
        *(f"{d} ppl" for d in datasets),
        "sparsity",
        "prune s",
        "peak RSS GiB",
        "command",
    ]
    body = [
        [
            r["name"],
            *(r["perplexity"].get(d, float("nan")) for d in datasets),
            r["mean_sparsity"],
            r["prune_seconds"],
            r["host_peak_rss_bytes"] / 2**30,
            f"`{r['command']}`",
        ]
        for r in rows
    ]
    (out / "table.md").write_text(results.markdown_table(headers, body) + "\n")
    results.write_json(out / "table.json", rows)
    plots.bar_plot(
        [r["name"] for r in rows],
        {d: [r["perplexity"].get(d, float("nan")) for r in rows] for d in datasets},
        out / "perplexity.png",
        ylabel="perplexity (log)",
        logy=True,
        title="Perplexity after pruning (lower is better)",
    )
    chosen = [
        r
        for r in rows
        if (
            r["name"] in cfg.attention_rows
            if cfg.attention_rows
            else r["config"]["targets"] == "qk" and r["config"]["method"] != "dense"
        )
    ]
    series = {
        r["name"]: [layer.get("heldout_attention_error", float("nan")) for layer in r["layers"]]
        for r in chosen
    }
    if series:
        n = max(len(v) for v in series.values())
        plots.lines_plot(
            list(range(n)),
            series,
            out / "attention_error.png",
            xlabel="layer",
            ylabel="||P_pruned - P||_F / ||P||_F (held out)",
            logy=True,
            title="Attention-matrix error per layer",
        )


def summary(metrics: dict) -> str:
    """The Markdown table, for the terminal."""
    return (
        (Path(metrics["out"]) / "table.md").read_text()
        + f"\nWrote {metrics['out']}/"
        + "{"
        + ", ".join(metrics["files"])
        + "}"
    )

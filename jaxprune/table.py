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
from jaxprune.compare import format_difference, paired_bootstrap
from jaxprune.config import ConfigError, flatten, from_dict, to_dict
from jaxprune.methods import registry
from jaxprune.methods.softmax import QK, resolve_mask
from jaxprune.prune_config import TARGETS, PruneConfig, flat_settings


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """Rows of the head-to-head comparison."""

    # PruneConfig keys shared by every row (sections nested, softmax: {steps: 60}, or dotted).
    base: dict = field(default_factory=dict)
    # The rows: each a mapping with "name", PruneConfig keys (a row's keys override base's, key by
    # key inside sections too) and optionally "reference" (the name of the row its perplexity is
    # compared with, paired over the same windows).
    rows: tuple[dict, ...] = field(default=(), metadata={"nonempty": True})
    # Folder of the table (rows' run folders go in out/runs).
    out: str = "runs/table"
    # Rows whose held-out attention error per layer is plotted (by name; empty: all qk rows).
    attention_rows: tuple[str, ...] = ()
    # Run the rows not yet measured (false: only write the table of the measured ones, listing
    # the others as not yet measured).
    run_missing: bool = True
    # One change at a time: each a mapping {change: what it changes, row: the row with it,
    # against: the row without it}; table.md gets the paired difference row - against.
    ablations: tuple[dict, ...] = ()
    # Stop after measuring this many new rows (None: all), so a driver can run one row per
    # process and a long table can be spread over sessions.
    max_new_rows: int | None = field(default=None, metadata={"range": (1, 10000)})

    def __post_init__(self):
        names = [r.get("name") for r in self.rows]
        if any(not isinstance(n, str) or not n for n in names):
            raise ValueError("every row needs a non-empty 'name'.")
        if len(set(names)) != len(names):
            raise ValueError(f"row names must be unique, got {names}.")
        unknown = [n for n in self.attention_rows if n not in names]
        if unknown:
            raise ValueError(f"attention_rows {unknown} name no row; rows are {names}.")
        for row in self.rows:
            ref = row.get("reference")
            if ref is not None and (ref not in names or ref == row["name"]):
                raise ValueError(
                    f"row {row['name']!r}: reference {ref!r} names no other row; rows are {names}."
                )
        for ablation in self.ablations:
            keys = set(ablation) if isinstance(ablation, dict) else set()
            if keys != {"change", "row", "against"}:
                raise ValueError(
                    f"ablation {ablation!r}: give exactly change, row and against, such as "
                    "{change: 'softmax.update: none', row: 'softmax qk 50% (no update)', "
                    "against: 'softmax qk 50%'}."
                )
            for side in ("row", "against"):
                if ablation[side] not in names:
                    raise ValueError(
                        f"ablation {ablation['change']!r}: {side} {ablation[side]!r} names no "
                        f"row; rows are {names}."
                    )
        for cfg in self.row_configs().values():
            del cfg  # building them validates every row

    def row_configs(self) -> dict[str, PruneConfig]:
        """Validated configs of the rows, by name."""
        out = {}
        for row in self.rows:
            source = f"row {row['name']!r}"
            own = {k: v for k, v in row.items() if k not in ("name", "reference")}
            try:
                raw = flatten(PruneConfig, self.base, source) | flatten(PruneConfig, own, source)
                raw["out"] = str(Path(self.out) / "runs")
                out[row["name"]] = from_dict(PruneConfig, raw, source=source)
            except ConfigError as err:
                message = str(err).removeprefix(f"row {row['name']!r}: ")
                raise ValueError(f"row {row['name']!r}: {message}") from err
        return out


def _same_settings(stored: dict, current: dict, stored_mask: str | None = None) -> bool:
    """Whether a stored row measured these settings. Both are configs as ``metrics.json`` holds
    them, nested or (rows stored before the sections) flat; they are compared as flat dotted keys
    (:func:`flat_settings`). A key the stored config lacks was added to ``PruneConfig`` after the
    row ran; the row measured its default, so it matches only that. ``stored_mask`` is the mask
    source the stored row recorded (``softmax_mask`` in its ``metrics.json``): a stored
    ``softmax.mask=auto`` is what it resolved to when the row ran, not what it resolves to now."""
    stored = _resolved(flat_settings(stored), stored_mask)
    current = _resolved(flat_settings(current))
    defaults = _resolved(flat_settings(json.loads(json.dumps(to_dict(PruneConfig())))))
    # Only the sections of the methods a row runs matter (a change of another method's defaults
    # leaves the row valid), and settings that change no result (progress bars) never do.
    stored, current = _used_settings(stored), _used_settings(current)
    for key, value in current.items():
        if key in stored:
            if stored[key] != value:
                return False
        elif value != defaults.get(key):
            return False
    return set(stored) <= set(current)


def _resolved(settings: dict, recorded: str | None = None) -> dict:
    """Flat settings with ``softmax.mask=auto`` replaced by the mask it gives (so a row on the
    default matches the run that measured that mask under its own name). ``recorded``, the
    source a stored run wrote down, wins over today's rule; a run from before the setting
    existed solved its mask."""
    if settings.get("method") != "softmax":
        return settings
    if recorded is not None:
        return settings | {"softmax.mask": recorded}
    if "softmax.mask" not in settings:
        return settings | {"softmax.mask": "solve"}
    mask = resolve_mask(settings["softmax.mask"], settings["pattern"], settings["softmax.update"])
    return settings | {"softmax.mask": mask}


# Settings that change how a run looks, never what it measures.
_NOT_RESULTS = ("progress",)


def _used_settings(settings: dict) -> dict:
    """Flat settings without those no result depends on: the sections of methods the row's
    method does not run (its own section, that of the method it hands other matrices to,
    ``NAME.other_method``, where there are other targets, and that of the method whose mask it
    starts from, ``NAME.mask``, stay) and :data:`_NOT_RESULTS`."""
    method = settings.get("method")
    other = f"{method}.other_method"
    if other in settings and set(TARGETS[settings.get("targets", "qk")]) <= set(QK):
        # Every target is its own: the method it would hand the others to is never run.
        settings = {k: v for k, v in settings.items() if k != other}
    # The method whose mask and weights start the softmax-aware update (softmax.mask, resolved).
    used = {method, settings.get(other), settings.get(f"{method}.mask")}
    sections = {m.name for m in registry.methods() if m.section is not None}
    return {
        k: v
        for k, v in settings.items()
        if k not in _NOT_RESULTS and (k.split(".")[0] not in sections - used or "." not in k)
    }


# The comparison group that an unset `group` meant when a row ran, for rows whose metrics.json
# predates the `group` entry (the softmax-aware default was "output" until it became "matrix").
_EARLIER_DEFAULT_GROUP = {"softmax": "output"}


def _measured_group(metrics: dict) -> str | None:
    """The comparison group a stored row actually used."""
    if "group" in metrics:
        return metrics["group"]
    config = metrics.get("config", {})
    if config.get("group") is not None:
        return config["group"]
    method = config.get("method", "dense")
    return _EARLIER_DEFAULT_GROUP.get(method, PruneConfig(method=method).group_or_default)


def _reusable(out: Path, cfg: PruneConfig) -> dict | None:
    # The group is compared as used (an unset group means the method's default of its time).
    current = {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items() if k != "group"}
    for path in sorted((out / "runs").glob("*/metrics.json"), reverse=True):
        metrics = json.loads(path.read_text())
        stored = {k: v for k, v in metrics.get("config", {}).items() if k != "group"}
        if (
            _same_settings(stored, current, metrics.get("softmax_mask"))
            and _measured_group(metrics) == cfg.group_or_default
        ):
            return metrics
    return None


def run(cfg: TableConfig) -> dict:
    """Runs (or reuses) every row, then writes ``table.md``, ``table.json`` and the plots."""
    from jaxprune.job import command_for, run_job, summary

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, new = [], 0
    for name, row_cfg in cfg.row_configs().items():
        command = command_for(row_cfg)
        metrics = _reusable(out, row_cfg)
        budget_left = cfg.max_new_rows is None or new < cfg.max_new_rows
        if metrics is None and not (cfg.run_missing and budget_left):
            print(f"[table] {name}: not yet measured: {command}", flush=True)
            continue
        if metrics is None:
            print(f"[table] {name}: {command}", flush=True)
            metrics = run_job(row_cfg, command=command)
            new += 1
            print(f"[table] {name}: {summary(metrics)}", flush=True)
        else:
            print(f"[table] {name}: reusing {metrics['run_dir']}", flush=True)
        # The command that reproduces the row today (a stored one may use flags since renamed).
        rows.append({"name": name, **metrics, "command": command})
        _write(out, rows, cfg)
    rows = _with_comparisons(rows, cfg)
    return {
        "rows": rows,
        "out": str(out),
        "files": ["table.md", "table.json", "perplexity.png", "attention_error.png"],
    }


def _with_comparisons(rows: list[dict], cfg: TableConfig) -> list[dict]:
    """Adds each row's paired bootstrap comparison with its reference row, per data set."""
    refs = {r["name"]: r.get("reference") for r in cfg.rows}
    by_name = {r["name"]: r for r in rows}
    out = []
    for r in rows:
        ref = by_name.get(refs.get(r["name"]) or "")
        comparisons = {}
        if ref is not None:
            for d, ev in r.get("evaluation", {}).items():
                if d in ref.get("evaluation", {}):
                    try:
                        comparisons[d] = paired_bootstrap(ev, ref["evaluation"][d])
                    except ValueError as err:
                        comparisons[d] = {"error": str(err)}
        out.append({**r, "reference": refs.get(r["name"]), "comparison": comparisons})
    return out


def _write(out: Path, rows: list[dict], cfg: TableConfig) -> None:
    from jaxprune.job import command_for

    rows = _with_comparisons(rows, cfg)
    datasets = list(dict.fromkeys(k for r in rows for k in r["perplexity"]))

    def diff(r, d):
        cmp = r["comparison"].get(d)
        if not cmp:
            return "-"
        if "error" in cmp:
            return "n/a"
        return format_difference(cmp)

    def attention(r):
        errs = [x["heldout_attention_error"] for x in r["layers"] if "heldout_attention_error" in x]
        return sum(errs) / len(errs) if errs and r["config"]["method"] != "dense" else "-"

    headers = [
        "row",
        *(h for d in datasets for h in (f"{d} ppl", f"{d} Δ vs ref [95% CI]")),
        "reference",
        "attention error",
        "sparsity",
        "prune s",
        "total s",
        "peak RSS GiB",
        "command",
    ]
    body = [
        [
            r["name"],
            *(v for d in datasets for v in (r["perplexity"].get(d, float("nan")), diff(r, d))),
            r["reference"] or "-",
            attention(r),
            r["mean_sparsity"],
            r["prune_seconds"],
            r.get("total_seconds", float("nan")),
            r["host_peak_rss_bytes"] / 2**30,
            f"`{r['command']}`",
        ]
        for r in rows
    ]
    done = {r["name"] for r in rows}
    pending = [
        f"- {name}: not yet measured (`{command_for(c)}`)"
        for name, c in cfg.row_configs().items()
        if name not in done
    ]
    text = results.markdown_table(headers, body) + "\n"
    if pending:
        text += "\nRows not yet measured:\n" + "\n".join(pending) + "\n"
    if cfg.ablations:
        text += "\n" + ablation_table(rows, cfg.ablations, datasets) + "\n"
    (out / "table.md").write_text(text)
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


def ablation_table(rows: list[dict], ablations, datasets: list[str]) -> str:
    """One change at a time: the paired difference ``row - against`` per data set (95%
    bootstrap interval over the shared windows), or "not yet measured" while a side is
    missing."""
    by_name = {r["name"]: r for r in rows}
    # Only the data sets some ablation's row evaluated (the paper rows' set may have none).
    evaluated = [by_name.get(a["row"], {}).get("evaluation", {}) for a in ablations]
    datasets = [d for d in datasets if any(d in ev for ev in evaluated)]
    body = []
    for a in ablations:
        on, off = by_name.get(a["row"]), by_name.get(a["against"])
        cells = []
        for d in datasets:
            if on is None or off is None:
                cells.append("not yet measured")
            elif d not in on["evaluation"] or d not in off["evaluation"]:
                cells.append("-")
            else:
                cmp = paired_bootstrap(on["evaluation"][d], off["evaluation"][d])
                cells.append(format_difference(cmp))
        body.append([a["change"], a["row"], a["against"], *cells])
    headers = ["change", "row", "against", *(f"{d} Δ row - against [95% CI]" for d in datasets)]
    return "Ablations (one change at a time, paired over the same windows):\n\n" + (
        results.markdown_table(headers, body)
    )


def summary(metrics: dict) -> str:
    """The Markdown table, for the terminal (or why there is none yet)."""
    if not metrics["rows"]:
        return (
            f"No row of this table is measured yet, so {metrics['out']}/table.md was not "
            "written; run it without --set run_missing=false to measure the rows listed above."
        )
    return (
        (Path(metrics["out"]) / "table.md").read_text()
        + f"\nWrote {metrics['out']}/"
        + "{"
        + ", ".join(metrics["files"])
        + "}"
    )

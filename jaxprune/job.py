"""One pruning job end to end: load, calibrate, prune, evaluate, save, report."""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxprune import data, results
from jaxprune.config import to_dict
from jaxprune.loaders.resolve import load_model
from jaxprune.perplexity import perplexity
from jaxprune.pipeline import PruneConfig, calibration_chunks, prune_model


def command_for(cfg: PruneConfig) -> str:
    """The ``jaxprune prune`` command that reproduces one row (method, targets, pattern and
    sparsity always, other keys where they differ from the defaults)."""
    default = PruneConfig()
    always = ("method", "targets", "pattern", "sparsity")
    parts = ["jaxprune", "prune"]
    for f in dataclasses.fields(PruneConfig):
        value = getattr(cfg, f.name)
        if f.name == "progress" or (f.name not in always and value == getattr(default, f.name)):
            continue
        if isinstance(value, tuple):
            text = json.dumps(list(value))
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        parts += [f"--{f.name.replace('_', '-')}", text]
    return " ".join(shlex.quote(p) for p in parts)


def evaluate(model, tokenizer, cfg: PruneConfig) -> dict[str, dict]:
    """Perplexity on each of ``cfg.eval_data`` under PROTOCOL.md (windows, or the paper's
    C4 documents for ``c4-paper``)."""
    out = {}
    for name in cfg.eval_data:
        if name == "c4-paper":
            seqs = data.paper_eval_sequences(tokenizer, cfg.data_dir, seq_len=cfg.eval_seq_len)
        else:
            seqs = data.eval_windows(
                tokenizer, name, cfg.eval_windows, seq_len=cfg.eval_seq_len, data_dir=cfg.data_dir
            )
        out[name] = perplexity(model, seqs, batch_size=cfg.eval_batch, progress=cfg.progress)
    return out


def save_outputs(run_dir: Path, model, masks: dict, cfg: PruneConfig) -> list[str]:
    """Masks (always) and pruned parameters (``save_params``) as orbax checkpoints."""
    written = []
    ckpt = ocp.StandardCheckpointer()
    tree = {str(layer): {k: np.asarray(v) for k, v in m.items()} for layer, m in masks.items()}
    if tree:
        ckpt.save((run_dir / "masks").absolute(), tree)
        written.append("masks/")
    if cfg.save_params and cfg.method != "dense":
        ckpt.save((run_dir / "params").absolute(), nnx.state(model, nnx.Param))
        written.append("params/")
    ckpt.wait_until_finished()
    return written


def run_job(
    cfg: PruneConfig, export_hf: str | None = None, command: str | None = None
) -> dict[str, Any]:
    """Runs one pruning job and writes ``metrics.json`` (and checkpoints) into a new run folder.

    Returns:
      The metrics (perplexities, measured sparsity per matrix, prune seconds, peak memory, the
      config and the command).
    """
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model)
    if tokenizer is None:
        raise ValueError(
            f"model {cfg.model!r} came without a tokenizer; pass a folder with "
            "tokenizer.json or a .gguf file with tokenizer metadata."
        )
    calib = data.calibration_windows(
        tokenizer, cfg.protocol, cfg.calib_samples, cfg.calib_seq_len, cfg.data_dir
    )
    heldout = []
    if cfg.heldout_samples:
        heldout = data.eval_windows(
            tokenizer,
            "c4",
            cfg.heldout_samples,
            seq_len=min(cfg.softmax_seq_len, cfg.calib_seq_len),
            data_dir=cfg.data_dir,
        )
    load_seconds = time.perf_counter() - t0
    report = prune_model(
        model,
        calibration_chunks(calib, cfg.micro_batch),
        calibration_chunks(np.asarray(heldout), cfg.micro_batch) if len(heldout) else [],
        cfg,
    )
    ppl = evaluate(model, tokenizer, cfg)
    run_dir = results.new_run_dir(cfg.out)
    files = save_outputs(run_dir, model, report["masks"], cfg)
    if export_hf:
        from jaxprune.loaders.hf import write_hf_folder

        write_hf_folder(model, export_hf, tokenizer=tokenizer)
    sparsity = {
        f"{li}.{k}": float(1.0 - np.mean(np.asarray(v)))
        for li, m in report["masks"].items()
        for k, v in m.items()
    }
    metrics = dict(
        command=command
        or command_for(cfg) + (f" --export-hf {shlex.quote(export_hf)}" if export_hf else ""),
        config=to_dict(cfg),
        perplexity={k: v["perplexity"] for k, v in ppl.items()},
        evaluation=ppl,
        measured_sparsity=sparsity,
        mean_sparsity=float(np.mean(list(sparsity.values()))) if sparsity else 0.0,
        prune_seconds=report["seconds"],
        load_seconds=load_seconds,
        total_seconds=time.perf_counter() - t0,
        host_peak_rss_bytes=report["host_peak_rss_bytes"],
        device_peak_bytes=report.get("device_peak_bytes"),
        layers=report["layers"],
        device=f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        calibration_tokens=int(sum(np.asarray(c).size for c in calib)),
        run_dir=str(run_dir),
        files=["metrics.json", *files],
    )
    results.write_json(run_dir / "metrics.json", metrics)
    return metrics


def summary(metrics: dict) -> str:
    """A few lines for the terminal."""
    cfg = metrics["config"]
    ppl = ", ".join(f"{k} {v:.3f}" for k, v in metrics["perplexity"].items())
    return (
        f"{cfg['method']} {cfg['targets']} {cfg['pattern']}"
        f"{'' if ':' in cfg['pattern'] else ' ' + str(cfg['sparsity'])}: perplexity {ppl}; "
        f"sparsity {metrics['mean_sparsity']:.3f}; prune {metrics['prune_seconds']:.1f} s; "
        f"peak RSS {metrics['host_peak_rss_bytes'] / 2**30:.2f} GiB -> {metrics['run_dir']}"
    )

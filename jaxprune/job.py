"""One pruning job end to end: check, load, calibrate, prune, evaluate, save, report.

Everything that can be checked is checked before the work it protects: the data files and output
folders before the model is loaded, the settings against the model's shapes, the export's disk space
and every data window (calibration, held-out, evaluation) before pruning starts. Each pruned layer
is saved as it finishes (:mod:`jaxprune.resume`), so a stopped run continues with ``--resume
RUN_DIR``.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxprune import data, outputs, results, resume, streaming
from jaxprune.config import to_dict, yaml_text
from jaxprune.errors import DistributedError, ModelError, OutputError
from jaxprune.loaders.lazy import open_weights
from jaxprune.loaders.resolve import load_model, locate
from jaxprune.methods import registry
from jaxprune.models import DTYPES
from jaxprune.perplexity import perplexity
from jaxprune.pipeline import (
    PruneConfig,
    calibration_chunks,
    check_model,
    prune_model,
    request_for,
)
from jaxprune.prune_config import flat_settings


def command_for(cfg: PruneConfig) -> str:
    """The ``jaxprune prune`` command that reproduces one row (method, targets, pattern and
    sparsity always, other keys where they differ from the defaults; values as YAML)."""
    default = flat_settings(to_dict(PruneConfig()))
    always = ("method", "targets", "pattern", "sparsity")
    parts = ["jaxprune", "prune"]
    for key, value in flat_settings(to_dict(cfg)).items():
        if key == "progress" or (key not in always and value == default[key]):
            continue
        parts += [f"--{key.replace('_', '-')}", yaml_text(value)]
    return " ".join(shlex.quote(p) for p in parts)


def method_summary(cfg: PruneConfig) -> dict[str, Any]:
    """The run's method's own run-level facts for ``metrics.json`` (such as ``softmax_mask``)."""
    method = registry.get(cfg.method)
    request = request_for(cfg)
    return method.summary(request, request.options_of(method))


def needed_data(cfg: PruneConfig) -> list[str]:
    """The data sets a run reads: C4 for calibration (and held-out sequences), plus its
    evaluation sets."""
    return ["c4", *cfg.eval.data]


def eval_sequences(tokenizer, cfg: PruneConfig) -> dict[str, Any]:
    """The token sequences of each of ``cfg.eval.data`` under PROTOCOL.md (windows, or the
    paper's C4 documents for ``c4-paper``)."""
    out = {}
    for name in cfg.eval.data:
        if name == "c4-paper":
            out[name] = data.paper_eval_sequences(tokenizer, cfg.data_dir, seq_len=cfg.eval.seq_len)
        else:
            out[name] = data.eval_windows(
                tokenizer, name, cfg.eval.windows, seq_len=cfg.eval.seq_len, data_dir=cfg.data_dir
            )
    return out


def evaluate(
    model, tokenizer, cfg: PruneConfig, sequences: dict | None = None, token_nlls=None
) -> dict[str, dict]:
    """Perplexity on each of ``cfg.eval.data`` (``sequences``: from :func:`eval_sequences`;
    ``token_nlls``: a streamed model's, see :func:`jaxprune.perplexity.perplexity`)."""
    if sequences is None:
        sequences = eval_sequences(tokenizer, cfg)
    return {
        name: perplexity(
            model, seqs, batch_size=cfg.eval.batch, progress=cfg.progress, token_nlls=token_nlls
        )
        for name, seqs in sequences.items()
    }


def _streams(cfg: PruneConfig, weights, resume_dir: str | None) -> bool:
    """Whether the run streams: a resumed run goes on in the mode its saved layers show;
    otherwise ``cfg.stream`` decides (``auto``: by the model's float32 size)."""
    stream = streaming.should_stream(cfg.stream, cfg.stream_threshold_gib, weights.param_bytes)
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if any((run_dir / streaming.PRUNED_DIR).glob("layer-*.safetensors")):
            stream = True
        elif any((run_dir / resume.LAYERS_DIR).glob("[0-9]*")):
            stream = False
    if stream and cfg.calibration.layer_inputs == "dense":
        raise ModelError(
            f"stream={yaml_text(cfg.stream)} streams {cfg.model} "
            f"({outputs.size_text(weights.param_bytes)} in float32), but "
            "calibration.layer_inputs=dense needs every layer in memory at once; use "
            "--calibration.layer-inputs sequential, or --stream false."
        )
    return stream


def _check_out(out: str | Path) -> None:
    path = Path(out)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"out={out}: {parent} is a file, not a folder; choose a folder.")
            if not os.access(parent, os.W_OK):
                raise OutputError(f"out={out}: {parent} is not writable; choose another folder.")
            return


def save_outputs(run_dir: Path, model, masks: dict, cfg: PruneConfig) -> list[str]:
    """Masks (always) and pruned parameters (``save_params``) as orbax checkpoints; complete ones
    left by an earlier try of a resumed run are kept (the same settings give the same bits)."""
    written = []
    fix = " (or move the run folder to a larger disk and resume it from there)"
    tree = {str(layer): {k: np.asarray(v) for k, v in m.items()} for layer, m in masks.items()}
    if tree:
        outputs.save_checkpoint(run_dir / "masks", tree, fix)
        written.append("masks/")
    if cfg.save_params and registry.get(cfg.method).prunes:
        params = nnx.state(model, nnx.Param)
        if jax.process_count() > 1:
            # Each process holds the whole model on its own device; orbax takes such arrays
            # across processes only as host arrays.
            params = jax.tree.map(np.asarray, params)
        outputs.save_checkpoint(run_dir / "params", params, fix)
        written.append("params/")
    return written


def run_job(
    cfg: PruneConfig,
    export_hf: str | None = None,
    command: str | None = None,
    *,
    overwrite: bool = False,
    resume_dir: str | None = None,
) -> dict[str, Any]:
    """Runs one pruning job and writes ``metrics.json`` (and checkpoints) into a new run folder.

    With several ``jax.distributed`` processes every process runs the job (the mask solves are
    split over all of their devices) and process 0 writes the run folder and the export; the
    others write theirs to a private temporary folder that is removed at the end, and return
    their metrics with ``run_dir`` ``None``.

    Args:
      cfg: the run's settings.
      export_hf: also write the pruned model as a Hugging Face folder there.
      command: the command recorded in the metrics (default: :func:`command_for`).
      overwrite: let ``export_hf`` replace an earlier export.
      resume_dir: continue this stopped run (same settings) instead of starting a new one.

    Returns:
      The metrics (perplexities, measured sparsity per matrix, prune seconds, peak memory, the
      config and the command).

    Raises:
      UserError, OSError (and the loaders' errors): bad input, found before the work it would
        spoil wherever possible.
    """
    command = command or command_for(cfg) + (
        f" --export-hf {shlex.quote(export_hf)}" if export_hf else ""
    )
    if jax.process_count() == 1:
        return _run_job(cfg, export_hf, command, overwrite, resume_dir, cfg.out)
    if resume_dir is not None:
        raise DistributedError(
            f"--resume with {jax.process_count()} processes: resuming is for one process; "
            "resume the run with one process, or start it again."
        )
    if jax.process_index() == 0:
        return _run_job(cfg, export_hf, command, overwrite, None, cfg.out)
    # Process 0 speaks for the run: the others show no progress and name no run folder.
    quiet = dataclasses.replace(cfg, progress=False)
    with tempfile.TemporaryDirectory(prefix=f"jaxprune-process-{jax.process_index()}-") as tmp:
        metrics = _run_job(quiet, None, command, overwrite, None, tmp)
    return metrics | {"run_dir": None, "files": []}


def _run_job(
    cfg: PruneConfig,
    export_hf: str | None,
    command: str,
    overwrite: bool,
    resume_dir: str | None,
    out: str,
) -> dict[str, Any]:
    """:func:`run_job`, writing into a new run folder under ``out``."""
    t0 = time.perf_counter()
    config = to_dict(cfg)
    # Before loading anything: data files, output folders, the run to resume.
    data.require_files(needed_data(cfg), cfg.data_dir)
    _check_out(out)
    if export_hf:
        outputs.check_export_dir(export_hf, overwrite)
    if resume_dir is not None:
        resume.check_resumable(resume_dir, config, to_dict(PruneConfig()))
    path = locate(cfg.model)
    weights = open_weights(path)
    stream = _streams(cfg, weights, resume_dir)
    if stream and jax.process_count() > 1:
        raise DistributedError(
            f"stream={yaml_text(cfg.stream)} streams {cfg.model} with {jax.process_count()} "
            "processes: streaming runs in one process; use --stream false (or one process)."
        )
    if stream:
        source = streaming.StreamedLayers(weights, dtype=DTYPES[cfg.dtype])
        model, tokenizer = source.model, weights.tokenizer
    else:
        source = None
        model, tokenizer = load_model(str(path), dtype=DTYPES[cfg.dtype])
    if tokenizer is None:
        raise ModelError(
            f"model {cfg.model!r} came without a tokenizer; pass a folder with "
            "tokenizer.json or a .gguf file with tokenizer metadata."
        )
    # Before calibrating: the settings against the model's shapes, the export's disk space (the
    # export comes last, after hours of work), then every data window.
    check_model(cfg, model.config)
    if export_hf:
        needed = outputs.export_bytes(model, tokenizer)
        outputs.require_free_space(export_hf, needed, f"--export-hf {export_hf}: the export")
    calib = data.calibration_windows(
        tokenizer,
        cfg.calibration.protocol,
        cfg.calibration.samples,
        cfg.calibration.seq_len,
        cfg.data_dir,
    )
    heldout = []
    if cfg.eval.heldout_samples:
        heldout = data.eval_windows(
            tokenizer,
            "c4",
            cfg.eval.heldout_samples,
            seq_len=min(cfg.softmax.seq_len, cfg.calibration.seq_len),
            data_dir=cfg.data_dir,
        )
    sequences = eval_sequences(tokenizer, cfg)
    load_seconds = time.perf_counter() - t0
    if resume_dir is None:
        run_dir = results.new_run_dir(out)
        resume.write_run_file(run_dir, config, command)
    else:
        run_dir = Path(resume_dir)
    if cfg.progress:
        print(f"run folder {run_dir} (if stopped: add --resume {run_dir})", file=sys.stderr)
    if stream:
        store = streaming.LayerFiles(run_dir / streaming.PRUNED_DIR, config, source.kernel_names)
    else:
        store = resume.LayerStore(run_dir / resume.LAYERS_DIR, config)
    saved = []
    try:
        try:
            report = prune_model(
                model,
                calibration_chunks(calib, cfg.calibration.micro_batch),
                calibration_chunks(np.asarray(heldout), cfg.calibration.micro_batch)
                if len(heldout)
                else [],
                cfg,
                store=store,
                layers=source,
                keep_masks=not stream,
            )
        finally:
            saved = store.saved_layers()
            store.close()
        if stream:
            source.pruned = store
            ppl = evaluate(None, tokenizer, cfg, sequences, token_nlls=source.token_nlls)
            files = [f"{streaming.PRUNED_DIR}/"] if saved else []
        else:
            ppl = evaluate(model, tokenizer, cfg, sequences)
            files = save_outputs(run_dir, model, report["masks"], cfg)
        if export_hf and stream:
            write = partial(streaming.write_hf_folder, source, tokenizer=tokenizer)
            outputs.export_hf_folder(model, export_hf, tokenizer=tokenizer, write=write)
        elif export_hf:
            outputs.export_hf_folder(model, export_hf, tokenizer=tokenizer)
    except BaseException as err:  # Ctrl-C too: say how to go on
        if saved:
            err.add_note(
                f"the finished layers are saved: add --resume {run_dir} to the same command "
                "to go on."
            )
        raise
    sparsity = report["sparsity"]
    warnings = [w for layer in report["layers"] for w in layer.get("warnings", [])]
    metrics = dict(
        command=command,
        config=config,
        perplexity={k: v["perplexity"] for k, v in ppl.items()},
        evaluation=ppl,
        measured_sparsity=sparsity,
        mean_sparsity=float(np.mean(list(sparsity.values()))) if sparsity else 0.0,
        prune_seconds=report["seconds"],
        load_seconds=load_seconds,
        total_seconds=time.perf_counter() - t0,
        host_peak_rss_bytes=report["host_peak_rss_bytes"],
        device_peak_bytes=report.get("device_peak_bytes"),
        stream=stream,
        model_param_bytes=weights.param_bytes,
        layers=report["layers"],
        device=f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        device_count=jax.device_count(),
        calibration_tokens=int(sum(np.asarray(c).size for c in calib)),
        group=cfg.group_or_default,
        **method_summary(cfg),
        run_dir=str(run_dir),
        files=["metrics.json", resume.RUN_FILE, *files],
        warnings=warnings,
        resumed_layers=report.get("resumed_layers", []),
    )
    results.write_json(run_dir / "metrics.json", metrics)
    # The final masks and parameters are saved; the per-layer checkpoints are no longer needed.
    shutil.rmtree(run_dir / resume.LAYERS_DIR, ignore_errors=True)
    return metrics


def summary(metrics: dict) -> str:
    """A few lines for the terminal."""
    cfg = metrics["config"]
    ppl = ", ".join(f"{k} {v:.3f}" for k, v in metrics["perplexity"].items())
    warned = len(metrics.get("warnings", []))
    return (
        f"{cfg['method']} {cfg['targets']} {cfg['pattern']}"
        f"{'' if ':' in cfg['pattern'] else ' ' + str(cfg['sparsity'])}: perplexity {ppl}; "
        f"sparsity {metrics['mean_sparsity']:.3f}; prune {metrics['prune_seconds']:.1f} s; "
        f"peak RSS {metrics['host_peak_rss_bytes'] / 2**30:.2f} GiB -> "
        + (metrics["run_dir"] or f"(process {jax.process_index()}: process 0 writes the run)")
        + (f" ({warned} warning(s) in metrics.json)" if warned else "")
    )

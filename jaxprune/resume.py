"""Resumable pruning runs: each pruned layer's masks and new kernels are saved as it finishes, so
a stopped run (killed, out of time, a crash) continues from the next layer.

A run folder holds ``run.json`` (the settings and the command, written before the work starts)
and ``layers/<index>/``, one orbax checkpoint per pruned layer (written atomically: orbax writes a
temporary folder and renames it, so a kill leaves the previous layers intact). ``jaxprune prune
... --resume RUN_DIR`` restores those layers into the freshly loaded model, recomputes the
calibration activations by running the restored layers forward (the same compiled functions on
the same values, so the bits are those of an uninterrupted run) and prunes the remaining layers.
The checkpoints are removed once the run has written ``metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxprune import checkpoints, outputs
from jaxprune.errors import ResumeError
from jaxprune.prune_config import flat_settings

RUN_FILE = "run.json"
LAYERS_DIR = "layers"
# Settings that do not change what a run computes (a streaming run computes the same bits as one
# in memory; a resumed run goes on in the mode its folder shows).
_NOT_FINGERPRINTED = ("progress", "out", "stream", "stream_threshold_gib")


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's result: JSON-normalised ``to_dict(cfg)`` as flat dotted
    keys (``softmax.lam``; the flat keys of runs started before the config had sections are
    moved to theirs, and a fingerprint comes back unchanged), less progress bars and the parent
    output folder."""
    flat = flat_settings(json.loads(json.dumps(config)))
    return {k: v for k, v in flat.items() if k not in _NOT_FINGERPRINTED}


def differences(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> list:
    """Keys whose values differ, as ``(key, saved, current)``. A key the saved settings lack was
    added to the config after that run started; it matches only its default."""
    out = []
    for key in sorted(set(saved) | set(current)):
        before = saved.get(key, defaults.get(key))
        if before != current.get(key, defaults.get(key)):
            out.append((key, before, current.get(key)))
    return out


def write_run_file(run_dir: Path, config: dict[str, Any], command: str) -> None:
    """Records the settings and command of a run before it starts (atomically)."""
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"config": config, "command": command}, indent=2) + "\n")
    tmp.replace(run_dir / RUN_FILE)


def check_resumable(run_dir: str | Path, config: dict, defaults: dict) -> Path:
    """Checks that ``run_dir`` is an unfinished run with these settings.

    Args:
      run_dir: the folder given to ``--resume``.
      config: ``to_dict`` of this run's config.
      defaults: ``to_dict`` of the config class's defaults.

    Returns:
      The run folder.

    Raises:
      ResumeError: not a run folder, already finished, or started with other settings (the
        message names the first keys that differ and the command that started it).
    """
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        what = "does not exist" if not run_dir.exists() else f"holds no {RUN_FILE}"
        raise ResumeError(
            f"--resume {run_dir}: the folder {what}, so it is no jaxprune prune run folder; give "
            "the run folder that the stopped run printed (under its --out)."
        )
    if (run_dir / "metrics.json").is_file():
        raise ResumeError(
            f"--resume {run_dir}: that run finished (it has metrics.json); nothing to resume. "
            "Drop --resume to start a new run."
        )
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text())
        saved_config, command = saved["config"], saved.get("command", "")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ResumeError(f"--resume {run_dir}: {RUN_FILE} is damaged ({err}).") from err
    diff = differences(fingerprint(saved_config), fingerprint(config), fingerprint(defaults))
    if diff:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ResumeError(
            f"--resume {run_dir}: that run was started with other settings ({shown}{more}); "
            f"resume it with its own command ({command} --resume {run_dir}), or drop --resume "
            "for a new run."
        )
    return run_dir


class LayerStore:
    """Orbax checkpoints of the pruned layers of one run, keyed by layer index.

    Each checkpoint holds ``{"masks": {name: bool}, "kernels": {name: array}}`` and, as JSON,
    the run's fingerprint and the layer's report (losses, sparsity, attention errors).
    """

    def __init__(self, directory: str | Path, config: dict[str, Any]):
        self.directory = Path(directory).absolute()
        self.fingerprint = fingerprint(config)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def saved_layers(self) -> list[int]:
        """Indices of the layers saved so far, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, layer: int, masks: dict, kernels: dict, info: dict) -> None:
        """Saves one finished layer (and waits, so a kill after this returns keeps it).

        Raises:
          DiskFullError: the disk filled up (in one line, without orbax's logging).
        """
        state = {
            "masks": {k: np.asarray(v) for k, v in masks.items()},
            "kernels": {k: np.asarray(v) for k, v in kernels.items()},
        }
        meta = {"fingerprint": self.fingerprint, "info": json.loads(json.dumps(info))}
        fix = " (or move the run folder to a larger disk and resume it from there)"
        try:
            with outputs.writing(self.directory, f"layer {layer}", outputs.tree_bytes(state), fix):
                checkpoints.save(self.manager, layer, state, meta)
        except BaseException:
            outputs.remove_orbax_tmp(self.directory / str(layer))  # its space, for the user
            raise

    def restore(self, layer: int, like: dict) -> tuple[dict, dict, dict]:
        """Restores one layer.

        Args:
          layer: its index.
          like: ``{"masks": ..., "kernels": ...}`` arrays (or shape structs) of the shapes and
            dtypes the saved ones must have.

        Returns:
          ``(masks, kernels, info)``.

        Raises:
          CheckpointError: unreadable, of other settings, or of other shapes (another model).
        """
        where = self.directory / str(layer)
        try:
            meta = self.manager.restore(
                layer, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as err:  # orbax raises many types for unreadable files
            raise checkpoints.CheckpointError(
                f"layer checkpoint {where} cannot be read ({type(err).__name__}); delete that "
                "folder to redo the layer."
            ) from err
        if fingerprint(meta.get("fingerprint") or {}) != self.fingerprint:
            raise checkpoints.CheckpointError(
                f"layer checkpoint {where} was written with other settings than {RUN_FILE} "
                "records; the run folder is mixed up, start a new run."
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            state = self.manager.restore(
                layer, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as err:
            raise checkpoints.CheckpointError(
                f"layer checkpoint {where} does not fit this model ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); was --model changed? Resume "
                "with the run's own model, or start a new run."
            ) from err
        return state["masks"], state["kernels"], meta["info"]

    def close(self) -> None:
        self.manager.close()

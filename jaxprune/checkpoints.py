"""Orbax checkpoints of a mask solve: the state pytree and a JSON fingerprint of its settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxprune.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder cannot be used for this solve (mismatch or corruption)."""


def make_manager(directory: str | Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` on ``directory`` (created if needed) keeping the last steps."""
    directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON-able) at ``step`` and waits."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, like: Any, meta: dict) -> tuple[int, Any] | None:
    """Restores the newest checkpoint into the structure of ``like``.

    Args:
      manager: from :func:`make_manager`.
      like: a pytree with the shapes and dtypes the restored state must have.
      meta: the fingerprint of this solve; a checkpoint written with other settings is refused.

    Returns:
      ``(step, state)``, or ``None`` when the folder holds no checkpoint.

    Raises:
      CheckpointError: the checkpoint belongs to another solve, or cannot be read.
    """
    step = manager.latest_step()
    if step is None:
        return None
    where = Path(manager.directory) / str(step)
    try:
        saved_meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
    except Exception as err:  # orbax raises many types for unreadable files
        raise CheckpointError(
            f"checkpoint {where} cannot be read ({type(err).__name__}: {err}); delete that folder "
            "to restart from the previous checkpoint, or choose another checkpoint directory."
        ) from err
    if json.loads(json.dumps(meta)) != saved_meta:
        raise CheckpointError(
            f"checkpoint {where} was written by a solve with other settings: saved {saved_meta}, "
            f"now {meta}. Use another checkpoint directory, or the same settings to resume."
        )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        state = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {where} cannot be restored ({type(err).__name__}: {err}); it may be "
            "truncated or corrupt: delete that folder, or choose another checkpoint directory."
        ) from err
    return step, state

"""A run's files on disk: checkpoints and Hugging Face exports written so that a full disk, a crash
or Ctrl-C never leaves a half-written result under its final name and never costs an earlier one.

Orbax writes a checkpoint into ``NAME.orbax-checkpoint-tmp*`` and renames it when complete, so a
folder under its final name is whole: a resumed run reuses it and rewrites only what was left
incomplete. An export is written into a hidden sibling ``.NAME.partial-PID`` and renamed into
place; the sibling is removed when the export fails or is interrupted, and a later export into the
same parent removes those of processes that no longer run. An export whose size is known is
refused before it starts when its disk lacks the room; a disk that fills up mid-write is reported
in one line (:class:`~jaxprune.errors.DiskFullError`) instead of orbax's pages of logging.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from jaxprune.errors import DiskFullError, OutputError, is_disk_full

# The suffix of the folder orbax writes a checkpoint into before renaming it into place.
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# `.NAME.partial-PID`: an export being written; `.NAME.old-PID`: the export it replaces, kept
# until the new one is in place.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")
# Loggers that report a failed orbax write from its background threads, many lines per array.
_WRITER_LOGGERS = ("absl", "asyncio", "concurrent.futures")
# Room an export needs besides its tensors: config.json, the safetensors header (names, shapes,
# offsets: well under this per tensor) and the filesystem's blocks.
_PER_TENSOR_BYTES = 256
_EXPORT_SLACK_BYTES = 64 * 1024


def size_text(n: int) -> str:
    """``136,080 bytes``, or ``540,123,456 bytes (515.1 MiB)`` from a MiB up."""
    text = f"{n:,} bytes"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{text} ({n / scale:.1f} {unit})"
    return text


def existing_parent(path: str | Path) -> Path:
    """``path``, or its nearest ancestor that exists (where its disk can be asked about)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes free on the disk that holds (or will hold) ``path``."""
    return shutil.disk_usage(existing_parent(path)).free


def require_free_space(path: str | Path, needed: int, what: str) -> None:
    """Refuses a write of ``needed`` bytes under ``path`` that its disk has no room for.

    Args:
      path: where the files will go (need not exist yet).
      needed: the bytes the write takes.
      what: the write, for the message (``"--export-hf out/hf: the export"``).

    Raises:
      DiskFullError: fewer than ``needed`` bytes are free there.
    """
    free = free_bytes(path)
    if needed > free:
        raise DiskFullError(
            f"{what} needs {size_text(needed)} but the disk of {existing_parent(path)} has "
            f"{size_text(free)} free; free space there, or choose a folder on a larger disk."
        )


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays of a pytree (uncompressed), without copying them to the host."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


@contextlib.contextmanager
def writing(folder: str | Path, what: str, needed: int | None = None, fix: str = "") -> Iterator:
    """Runs a write (an orbax save above all) with its logging held back, and turns a full disk
    into one :class:`DiskFullError` naming ``folder``.

    Orbax reports a failed write from each of its background threads (logging records, asyncio's
    "Task exception was never retrieved", tracebacks printed by callbacks): hundreds of lines for
    one full disk, some of it seconds later. Those are held while the write runs; they are dropped
    when it fails (the error says what happened; see :func:`_drop_closed_loop_callbacks` for the
    later ones) and passed on unchanged when it succeeds.

    Args:
      folder: where the write goes (named in the message).
      what: the thing written, for the message (``"params/"``).
      needed: its size in bytes where known (before orbax compresses it).
      fix: what to do besides freeing space, appended to the message.

    Raises:
      DiskFullError: the disk filled up during the write (raised from the writer's error).
    """
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record):
            held.append(record)

    hold = _Hold()
    loggers = [logging.getLogger(name) for name in _WRITER_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [hold], False
    stderr, sys.stderr = sys.stderr, io.StringIO()
    failed = False
    try:
        yield
    except Exception as err:
        failed = True
        if not is_disk_full(err):
            raise
        size = f" (about {size_text(needed)} uncompressed)" if needed else ""
        raise DiskFullError(
            f"no space left on the disk of {folder} while writing {what}{size}; free space "
            f"there{fix}."
        ) from err
    except BaseException:  # Ctrl-C: its own message says what happened
        failed = True
        raise
    finally:
        if failed:
            # Tasks orbax abandoned report their errors when collected: let them do it now.
            gc.collect()
            _drop_closed_loop_callbacks()
        printed = sys.stderr.getvalue()
        sys.stderr = stderr
        for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
        if not failed:
            stderr.write(printed)
            for record in held:
                logging.getLogger(record.name).handle(record)


def _drop_closed_loop_callbacks() -> None:
    """Silences what a failed orbax write prints later: tensorstore completes the array writes
    orbax abandoned and reports each to orbax's event loop, closed by then; Python prints every
    refusal as an unraisable ``RuntimeError: Event loop is closed`` traceback, seconds after the
    error was reported. Those, and only those, are dropped from then on."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop", False):
        return

    def hook(unraisable):
        err = unraisable.exc_value
        if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop = True
    sys.unraisablehook = hook


def save_checkpoint(path: str | Path, tree: Any, fix: str = "") -> bool:
    """Saves ``tree`` as an orbax checkpoint at ``path``, or keeps the complete one already there.

    A checkpoint under its final name is complete (orbax renames it there last), so a resumed run
    reuses it; the temporary folder of an interrupted or failed save is removed and written anew.

    Args:
      path: the checkpoint folder.
      tree: a pytree of arrays.
      fix: what to do besides freeing space when the disk is full (see :func:`writing`).

    Returns:
      Whether the checkpoint was written (``False``: a complete one was kept).

    Raises:
      DiskFullError: the disk filled up; the incomplete checkpoint is removed.
      OutputError: ``path`` is a file.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    remove_orbax_tmp(path)
    if path.is_dir():
        return False
    if path.exists():
        raise OutputError(f"{path} is a file where a checkpoint folder belongs; move it away.")
    ckpt = ocp.StandardCheckpointer()
    try:
        with writing(path.parent, f"{path.name}/", tree_bytes(tree), fix):
            try:
                ckpt.save(path, tree)
                ckpt.wait_until_finished()
            finally:
                ckpt.close()
    except BaseException:
        remove_orbax_tmp(path)
        raise
    return True


def remove_orbax_tmp(path: str | Path) -> None:
    """Removes the temporary folders of unfinished orbax saves of the checkpoint ``path``."""
    path = Path(path)
    for tmp in path.parent.glob(path.name + ORBAX_TMP_SUFFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)


# --- Hugging Face exports -----------------------------------------------------------------------


def check_export_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Checks that ``--export-hf`` may write ``path``: absent or empty, or (with ``overwrite``)
    an earlier Hugging Face export.

    Raises:
      OutputError: the path is a file, holds earlier files and ``overwrite`` is off, or holds
        files that are no model export (never replaced, even with ``overwrite``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--export-hf {path}: that is a file, not a folder; choose a folder.")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise OutputError(
            f"--export-hf {path}: the folder is not empty (an earlier export?); choose a new "
            "folder, or add --overwrite to replace that export."
        )
    if not (path / "config.json").is_file():
        raise OutputError(
            f"--export-hf {path}: the folder holds files but no config.json, so it is no earlier "
            "model export; it is not replaced even with --overwrite. Choose another folder."
        )
    return path


def export_bytes(model, tokenizer=None) -> int:
    """About the bytes a Hugging Face export of ``model`` takes: its tensors, the safetensors
    header, config.json and ``tokenizer``'s JSON."""
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model))
    tokens = len(tokenizer.to_str().encode()) if tokenizer is not None else 0
    return tree_bytes(leaves) + _PER_TENSOR_BYTES * len(leaves) + _EXPORT_SLACK_BYTES + tokens


def export_hf_folder(model, path: str | Path, tokenizer=None, write=None) -> Path:
    """Writes the Hugging Face folder into a hidden sibling and renames it into place when
    complete, so a stopped export leaves no half-written model (and an earlier export stays
    whole until the new one is complete). ``write(folder)`` writes it (default:
    :func:`jaxprune.loaders.hf.write_hf_folder` of ``model`` and ``tokenizer``; a streamed
    model's is :func:`jaxprune.streaming.write_hf_folder`).

    The sibling is removed when the export fails or is interrupted; those left by processes that
    no longer run (killed) are removed first.

    Raises:
      DiskFullError: the disk lacks the room for the export (checked before writing), or filled
        up while it was written.
    """
    from jaxprune.loaders.hf import write_hf_folder

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_exports(path.parent)
    what = f"--export-hf {path}"
    needed = export_bytes(model, tokenizer)
    require_free_space(path.parent, needed, f"{what}: the export")
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if write is None:
            write_hf_folder(model, partial, tokenizer=tokenizer)
        else:
            write(partial)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            try:
                partial.rename(path)
            except BaseException:
                old.rename(path)
                raise
            shutil.rmtree(old)
        else:
            partial.rename(path)
    except BaseException as err:  # Ctrl-C too
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise DiskFullError(
                f"{what}: the disk filled up while the export was written (it needs about "
                f"{size_text(needed)}; {size_text(free_bytes(path.parent))} free with the "
                "partial export removed); free space there, or choose a folder on a larger disk."
            ) from err
        raise
    return path


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_exports(parent: str | Path) -> list[Path]:
    """Clears what killed exports left in ``parent``: their ``.NAME.partial-PID`` folders are
    removed, and a ``.NAME.old-PID`` (an export being replaced) is removed once ``NAME`` is in
    place, or else renamed back to ``NAME``. Folders of processes that still run are left alone.

    Returns:
      The folders removed or renamed back.
    """
    cleared = []
    for entry in Path(parent).iterdir():
        match = _LEFTOVER.match(entry.name)
        if not match or not entry.is_dir() or _alive(int(match["pid"])):
            continue
        target = entry.parent / match["name"]
        if match["kind"] == "old" and not target.exists():
            entry.rename(target)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        cleared.append(entry)
    return cleared

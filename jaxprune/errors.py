"""User errors versus bugs: what a command reports in one line (exit 2) and what it lets through
as a traceback.

A user error is input the user can fix: a missing or corrupt file, an unsupported model, a setting
that cannot work, no network. Its message names the file, flag or value and says what to do; the
command line prints it as ``jaxprune <command>: error: <message>`` and exits with status 2. Any
other exception is a bug and keeps its traceback (as does every error under ``--debug``).

The library's error classes stay where they are raised (``ConfigError`` in ``config``,
``GGUFError`` in the GGUF loader, ...) and derive from :class:`UserError`; this module imports
nothing of the package, so every module can import it.
"""

from __future__ import annotations

import errno
import re


class UserError(Exception):
    """Input the user can fix. Concrete errors also derive from ``ValueError`` or ``OSError`` so
    that callers catching those keep working."""


class DataError(UserError, ValueError):
    """A data file is damaged, or holds less text than the settings ask for."""


class DataFileError(UserError, FileNotFoundError):
    """A data folder or file the run needs is missing."""


class ModelError(UserError, ValueError):
    """The model cannot be used as asked: no tokenizer, or settings that do not fit its shapes."""


class OutputError(UserError, OSError):
    """An output folder cannot be used (it holds earlier results, or is not a folder)."""


class DistributedError(UserError, ValueError):
    """The settings of a multi-process run (its environment variables) are incomplete."""


class ResumeError(UserError, ValueError):
    """A run folder cannot be resumed with these settings."""


class DiskFullError(OutputError):
    """A folder's disk has no room for what the run writes there (``errno`` is ``ENOSPC``)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is bad input (one line, exit 2) rather than a bug (traceback).

    ``OSError`` counts as the user's (a missing file, a full disk, no permission, no network);
    so does running out of accelerator memory, which the settings control.
    """
    return isinstance(err, UserError | OSError) or is_out_of_memory(err)


def is_out_of_memory(err: BaseException) -> bool:
    """XLA's allocation failure (``RESOURCE_EXHAUSTED``), which smaller batches avoid."""
    return type(err).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and (
        "RESOURCE_EXHAUSTED" in str(err)
    )


# How a full disk reads in the errors of the libraries that write files: OSError's strerror, Rust's
# io::Error (safetensors) and tensorstore's status text (orbax).
_DISK_FULL = re.compile(r"No space left on device|StorageFull|ENOSPC|os_error_code='28'")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, is a full disk (``ENOSPC``), however the
    library that wrote the file reports it (orbax raises ``ValueError("RESOURCE_EXHAUSTED: ...
    No space left on device")``, safetensors a ``SafetensorError``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if _DISK_FULL.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def one_line(err: BaseException, max_items: int = 4) -> str:
    """The error's message (and notes) on one line.

    Messages that list problems one per line (``WeightLoadError``, the GGUF tensor checks) are
    joined with ``"; "``, keeping the first ``max_items`` list entries and the count of the rest.
    """
    if is_out_of_memory(err):
        first = str(err).strip().splitlines()[0]
        return (
            f"out of memory ({first[:200]}); lower --calibration.micro-batch or --eval.batch, "
            "shorten --calibration.seq-len or --softmax.seq-len (or set --softmax.row-block), "
            "or use a machine with more memory."
        )
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines += [note.strip() for note in getattr(err, "__notes__", ()) if note.strip()]
    items = [i for i, line in enumerate(lines) if line.startswith("- ")]
    if len(items) > max_items:
        dropped = items[max_items:]
        lines = [line for i, line in enumerate(lines) if i not in set(dropped)]
        lines.insert(items[max_items], f"- and {len(dropped)} more")
    text = "; ".join(lines) if lines else type(err).__name__
    return re.sub(r"([:;.])\s*;\s*", r"\1 ", text)

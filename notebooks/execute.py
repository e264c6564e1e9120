"""Execute a paired notebook top to bottom in a Jupyter kernel and store it with its outputs.

    python notebooks/execute.py notebooks/01_convergence.py --size medium

Reads the ``.py`` twin with jupytext, runs every cell in a fresh ``python3`` kernel with
``JAXPRUNE_NOTEBOOK_SIZE`` set, and writes the ``.ipynb`` beside it with the outputs and
``metadata["jaxprune"]``: the size, the SHA-256 of the code cells that produced the outputs, the
wall time and the devices. ``tests/test_notebooks.py`` runs the same :func:`execute` at the small
size, and fails when a stored notebook's hash is not that of its ``.py`` twin's code (outputs
from other code) or its cells differ from the twin's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

SIZE_VARIABLE = "JAXPRUNE_NOTEBOOK_SIZE"
SIZES = ("small", "medium", "full")


def code_cells(nb: nbformat.NotebookNode) -> list[str]:
    """The sources of the code cells, in order."""
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def code_sha256(nb: nbformat.NotebookNode) -> str:
    """SHA-256 of the code cells' sources (what determines the outputs; markdown does not)."""
    return hashlib.sha256(json.dumps(code_cells(nb)).encode("utf-8")).hexdigest()


def execute(
    script: str | Path,
    size: str,
    *,
    timeout: int | None = None,
    env: dict[str, str] | None = None,
) -> nbformat.NotebookNode:
    """Runs the ``.py`` twin as a notebook in a fresh kernel; returns it with its outputs.

    Args:
      script: the jupytext ``.py`` file.
      size: one of :data:`SIZES`, passed to the kernel as ``$JAXPRUNE_NOTEBOOK_SIZE``.
      timeout: seconds allowed per cell (``None``: no limit).
      env: extra environment variables for the kernel.

    Returns:
      The executed notebook, with ``metadata["jaxprune"]`` filled in.

    Raises:
      nbclient.exceptions.CellExecutionError: a cell raised; the message shows the traceback.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r}: use one of {SIZES}.")
    script = Path(script).resolve()
    nb = jupytext.read(script)
    # Stable cell ids keep the stored notebook's diffs to what changed.
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
    kernel_env = {**os.environ, **(env or {}), SIZE_VARIABLE: size}
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=timeout,
        resources={"metadata": {"path": str(script.parent)}},
    )
    start = time.perf_counter()
    client.execute(env=kernel_env)
    nb.metadata["jaxprune"] = {
        "size": size,
        "code_sha256": code_sha256(nb),
        "seconds": round(time.perf_counter() - start, 1),
        "devices": _devices(nb),
    }
    return nb


def _devices(nb: nbformat.NotebookNode) -> str:
    """The setup cell's line that names JAX's devices (the first cell printing "JAX ")."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                for line in out.get("text", "").splitlines():
                    if line.startswith("JAX "):
                        return line
    return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scripts", nargs="+", type=Path, help="jupytext .py twins to execute")
    parser.add_argument("--size", default="medium", choices=SIZES)
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell")
    args = parser.parse_args(argv)
    for script in args.scripts:
        if script.suffix != ".py":
            raise SystemExit(f"{script}: give the .py twin (the .ipynb is written from it).")
        nb = execute(script, args.size, timeout=args.timeout)
        target = script.with_suffix(".ipynb")
        jupytext.write(nb, target, fmt="ipynb")
        meta = nb.metadata["jaxprune"]
        print(f"{target}: size {meta['size']}, {meta['seconds']} s, {meta['devices']}")


if __name__ == "__main__":
    main()

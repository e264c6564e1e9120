"""The notebooks run top to bottom (their .py halves, as scripts) and stay paired."""

import runpy
from pathlib import Path

import jupytext
import matplotlib
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("script", sorted(NOTEBOOKS.glob("*.py")), ids=lambda p: p.name)
def test_notebook_runs_and_has_its_ipynb_pair(script):
    matplotlib.use("Agg")
    runpy.run_path(str(script), run_name="__main__")
    pair = script.with_suffix(".ipynb")
    assert pair.exists(), f"run: jupytext --to ipynb {script}"

    def code_cells(nb):
        return [c.source for c in nb.cells if c.cell_type == "code"]

    stale = f"{pair.name} differs from {script.name}; run: jupytext --sync {script}"
    assert code_cells(jupytext.read(pair)) == code_cells(jupytext.read(script)), stale

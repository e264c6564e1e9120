"""The notebooks: each runs top to bottom in a real Jupyter kernel at the small size, its stored
``.ipynb`` holds the same cells as its jupytext ``.py`` twin, and its stored outputs were produced
by the twin's current code (``notebooks/execute.py`` records the hash of the code it ran)."""

import importlib.util
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# The paired notebooks are the numbered .py files; notebooks/execute.py is the tool that runs them.
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
# Notebooks that load the default model: slow, and skipped where it or the data is unavailable.
REAL_MODEL = {"02_prune_smollm2.py"}
RERUN = "python notebooks/execute.py notebooks/{script.name} --size medium"


def _load_execute():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _load_execute()


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_every_notebook_is_paired():
    assert {"01_convergence.py", "02_prune_smollm2.py"} <= {p.name for p in SCRIPTS}
    stems = {p.stem for p in SCRIPTS}
    unpaired = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if p.stem not in stems)
    assert not unpaired, f"notebooks without a .py twin: {unpaired}"
    for script in SCRIPTS:
        assert script.with_suffix(".ipynb").is_file(), "store it: " + RERUN.format(script=script)
        formats = jupytext.read(script).metadata["jupytext"]["formats"]
        assert formats == "ipynb,py:percent", f"{script.name} is paired as {formats!r}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_stored_notebook_has_the_twins_cells(script):
    stored = jupytext.read(script.with_suffix(".ipynb"))
    assert _cells(stored) == _cells(jupytext.read(script)), (
        f"{script.with_suffix('.ipynb').name} and {script.name} differ: after editing the .py, "
        + RERUN.format(script=script)
        + " (or `jupytext --sync` when only markdown changed)"
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_stored_outputs_come_from_the_twins_code(script):
    stored = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    meta = stored.metadata.get("jaxprune", {})
    rerun = RERUN.format(script=script)
    assert meta.get("code_sha256") == execute.code_sha256(jupytext.read(script)), (
        f"the outputs stored in {script.with_suffix('.ipynb').name} were produced by other code "
        f"than {script.name}'s; store fresh ones: {rerun}"
    )
    code = [cell for cell in stored.cells if cell.cell_type == "code"]
    # One run, top to bottom, every cell executed and none failed.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), rerun
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"stored outputs hold an error: {errors[0].get('ename')}"
    images = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert images, "the stored notebook shows no plot"


def _real_model_or_skip():
    from jaxprune.data import default_data_dir
    from jaxprune.loaders.gguf import FetchError, fetch_default_model

    try:
        fetch_default_model()
    except FetchError as err:
        pytest.skip(f"default model unavailable: {err}")
    try:
        default_data_dir()
    except FileNotFoundError as err:
        pytest.skip(f"no data folder: {err}")


@pytest.mark.parametrize(
    "script",
    [pytest.param(p, marks=[pytest.mark.slow] if p.name in REAL_MODEL else []) for p in SCRIPTS],
    ids=lambda p: p.stem,
)
def test_notebook_runs_in_a_kernel_at_the_small_size(script):
    if script.name in REAL_MODEL:
        _real_model_or_skip()
    # A failing cell raises nbclient's CellExecutionError, whose message holds the traceback.
    nb = execute.execute(script, "small", timeout=900, env={"JAX_NUMPY_RANK_PROMOTION": "raise"})
    assert nb.metadata["jaxprune"]["size"] == "small"
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert any("image/png" in out.get("data", {}) for out in outputs), "no plot was shown"

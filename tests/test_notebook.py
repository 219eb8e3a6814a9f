"""The posterior-exploration notebook runs top to bottom in fast mode (outputs are cleared in git)."""
import shutil
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "posterior_exploration.ipynb"


def test_notebook_outputs_are_cleared_in_git():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def test_notebook_executes_in_fast_mode(prepared, trained_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    monkeypatch.setenv("PYRO_TVC_FAST", "1")
    monkeypatch.setenv("PYRO_TVC_ARTIFACTS", str(prepared))
    monkeypatch.setenv("PYRO_TVC_RUN", str(run))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert time.perf_counter() - t0 < 180
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 4
    assert (run / "nb_reliability.png").exists()

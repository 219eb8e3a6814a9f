"""The posterior-exploration notebook: outputs cleared in git, prose before every figure, and in fast mode it runs
top to bottom on a small run, shows images, prints no warnings, writes nothing into the run folder, and stops with
one clear error on a wrong run path."""
import os
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "posterior_exploration.ipynb"


def _run(env: dict, monkeypatch, timeout: int = 300):
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    return nb, client


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_notebook_outputs_are_cleared_and_figures_are_introduced():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    for prev, cell in zip(nb.cells, nb.cells[1:]):
        if cell.cell_type == "code" and ("plt.show()" in cell.source or "display(fig)" in cell.source):
            assert prev.cell_type == "markdown" and len(prev.source) > 60, cell.source[:80]


def test_notebook_executes_in_fast_mode(prepared, trained_run, tmp_path, monkeypatch):
    run = tmp_path / "copied" / "run"  # copied away from its artefacts: found through PYRO_TVC_ARTIFACTS
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("diagnostics"))
    before = _snapshot(run)
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    nb, client = _run({"PYRO_TVC_FAST": "1", "PYRO_TVC_ARTIFACTS": prepared, "PYRO_TVC_RUN": run,
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}, monkeypatch)
    t0 = time.perf_counter()
    client.execute()
    assert time.perf_counter() - t0 < 420  # about 1 min on an idle 2-core machine; generous for a loaded one
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Warning" not in stderr and "warn" not in stderr.lower(), stderr[:2000]
    assert _snapshot(run) == before  # nothing written into (or touched in) the run folder
    text = "".join(o.get("text", "") for o in outputs)
    assert "checkpoint epoch1.pt" in text or "checkpoint final.pt" in text


def test_notebook_fails_clearly_on_a_wrong_run_path(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-run"
    nb, client = _run({"PYRO_TVC_FAST": "1", "PYRO_TVC_RUN": missing}, monkeypatch, timeout=300)  # imports: slow when loaded
    with pytest.raises(CellExecutionError, match="run folder .*no-such-run does not exist"):
        client.execute()
    assert not missing.exists()  # and it did not train a run there

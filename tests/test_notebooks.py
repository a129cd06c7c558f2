"""Every notebook in notebooks/ runs top to bottom without error on the shipped models and the real data."""
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_exist_and_are_committed_without_outputs():
    assert len(NOTEBOOKS) == 7
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.slow
# Several cells of up to CELL_TIMEOUT_S each: nbclient names a stuck cell before the default timeout would fire.
@pytest.mark.timeout(3 * CELL_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, cifar10_npz, imagenette_npz, data_root, tmp_path, monkeypatch):
    # The kernel inherits the environment: the data folder, and the test run's own cache folder.
    monkeypatch.setenv("SSL_PATCH_ANALYSIS_DATA", str(data_root))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    book = nbformat.read(path, as_version=4)
    # kernel "python3" resolves to this interpreter (jupyter_client runs a kernelspec's "python" as sys.executable).
    client = NotebookClient(book, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    client.execute()
    print(f"{path.name}: {time.perf_counter() - started:.1f} s with {sys.executable}")
    errors = [output for cell in book.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
    images = [output for cell in book.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {}) or
              "application/vnd.jupyter.widget-view+json" in output.get("data", {})]
    assert images, f"{path.name} shows no figure"

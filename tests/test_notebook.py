"""The inspection notebook (notebooks/inspect_run.ipynb) executes top to bottom on a real
smoke run of the `atop` pipeline, loading everything through the Kedro catalog."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "notebooks" / "inspect_run.ipynb"


@pytest.mark.slow
def test_inspection_notebook_runs_on_the_pipeline_outputs(atop_project, monkeypatch):
    monkeypatch.setenv("ATOP_PROJECT", str(atop_project))
    monkeypatch.setenv("ATOP_ENV", "smoke")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    tables = [o for o in outputs if o.output_type == "execute_result" and "text/html" in o.data]
    assert any(
        "worst case" in o.data["text/html"] and "atop" in o.data["text/html"] for o in tables
    )
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 2  # robust accuracy vs eps, the image grid

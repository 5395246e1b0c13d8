"""The inspection notebook (notebooks/inspect_run.ipynb) executes top to bottom on a real
smoke run of the `atop` pipeline, loading everything through the Kedro catalog: the report,
the per-image verdicts table it recomputes the accuracies from, and the checkpoints."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import PROJECT_ROOT, stage_params

NOTEBOOK = PROJECT_ROOT / "notebooks" / "inspect_run.ipynb"


def _code() -> str:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    return "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")


def test_notebook_reads_the_run_through_the_catalog_only():
    code = _code()
    for name in ("robustness", "robustness_verdicts", "params:evaluation", "test_set"):
        assert f'catalog.load("{name}")' in code, name
    # the checkpoints each defense needs, by their catalog names (classifier, purifier_atop)
    assert "NEEDS[name]" in code and "catalog.load(key)" in code
    assert "data/" not in code and ".json" not in code and ".csv" not in code  # no paths
    for stale in ("atop_purifier", "clean_acc", "worst_case_acc"):  # the old names and layout
        assert stale not in code, stale


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
    tables = [
        o.data["text/html"]
        for o in outputs
        if o.output_type == "execute_result" and "text/html" in o.data
    ]
    # the report's table: every main-job defense, single-draw and the per-image worst cases
    assert any("worst case Linf" in t and "atop" in t and "ap_continued" in t for t in tables)
    # the accuracies recomputed from the verdicts (checked against the report in the notebook)
    worst_of_n = f"worst-of-{stage_params('evaluation').draws}"
    assert any("single-draw" in t and worst_of_n in t for t in tables)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "the accuracies recomputed from them are the report's" in text
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 2  # robust accuracy vs eps, the image grid

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
    # the first code cell checks that the run's outputs exist before anything loads them
    first = next(
        c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"
    )
    assert "check_run_outputs(" in first and '"robustness_verdicts"' in first
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


def test_without_run_outputs_the_notebook_stops_in_one_line(tmp_path, data_root, monkeypatch):
    """No run yet (a fresh clone): the first cell names what is missing and the command that
    makes it, and nothing else runs (the old notebook printed a 120-line traceback, then a
    NameError in every later cell)."""
    from nbclient.exceptions import CellExecutionError

    from tests.conftest import make_project_copy

    project = make_project_copy(tmp_path)
    monkeypatch.setenv("ATOP_PROJECT", str(project))
    monkeypatch.setenv("ATOP_ENV", "smoke")
    monkeypatch.setenv("ATOP_DATA_ROOT", str(data_root))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    with pytest.raises(CellExecutionError) as info:
        client.execute()
    assert info.value.ename == "MissingOutputs"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    shown = [o for o in code[0].outputs if o.output_type in ("error", "stream")]
    text = "".join(o.get("text", "") for o in shown if o.get("name") == "stderr").strip()
    assert not [o for o in shown if o.output_type == "error"]  # no traceback box
    assert len(text.splitlines()) == 1, text  # one line
    assert text.startswith("MissingOutputs: The run's outputs are missing: robustness (")
    assert (
        "robustness_verdicts (data/07_model_output/cifar10/smoke/robustness_verdicts.csv)" in text
    )
    assert "classifier (data/06_models/cifar10/smoke/classifier.pt)" in text
    assert text.endswith("Make them with `kedro run --pipelines atop --env smoke`.")
    assert all(not cell.outputs for cell in code[1:])  # nothing ran after it


def test_the_first_cell_warns_when_the_report_is_from_other_code_or_another_machine():
    from atop.machine import machine
    from atop.preflight import provenance_warnings

    here = machine()
    same = {"dataset": "cifar10", "profile": "base", "commit": "abc123", "machine": here}
    assert provenance_warnings(same, "abc123", here) == []
    other = {**same, "commit": "c33e326783bd", "machine": {**here, "isa": ["avx512_bf16"]}}
    warnings = provenance_warnings(other, "abc123", here, "the report")
    assert warnings[0].startswith("WARNING: the report was made by commit c33e326783bd")
    assert "made on another machine" in warnings[1] and "differs in isa" in warnings[1]
    # the committed base records predate provenance.machine: said too
    committed = {"dataset": "cifar10", "profile": "base", "commit": "abc123"}
    assert "does not say which machine" in provenance_warnings(committed, "abc123", here)[0]

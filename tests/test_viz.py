"""`kedro viz build` works headless and its JSON holds the `atop` pipeline, every stage and
the data layers (issue: inspecting the pipeline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atop.pipeline_registry import ATOP_STAGES, COMPARISON_STAGES, register_pipelines
from tests.conftest import make_project_copy


@pytest.mark.slow
def test_kedro_viz_build_lists_the_atop_pipeline_its_stages_and_layers(tmp_path):
    project = make_project_copy(tmp_path)
    kedro = Path(sys.executable).with_name("kedro")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    result = subprocess.run(
        [str(kedro), "viz", "build"], cwd=project, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    api = project / "build" / "api"
    main = json.loads((api / "main").read_text())
    pipeline_ids = {p["id"] for p in main["pipelines"]}
    assert {"atop", "__default__", *ATOP_STAGES, *COMPARISON_STAGES} <= pipeline_ids
    assert main["layers"] == [
        "raw",
        "intermediate",
        "model_input",
        "models",
        "model_output",
        "reporting",
    ]

    atop = json.loads((api / "pipelines" / "atop").read_text())
    assert atop["selected_pipeline"] == "atop"
    built_tasks = {n["name"] for n in atop["nodes"] if n["type"] == "task"}
    registered = register_pipelines()
    for stage in ATOP_STAGES:  # every node of every stage is in the built atop DAG
        assert {node.name for node in registered[stage].nodes} <= built_tasks, stage
    for stage in COMPARISON_STAGES:  # the full comparison's stages are not in the main job
        assert not {node.name for node in registered[stage].nodes} & built_tasks, stage
    layers = {n["name"]: n.get("layer") for n in atop["nodes"] if n["type"] == "data"}
    assert layers["raw_dataset"] == "raw"
    assert layers["monitor_indices"] == layers["eval_indices"] == "model_input"
    assert layers["classifier"] == layers["purifier"] == "models"
    for arm in ("ap_continued", "ap_classifier_aware", "atop"):
        assert layers[f"purifier_{arm}"] == "models"  # a dataset factory entry
        assert layers[f"finetuning_metrics_{arm}"] == "reporting"
    assert layers["evaluation_atop"] == layers["robustness_verdicts"] == "model_output"
    assert layers["robustness"] == layers["robustness_accuracy_vs_eps"] == "reporting"

"""The whole `atop` DAG (ingestion -> classifier -> purifier -> AToP -> evaluation) through a
real KedroSession and the project's catalog, smoke profile, real CIFAR-10."""

from __future__ import annotations

import json

import pytest
import torch

from atop.pipeline_registry import ATOP_STAGES, register_pipelines


def test_registry_has_every_stage_and_the_atop_dag():
    pipelines = register_pipelines()
    for name in ATOP_STAGES + ("adversarial_training", "rvs", "atop", "__default__"):
        assert name in pipelines, name
    atop_nodes = {node.name for node in pipelines["atop"].nodes}
    for stage in ATOP_STAGES:
        assert {node.name for node in pipelines[stage].nodes} <= atop_nodes
    assert "pgd_at_classifier" not in pipelines["atop"].all_outputs()


@pytest.mark.slow
def test_atop_pipeline_end_to_end_smoke(atop_project):
    data = atop_project / "data"
    for path in (
        "06_models/cifar10/classifier.pt",
        "06_models/cifar10/purifier.pt",
        "06_models/cifar10/purifier_atop.pt",
    ):
        checkpoint = torch.load(data / path, weights_only=True)
        assert {"arch", "config", "state_dict", "meta"} <= set(checkpoint)
    pretrained = torch.load(data / "06_models/cifar10/purifier.pt", weights_only=True)
    finetuned = torch.load(data / "06_models/cifar10/purifier_atop.pt", weights_only=True)
    generator_before = pretrained["state_dict"]["generator"]
    generator_after = finetuned["state_dict"]["generator"]
    assert any(not torch.equal(generator_before[k], generator_after[k]) for k in generator_before)
    robustness = json.loads((data / "08_reporting/robustness.json").read_text())
    text = json.dumps(robustness)
    for defense in ("standard", "ap", "atop"):
        assert defense in text
    assert (data / "08_reporting/robustness_report.md").is_file()

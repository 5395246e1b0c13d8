"""The whole `atop` DAG (ingestion -> classifier -> purifier -> fine-tuning arms -> evaluation)
through a real KedroSession and the project's catalog, smoke profile, real CIFAR-10."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from atop.evaluation.defenses import MAIN, STUDIED
from atop.pipeline_registry import ATOP_STAGES, COMPARISON_STAGES, STUDIES, register_pipelines

#: The main job's fine-tuning arms (atop_finetuning), each written beside the purifier.
ARMS = ("ap_continued", "ap_classifier_aware", "adversarial_reconstruction", "atop")


def test_registry_has_every_stage_and_the_atop_dag():
    pipelines = register_pipelines()
    assert set(pipelines) == {*ATOP_STAGES, *COMPARISON_STAGES, *STUDIES, "atop", "__default__"}
    assert STUDIES == ("seeds", "scaling")  # run alone: in neither atop nor __default__
    assert ATOP_STAGES == (
        "data_ingestion",
        "classifier_pretraining",
        "purifier_pretraining",
        "atop_finetuning",
        "evaluation",
    )

    def names(pipeline) -> set[str]:
        return {node.name for node in pipeline.nodes}

    assert names(pipelines["atop"]) == set().union(*(names(pipelines[s]) for s in ATOP_STAGES))
    every = ATOP_STAGES + COMPARISON_STAGES
    assert names(pipelines["__default__"]) == set().union(*(names(pipelines[s]) for s in every))
    assert names(pipelines["atop_finetuning"]) == {f"finetune_{arm}" for arm in ARMS}
    assert {f"evaluate_{d}" for d in MAIN} <= names(pipelines["evaluation"])
    assert MAIN == ("standard", "ap", "ap_continued", "ap_classifier_aware",
                    "adversarial_reconstruction", "atop")  # fmt: skip
    # the main job trains no baseline and needs nothing from the full comparison but the
    # convergence study's report and per-defense studies, which are optional (cited, and
    # added to a headline they find not converged, when they exist)
    outputs = pipelines["atop"].all_outputs()
    assert not {"pgd_at_classifier", "rvs_classifier", "purifier_atop_pgd"} & outputs
    free = {n for n in pipelines["atop"].inputs() if not n.startswith("params:")}
    assert free == {"convergence", *(f"convergence_{d}" for d in MAIN if d in STUDIED)}
    # the training stages monitor on held-out images, never on the evaluation subset
    for stage in ("classifier_pretraining", "adversarial_training", "rvs"):
        assert "monitor_indices" in pipelines[stage].inputs(), stage
        assert "eval_indices" not in pipelines[stage].inputs(), stage


@pytest.mark.slow
def test_atop_pipeline_end_to_end_smoke(atop_project):
    data = atop_project / "data"
    models = data / "06_models/cifar10/smoke"
    for name in ("classifier", "purifier", *(f"purifier_{arm}" for arm in ARMS)):
        checkpoint = torch.load(models / f"{name}.pt", weights_only=True)
        assert {"arch", "config", "state_dict", "meta"} <= set(checkpoint), name
    pretrained = torch.load(models / "purifier.pt", weights_only=True)
    generator_before = pretrained["state_dict"]["generator"]
    for arm in ARMS:  # every arm fine-tunes the same pretrained purifier
        finetuned = torch.load(models / f"purifier_{arm}.pt", weights_only=True)
        generator_after = finetuned["state_dict"]["generator"]
        assert generator_after.keys() == generator_before.keys()
        assert any(
            not torch.equal(generator_before[k], generator_after[k]) for k in generator_after
        )
        assert finetuned["meta"]["atop"]["arm"] == arm
        metrics = json.loads(
            (data / f"08_reporting/cifar10/smoke/finetuning_{arm}_metrics.json").read_text()
        )
        assert metrics["arm"] == arm and 0.0 <= metrics["val_adv_acc"] <= 1.0
        assert (data / f"08_reporting/cifar10/smoke/finetuning_{arm}_history.csv").is_file()
    assert not list(models.glob("purifier_atop_pgd*.pt"))  # the full comparison's arm

    # the report: every main-job defense, in both judging rules
    robustness = json.loads((data / "08_reporting/cifar10/smoke/robustness.json").read_text())
    assert list(robustness["defenses"]) == list(MAIN) and robustness["skipped"] == {}
    for entry in robustness["defenses"].values():
        for accuracy in (entry["clean"], entry["worst_case"]["Linf"], entry["worst_case"]["L2"]):
            assert 0.0 <= accuracy["worst_of_n"] <= accuracy["single"] <= 1.0
            low, high = accuracy["single_ci"]
            assert low <= accuracy["single"] <= high
        assert entry["worst_case"]["Linf"]["single"] <= entry["clean"]["single"]
    for name in MAIN:  # per-defense results: per-draw verdict tensors
        result = torch.load(
            data / f"07_model_output/cifar10/smoke/evaluation/{name}.pt", weights_only=True
        )
        clean = result["clean"]
        n_images = robustness["settings"]["n_images"]
        draws = robustness["settings"]["draws"] if result["stochastic"] else 1
        assert clean.dtype == torch.bool and clean.shape == (n_images, draws)
    verdicts = pd.read_csv(data / "07_model_output/cifar10/smoke/robustness_verdicts.csv")
    assert set(verdicts["defense"]) == set(MAIN)
    assert (verdicts["correct"] <= verdicts["draws"]).all()
    for path in (
        "robustness.csv",
        "robustness_report.md",
        "robust_accuracy_vs_eps.png",
        "adversarial_grid.png",
    ):
        assert (data / "08_reporting/cifar10/smoke" / path).is_file(), path
    assert not (data / "08_reporting/cifar10/smoke/comparison.json").exists()

"""The training-seeds study end to end on real CIFAR-10 (smoke profile, a real Kedro
session after the main job): every arm of the 2 x 2 fine-tuned with every seed, evaluated
with the main job's protocol, and the report's intervals over seeds and images."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from atop.evaluation.defenses import FACTORIAL
from atop.pipeline_registry import register_pipelines
from atop.pipelines.seeds.nodes import contrasts, seeds_report, verdict
from atop.pipelines.seeds.pipeline import ARMS, SEEDS
from tests.conftest import run_kedro, stage_params

pytestmark = pytest.mark.slow


def test_the_study_is_its_own_pipeline_with_a_node_pair_per_arm_and_seed():
    pipelines = register_pipelines()
    seeds = pipelines["seeds"]
    names = {n.name for n in seeds.nodes}
    assert set(ARMS) == set(FACTORIAL.values()) and SEEDS == (1, 2, 3, 4)
    for arm in ARMS:
        for seed in SEEDS:
            assert {f"finetune_{arm}_seed{seed}", f"evaluate_{arm}_seed{seed}"} <= names
    assert "seeds_report" in names and len(names) == 2 * len(ARMS) * len(SEEDS) + 1
    # run alone: in neither the main job nor the full comparison
    assert not names & {n.name for n in pipelines["atop"].nodes}
    assert not names & {n.name for n in pipelines["__default__"].nodes}
    # the main job's evaluations are the first seed
    report = next(n for n in seeds.nodes if n.name == "seeds_report")
    assert {f"evaluation_{arm}" for arm in ARMS} <= set(report.inputs)


@pytest.fixture(scope="module")
def studied(atop_project):
    run_kedro(atop_project, "seeds")
    return atop_project / "data" / "08_reporting" / "cifar10" / "smoke"


def test_the_seeds_study_runs_end_to_end_after_the_main_job(studied, atop_project):
    record = json.loads((studied / "seeds.json").read_text())
    settings = record["settings"]
    assert settings["seeds"] == [0, *SEEDS] and settings["n_images"] == 8
    assert list(record["arms"]) == list(ARMS)
    for outcomes in record["arms"].values():
        assert set(outcomes) == {"clean", "Linf", "L2"}
        for summary in outcomes.values():
            assert len(summary["per_seed"]) == 5 and summary["seeds"] == 5
            assert summary["mean"] == pytest.approx(sum(summary["per_seed"]) / 5)
    assert set(record["contrasts"]) == set(contrasts())
    for by_outcome in record["contrasts"].values():
        for test in by_outcome.values():
            assert test["ci"][0] <= test["delta"] <= test["ci"][1]
    table = pd.read_csv(studied / "seeds.csv")
    assert len(table) == len(ARMS) * 5 * 3
    report = (studied / "seeds_report.md").read_text()
    assert report.startswith("# Training seeds") and "hierarchical bootstrap" in report
    assert (studied / "seeds.png").stat().st_size > 0
    models = atop_project / "data" / "06_models" / "cifar10" / "smoke"
    for arm in ARMS:
        for seed in SEEDS:
            assert (models / f"purifier_{arm}_seed{seed}.pt").is_file()
    metrics = json.loads((studied / f"finetuning_{ARMS[0]}_seed1_metrics.json").read_text())
    assert metrics["seed"] == 1  # the seed reached the fine-tuning


def _result(right: int, n: int = 6, draws: int = 2) -> dict:
    """An evaluation result: the first ``right`` of ``n`` images right on every draw, clean
    and under one attack per norm."""
    verdicts = (torch.arange(n) < right)[:, None].repeat(1, draws)
    attacks = {"pgd_linf": {"draws": verdicts}, "pgd_l2": {"draws": verdicts}}
    return {"clean": verdicts, "attacks": attacks}


def test_the_report_reads_differences_only_from_intervals_over_seeds():
    evaluation = stage_params("evaluation")
    finetuning = stage_params("atop_finetuning")
    params = stage_params("seeds")
    results = {}
    for i, arm in enumerate(ARMS):
        results[arm] = _result(2 + i)
        for seed in SEEDS:
            results[f"{arm}_seed{seed}"] = _result(2 + i)
    record, table, markdown, _ = seeds_report(params, evaluation, finetuning, **results)
    # AToP is the last arm: right on 5 images, ap_continued on 2, at every seed
    test = record["contrasts"]["atop - ap_continued"]["clean"]
    assert test["delta"] == pytest.approx(3 / 6) and test["seed_sd"] == pytest.approx(0)
    assert verdict(test) == "higher"
    assert verdict({"ci": [-0.1, 0.2]}) == "no difference shown"
    assert len(table) == len(ARMS) * 5 * 3 and "higher" in markdown
    broken = {**results, "atop_seed2": {"skipped": "checkpoint not found"}}
    with pytest.raises(ValueError, match="needs the evaluation of 'atop_seed2'"):
        seeds_report(params, evaluation, finetuning, **broken)

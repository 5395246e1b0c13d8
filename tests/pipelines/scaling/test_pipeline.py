"""The budget study end to end on real CIFAR-10 (smoke profile, a real Kedro session after
the main job): three arms fine-tuned at larger budgets and evaluated with the main job's
protocol; the report's table and figure of accuracy vs fine-tuning steps."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from atop.params import ParameterError
from atop.pipeline_registry import register_pipelines
from atop.pipelines.scaling.nodes import ScalingParams, budget_settings, steps_of
from atop.pipelines.scaling.pipeline import ARMS, BUDGETS
from tests.conftest import run_kedro, stage_params


def test_the_study_is_its_own_pipeline_with_a_node_pair_per_arm_and_budget():
    pipelines = register_pipelines()
    names = {n.name for n in pipelines["scaling"].nodes}
    assert ARMS == ("adversarial_reconstruction", "ap_classifier_aware", "atop")
    assert BUDGETS == (800, 3200)
    for arm in ARMS:
        for steps in BUDGETS:
            assert {f"finetune_{arm}_steps{steps}", f"evaluate_{arm}_steps{steps}"} <= names
    assert not names & {n.name for n in pipelines["__default__"].nodes}


def test_each_budget_is_that_many_fine_tuning_steps_on_the_base_profile():
    params = stage_params("scaling", env="base")
    finetuning = stage_params("atop_finetuning", env="base")
    assert isinstance(params, ScalingParams)
    assert steps_of(finetuning, finetuning.train_images, finetuning.epochs) == 200
    for steps in BUDGETS:
        assert steps_of(finetuning, **budget_settings(params, steps)) == steps
    assert budget_settings(params, 3200)["train_images"] * 5 == 3200 * 64  # 204,800 images
    with pytest.raises(ValueError, match="scaling.budgets has no entry '400'"):
        budget_settings(params, 400)
    with pytest.raises(ParameterError, match="epochs"):
        params.replace(budgets={"800": {"train_images": 100, "epochs": 0}})


@pytest.mark.slow
def test_the_scaling_study_runs_end_to_end_after_the_main_job(atop_project):
    run_kedro(atop_project, "scaling")
    reports = atop_project / "data" / "08_reporting" / "cifar10" / "smoke"
    record = json.loads((reports / "scaling.json").read_text())
    assert list(record["arms"]) == list(ARMS)
    for entry in record["arms"].values():
        steps = [int(k) for k in entry["points"]]
        assert len(steps) == 3 and steps == sorted(steps)  # the main job's budget first
        for point in entry["points"].values():
            for outcome in ("clean", "Linf", "L2"):
                low, high = point[outcome]["ci"]
                assert low <= point[outcome]["acc"] <= high
        assert set(entry["change"]) == {"clean", "Linf", "L2"}
    # AToP against each single-term arm at the largest budget: a paired mean difference
    contrasts = record["at_largest"]
    assert set(contrasts) == {f"atop - {arm}" for arm in ARMS if arm != "atop"}
    last = str(max(int(k) for k in record["arms"]["atop"]["points"]))
    for name, tests in contrasts.items():
        other = record["arms"][name.removeprefix("atop - ")]["points"][last]
        for outcome, test in tests.items():
            mine = record["arms"]["atop"]["points"][last][outcome]["acc"]
            assert test["delta"] == pytest.approx(mine - other[outcome]["acc"], abs=1e-6)
    table = pd.read_csv(reports / "scaling.csv")
    assert len(table) == len(ARMS) * 3 * 3
    assert (reports / "scaling_report.md").read_text().startswith("# Robustness vs fine-tuning")
    assert (reports / "scaling.png").stat().st_size > 0
    metrics = json.loads((reports / "finetuning_atop_steps3200_metrics.json").read_text())
    assert metrics["epochs"] == 3  # the smoke budget's settings reached the fine-tuning

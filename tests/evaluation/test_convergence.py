"""The attack-convergence study (:mod:`atop.evaluation.convergence`), without Kedro: robust
accuracy vs PGD steps and vs EOT samples, and where each curve is flat."""

from __future__ import annotations

import math

import pytest
import torch

from atop.checkpoint import state_hash
from atop.evaluation import convergence as convergence_module
from atop.evaluation.convergence import ConvergenceParams, flat_point, study, summarize
from atop.evaluation.defenses import PURIFIED, build_defense
from atop.evaluation.protocol import EvalData, EvalSettings, run_one
from atop.params import ParameterError
from tests.conftest import stage_params
from tests.evaluation.conftest import TRANSFORM, classifier_dict, purifier_dict

EPS = 8 / 255


@pytest.fixture(scope="module")
def smoke() -> ConvergenceParams:
    return stage_params("convergence", device="cpu")


def test_the_typed_block_and_its_settings(smoke):
    assert isinstance(smoke, ConvergenceParams) and set(smoke.defenses) <= set(PURIFIED)
    assert smoke.settings == EvalSettings(
        smoke.batch_size, smoke.draws, smoke.seed, False, smoke.attack_amp
    )
    assert smoke.attack["name"] == "pgd" and smoke.attack["eps"] == pytest.approx(EPS)
    for profile in ("smoke", "base", "paper"):
        assert isinstance(stage_params("convergence", env=profile), ConvergenceParams)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attack": {"name": "fgsm", "eps": EPS}}, "convergence.attack: give a 'pgd' spec"),
        ({"attack": {"name": "pgd", "eps": EPS, "alpha": 0.01, "steps": 5}}, "are swept"),
        ({"attack": {"name": "pgd", "eps": EPS, "alpha": 0.01, "eot_iter": 5}}, "are swept"),
        ({"defenses": ["standard"]}, r"convergence.defenses\[0\]='standard'"),
        ({"alpha_rule": "madry"}, "convergence.alpha_rule='madry'"),
        ({"steps": [0, 2]}, r"convergence.steps\[0\]=0 is out of range"),
    ],
)
def test_the_typed_block_refuses_bad_values(smoke, changes, message):
    with pytest.raises(ParameterError, match=message):
        smoke.replace(**changes)


def test_spec_for_sets_steps_eot_and_the_step_size(smoke):
    fixed = smoke.spec_for(steps=10, eot=4)
    assert fixed == {**smoke.attack, "steps": 10, "eot_iter": 4}
    assert fixed["alpha"] == smoke.attack["alpha"]
    madry = smoke.replace(alpha_rule="2.5eps/steps").spec_for(steps=10, eot=4)
    assert madry["alpha"] == pytest.approx(2.5 * EPS / 10)
    assert "steps" not in smoke.attack  # the block is not modified


@pytest.fixture(scope="module")
def tiny_defense():
    checkpoints = {
        "classifier": classifier_dict(),
        "purifier": purifier_dict(meta={"transform": TRANSFORM}),
    }
    return build_defense("ap", checkpoints, torch.device("cpu"))


@pytest.fixture
def recorded(smoke, cifar10_test_batch, monkeypatch):
    """The smoke study's images, and the ``(label, spec)`` of every :func:`run_one` call
    the study makes (it still runs)."""
    images, labels = cifar10_test_batch
    data = EvalData(images[: smoke.images], labels[: smoke.images], list(range(4)), 10)
    calls = []

    def recording(defense, label, spec, norm, eps, data, settings, validate=None):
        calls.append((label, dict(spec)))
        return run_one(defense, label, spec, norm, eps, data, settings, validate)

    monkeypatch.setattr(convergence_module, "run_one", recording)
    return data, calls


def test_study_runs_each_setting_once_and_judges_with_fresh_draws(smoke, tiny_defense, recorded):
    data, calls = recorded
    result = study(tiny_defense, data, smoke)
    # smoke: steps [1, 2] at EOT 1 (one 2-step run, read off after 1 step), EOT [1, 2] at
    # 1 step; (1 step, EOT 1) is in both sweeps
    assert [(label, spec["steps"], spec["eot_iter"]) for label, spec in calls] == [
        ("pgd1_eot2", 1, 2)
    ]
    assert [k for k, _ in result["steps"]] == sorted(smoke.steps)
    assert [k for k, _ in result["eot"]] == sorted(smoke.eot)
    assert result["steps"][0][1] is result["eot"][0][1]  # the shared setting ran once
    for _, draws in result["steps"] + result["eot"]:
        assert draws.dtype == torch.bool and draws.shape == (smoke.images, smoke.draws)
    assert (result["norm"], result["eps"]) == ("Linf", pytest.approx(EPS))
    assert (result["eot_at"], result["steps_at"]) == (smoke.eot_at, smoke.steps_at)
    assert result["indices"] == [0, 1, 2, 3]
    assert result["model"] == state_hash(tiny_defense.model.state_dict())

    summary = summarize(result)
    assert set(summary) == {"steps", "eot"}
    for sweep in ("steps", "eot"):
        points = summary[sweep]["points"]
        assert list(points) == [str(k) for k, _ in result[sweep]]
        for k, draws in result[sweep]:
            single = draws.float().mean(dim=1)
            point = points[str(k)]
            assert point["acc"] == pytest.approx(single.mean().item())
            p = single.mean().item()
            assert point["se"] == pytest.approx(math.sqrt(p * (1 - p) / len(single)))
            assert point["worst_of_n"] == draws.all(dim=1).float().mean().item()
            assert point["worst_of_n"] <= point["acc"]
        curve = [(int(k), v["acc"], v["se"]) for k, v in points.items()]
        assert {k: v for k, v in summary[sweep].items() if k != "points"} == flat_point(curve)


def test_study_runs_each_step_count_alone_when_the_step_size_depends_on_it(
    smoke, tiny_defense, recorded
):
    data, calls = recorded
    study(tiny_defense, data, smoke.replace(alpha_rule="2.5eps/steps"))  # Madry et al.'s rule
    assert [(label, spec["alpha"]) for label, spec in calls] == [
        ("pgd1_eot1", pytest.approx(2.5 * EPS)),
        ("pgd2_eot1", pytest.approx(2.5 * EPS / 2)),
        ("pgd1_eot2", pytest.approx(2.5 * EPS)),
    ]


def test_flat_point_on_hand_made_curves():
    # falls, then stays within one standard error of the strongest point
    curve = [(10, 0.50, 0.04), (20, 0.35, 0.04), (50, 0.31, 0.04), (100, 0.30, 0.04)]
    assert flat_point(curve) == {
        "strongest": 100,
        "strongest_acc": 0.30,
        "se": 0.04,
        "flat_from": 50,  # 0.35 > 0.30 + 0.04, 0.31 is within it
    }
    # still falling at the last point: flat only there
    falling = [(1, 0.9, 0.01), (2, 0.7, 0.01), (4, 0.5, 0.01)]
    assert flat_point(falling) == {
        "strongest": 4,
        "strongest_acc": 0.5,
        "se": 0.01,
        "flat_from": 4,
    }
    # flat from the start
    flat = [(1, 0.20, 0.05), (2, 0.22, 0.05), (4, 0.19, 0.05)]
    assert flat_point(flat)["flat_from"] == 1 and flat_point(flat)["strongest"] == 4
    # the strongest point need not be the last: a noisy curve
    noisy = [(10, 0.40, 0.02), (20, 0.30, 0.02), (50, 0.33, 0.02)]
    assert flat_point(noisy) == {
        "strongest": 20,
        "strongest_acc": 0.30,
        "se": 0.02,
        "flat_from": 20,
    }
    # a standard error of zero: flat from the first point reaching the minimum
    exact = [(1, 0.5, 0.0), (2, 0.0, 0.0), (4, 0.0, 0.0)]
    assert flat_point(exact)["flat_from"] == 2 and flat_point(exact)["strongest"] == 2

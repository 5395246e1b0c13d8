"""The attack-convergence study (:mod:`atop.evaluation.convergence`), without Kedro: both
norms, every setting judged with fresh draws, the costly settings on the images still
standing, and the rule that compares each setting with the headline (paired SE)."""

from __future__ import annotations

import pytest
import torch

from atop.checkpoint import state_hash
from atop.evaluation import convergence as convergence_module
from atop.evaluation.convergence import (
    ConvergenceParams,
    point_key,
    study,
    summarize,
)
from atop.evaluation.defenses import STUDIED, build_defense
from atop.evaluation.protocol import EvalData, EvalSettings, crossfit_worst
from atop.params import ParameterError
from tests.conftest import stage_params
from tests.evaluation.conftest import TRANSFORM, classifier_dict, purifier_dict

EPS = 8 / 255


@pytest.fixture(scope="module")
def smoke() -> ConvergenceParams:
    return stage_params("convergence", device="cpu")


def test_the_typed_block_and_its_settings(smoke):
    assert isinstance(smoke, ConvergenceParams) and set(smoke.defenses) <= set(STUDIED)
    assert smoke.settings == EvalSettings(
        smoke.batch_size, smoke.draws, smoke.seed, False, smoke.attack_amp
    )
    assert [a["norm"] for a in smoke.attacks] == ["Linf", "L2"]
    assert smoke.entry("Linf").eps == pytest.approx(EPS) and smoke.entry("L2").eps == 0.5
    for profile in ("smoke", "base", "paper"):
        assert isinstance(stage_params("convergence", env=profile), ConvergenceParams)
    base = stage_params("convergence", env="base")
    assert (200, 20) in base.points and max(e for _, e in base.points) >= 32
    assert max(k for k, _ in base.points) >= 200
    assert set(base.defenses) == set(STUDIED)  # AP and every arm of the main job


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attacks": [{"name": "fgsm", "eps": EPS}]}, r"convergence.attacks\[0\]: give a 'pgd'"),
        ({"attacks": [{"name": "pgd", "eps": EPS, "alpha": 0.01, "steps": 5}]}, "are swept"),
        ({"defenses": ["standard"]}, r"convergence.defenses\[0\]='standard'"),
        ({"steps": [0, 2]}, r"convergence.steps\[0\]=0 is out of range"),
        ({"extra": [[3]]}, r"convergence.extra\[0\]: give \[steps, eot\]"),
        (
            {"attacks": [{"name": "pgd", "norm": "L2", "eps": 0.5, "alpha": 0.1}] * 2},
            "one pgd spec per norm",
        ),
    ],
)
def test_the_typed_block_refuses_bad_values(smoke, changes, message):
    with pytest.raises(ParameterError, match=message):
        smoke.replace(**changes)


def test_the_settings_and_which_run_on_every_image(smoke):
    # smoke: steps [1, 2, 3] at EOT 1, EOT [1, 2] at 1 step, extra 3 x 2; cost <= 2 everywhere
    assert smoke.points == [(1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]
    cheap = convergence_module._groups(smoke.points, True, smoke.all_images_cost)
    costly = convergence_module._groups(smoke.points, False, smoke.all_images_cost)
    assert cheap == {1: [1, 2], 2: [1]} and costly == {1: [3], 2: [3]}
    assert point_key(200, 20) == "200x20"


@pytest.fixture(scope="module")
def tiny_defense():
    checkpoints = {
        "classifier": classifier_dict(),
        "purifier": purifier_dict(meta={"transform": TRANSFORM}),
    }
    return build_defense("ap", checkpoints, torch.device("cpu"))


@pytest.fixture(scope="module")
def data(smoke, cifar10_test_batch) -> EvalData:
    images, labels = cifar10_test_batch
    return EvalData(images[: smoke.images], labels[: smoke.images], list(range(4)), 10)


def test_study_runs_both_norms_and_the_costly_settings_on_the_survivors(
    smoke, tiny_defense, data, monkeypatch
):
    calls = []
    real_one, real_survivors = convergence_module.run_one, convergence_module.run_on_survivors

    def one(defense, label, spec, *args, **kwargs):
        calls.append(("all", label, spec["steps"], spec["eot_iter"], args[-1]))
        return real_one(defense, label, spec, *args, **kwargs)

    def survivors(defense, entry, spec, data, settings, earlier, validate, snapshots):
        calls.append(("survivors", entry.label, spec["steps"], spec["eot_iter"], snapshots))
        return real_survivors(defense, entry, spec, data, settings, earlier, validate, snapshots)

    monkeypatch.setattr(convergence_module, "run_one", one)
    monkeypatch.setattr(convergence_module, "run_on_survivors", survivors)
    headline = {"Linf": [torch.ones(4, 2, dtype=torch.bool)]}  # one set, every draw right
    result = study(tiny_defense, data, smoke, headline)
    # per norm: one run per EOT count and side, read off at its smaller step counts
    assert [c[:5] for c in calls] == [
        ("all", "pgd_linf_2x1", 2, 1, (1,)),
        ("all", "pgd_linf_1x2", 1, 2, ()),
        ("survivors", "pgd_linf_3x1", 3, 1, ()),
        ("survivors", "pgd_linf_3x2", 3, 2, ()),
        ("all", "pgd_l2_2x1", 2, 1, (1,)),
        ("all", "pgd_l2_1x2", 1, 2, ()),
        ("survivors", "pgd_l2_3x1", 3, 1, ()),
        ("survivors", "pgd_l2_3x2", 3, 2, ()),
    ]
    assert result["model"] == state_hash(tiny_defense.model.state_dict())
    assert result["indices"] == [0, 1, 2, 3]
    for norm in ("Linf", "L2"):
        record = result["norms"][norm]
        assert list(record["points"]) == [point_key(*p) for p in smoke.points]
        for point in record["points"].values():
            assert point["draws"].dtype == torch.bool and point["draws"].shape == (4, 2)
            cheap = point["steps"] * point["eot"] <= smoke.all_images_cost
            assert (point["attacked"] is None) == cheap
    assert result["norms"]["Linf"]["headline"] == headline["Linf"]
    assert result["norms"]["L2"]["headline"] is None
    assert result["norms"]["L2"]["eps"] == 0.5


def _record(headline: torch.Tensor | None, **points: torch.Tensor) -> dict:
    """A one-norm study record with the given per-setting verdicts (all on every image)."""

    def point(key: str, draws: torch.Tensor) -> dict:
        steps, eot = (int(v) for v in key.lstrip("p").split("x"))
        return {"steps": steps, "eot": eot, "draws": draws, "attacked": None, "seconds": 0.0}

    return {
        "norms": {
            "Linf": {
                "eps": EPS,
                "alpha": 2 / 255,
                "points": {k.lstrip("p"): point(k, d) for k, d in points.items()},
                "headline": None if headline is None else [headline],
            }
        }
    }


def test_a_setting_lowers_the_headline_only_beyond_its_paired_standard_error():
    n = 100
    headline = (torch.arange(n) < 30)[:, None].repeat(1, 10)  # 30 %, deterministic per image
    same = headline.clone()
    lower = (torch.arange(n) < 20)[:, None].repeat(1, 10)  # 10 images fewer
    barely = (torch.arange(n) < 29)[:, None].repeat(1, 10)  # one image fewer
    summary = summarize(_record(headline, p10x4=same, p20x4=barely, p200x20=lower))["Linf"]
    points = summary["points"]
    assert points["10x4"]["gap"] == 0 and not points["10x4"]["lowers"]
    # one image: the floor (1/n) is the standard error, the gap does not exceed it
    assert points["20x4"]["gap"] == pytest.approx(0.01)
    assert points["20x4"]["paired_se"] == pytest.approx(0.01) and not points["20x4"]["lowers"]
    # ten images: the paired SE of a difference of ten 1s is sqrt(0.1 * 0.9 / 99) ~ 0.03
    assert points["200x20"]["gap"] == pytest.approx(0.1)
    assert points["200x20"]["paired_se"] == pytest.approx((0.1 * 0.9 / 99) ** 0.5, rel=0.05)
    assert points["200x20"]["lowers"]
    assert summary["converged"] is False and summary["max_gap"] == pytest.approx(0.1)
    assert summary["strongest"] == "200x20"
    assert summary["headline"] == pytest.approx(0.3)
    # the headline is the cross-fitted worst case of its sets
    assert summary["headline"] == crossfit_worst([headline]).mean().item()
    converged = summarize(_record(headline, p10x4=same, p20x4=barely))["Linf"]
    assert converged["converged"] is True
    # no headline: nothing to compare with
    alone = summarize(_record(None, p10x4=same))["Linf"]
    assert alone["converged"] is None and "gap" not in alone["points"]["10x4"]


def test_a_headline_of_zero_has_no_slack_but_nothing_can_lower_it():
    n = 64
    zero = torch.zeros(n, 10, dtype=torch.bool)
    summary = summarize(_record(zero, p10x4=zero, p200x20=zero))["Linf"]
    assert summary["converged"] is True and summary["max_gap"] == 0
    assert all(p["paired_se"] == pytest.approx(1 / n) for p in summary["points"].values())

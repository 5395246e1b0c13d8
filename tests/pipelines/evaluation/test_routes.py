"""The noise routes in the comparison's record and reports: each noise ablation against the
same defense with the default route, paired per image (:func:`noise_routes`)."""

from __future__ import annotations

import pytest
import torch

from atop import results
from atop.pipelines.evaluation.metrics import noise_routes, outcome_scores
from atop.pipelines.evaluation.report import _routes_section

N, DRAWS = 60, 4
ATTACKS = [
    {"label": "pgd", "norm": "Linf", "eps": 8 / 255},
    {"label": "pgd_l2", "norm": "L2", "eps": 0.5},
]


def _defense(clean_right: int, robust_right: int) -> dict:
    """The first ``clean_right`` images right on every clean draw, the first
    ``robust_right`` on every draw of both attacks, the rest wrong."""

    def right(first: int) -> torch.Tensor:
        return (torch.arange(N) < first)[:, None].repeat(1, DRAWS)

    robust = {"draws": right(robust_right)}
    return {"clean": right(clean_right), "attacks": {"pgd": robust, "pgd_l2": dict(robust)}}


def test_each_evaluated_ablation_is_tested_against_its_default_per_image():
    defenses = {
        "ap": _defense(50, 10),
        "ap_upsample": _defense(41, 10),  # 9 images fewer right when clean, same robustness
        "atop": _defense(50, 12),
        "atop_sigma025": _defense(50, 18),  # 6 images more right under attack
        "ap_sigma025": _defense(50, 10),  # its default is ap: tested
    }
    routes = noise_routes(defenses, ATTACKS)
    assert set(routes) == {"ap_upsample", "ap_sigma025", "atop_sigma025"}  # no atop_upsample
    assert routes["ap_upsample"]["default"] == "ap"
    assert routes["ap_upsample"]["clean"]["delta"] == pytest.approx(-9 / N)
    assert routes["ap_upsample"]["clean"]["p_value"] < 0.01
    assert routes["ap_upsample"]["Linf"]["delta"] == 0.0
    assert routes["atop_sigma025"]["default"] == "atop"
    assert routes["atop_sigma025"]["L2"]["delta"] == pytest.approx(6 / N)
    low, high = routes["atop_sigma025"]["L2"]["ci"]
    assert low <= 6 / N <= high
    assert noise_routes({"ap": defenses["ap"], "atop": defenses["atop"]}, ATTACKS) == {}


def test_the_reports_show_one_row_per_ablation_and_nothing_without_one():
    routes = noise_routes({"ap": _defense(50, 10), "ap_upsample": _defense(41, 10)}, ATTACKS)
    section = "\n".join(_routes_section({"noise_routes": routes}))
    assert "## The noise routes" in section and "| `ap_upsample` vs `ap` | -15.00 [" in section
    page = "\n".join(results._routes({"noise_routes": routes}))
    assert "| `ap_upsample` vs `ap` | -15.00 [" in page
    assert _routes_section({"noise_routes": {}}) == [] and results._routes({}) == []
    sentence = results.route_sentence({"noise_routes": routes}, None)
    assert "`ap_upsample` − `ap` clean -15.00 [" in sentence
    assert "no noise ablation" in results.route_sentence({"noise_routes": {}}, None)


def test_both_sides_face_the_same_attacks_and_an_ablation_needs_its_default():
    """A default whose convergence study added a lowering setting to its headline is still
    compared on the evaluation's attacks only (the ablations are not in the study)."""
    from tests.pipelines.evaluation.test_headline import _study

    atop = _defense(50, 12)
    lower = (torch.arange(N) < 2)[:, None].repeat(1, DRAWS)  # 10 images fewer
    study = _study({"clean": atop["clean"], "attacks": {"pgd": atop["attacks"]["pgd"]}},
                   **{"200x20": lower})  # fmt: skip
    studied = {**atop, "study": study}
    assert outcome_scores(studied, ATTACKS, "Linf").mean() < 12 / N  # its headline is lower
    routes = noise_routes({"atop": studied, "atop_upsample": _defense(50, 12)}, ATTACKS)
    assert routes["atop_upsample"]["Linf"]["delta"] == 0.0  # not +10 / N
    assert noise_routes({"atop_upsample": _defense(50, 12)}, ATTACKS) == {}
    assert "not in this record" in results.route_sentence({}, None)

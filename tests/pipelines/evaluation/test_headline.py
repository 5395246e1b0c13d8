"""A headline the convergence study did not find converged: which study it may use
(:func:`study_fits`) and which of its settings join the worst case (:func:`headline_sets`)."""

from __future__ import annotations

import pytest
import torch

from atop.evaluation.protocol import crossfit_worst
from atop.pipelines.evaluation.metrics import headline_sets, study_fits

N, DRAWS = 100, 10
ATTACKS = [{"label": "pgd", "norm": "Linf", "eps": 8 / 255}]


def _right(first: int, n: int = N) -> torch.Tensor:
    """bool [n, DRAWS]: the first ``first`` images right on every draw, the rest wrong."""
    return (torch.arange(n) < first)[:, None].repeat(1, DRAWS)


def _evaluation(pgd_right: int, n: int = N) -> dict:
    return {"clean": _right(n, n), "attacks": {"pgd": {"draws": _right(pgd_right, n)}}}


def _study(evaluation: dict, **points: torch.Tensor) -> dict:
    """A one-norm study run against ``evaluation`` (its headline sets stored)."""
    headline = [evaluation["clean"], evaluation["attacks"]["pgd"]["draws"]]
    return {
        "model": "w",
        "indices": list(range(len(headline[0]))),
        "norms": {
            "Linf": {
                "eps": 8 / 255,
                "alpha": 2 / 255,
                "points": {
                    key: {
                        "steps": int(key.split("x")[0]),
                        "eot": int(key.split("x")[1]),
                        "draws": d,
                        "attacked": None,
                        "seconds": 0.0,
                    }
                    for key, d in points.items()
                },
                "headline": headline,
            }
        },
    }


def test_a_study_fits_only_the_evaluation_it_was_run_against():
    evaluation = _evaluation(30)
    study = _study(evaluation, **{"10x4": _right(30)})
    assert study_fits(evaluation, study, ATTACKS)
    # other weights (other verdicts), other images, absent or skipped: not used
    assert not study_fits(_evaluation(31), study, ATTACKS)
    assert not study_fits(_evaluation(30, n=N - 1), study, ATTACKS)
    assert not study_fits(evaluation, None, ATTACKS)
    assert not study_fits(evaluation, {"skipped": "not listed"}, ATTACKS)
    # the evaluation ran an attack the study's headline did not include
    more = [*ATTACKS, {"label": "fgsm", "norm": "Linf", "eps": 8 / 255}]
    evaluation_more = {
        **evaluation,
        "attacks": {**evaluation["attacks"], "fgsm": {"draws": _right(40)}},
    }
    assert not study_fits(evaluation_more, study, more)


def test_only_the_settings_that_lower_the_headline_join_it():
    evaluation = _evaluation(30)  # headline 30 %
    same, barely, lower = _right(30), _right(29), _right(20)  # 0, 1 (the SE floor), 10 images
    converged = _study(evaluation, **{"10x4": same, "20x4": barely})
    sets, with_study = headline_sets({**evaluation, "study": converged}, ATTACKS, "Linf")
    assert not with_study and len(sets) == 2
    study = _study(evaluation, **{"10x4": same, "20x4": barely, "200x20": lower})
    sets, with_study = headline_sets({**evaluation, "study": study}, ATTACKS, "Linf")
    assert with_study and len(sets) == 3 and torch.equal(sets[-1], lower)
    assert crossfit_worst(sets).mean().item() == pytest.approx(0.2)
    # a norm the study did not run keeps the evaluation's sets
    sets, with_study = headline_sets({**evaluation, "study": study}, ATTACKS, "L2")
    assert not with_study

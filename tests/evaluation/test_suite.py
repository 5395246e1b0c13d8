"""The evaluation stage's parameters and its protocol for one defense
(:mod:`atop.evaluation.suite`), without the Kedro runner."""

from __future__ import annotations

import pytest
import torch

from atop.evaluation.defenses import build_defense
from atop.evaluation.protocol import AttackRun, EvalData, EvalSettings, parse_attacks
from atop.evaluation.suite import EvalParams, evaluate_defense, grid_images
from atop.params import ParameterError
from tests.conftest import stage_params
from tests.evaluation.conftest import TRANSFORM, classifier_dict, purifier_dict

EPS = 8 / 255
FAST_ATTACKS = [
    {"label": "fgsm", "name": "fgsm", "eps": "8/255"},
    {"label": "pgd_linf", "name": "pgd", "norm": "Linf", "eps": "8/255", "alpha": "2/255",
     "steps": 1, "eot_iter": 2},
    {"label": "bpda_linf", "name": "bpda", "norm": "Linf", "eps": "8/255", "alpha": "2/255",
     "steps": 1, "eot_iter": 1},
]  # fmt: skip


@pytest.fixture(scope="module")
def smoke() -> EvalParams:
    return stage_params("evaluation", device="cpu", images=4)


def test_the_typed_block_gives_entries_and_settings(smoke):
    assert isinstance(smoke, EvalParams) and smoke.images == 4 and smoke.device == "cpu"
    assert smoke.entries == parse_attacks(smoke.attacks)
    assert smoke.settings == EvalSettings(smoke.batch_size, smoke.draws, smoke.seed, False)
    assert (smoke.sanity.reference, smoke.grid.images) == ("pgd_linf", 4)
    with pytest.raises(AttributeError):
        smoke.images = 8  # immutable: use .replace
    assert smoke.replace(images=None).images is None and smoke.images == 4


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_images": 8}, "unknown key 'n_images'. Did you mean 'images'"),
        ({"images": 0}, r"evaluation.images=0 is out of range: it must be >= 1"),
        ({"defenses": ["standard", "madry"]}, r"evaluation.defenses\[1\]='madry': choose one"),
        ({"attacks": FAST_ATTACKS * 2}, "evaluation.attacks: .*used twice"),
        ({"attacks": FAST_ATTACKS[:1]}, "evaluation.sanity.reference: 'pgd_linf' must be"),
        ({"tolerance": 0.1}, r"evaluation.tolerance=0.1 is out of range: it must be >= 0 and <= 0.01"),
    ],
)  # fmt: skip
def test_the_typed_block_refuses_bad_values_with_the_key_and_the_fix(smoke, changes, message):
    with pytest.raises(ParameterError, match=message) as info:
        smoke.replace(**changes)
    assert "conf/<profile>/parameters_evaluation.yml" in str(info.value)


def test_nested_blocks_are_checked_too(smoke):
    grid = {**smoke.grid.to_dict(), "defense": "madry"}
    with pytest.raises(ParameterError, match=r"evaluation.grid.defense='madry'"):
        smoke.replace(grid=grid)
    sanity = {**smoke.sanity.to_dict(), "reference": "fgsm"}
    with pytest.raises(ParameterError, match="evaluation.sanity.reference: 'fgsm'"):
        smoke.replace(sanity=sanity)


def _data(cifar10_test_batch, n: int) -> EvalData:
    images, labels = cifar10_test_batch
    return EvalData(images[:n], labels[:n], list(range(100, 100 + n)), 10)


def test_evaluate_defense_runs_every_attack_the_sanity_checks_and_the_grid(
    smoke, cifar10_test_batch
):
    params = smoke.replace(
        attacks=FAST_ATTACKS,
        sanity={**smoke.sanity.to_dict(), "eps_sweep": [0, "8/255", "32/255"], "stronger": {},
                "images": 2},
        grid={"defense": "standard", "attack": "pgd_linf", "images": 3},
    )  # fmt: skip
    defense = build_defense("standard", {"classifier": classifier_dict()}, torch.device("cpu"))
    names = []
    result = evaluate_defense(
        defense, _data(cifar10_test_batch, 4), params, lambda *a: names.append((a[5], a[6]))
    )
    assert list(result["attacks"]) == ["fgsm", "pgd_linf"]  # no BPDA without a purifier
    assert all(len(a["correct"]) == 4 for a in result["attacks"].values())
    assert {a["eot_iter"] for a in result["attacks"].values()} == {None, 1}
    assert [p["eps"] for p in result["sweep"]] == [0.0, EPS, pytest.approx(32 / 255)]
    statuses = {check: value["status"] for check, value in result["sanity"].items()}
    assert statuses["stronger_attack"] == statuses["bpda_vs_exact"] == "not run"
    assert {statuses["eps_monotonic"], statuses["iterative_beats_single_step"]} <= {"pass", "fail"}
    assert all(value["n_images"] == 2 for value in result["sanity"].values())
    # every attack output is validated, the sweep on the first 2 images only
    assert names == [
        ("standard_fgsm", [100, 101, 102, 103]),
        ("standard_pgd_linf", [100, 101, 102, 103]),
        ("standard_pgd_linf_eps_32_255", [100, 101]),
    ]
    grid = result["grid"]
    assert grid["attack"] == "pgd_linf" and grid["defense"] == "standard"
    assert grid["clean"].shape == grid["adversarial"].shape == (3, 3, 32, 32)
    assert grid["transformed"] is None and grid["purified"] is None
    assert len(grid["prediction"]) == 3 and grid["labels"] == cifar10_test_batch[1][:3].tolist()
    other = params.replace(grid={"defense": "atop", "attack": "pgd_linf", "images": 3})
    assert evaluate_defense(defense, _data(cifar10_test_batch, 2), other)["grid"] is None


def test_a_spec_that_cannot_be_built_fails_before_any_attack_runs(smoke, cifar10_test_batch):
    odd = {**FAST_ATTACKS[1], "label": "odd", "norm": "L3"}  # the last entry: would run last
    attacks = [*FAST_ATTACKS, odd]
    params = smoke.replace(attacks=attacks)
    defense = build_defense("standard", {"classifier": classifier_dict()}, torch.device("cpu"))
    names = []
    with pytest.raises(ValueError, match="L3"):
        evaluate_defense(
            defense, _data(cifar10_test_batch, 2), params, lambda *a: names.append(a[5])
        )
    assert names == []


def test_the_grid_of_a_purified_defense_shows_one_draw_of_the_transform(cifar10_test_batch):
    checkpoints = {
        "classifier": classifier_dict(),
        "atop_purifier": purifier_dict(meta={"transform": TRANSFORM}),
    }
    defense = build_defense("atop", checkpoints, torch.device("cpu"))
    data = _data(cifar10_test_batch, 4)
    run = AttackRun(torch.ones(4, dtype=torch.bool), data.images, 0.0, 0.0)
    grid = grid_images(defense, data, run, 2)
    for key in ("clean", "adversarial", "transformed", "purified"):
        assert grid[key].shape == (2, 3, 32, 32), key
        assert 0 <= grid[key].min() and grid[key].max() <= 1, key
    holes = (grid["transformed"] == 0).all(dim=1).flatten(1).float().mean(1)
    assert (holes >= 0.25).all()  # RT2: a quarter of every image is masked (black)
    assert len(grid["prediction"]) == 2

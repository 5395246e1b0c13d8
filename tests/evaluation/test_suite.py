"""The evaluation stage's parameters and its protocol for one defense
(:mod:`atop.evaluation.suite`), without the Kedro runner."""

from __future__ import annotations

import pytest
import torch

from atop.evaluation.defenses import build_defense
from atop.evaluation.protocol import AttackRun, EvalData, EvalSettings, parse_attacks
from atop.evaluation.suite import (
    EvalParams,
    FixedRandomness,
    complete_sanity,
    evaluate_defense,
    fixed_randomness_run,
    grid_images,
)
from atop.params import ParameterError
from tests.conftest import stage_params
from tests.evaluation.conftest import TRANSFORM, classifier_dict, purifier_dict

EPS = 8 / 255
#: A sanity block for FAST_ATTACKS (an l-inf reference only).
LINF_SANITY = {"references": ["pgd_linf"], "eps_sweep": {"Linf": [0, "8/255", "32/255"]}}
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
    assert smoke.settings == EvalSettings(
        smoke.batch_size, smoke.draws, smoke.seed, False, smoke.attack_amp
    )
    assert smoke.replace(attack_amp=True).settings.attack_amp is True
    assert isinstance(smoke.fixed_randomness, bool) and smoke.draws == 2
    # the smoke profile runs AutoAttack-standard on deterministic defenses, -rand on random ones
    applies = {e.label: e.applies_to for e in smoke.entries if e.name == "autoattack"}
    assert applies == {"autoattack_standard": "deterministic", "autoattack_rand": "stochastic",
                       "autoattack_rand_l2": "stochastic"}  # fmt: skip
    assert (smoke.sanity.references, smoke.grid.images) == (["pgd_linf", "pgd_l2"], 4)
    assert [e.label for e in smoke.references] == ["pgd_linf", "pgd_l2"]
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
        ({"attacks": FAST_ATTACKS[:1]}, r"evaluation.sanity.references\[0\]: 'pgd_linf' must be"),
        ({"tolerance": 0.1}, r"evaluation.tolerance=0.1 is out of range: it must be >= 0 and <= 0.01"),
        ({"draws": 1}, r"evaluation.draws=1 is out of range: it must be >= 2"),
        ({"attack_amp": "yes"}, r"evaluation.attack_amp"),
        ({"fixed_randomness": 1}, r"evaluation.fixed_randomness"),
        ({"attacks": [*FAST_ATTACKS, {**FAST_ATTACKS[0], "label": "x", "applies_to": "some"}]},
         "applies_to must be one of"),
        ({"attacks": [*FAST_ATTACKS, {**FAST_ATTACKS[0], "label": "x", "defenses": ["madry"]}],
          "sanity": {"references": ["pgd_linf"], "eps_sweep": {"Linf": [0]}}},
         r"evaluation.attacks.x.defenses: unknown defenses \['madry'\]"),
        ({"attacks": [FAST_ATTACKS[0], {**FAST_ATTACKS[1], "applies_to": "stochastic"}]},
         r"evaluation.sanity.defenses: \['pgd_at', 'rvs', 'standard'\] are not attacked by"),
        ({"attacks": [FAST_ATTACKS[0], {**FAST_ATTACKS[1], "survivors": True}]},
         r"evaluation.sanity.references\[0\]: 'pgd_linf' must be .*\(not `survivors`\)"),
        ({"sanity": {"images": 5}}, r"evaluation.sanity.images: 5 is above evaluation.images=4"),
        ({"grid": {"images": 9}}, r"evaluation.grid.images: 9 is above evaluation.images=4"),
        ({"primary": {"versus": ["atop"]}}, r"evaluation.primary.versus: 'atop' is the focus"),
    ],
)  # fmt: skip
def test_the_typed_block_refuses_bad_values_with_the_key_and_the_fix(smoke, changes, message):
    for block in ("sanity", "grid", "primary"):  # nested blocks: change some of their keys
        if block in changes:
            changes = {**changes, block: {**getattr(smoke, block).to_dict(), **changes[block]}}
    with pytest.raises(ParameterError, match=message) as info:
        smoke.replace(**changes)
    assert "conf/<profile>/parameters_evaluation.yml" in str(info.value)


def test_nested_blocks_are_checked_too(smoke):
    grid = {**smoke.grid.to_dict(), "defense": "madry"}
    with pytest.raises(ParameterError, match=r"evaluation.grid.defense='madry'"):
        smoke.replace(grid=grid)
    sanity = {**smoke.sanity.to_dict(), "references": ["fgsm"]}
    with pytest.raises(ParameterError, match=r"evaluation.sanity.references\[0\]: 'fgsm'"):
        smoke.replace(sanity=sanity)
    sanity = {**smoke.sanity.to_dict(), "references": ["pgd_linf", "pgd_linf_strong"]}
    with pytest.raises(ParameterError, match="must be the label of a 'pgd' attack entry"):
        smoke.replace(sanity=sanity)
    sanity = {**smoke.sanity.to_dict(), "defenses": ["atop", "madry"]}
    with pytest.raises(ParameterError, match=r"evaluation.sanity.defenses: unknown defenses"):
        smoke.replace(sanity=sanity)


def test_a_defense_outside_sanity_defenses_gets_the_attacks_but_no_checks(
    smoke, cifar10_test_batch
):
    sanity = {**smoke.sanity.to_dict(), **LINF_SANITY, "stronger": {},
              "defenses": ["ap", "atop"]}  # fmt: skip
    params = smoke.replace(attacks=FAST_ATTACKS, fixed_randomness=True, sanity=sanity)
    defense = _purified()
    defense.name = "ap_continued"
    result = evaluate_defense(defense, _data(cifar10_test_batch, 2), params)
    assert list(result["attacks"]) == ["fgsm", "pgd_linf", "bpda_linf"]
    assert result["sweep"] == {"Linf": []} and result["fixed_randomness"] is None
    statuses = {check: value["status"] for check, value in result["sanity"].items()}
    assert statuses["eps_monotonic_linf"] == statuses["large_eps_near_zero_linf"] == "not run"
    detail = result["sanity"]["stronger_attack_linf"]["detail"]
    assert "not in evaluation.sanity.defenses" in detail
    # the checks that compare attacks already run cost nothing and still run
    assert statuses["iterative_beats_single_step"] in ("pass", "fail")
    defense.name = "atop"
    result = evaluate_defense(defense, _data(cifar10_test_batch, 2), params)
    assert len(result["sweep"]["Linf"]) == 3 and set(result["fixed_randomness"]) == {"Linf"}


def test_the_main_job_split_gives_the_same_result_as_one_evaluation(smoke, cifar10_test_batch):
    """evaluate_defense(sanity=False) (main job) then complete_sanity (full comparison) equals
    evaluate_defense with the checks: the split moves time, not results."""
    sanity = {**smoke.sanity.to_dict(), **LINF_SANITY, "stronger": {"steps": 3},
              "defenses": None}  # fmt: skip
    params = smoke.replace(attacks=FAST_ATTACKS, fixed_randomness=True, sanity=sanity)
    data = _data(cifar10_test_batch, 2)
    whole = evaluate_defense(_purified(), data, params)
    main = evaluate_defense(_purified(), data, params, sanity=False)
    assert main["sweep"] == {"Linf": []} and main["fixed_randomness"] is None
    deferred = {c: v["detail"] for c, v in main["sanity"].items() if v["status"] == "not run"}
    assert set(deferred) == {"eps_monotonic_linf", "large_eps_near_zero_linf",
                             "stronger_attack_linf"}  # fmt: skip
    assert all("full comparison" in detail for detail in deferred.values())
    done = complete_sanity(_purified(), data, params, main)
    assert done["sanity"] == whole["sanity"]
    assert [p["eps"] for p in done["sweep"]["Linf"]] == [p["eps"] for p in whole["sweep"]["Linf"]]
    for a, b in zip(done["sweep"]["Linf"], whole["sweep"]["Linf"], strict=True):
        assert torch.equal(a["draws"], b["draws"])
    for key in ("clean", "draws"):
        assert torch.equal(
            done["fixed_randomness"]["Linf"][key], whole["fixed_randomness"]["Linf"][key]
        )
    assert all(
        torch.equal(done["attacks"][k]["draws"], whole["attacks"][k]["draws"])
        for k in whole["attacks"]
    )


def _data(cifar10_test_batch, n: int) -> EvalData:
    images, labels = cifar10_test_batch
    return EvalData(images[:n], labels[:n], list(range(100, 100 + n)), 10)


def test_evaluate_defense_runs_every_attack_the_sanity_checks_and_the_grid(
    smoke, cifar10_test_batch
):
    params = smoke.replace(
        attacks=FAST_ATTACKS,
        sanity={**smoke.sanity.to_dict(), **LINF_SANITY, "stronger": {}, "images": 2},
        grid={"defense": "standard", "attack": "pgd_linf", "images": 3},
    )  # fmt: skip
    defense = build_defense("standard", {"classifier": classifier_dict()}, torch.device("cpu"))
    names = []
    result = evaluate_defense(
        defense, _data(cifar10_test_batch, 4), params, lambda *a: names.append((a[5], a[6]))
    )
    assert list(result["attacks"]) == ["fgsm", "pgd_linf"]  # no BPDA without a purifier
    assert all(a["draws"].shape == (4, 1) for a in result["attacks"].values())
    assert result["clean"].shape == (4, 1) and result["clean"].dtype == torch.bool
    assert result["fixed_randomness"] is None  # deterministic: nothing to fix
    assert {a["eot_iter"] for a in result["attacks"].values()} == {None, 1}
    sweep = result["sweep"]["Linf"]
    assert [p["eps"] for p in sweep] == [0.0, EPS, pytest.approx(32 / 255)]
    assert [p["draws"].shape for p in sweep] == [(2, 1)] * 3
    statuses = {check: value["status"] for check, value in result["sanity"].items()}
    assert statuses["stronger_attack_linf"] == statuses["bpda_vs_exact_linf"] == "not run"
    assert {statuses["eps_monotonic_linf"], statuses["iterative_beats_single_step"]} <= {
        "pass",
        "fail",
    }
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
    params = smoke.replace(attacks=attacks, sanity={**smoke.sanity.to_dict(), **LINF_SANITY})
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
        "purifier_atop": purifier_dict(meta={"transform": TRANSFORM}),
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


def _purified(name: str = "atop"):
    checkpoints = {
        "classifier": classifier_dict(),
        "purifier": purifier_dict(meta={"transform": TRANSFORM}),
        "purifier_atop": purifier_dict(1, meta={"transform": TRANSFORM}),
    }
    return build_defense(name, checkpoints, torch.device("cpu"))


def test_fixed_randomness_is_one_draw_the_same_at_every_call(cifar10_test_batch):
    defense = _purified()
    images = cifar10_test_batch[0][:4]
    fixed = FixedRandomness(defense.model, seed=3)
    with torch.no_grad():
        first, second = fixed(images), fixed(images)
        other = FixedRandomness(defense.model, seed=4)(images)
        fresh = defense.model(images), defense.model(images)
    assert torch.equal(first, second)  # the same noise and masks at every call
    assert not torch.equal(first, other)  # another seed: another draw
    assert not torch.equal(*fresh)  # the defense itself still draws afresh
    assert defense.model.generator is None  # restored after each call


def test_fixed_randomness_run_attacks_and_judges_with_the_same_draw(smoke, cifar10_test_batch):
    defense = _purified()
    data = _data(cifar10_test_batch, 4)
    reference = smoke.references[0]
    settings = EvalSettings(batch_size=4, draws=3)
    out = fixed_randomness_run(defense, reference, data, settings)
    assert out["attack"] == "pgd_linf"
    # a deterministic model: one pass judges it
    assert out["clean"].shape == out["draws"].shape == (4, 1)
    assert out["clean"].dtype == out["draws"].dtype == torch.bool
    fixed = FixedRandomness(defense.model, settings.seed)
    with torch.no_grad():
        expected = fixed(data.images).argmax(1) == data.labels
    assert torch.equal(out["clean"][:, 0], expected)


@pytest.mark.parametrize("on", [True, False])
def test_evaluate_defense_adds_the_fixed_randomness_diagnostic_when_asked(
    smoke, cifar10_test_batch, on
):
    params = smoke.replace(
        attacks=FAST_ATTACKS,
        fixed_randomness=on,
        sanity={**smoke.sanity.to_dict(), **LINF_SANITY, "stronger": {}},
    )
    defense = _purified()
    # the evaluation node fills in the stages' times from their histories (one unknown)
    stages = {"classifier_history": 3.0, "purifier_history": None, "finetuning_history_atop": 5.0}
    defense.train_seconds = dict(stages)
    result = evaluate_defense(defense, _data(cifar10_test_batch, 2), params)
    assert list(result["attacks"]) == ["fgsm", "pgd_linf", "bpda_linf"]
    assert result["clean"].shape == (2, params.draws)  # fresh draws judge a random defense
    assert result["attacks"]["pgd_linf"]["eot_iter"] == 2
    assert result["train_seconds"] == stages and result["total_train_seconds"] is None
    if on:
        fixed = result["fixed_randomness"]["Linf"]
        assert fixed["attack"] == "pgd_linf" and fixed["draws"].shape == (2, 1)
    else:
        assert result["fixed_randomness"] is None


def test_fixed_randomness_fixes_any_module_that_draws_from_the_global_rng():
    """A user's randomized defense (no generator of its own): one fixed draw per call."""

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10] + torch.rand(len(x), 10)

    images = torch.rand(4, 3, 8, 8)
    fixed = FixedRandomness(Noisy(), seed=5)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(fixed(images), fixed(images))
    assert torch.equal(torch.rand(1), before)  # the global stream is left where it was
    assert not torch.equal(Noisy()(images), Noisy()(images))

"""The evaluation protocol as a library (:mod:`atop.evaluation.protocol`), without Kedro.

Real CIFAR-10 test images, a tiny classifier and purifier (``tests/evaluation/conftest.py``),
1-2 attack steps. Verdicts are bool ``[N, D]`` (image, fresh draw); the judging rules
(single-draw, worst-of-N) are computed from them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torchattacks

from atop import EvalSettings, evaluate, load_defense
from atop.checkpoint import load_safe, save_atomic
from atop.evaluation import protocol
from atop.evaluation.defenses import Defense
from atop.evaluation.protocol import (
    RULES,
    AttackEntry,
    AttackRun,
    EvalData,
    EvalResult,
    attack_defense,
    bound_l2,
    defense_results,
    defense_spec,
    format_eps,
    judge,
    max_perturbation,
    parse_attacks,
    per_image,
    run_one,
    select_images,
    worst_case,
    worst_cases,
)
from atop.params import ParameterError, fraction

EPS = 8 / 255


@pytest.fixture(scope="module")
def purified(checkpoint_files) -> torch.nn.Module:
    return load_defense(checkpoint_files["classifier"], checkpoint_files["purifier"])


@pytest.fixture()
def bare(checkpoint_files) -> torch.nn.Module:
    # a fresh model per test: a test that left it changed would shift near-tie logits
    return load_defense(checkpoint_files["classifier"])


@pytest.fixture(scope="module")
def data(cifar10_test_batch) -> EvalData:
    images, labels = cifar10_test_batch
    return EvalData(images[:8], labels[:8], list(range(8)), 10)


def _bools(*values: int) -> torch.Tensor:
    """One-draw verdicts ``[N, 1]``."""
    return torch.tensor(values, dtype=torch.bool)[:, None]


def verdicts(*rows: str) -> torch.Tensor:
    """``verdicts("11", "10")``: per-draw verdicts ``[N, D]``, one 0/1 string per image."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


# --- budgets and attack entries ---------------------------------------------------------


def test_budgets_are_numbers_or_fractions():
    assert fraction("8/255") == pytest.approx(8 / 255) and fraction(0.5) == 0.5
    assert fraction(" 2 / 255 ") == pytest.approx(2 / 255) and fraction(1) == 1.0
    for bad in ("eight", "1/0", True, None):
        with pytest.raises(ValueError, match="fraction"):
            fraction(bad)
    assert issubclass(ParameterError, ValueError)


def test_format_eps_writes_linf_budgets_in_255ths():
    assert format_eps(8 / 255) == "8/255" and format_eps(0.0) == "0/255"
    assert format_eps(0.5, "L2") == "0.5" and format_eps(2 / 255, "L2") == f"{2 / 255:g}"
    assert format_eps(0.5, "Linf") == "0.5"  # not a whole multiple of 1/255
    assert format_eps(None) == "-"


def test_parse_attacks_reads_labels_budgets_and_threat_models():
    entries = parse_attacks(
        [
            {"label": "fgsm", "name": "FGSM", "eps": "8/255"},
            {"label": "pgd_l2", "name": "pgd", "norm": "L2", "eps": 0.5, "alpha": "1/10",
             "steps": 2},
            {"label": "cw-l2", "name": "cw", "eps": 0.5, "c": 1.0, "steps": 2},
            {"label": "cw_free", "name": "cw", "steps": 2},
        ]
    )  # fmt: skip
    fgsm, pgd, cw, free = entries
    assert fgsm == AttackEntry("fgsm", {"name": "fgsm", "eps": pytest.approx(EPS)}, "Linf", EPS)
    assert "label" not in pgd.spec and pgd.name == "pgd" and pgd.norm == "L2"
    assert pgd.spec["alpha"] == pytest.approx(0.1) and pgd.eps == 0.5
    # C&W is an ℓ2 attack; its eps bounds the threat model, it is no attack parameter
    assert (cw.norm, cw.eps, "eps" in cw.spec) == ("L2", 0.5, False)
    assert (free.norm, free.eps) == ("L2", None)
    assert {e.applies_to for e in entries} == {"all"}  # the default


def test_parse_attacks_reads_which_defenses_an_entry_applies_to():
    entries = parse_attacks(
        [
            {"label": "aa_std", "name": "autoattack", "version": "standard", "norm": "Linf",
             "eps": "8/255", "steps": 2, "applies_to": "deterministic"},
            {"label": "aa_rand", "name": "autoattack", "version": "rand", "norm": "Linf",
             "eps": "8/255", "steps": 2, "applies_to": "stochastic"},
        ]
    )  # fmt: skip
    assert [e.applies_to for e in entries] == ["deterministic", "stochastic"]
    assert all("applies_to" not in e.spec and "label" not in e.spec for e in entries)
    with pytest.raises(ValueError, match="applies_to must be one of"):
        parse_attacks([{"label": "x", "name": "fgsm", "eps": EPS, "applies_to": "random"}])


def test_an_entry_can_name_the_defenses_it_runs_on(bare, purified):
    (bpda,) = parse_attacks(
        [{"label": "bpda", "name": "bpda", "eps": EPS, "alpha": 2 / 255, "steps": 2,
          "defenses": ["ap", "atop"]}]
    )  # fmt: skip
    assert bpda.defenses == ("ap", "atop") and "defenses" not in bpda.spec
    assert defense_spec(bpda, Defense("atop", purified, True), 5, 3) == bpda.spec
    assert defense_spec(bpda, Defense("ap_continued", purified, True), 5, 3) is None
    with pytest.raises(ValueError, match="defenses must be a list"):
        parse_attacks([{"label": "x", "name": "fgsm", "eps": EPS, "defenses": "atop"}])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "is empty"),
        ([{"name": "fgsm", "eps": 0.1}], "needs a 'label' and a 'name'"),
        ([{"label": "a b", "name": "fgsm", "eps": 0.1}], "letters, digits"),
        ([{"label": "clean", "name": "fgsm", "eps": 0.1}], "reserved"),
        ([{"label": "worst_case", "name": "fgsm", "eps": 0.1}], "reserved"),
        ([{"label": "a", "name": "fgsm", "eps": 0.1}] * 2, "used twice"),
        ([{"label": "x", "name": "fgsm", "eps": "eight"}], "Attack 'x': eps expected a number"),
        ([{"label": "x", "name": "pgd", "eps": 0.1, "alpha": "a/b"}], "Attack 'x': alpha"),
        (
            [{"label": "aa", "name": "autoattack", "version": "rand", "norm": "Linf",
              "eps": 0.03, "steps": 5, "seed": 1}],
            "evaluation.seed",
        ),
        (
            [{"label": "aa", "name": "autoattack", "version": "rand", "norm": "Linf",
              "eps": 0.03, "steps": 5, "draws": 3}],
            "evaluation.draws",
        ),
        (
            [{"label": "x", "name": "pgd", "eps": 0.03, "alpha": 0.01, "steps": 2,
              "survivors": "yes"}],
            "survivors must be true or false",
        ),
        (
            [{"label": "x", "name": "cw", "c": 1, "kappa": 0, "steps": 2, "lr": 0.01,
              "survivors": True}],
            "true needs an eps",
        ),
    ],
)  # fmt: skip
def test_parse_attacks_refuses_bad_entries(entries, message):
    with pytest.raises(ValueError, match=message):
        parse_attacks(entries)


# --- perturbation bounds ----------------------------------------------------------------


def test_max_perturbation_and_bound_l2_measure_each_image():
    clean = torch.full((3, 3, 4, 4), 0.5)
    delta = torch.zeros(3, 3, 4, 4)
    for i, norm in enumerate((0.3, 0.5, 0.7)):  # two values moved by ±norm/2 each
        delta[i, 0, 0, 0] = norm / 2
        delta[i, 1, 0, 0] = -norm / 2
    adversarial = clean + delta
    assert max_perturbation(clean, adversarial, "Linf") == pytest.approx(0.35)
    l2 = (0.35**2 * 2) ** 0.5
    assert max_perturbation(clean, adversarial, "L2") == pytest.approx(l2)
    assert max_perturbation(clean[:0], adversarial[:0], "L2") == 0.0
    eps = ((0.25**2) * 2) ** 0.5  # the ℓ2 norm of the middle image
    bounded = bound_l2(clean, adversarial, eps + 1e-6)
    assert torch.equal(bounded[:2], adversarial[:2])  # within eps: kept
    assert torch.equal(bounded[2], clean[2])  # too far: the clean image (counts as a failure)


# --- defense specs ----------------------------------------------------------------------


def test_defense_spec_adapts_each_entry_to_the_defense(bare, purified):
    standard, atop = Defense("standard", bare, False), Defense("atop", purified, True)
    pgd, bpda, auto = parse_attacks(
        [
            {"label": "pgd", "name": "pgd", "eps": EPS, "alpha": 2 / 255, "steps": 2,
             "eot_iter": 4},
            {"label": "bpda", "name": "bpda", "eps": EPS, "alpha": 2 / 255, "steps": 2,
             "eot_iter": 4},
            {"label": "aa", "name": "autoattack", "version": "rand", "norm": "Linf", "eps": EPS,
             "steps": 2, "eot_iter": 4},
        ]
    )  # fmt: skip
    # EOT over a deterministic model only repeats the gradient
    assert defense_spec(pgd, standard, draws=5, seed=3)["eot_iter"] == 1
    assert defense_spec(pgd, atop, draws=5, seed=3) == pgd.spec
    # BPDA needs a purifier to bypass
    assert defense_spec(bpda, standard, 5, 3) is None
    assert defense_spec(bpda, atop, 5, 3) == bpda.spec
    # AutoAttack's seed and success judge come from the settings
    assert defense_spec(auto, atop, 5, 3) == {**auto.spec, "seed": 3, "draws": 5}
    assert defense_spec(auto, standard, 5, 3) == {
        **auto.spec,
        "seed": 3,
        "draws": 1,
        "eot_iter": 1,
    }
    assert pgd.spec["eot_iter"] == 4 and "seed" not in auto.spec  # entries are not modified


def test_defense_spec_honours_applies_to(bare, purified):
    standard, atop = Defense("standard", bare, False), Defense("atop", purified, True)
    fgsm = {"label": "fgsm", "name": "fgsm", "eps": EPS}
    only_det, only_stoch, every = parse_attacks(
        [
            {**fgsm, "label": "det", "applies_to": "deterministic"},
            {**fgsm, "label": "stoch", "applies_to": "stochastic"},
            {**fgsm, "label": "all", "applies_to": "all"},
        ]
    )
    assert defense_spec(only_det, standard, 5, 0) == only_det.spec
    assert defense_spec(only_det, atop, 5, 0) is None
    assert defense_spec(only_stoch, standard, 5, 0) is None
    assert defense_spec(only_stoch, atop, 5, 0) == only_stoch.spec
    assert defense_spec(every, standard, 5, 0) == defense_spec(every, atop, 5, 0) == every.spec


# --- judging, running, worst cases --------------------------------------------------------


def test_eval_settings_defaults():
    assert EvalSettings() == EvalSettings(
        batch_size=64, draws=10, seed=0, progress=False, attack_amp=False
    )


def test_judge_uses_fresh_draws_for_stochastic_models_and_one_pass_otherwise(bare, purified, data):
    settings = EvalSettings(batch_size=4, draws=3)
    with torch.no_grad():
        expected = (bare(data.images).argmax(1) == data.labels).cpu()
    correct = judge(Defense("standard", bare, False), data.images, data.labels, settings)
    assert correct.dtype == torch.bool and correct.shape == (8, 1)
    assert torch.equal(correct[:, 0], expected)
    calls = []
    hook = purified.classifier.register_forward_hook(lambda *args: calls.append(1))
    try:
        draws = judge(Defense("atop", purified, True), data.images, data.labels, settings)
    finally:
        hook.remove()
    assert len(calls) == 3 * 2  # 3 draws of each of the 2 batches
    assert draws.dtype == torch.bool and draws.shape == (8, 3)


def test_the_rules_score_each_image_from_its_draws():
    draws = verdicts("111", "110", "011", "000")
    assert RULES == ("single", "worst_of_n")
    assert torch.allclose(per_image(draws, "single"), torch.tensor([1, 2 / 3, 2 / 3, 0]))
    assert per_image(draws, "worst_of_n").tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="Unknown rule 'first'"):
        per_image(draws, "first")
    run = AttackRun(draws, torch.zeros(4, 3, 2, 2), 0.0, 0.0)
    assert run.accuracy() == run.accuracy("single") == pytest.approx((1 + 4 / 3) / 4)
    assert run.accuracy("worst_of_n") == 0.25


def test_worst_case_is_cross_fitted_over_the_draws():
    a = verdicts("11", "10", "11", "00")
    b = verdicts("10", "11", "01", "11")
    # image 0: chosen on draw 0 (a, b tie -> a, the earlier of two equally strong sets),
    # scored on draw 1 (a: 1); chosen on draw 1 (b), scored on draw 0 (b: 1) -> 1.0
    # image 2: on draw 0 b is lower (scored 1 on draw 1); on draw 1 a and b tie and a is the
    # set with the lower mean on draw 1 (0.5 < 0.75), scored 1 on draw 0 -> 1.0
    assert worst_case([a, b], "single").tolist() == [1.0, 0.5, 1.0, 0.0]
    assert protocol.plugin_worst([a, b]).tolist() == [0.5, 0.5, 0.5, 0.0]
    assert worst_case([a, b], "worst_of_n").tolist() == [False, False, False, False]
    assert torch.equal(worst_case([a], "worst_of_n"), per_image(a, "worst_of_n"))
    # one draw per set (a deterministic defense): the exact minimum of the 0/1 verdicts
    one, other = verdicts("1", "1", "0"), verdicts("1", "0", "1")
    assert worst_case([one, other], "single").tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="same"):
        protocol.crossfit_worst([a, verdicts("1", "1", "1", "1")])


@pytest.mark.parametrize(("p", "k"), [(0.1, 2), (0.1, 6), (0.5, 3), (0.5, 6)])
def test_the_cross_fitted_worst_case_is_unbiased_where_the_plain_minimum_is_not(p, k):
    """A synthetic stochastic defense with a known per-image single-draw accuracy ``p`` under
    ``k`` equally strong attacks, each judged with its own 10 draws (method.md §6.2): the
    plain minimum of the fractions is biased low by several points, the cross-fitted
    estimate is within one point of ``p``."""
    generator = torch.Generator().manual_seed(0)
    sets = [torch.rand(20_000, 10, generator=generator) < p for _ in range(k)]
    plugin = protocol.plugin_worst(sets).mean().item() - p
    crossfit = protocol.crossfit_worst(sets).mean().item() - p
    assert abs(crossfit) < 0.01
    assert plugin < -0.04  # -5 / -9 points at p = 0.1, -13 / -20 at p = 0.5 (method.md §6.2)
    # a set that is really stronger is mostly found, and a miss errs on the defense's side
    # (a weaker set chosen on half the draws scores higher on the other half)
    weaker = [torch.rand(20_000, 10, generator=generator) < 0.9 for _ in range(k - 1)]
    mixed = protocol.crossfit_worst([*weaker, sets[0]]).mean().item()
    assert p - 0.01 < mixed < p + 0.05


def test_worst_cases_keep_bounded_attacks_and_split_by_threat_model():
    entries = parse_attacks(
        [
            {"label": "fgsm", "name": "fgsm", "eps": EPS},
            {"label": "pgd_l2", "name": "pgd", "norm": "L2", "eps": 0.5},
            {"label": "cw", "name": "cw"},  # unbounded: out of the worst cases
            {"label": "bpda", "name": "bpda", "eps": EPS},  # did not run (no purifier)
        ]
    )
    clean = verdicts("11", "11", "11", "11", "00")

    def run(*rows: str) -> AttackRun:
        return AttackRun(verdicts(*rows), torch.zeros(5, 3, 2, 2), 0.0, 0.0)

    runs = {
        "fgsm": run("11", "00", "11", "10", "11"),
        "pgd_l2": run("11", "11", "01", "11", "11"),
        "cw": run("00", "00", "00", "00", "00"),
    }
    worst = worst_cases(clean, runs, entries, "worst_of_n")
    assert set(worst) == {"all", "Linf", "L2"}
    assert worst["all"].tolist() == [True, False, False, False, False]
    assert worst["Linf"].tolist() == [True, False, True, False, False]
    assert worst["L2"].tolist() == [True, True, False, True, False]
    single = worst_cases(clean, runs, entries, "single")
    crossfit = protocol.crossfit_worst
    sets = {k: r.draws for k, r in runs.items()}
    assert torch.equal(single["all"], crossfit([clean, sets["fgsm"], sets["pgd_l2"]]))
    assert torch.equal(single["Linf"], crossfit([clean, sets["fgsm"]]))
    assert torch.equal(single["L2"], crossfit([clean, sets["pgd_l2"]]))
    result = EvalResult(clean, runs, entries)
    assert result.accuracy() == result.accuracy("single")
    assert result.accuracy("single") == pytest.approx(
        {
            "clean": 0.8,
            "fgsm": 0.7,
            "pgd_l2": 0.9,
            "cw": 0.0,
            "worst_case_all": single["all"].mean().item(),
            "worst_case_Linf": single["Linf"].mean().item(),
            "worst_case_L2": single["L2"].mean().item(),
        }
    )
    assert result.accuracy("worst_of_n") == pytest.approx(
        {
            "clean": 0.8,
            "fgsm": 0.6,
            "pgd_l2": 0.8,
            "cw": 0.0,
            "worst_case_all": 0.2,
            "worst_case_Linf": 0.4,
            "worst_case_L2": 0.6,
        }
    )
    # only ℓ∞ attacks ran: no ℓ2 worst case
    assert set(worst_cases(clean, {"fgsm": runs["fgsm"]}, entries, "single")) == {"all", "Linf"}


def test_run_one_cuts_cw_to_its_eps_and_validates_before_judging(bare, data):
    defense = Defense("standard", bare, False)
    seen = []

    def validate(clean, adversarial, labels, eps, norm, name, indices):
        seen.append((name, eps, norm, list(indices), max_perturbation(clean, adversarial, norm)))

    spec = {"name": "cw", "c": 10.0, "kappa": 0.0, "steps": 2, "lr": 0.1}
    run = run_one(defense, "cw_l2", spec, "L2", 0.05, data, EvalSettings(8, 1), validate)
    assert run.max_perturbation <= 0.05 + 1e-6 and run.spec == spec
    assert run.draws.dtype == torch.bool and run.draws.shape == (8, 1)
    assert seen == [("standard_cw_l2", 0.05, "L2", list(range(8)), run.max_perturbation)]

    def refuse(*args):
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        run_one(defense, "fgsm", {"name": "fgsm", "eps": EPS}, "Linf", EPS, data,
                EvalSettings(8, 1), refuse)  # fmt: skip


def test_attack_amp_computes_the_attack_under_autocast_and_judges_in_float32(
    bare, data, monkeypatch
):
    defense = Defense("standard", bare, False)
    spec = {"name": "pgd", "norm": "Linf", "eps": EPS, "alpha": 2 / 255, "steps": 2,
            "eot_iter": 1}  # fmt: skip
    state = {"inside": False, "enabled": [], "judged_inside": []}
    real_autocast, real_draw_correct = protocol.autocast, protocol.draw_correct

    class Recording:
        def __init__(self, device, enabled):
            state["enabled"].append(enabled)
            self.inner = real_autocast(device, enabled)

        def __enter__(self):
            state["inside"] = True
            return self.inner.__enter__()

        def __exit__(self, *exc):
            state["inside"] = False
            return self.inner.__exit__(*exc)

    def draw_correct(*args, **kwargs):
        state["judged_inside"].append(state["inside"])
        return real_draw_correct(*args, **kwargs)

    monkeypatch.setattr(protocol, "autocast", Recording)
    monkeypatch.setattr(protocol, "draw_correct", draw_correct)
    amp = run_one(defense, "pgd", spec, "Linf", EPS, data, EvalSettings(8, 1, attack_amp=True))
    full = run_one(defense, "pgd", spec, "Linf", EPS, data, EvalSettings(8, 1))
    assert state["enabled"] == [True, False] and state["judged_inside"] == [False, False]
    for run in (amp, full):
        assert run.adversarial.dtype == torch.float32 and run.draws.shape == (8, 1)
        assert run.max_perturbation <= EPS + 1e-6


def test_only_the_attacks_checked_in_bf16_run_under_autocast(bare, data):
    on, off = EvalSettings(8, 1, attack_amp=True), EvalSettings(8, 1)
    checked = [{"name": "fgsm"}, {"name": "pgd"}, {"name": "bpda"},
               {"name": "autoattack", "version": "rand"},
               {"name": "autoattack", "version": "standard"}]  # fmt: skip
    assert all(protocol.uses_amp(spec, on) and not protocol.uses_amp(spec, off) for spec in checked)
    assert not any(protocol.uses_amp(spec, on) for spec in [{"name": "cw"}, {"name": "PGD"}])
    # AutoAttack-standard (APGD-T, Square) runs under bf16 autocast on float32 logits
    spec = {"name": "autoattack", "version": "standard", "norm": "Linf", "eps": EPS, "steps": 1,
            "n_queries": 5, "seed": 0, "draws": 1}  # fmt: skip
    run = run_one(Defense("standard", bare, False), "aa", spec, "Linf", EPS, data, on)
    assert run.max_perturbation <= EPS + 1e-6


def test_attack_defense_skips_what_does_not_apply_and_results_are_a_torch_file(
    bare, data, tmp_path
):
    defense = Defense("standard", bare, False, {"classifier": 3.0})
    entries = parse_attacks(
        [
            {"label": "fgsm", "name": "fgsm", "eps": EPS},
            {"label": "bpda", "name": "bpda", "eps": EPS, "alpha": 2 / 255, "steps": 1},
            {"label": "fgsm_rand", "name": "fgsm", "eps": EPS, "applies_to": "stochastic"},
        ]
    )
    runs = attack_defense(defense, entries, data, EvalSettings(batch_size=8, draws=2))
    assert list(runs) == ["clean", "fgsm"]  # no purifier: no BPDA; not stochastic
    assert torch.equal(runs["clean"].adversarial, data.images)
    assert runs["fgsm"].max_perturbation <= EPS + 1e-6
    clean = runs.pop("clean").draws
    assert clean.shape == (8, 1)  # deterministic: one pass
    sweep = {"Linf": [(0.0, clean), (EPS, runs["fgsm"].draws)]}
    result = defense_results(defense, clean, runs, sweep, {"check": {"status": "pass"}})
    # tensors and primitives only: the catalog writes a torch file read with weights_only
    save_atomic(result, tmp_path / "standard.pt")
    saved = load_safe(tmp_path / "standard.pt")
    assert torch.equal(saved["clean"], clean) and list(saved["attacks"]) == ["fgsm"]
    fgsm = saved["attacks"]["fgsm"]
    assert torch.equal(fgsm["draws"], runs["fgsm"].draws) and fgsm["draws"].dtype == torch.bool
    assert fgsm["max_perturbation"] == runs["fgsm"].max_perturbation
    assert fgsm["steps"] is None and fgsm["eot_iter"] is None  # FGSM has neither
    assert [p["eps"] for p in saved["sweep"]["Linf"]] == [0.0, EPS]
    assert torch.equal(saved["sweep"]["Linf"][1]["draws"], runs["fgsm"].draws)
    assert saved["sanity"] == {"check": {"status": "pass"}}
    assert saved["description"] == "bare classifier f (no defense)"
    assert (saved["stochastic"], saved["transform"], saved["total_train_seconds"]) == (
        False,
        None,
        3.0,
    )
    assert saved["train_seconds"] == {"classifier": 3.0}


def test_a_survivors_entry_attacks_only_the_images_its_threat_model_left_standing(
    purified, cifar10_test_batch
):
    images, labels = cifar10_test_batch
    data = EvalData(images[:16], labels[:16], list(range(100, 116)), 10)
    defense = Defense("ap", purified, True)
    strong = {
        "name": "pgd",
        "norm": "Linf",
        "eps": EPS,
        "alpha": 2 / 255,
        "steps": 2,
        "eot_iter": 2,
    }
    entries = parse_attacks(
        [
            {"label": "fgsm", "name": "fgsm", "eps": EPS},
            {
                "label": "pgd_l2",
                "name": "pgd",
                "norm": "L2",
                "eps": 0.5,
                "alpha": 0.5,
                "steps": 1,
                "eot_iter": 1,
            },
            {"label": "strong", **strong, "survivors": True},
        ]
    )
    assert [e.survivors for e in entries] == [False, False, True]
    checked = []

    def validate(clean, adversarial, labels, eps, norm, name, indices):
        checked.append((name, len(adversarial), list(indices)))

    settings = EvalSettings(batch_size=8, draws=4)
    runs = attack_defense(defense, entries, data, settings, validate)
    # standing = right on some draw both clean and after FGSM (the l2 run does not count)
    lowest = torch.minimum(
        per_image(runs["clean"].draws, "single"), per_image(runs["fgsm"].draws, "single")
    )
    standing = (lowest > 0).nonzero().flatten()
    run = runs["strong"]
    assert torch.equal(run.attacked, lowest > 0) and 0 < len(standing) < 16
    beaten = torch.ones(16, dtype=torch.bool)
    beaten[standing] = False
    clean_wrong = per_image(runs["clean"].draws, "single") == 0
    kept = torch.where(clean_wrong[:, None, None, None], data.images, runs["fgsm"].adversarial)
    assert torch.equal(run.adversarial[beaten], kept[beaten])  # their best earlier example
    # the survivors: the same attack as a run on just those images
    alone = run_one(defense, "strong", strong, "Linf", EPS, data.take(standing), settings)
    assert torch.equal(run.adversarial[standing], alone.adversarial)
    # the whole merged set is judged afresh on the entry's own stream: the kept examples are
    # not scored by the draws that found them beaten
    rejudged = judge(defense, run.adversarial, data.labels, settings, stream="strong")
    assert torch.equal(run.draws, rejudged)
    assert run.max_perturbation <= EPS + 1e-6
    # the check sees the whole merged set once, like any other attack
    assert checked[-1] == ("ap_strong", 16, list(range(100, 116)))
    # the library entry point takes the same key
    result = evaluate(
        defense,
        data.images,
        data.labels,
        {"fgsm": entries[0].spec, "strong": {**strong, "survivors": True}},
        settings,
    )
    assert torch.equal(result.runs["strong"].attacked, lowest > 0)
    # only runs of the same threat model AND budget count: a larger-eps FGSM is ignored
    wider = parse_attacks(
        [
            {"label": "fgsm16", "name": "fgsm", "eps": 2 * EPS},
            {"label": "strong", **strong, "survivors": True},
        ]
    )
    runs = attack_defense(defense, wider, data, settings)
    assert torch.equal(runs["strong"].attacked, per_image(runs["clean"].draws, "single") > 0)
    assert runs["strong"].max_perturbation <= EPS + 1e-6


def test_select_images_takes_the_first_images_of_the_fixed_subset(cifar10_test_batch):
    images, labels = cifar10_test_batch
    test_set = {"images": (images * 255).round().to(torch.uint8), "labels": labels}
    indices = [9, 3, 250, 0]
    data = select_images(test_set, indices, 3, 10, torch.device("cpu"))
    assert data.indices == [9, 3, 250] and data.n_classes == 10
    assert data.images.dtype == torch.float32 and torch.equal(data.labels, labels[[9, 3, 250]])
    assert torch.allclose(data.images, images[[9, 3, 250]], atol=0.5 / 255)
    assert len(select_images(test_set, indices, None, 10, torch.device("cpu")).labels) == 4
    assert data.head(2).indices == [9, 3] and len(data.head(2).images) == 2
    for n in (0, 5):
        with pytest.raises(ValueError, match="choose 1..4"):
            select_images(test_set, indices, n, 10, torch.device("cpu"))
    with pytest.raises(ValueError, match="outside the test set"):
        select_images(test_set, [0, 256], None, 10, torch.device("cpu"))
    with pytest.raises(ValueError, match="class names"):
        select_images(test_set, indices, None, 2, torch.device("cpu"))


# --- evaluate: the entry point ------------------------------------------------------------


def _evaluate_twice(model, images, labels):
    results = []
    for _ in range(2):
        attacks = {
            "pgd": torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=2),
            "fgsm": {"name": "fgsm", "eps": EPS},
        }
        results.append(
            evaluate(model, images, labels, attacks, EvalSettings(batch_size=16, draws=3))
        )
    return results


def test_evaluate_judges_every_attack_with_fresh_draws_and_is_seeded(purified, eval_batch):
    images, labels = eval_batch
    first, second = _evaluate_twice(purified, images, labels)
    assert first.clean.dtype == torch.bool and first.clean.shape == (16, 3)
    assert list(first.runs) == ["pgd", "fgsm"]
    for label, run in first.runs.items():
        assert run.draws.dtype == torch.bool and run.draws.shape == (16, 3), label
        assert run.max_perturbation <= EPS + 1e-6, label
        assert 0 <= run.adversarial.min() and run.adversarial.max() <= 1
    single, worst_of_n = first.accuracy("single"), first.accuracy("worst_of_n")
    keys = {"clean", "pgd", "fgsm", "worst_case_all", "worst_case_Linf"}
    assert set(single) == set(worst_of_n) == keys
    assert first.accuracy() == single  # single-draw is the headline
    for key in keys:
        assert 0 <= worst_of_n[key] <= single[key] <= 1, key
    # single-draw: the mean over images and draws; worst-of-N: every draw right
    assert single["clean"] == pytest.approx(first.clean.float().mean().item())
    assert worst_of_n["pgd"] == first.runs["pgd"].draws.all(dim=1).float().mean().item()
    everything = [first.clean, first.runs["pgd"].draws, first.runs["fgsm"].draws]
    crossfit = protocol.crossfit_worst(everything)
    assert single["worst_case_all"] == pytest.approx(crossfit.mean().item())
    all_right = torch.stack([d.all(dim=1) for d in everything]).all(dim=0)
    assert worst_of_n["worst_case_all"] == all_right.float().mean().item()
    assert single["worst_case_Linf"] == single["worst_case_all"]  # every attack is ℓ∞
    # seeded: the same numbers, verdicts and adversarial images on a second run
    assert second.accuracy() == single and second.accuracy("worst_of_n") == worst_of_n
    assert torch.equal(second.clean, first.clean)
    for label in first.runs:
        assert torch.equal(second.runs[label].draws, first.runs[label].draws), label
        assert torch.equal(second.runs[label].adversarial, first.runs[label].adversarial), label


def test_evaluate_judges_a_deterministic_model_with_one_pass(bare, eval_batch):
    images, labels = eval_batch
    first, second = _evaluate_twice(bare, images, labels)
    accuracy = first.accuracy()
    with torch.no_grad():
        assert torch.equal(first.clean[:, 0], bare(images).argmax(1) == labels)
    assert first.clean.shape == (16, 1)
    assert accuracy["clean"] == 12 / 16  # the batch: 12 images it gets right, 4 wrong
    # one pass: both rules agree
    assert first.accuracy("worst_of_n") == accuracy
    # an undefended classifier: both attacks break some of them, the worst case is the minimum
    assert accuracy["pgd"] < accuracy["clean"] and accuracy["fgsm"] < accuracy["clean"]
    assert accuracy["worst_case_all"] == accuracy["worst_case_Linf"] <= min(accuracy.values())
    assert second.accuracy() == accuracy
    # FGSM on a deterministic model: every image moved by exactly eps (or clipped)
    assert first.runs["fgsm"].max_perturbation == pytest.approx(EPS, abs=1e-6)


def test_evaluate_skips_specs_that_do_not_apply(bare, eval_batch):
    images, labels = eval_batch[0][:4], eval_batch[1][:4]
    attacks = {
        "fgsm": {"name": "fgsm", "eps": EPS},
        "only_random": {"name": "fgsm", "eps": EPS, "applies_to": "stochastic"},
        "bpda": {"name": "bpda", "eps": EPS, "alpha": 2 / 255, "steps": 1, "eot_iter": 1},
    }
    result = evaluate(bare, images, labels, attacks, EvalSettings(batch_size=4, draws=2))
    assert list(result.runs) == ["fgsm"]
    assert set(result.accuracy()) == {"clean", "fgsm", "worst_case_all", "worst_case_Linf"}


def test_evaluate_refuses_a_bad_spec(bare, eval_batch):
    images, labels = eval_batch[0][:4], eval_batch[1][:4]
    with pytest.raises(ValueError):
        evaluate(bare, images, labels, {"x": {"name": "fgsm", "eps": "eight"}})
    with pytest.raises(ValueError):
        evaluate(bare, images, labels, {"x": {"name": "no-such-attack", "eps": EPS}})


LIBRARY_SCRIPT = r"""
import json, sys
import torch, torchattacks
from atop import EvalSettings, evaluate, load_defense

classifier, purifier, data = sys.argv[1:4]
images, labels = torch.load(data)
model = load_defense(classifier, purifier)
attacks = {
    "pgd": torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=1),
    "fgsm": {"name": "fgsm", "eps": "8/255"},
}
result = evaluate(model, images, labels, attacks, EvalSettings(batch_size=8, draws=2))
heavy = [m for m in ("kedro", "great_expectations", "dvc", "pandas") if m in sys.modules]
print(json.dumps({"accuracy": result.accuracy(), "worst_of_n": result.accuracy("worst_of_n"),
                  "shape": list(result.clean.shape), "heavy": heavy}))
"""


def _python(tmp_path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_library_works_in_a_fresh_process_without_kedro(checkpoint_files, eval_batch, tmp_path):
    """``from atop import load_defense, evaluate``: no Kedro, Great Expectations, DVC or
    pandas behind it (run outside the project folder)."""
    data = tmp_path / "images.pt"
    torch.save((eval_batch[0][8:].clone(), eval_batch[1][8:].clone()), data)  # 4 right, 4 wrong
    paths = [str(checkpoint_files["classifier"]), str(checkpoint_files["purifier"]), str(data)]
    out = json.loads(_python(tmp_path, "-c", LIBRARY_SCRIPT, *paths))
    assert out["heavy"] == []
    assert set(out["accuracy"]) == {"clean", "pgd", "fgsm", "worst_case_all", "worst_case_Linf"}
    assert all(0 <= v <= 1 for v in out["accuracy"].values())
    assert out["accuracy"]["worst_case_all"] <= min(out["accuracy"].values())
    assert out["shape"] == [8, 2]  # 2 fresh draws per image of the purified defense
    assert all(out["worst_of_n"][k] <= v for k, v in out["accuracy"].items())
    # `import atop` alone (what Kedro's settings do) does not even load torch
    light = "import sys, atop; print(sorted({'torch', 'kedro'} & set(sys.modules)))"
    assert _python(tmp_path, "-c", light) == "[]"


class _RecordingRandomModel(torch.nn.Module):
    """A stochastic toy defense: a fixed linear classifier on ``x`` plus a random logit offset
    per row and call, recording the random numbers each judging (no-grad) pass draws."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)
        self.judging_draws: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(len(x), 10)
        if not torch.is_grad_enabled():
            self.judging_draws.append(noise[:, 0].clone())
        return self.linear(x.flatten(1)) + 3 * noise


def test_no_two_verdict_sets_of_a_run_share_a_draw(data):
    """Every attack run and every judging pass has its own random stream (seed, defense,
    attack, batch): before, e.g. FGSM's judging repeated the clean judge's draws."""
    torch.manual_seed(0)
    model = _RecordingRandomModel().eval()
    entries = parse_attacks(
        [
            {"label": "fgsm", "name": "fgsm", "eps": EPS},
            {"label": "pgd", "name": "pgd", "norm": "Linf", "eps": EPS, "alpha": 2 / 255,
             "steps": 1, "eot_iter": 2},
            {"label": "pgd_l2", "name": "pgd", "norm": "L2", "eps": 0.5, "alpha": 0.25,
             "steps": 1, "eot_iter": 2},
        ]
    )  # fmt: skip
    settings = EvalSettings(batch_size=8, draws=3)
    runs = attack_defense(Defense("toy", model, True), entries, data, settings)
    assert list(runs) == ["clean", "fgsm", "pgd", "pgd_l2"]
    drawn = torch.cat(model.judging_draws)
    assert len(drawn) == 4 * len(data.labels) * 3  # four verdict sets x images x 3 draws
    assert len(torch.unique(drawn)) == len(drawn)
    # and a second run of the same evaluation repeats every draw (seeded)
    first = list(model.judging_draws)
    model.judging_draws.clear()
    attack_defense(Defense("toy", model, True), entries, data, settings)
    assert all(torch.equal(a, b) for a, b in zip(first, model.judging_draws, strict=True))


@pytest.mark.skipif(
    not __import__("atop.training").training.bf16_available("cpu"), reason="no bf16 units"
)
def test_the_autocast_copy_computes_the_same_gradients_without_per_call_casts(purified, data):
    """The attacks' model under bf16 autocast: conv / linear weights cast once instead of at
    every call (frozen weights skip autocast's cache) -- bit-identical logits and gradients."""
    from atop.training import autocast, autocast_copy

    copy = autocast_copy(purified)
    convs = [m for m in copy.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(p.dtype == torch.float32 for p in purified.parameters())  # original untouched

    def gradient(model):
        torch.manual_seed(0)
        x = data.images.clone().requires_grad_(True)
        with autocast("cpu", True):
            loss = torch.nn.functional.cross_entropy(model(x).float(), data.labels)
        return torch.autograd.grad(loss, x)[0]

    assert torch.equal(gradient(copy), gradient(purified))

"""The gradient-masking sanity checks (:mod:`atop.evaluation.sanity`), without Kedro:
paired one-sided sign-flip tests of the single-draw scores of bool ``[N, D]`` verdicts."""

from __future__ import annotations

import pytest
import torch
from scipy import stats as scipy_stats

from atop import load_defense
from atop.evaluation import sanity as sanity_module
from atop.evaluation.defenses import Defense
from atop.evaluation.protocol import AttackRun, EvalData, EvalSettings, parse_attacks, run_one
from atop.evaluation.sanity import (
    ReferenceRuns,
    SanityParams,
    rise_test,
    sanity_checks,
    sanity_runs,
    sweep_spec,
)
from atop.params import ParameterError

EPS = 8 / 255
CHECKS = {
    "eps_monotonic_linf",
    "large_eps_near_zero_linf",
    "stronger_attack_linf",
    "iterative_beats_single_step",
    "bpda_vs_exact_linf",
}
ENTRIES = parse_attacks(
    [
        {"label": "fgsm", "name": "fgsm", "eps": EPS},
        {"label": "pgd_linf", "name": "pgd", "norm": "Linf", "eps": EPS, "alpha": 2 / 255,
         "steps": 1, "eot_iter": 2},
        {"label": "bpda_linf", "name": "bpda", "norm": "Linf", "eps": EPS, "alpha": 2 / 255,
         "steps": 1},
    ]
)  # fmt: skip
REFERENCE = ENTRIES[1]


def sanity_params(**changes) -> SanityParams:
    values = {
        "references": ["pgd_linf"],
        "defenses": None,
        "eps_sweep": {"Linf": [0, EPS, "64/255"]},
        "stronger": {},
        "images": None,
        "large_eps_max_acc": 0.05,
        "alpha": 0.05,
    }
    return SanityParams(**{**values, **changes})


def correct(n_true: int, n: int = 10, draws: int = 2) -> torch.Tensor:
    """Per-draw verdicts ``[n, draws]``: the first ``n_true`` images right on every draw."""
    return (torch.arange(n) < n_true)[:, None].repeat(1, draws)


def verdicts(*rows: str) -> torch.Tensor:
    """``verdicts("11", "10")``: one string of 0/1 draws per image."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


def runs_of(**draws: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attack label -> bool ``[N, D]`` verdicts, as :func:`sanity_checks` takes them."""
    return dict(draws)


def check(clean, runs, sweep, stronger, params=None, entries=ENTRIES, reference=REFERENCE):
    """:func:`sanity_checks` with one ℓ∞ reference."""
    refs = [ReferenceRuns(reference, sweep, stronger)]
    return sanity_checks(clean, runs, entries, refs, params or sanity_params())


def _binomtest(k: int, n: int) -> float:
    return scipy_stats.binomtest(k, n, 0.5, alternative="greater").pvalue


@pytest.mark.parametrize(("rises", "falls"), [(4, 0), (5, 0), (6, 1), (3, 3), (0, 5), (9, 2)])
def test_rise_test_on_0_1_verdicts_is_the_one_sided_exact_mcnemar_test(rises, falls):
    n = 12
    before = torch.zeros(n, 3, dtype=torch.bool)
    after = torch.zeros(n, 3, dtype=torch.bool)
    after[:rises] = True  # right after only
    before[rises : rises + falls] = True  # right before only
    before[-1] = after[-1] = True  # a concordant image
    rise = rise_test(before, after, alpha=0.05)
    assert rise["n_nonzero"] == rises + falls
    expected = _binomtest(rises, rises + falls) if rises + falls else 1.0
    assert rise["p_value"] == pytest.approx(expected)
    assert rise["significant_rise"] == (expected < 0.05)
    assert rise["before"] == pytest.approx((falls + 1) / n)
    assert rise["after"] == pytest.approx((rises + 1) / n)
    assert rise["delta"] == pytest.approx((rises - falls) / n)


def test_a_significant_rise_needs_enough_images_that_rise():
    # 4 of 4 changed images rise: p = 1/16 > 0.05 (could be luck); 5 of 5: p = 1/32
    assert not rise_test(correct(0), correct(4), 0.05)["significant_rise"]
    five = rise_test(correct(0), correct(5), 0.05)
    assert five["significant_rise"] and five["p_value"] == pytest.approx(1 / 32)
    # the same rise at a stricter level is not significant
    assert not rise_test(correct(0), correct(5), 0.01)["significant_rise"]
    # a fall is never a significant rise
    fall = rise_test(correct(10), correct(0), 0.05)
    assert not fall["significant_rise"] and fall["p_value"] == 1.0


def test_rise_test_pairs_the_single_draw_scores():
    """The test sees what single-draw accuracy sees: worst-of-N verdicts (≈ 0 everywhere at
    ℓ∞) would miss a rise of every image from one right draw in two to two in two."""
    before = verdicts(*["10"] * 10)  # every image right on one draw of two: 0.5
    after = verdicts(*["11"] * 10)  # now right on both
    rise = rise_test(before, after, 0.05)
    assert (rise["before"], rise["after"]) == (0.5, 1.0)
    assert rise["p_value"] == pytest.approx(1 / 1024) and rise["significant_rise"]
    # the same single-draw accuracy, reshuffled between images: no rise
    shuffled = verdicts(*["11"] * 5, *["00"] * 5)
    flat = rise_test(before, shuffled, 0.05)
    assert flat["after"] == 0.5 and not flat["significant_rise"]


def test_an_honest_defense_passes_every_check():
    clean, reference = correct(8), correct(4)
    runs = runs_of(
        fgsm=correct(6, 12), pgd_linf=correct(4, 12), bpda_linf=correct(5, 12)
    )  # the runs cover more images than the sanity checks: the first 10 are compared
    sweep = [(0.0, clean), (EPS, reference), (64 / 255, correct(0))]
    checks = check(clean, runs, sweep, [("stronger", correct(3))])
    assert set(checks) == CHECKS
    assert {name: c["status"] for name, c in checks.items()} == dict.fromkeys(CHECKS, "pass")
    assert checks["bpda_vs_exact_linf"]["stronger"] == "exact"
    assert all(c["n_images"] == 10 for c in checks.values())
    assert (
        "0/255->8/255: 0.800 -> 0.400 single-draw (4 images changed, one-sided p = 1)"
        in checks["eps_monotonic_linf"]["detail"]
    )
    assert (
        "single-draw accuracy 0.000 at eps 64/255 (limit 0.05)"
        in checks["large_eps_near_zero_linf"]["detail"]
    )


def test_masked_gradients_fail_the_checks():
    n = 20
    clean, reference = correct(16, n), correct(6, n)
    runs = runs_of(fgsm=correct(0, n), pgd_linf=reference, bpda_linf=correct(0, n))
    # accuracy rises with eps and stays high at 64/255; more steps raise it
    sweep = [(0.0, clean), (EPS, correct(0, n)), (64 / 255, correct(n, n))]
    stronger = [("more steps", correct(4, n)), ("more EOT", correct(n, n))]  # one rise fails
    checks = check(clean, runs, sweep, stronger)
    assert {name: c["status"] for name, c in checks.items()} == dict.fromkeys(CHECKS, "fail")
    assert checks["bpda_vs_exact_linf"]["stronger"] == "bpda"  # BPDA beats the exact gradients
    # 20 changed images: a Monte Carlo sign-flip test (exact up to 16), p at its floor
    assert (
        "8/255->64/255: 0.000 -> 1.000 single-draw (20 images changed, one-sided p = 1e-05)"
        in checks["eps_monotonic_linf"]["detail"]
    )
    assert (
        "single-draw accuracy 1.000 at eps 64/255" in checks["large_eps_near_zero_linf"]["detail"]
    )
    p_14 = f"{_binomtest(14, 14):.4g}"
    detail = checks["stronger_attack_linf"]["detail"]
    assert "pgd_linf -> more steps: 0.300 -> 0.200" in detail  # both attacks are reported
    assert (
        f"pgd_linf -> more EOT: 0.300 -> 1.000 single-draw (14 images changed, one-sided p = {p_14})"
        in detail
    )


def test_a_rise_within_chance_passes_and_the_level_decides():
    n = 10
    clean = correct(8, n)
    runs = runs_of(fgsm=correct(2, n), pgd_linf=correct(2, n), bpda_linf=correct(5, n))
    sweep = [(0.0, clean), (EPS, correct(2, n)), (64 / 255, correct(0, n))]
    # the stronger attack is right on 4 more images: p = 1/16
    stronger = [("stronger", correct(6, n))]
    assert check(clean, runs, sweep, stronger)["stronger_attack_linf"]["status"] == "pass"
    loose = check(clean, runs, sweep, stronger, sanity_params(alpha=0.1))
    assert loose["stronger_attack_linf"]["status"] == "fail"


def test_checks_run_on_stochastic_verdicts_with_many_draws():
    """Single-draw fractions for the limits and for the paired tests."""
    n, draws = 10, 5
    clean = correct(9, n, draws)
    near_zero = torch.zeros(n, draws, dtype=torch.bool)
    near_zero[0, 0] = True  # one draw of one image right: single-draw 0.02
    runs = runs_of(fgsm=correct(5, n, draws), pgd_linf=correct(3, n, draws),
                   bpda_linf=correct(4, n, draws))  # fmt: skip
    sweep = [(0.0, clean), (EPS, correct(3, n, draws)), (64 / 255, near_zero)]
    checks = check(clean, runs, sweep, [])
    assert checks["large_eps_near_zero_linf"]["status"] == "pass"
    assert "single-draw accuracy 0.020" in checks["large_eps_near_zero_linf"]["detail"]
    strict = check(clean, runs, sweep, [], sanity_params(large_eps_max_acc=0.01))
    assert strict["large_eps_near_zero_linf"]["status"] == "fail"
    assert checks["stronger_attack_linf"]["status"] == "not run"
    assert {checks[c]["status"] for c in CHECKS - {"stronger_attack_linf"}} == {"pass"}


def test_checks_without_their_attacks_are_not_run():
    entries = parse_attacks(
        [
            {"label": "fgsm", "name": "fgsm", "eps": 4 / 255},  # not at the reference eps
            {"label": "pgd_linf", "name": "pgd", "eps": EPS, "alpha": 2 / 255, "steps": 1},
            {"label": "bpda_linf", "name": "bpda", "eps": EPS, "alpha": 2 / 255, "steps": 1},
        ]
    )
    clean = correct(8)
    runs = runs_of(fgsm=correct(2), pgd_linf=correct(4))  # BPDA did not run (no purifier)
    checks = check(clean, runs, [(0.0, clean)], [], entries=entries, reference=entries[1])
    assert {name: c["status"] for name, c in checks.items()} == dict.fromkeys(CHECKS, "not run")


def test_each_threat_model_gets_its_own_checks():
    entries = parse_attacks(
        [
            {"label": "pgd_linf", "name": "pgd", "eps": EPS, "alpha": 2 / 255, "steps": 1},
            {"label": "pgd_l2", "name": "pgd", "norm": "L2", "eps": 0.5, "alpha": 0.1, "steps": 1},
            {"label": "bpda_l2", "name": "bpda", "norm": "L2", "eps": 0.5, "alpha": 0.1, "steps": 1},
        ]
    )  # fmt: skip
    clean = correct(8)
    runs = runs_of(pgd_linf=correct(1), pgd_l2=correct(3), bpda_l2=correct(6))
    refs = [
        ReferenceRuns(entries[0], [(0.0, clean), (EPS, correct(1)), (64 / 255, correct(0))]),
        ReferenceRuns(entries[1], [(0.0, clean), (0.5, correct(3)), (4.0, correct(0))]),
    ]
    params = sanity_params(references=["pgd_linf", "pgd_l2"],
                           eps_sweep={"Linf": [0, EPS], "L2": [0, 0.5, 4.0]})  # fmt: skip
    checks = sanity_checks(clean, runs, entries, refs, params)
    assert checks["eps_monotonic_l2"]["status"] == "pass"
    assert "0->0.5" in checks["eps_monotonic_l2"]["detail"]
    assert checks["large_eps_near_zero_l2"]["status"] == "pass"
    assert checks["bpda_vs_exact_l2"]["status"] == "pass"
    assert checks["bpda_vs_exact_l2"]["stronger"] == "exact"
    assert checks["iterative_beats_single_step"]["status"] == "not run"  # no FGSM


def test_sweep_spec_scales_the_step_size_with_eps():
    spec = {"name": "pgd", "eps": EPS, "alpha": 2 / 255, "steps": 2}
    assert sweep_spec(spec, 16 / 255) == {
        "name": "pgd",
        "eps": 16 / 255,
        "alpha": pytest.approx(4 / 255),
        "steps": 2,
    }
    assert spec["eps"] == EPS  # not modified


def test_sanity_params_are_checked():
    assert sanity_params().eps_sweep == {"Linf": [0.0, EPS, pytest.approx(64 / 255)]}
    assert sanity_params().alpha == 0.05
    with pytest.raises(ParameterError, match=r"eps_sweep.Linf: \[8.0\] out of range"):
        sanity_params(eps_sweep={"Linf": [0, 8]})
    with pytest.raises(ParameterError, match="keys are threat models"):
        sanity_params(eps_sweep={"L1": [0, 1]})
    assert sanity_params(eps_sweep={"L2": [0, 0.5, 8.0]}).eps_sweep["L2"][-1] == 8.0
    with pytest.raises(ParameterError, match="unknown key 'n_images'.*Valid keys: .*images"):
        SanityParams.from_dict({**sanity_params().to_dict(), "n_images": 4})
    for alpha in (0, 1, 1.5):
        with pytest.raises(ParameterError, match="alpha"):
            sanity_params(alpha=alpha)


def _recording(calls: list, fake: bool):
    """A ``run_one`` that records its specs (and, ``fake``, returns all-wrong verdicts)."""

    def record(defense, label, spec, norm, eps, data, settings, validate=None):
        calls.append((label, dict(spec), eps))
        if fake:
            n, draws = len(data.labels), settings.draws if defense.stochastic else 1
            return AttackRun(torch.zeros(n, draws, dtype=torch.bool), data.images, 0.0, 0.0, spec)
        return run_one(defense, label, spec, norm, eps, data, settings, validate)

    return record


def test_sanity_runs_reuse_clean_and_reference_and_run_the_rest(
    checkpoint_files, cifar10_test_batch, monkeypatch
):
    images, labels = cifar10_test_batch[0][:8], cifar10_test_batch[1][:8]
    defense = Defense("standard", load_defense(checkpoint_files["classifier"]), False)
    data = EvalData(images, labels, list(range(8)), 10)
    settings = EvalSettings(batch_size=8, draws=2)
    reference = run_one(defense, "pgd_linf", REFERENCE.spec, "Linf", EPS, data, settings)
    assert reference.draws.shape == (8, 1)  # deterministic: one pass
    clean = correct(5, 8, draws=1)
    names, calls = [], []
    monkeypatch.setattr(sanity_module, "run_one", _recording(calls, fake=False))
    runs = sanity_runs(
        defense,
        REFERENCE,
        reference.draws,
        clean,
        [0.0, EPS, 32 / 255],
        data.head(4),  # the sanity checks run on the first images only
        sanity_params(stronger={"steps": 2, "eot_iter": 3}),
        settings,
        lambda *args: names.append(args[5]),
    )
    sweep, stronger = runs.sweep, runs.stronger
    assert runs.reference is REFERENCE
    assert [eps for eps, _ in sweep] == [0.0, EPS, 32 / 255]
    assert torch.equal(sweep[0][1], clean[:4])  # eps 0 is the clean verdict
    assert torch.equal(sweep[1][1], reference.draws[:4])  # the reference run is reused
    assert sweep[2][1].shape == (4, 1) and [(k, d.shape) for k, d in stronger] == [
        ("stronger", (4, 1))
    ]
    assert names == ["standard_pgd_linf_eps_32_255", "standard_pgd_linf_stronger"]
    (_, at_32, _), (_, strong, _) = calls
    assert at_32["alpha"] == pytest.approx(8 / 255) and at_32["eot_iter"] == 1
    # deterministic: more EOT samples are pointless, more steps are not
    assert (strong["steps"], strong["eot_iter"], strong["eps"]) == (2, 1, EPS)


def test_sanity_runs_keep_eot_for_stochastic_defenses_and_skip_an_empty_stronger(
    checkpoint_files, cifar10_test_batch, monkeypatch
):
    images, labels = cifar10_test_batch[0][:4], cifar10_test_batch[1][:4]
    model = load_defense(checkpoint_files["classifier"], checkpoint_files["purifier"])
    defense = Defense("atop", model, True)
    data = EvalData(images, labels, list(range(4)), 10)
    reference = AttackRun(correct(2, 4), images, 0.0, 0.0)  # [4, 2]: two draws
    calls = []
    monkeypatch.setattr(sanity_module, "run_one", _recording(calls, fake=True))
    args = (defense, REFERENCE, reference.draws, correct(3, 4), [0.0, EPS], data)
    settings = EvalSettings(batch_size=4, draws=2)
    runs = sanity_runs(*args, sanity_params(stronger={"steps": 4}), settings)
    assert calls == [("pgd_linf_stronger", {**REFERENCE.spec, "steps": 4}, EPS)]
    assert calls[0][1]["eot_iter"] == 2 and runs.stronger[0][1].shape == (4, 2)
    calls.clear()
    runs = sanity_runs(*args, sanity_params(), settings)
    assert calls == [] and runs.stronger == [] and len(runs.sweep) == 2


def _study(model: str, n: int = 6, norm: str = "Linf", eps: float = EPS, start: int = 10) -> dict:
    """A convergence-study record (:func:`atop.evaluation.convergence.study`) of ``n``
    images: PGD-1 and -3 at EOT 2 and PGD-1 at EOT 1 and 4 on every image, PGD-6 x EOT-8 on
    the images still standing."""

    def point(steps, eot, draws, attacked=None):
        return {"steps": steps, "eot": eot, "draws": draws, "attacked": attacked, "seconds": 0}

    points = {
        "1x1": point(1, 1, correct(3, n)),
        "1x2": point(1, 2, correct(2, n)),
        "3x2": point(3, 2, correct(1, n)),
        "1x4": point(1, 4, correct(0, n)),
        "6x8": point(6, 8, correct(0, n), attacked=torch.ones(n, dtype=torch.bool)),
    }
    return {
        "model": model,
        "indices": list(range(start, start + n)),
        "norms": {norm: {"eps": eps, "alpha": 0.01, "points": points, "headline": None}},
    }


def test_study_points_are_the_studys_stronger_attacks_on_the_same_images_and_weights():
    indices = list(range(10, 14))  # the sanity images: the study's first four
    # the reference is PGD-1 x EOT-2: the study's 3 steps at EOT 2 and 4 EOT at 1 step (the
    # cascade setting 6 x 8 ran on some images only: not a plain stronger attack)
    reference = parse_attacks(
        [{"label": "pgd_linf", "name": "pgd", "eps": EPS, "alpha": 2 / 255, "steps": 1,
          "eot_iter": 2}]
    )[0]  # fmt: skip
    points = sanity_module.study_points(_study("w"), reference, indices, "w")
    assert [label for label, _ in points] == [
        "pgd3_eot2 (convergence study)",
        "pgd1_eot4 (convergence study)",
    ]
    assert torch.equal(points[0][1], correct(1, 4)) and torch.equal(points[1][1], correct(0, 4))
    # the study does not fit: nothing is read from it
    for study, model in [
        (None, "w"),
        ({"skipped": "not listed"}, "w"),
        (_study("w"), "other weights"),  # a stale study
        (_study("w", norm="L2"), "w"),
        (_study("w", eps=16 / 255), "w"),
        (_study("w", start=20), "w"),  # other images
        (_study("w", n=3), "w"),  # fewer images than the sanity checks
    ]:
        assert sanity_module.study_points(study, reference, indices, model) == []


def test_sanity_runs_read_the_stronger_attack_from_a_fitting_study(
    checkpoint_files, cifar10_test_batch, monkeypatch
):
    from atop.checkpoint import state_hash

    images, labels = cifar10_test_batch[0][:4], cifar10_test_batch[1][:4]
    model = load_defense(checkpoint_files["classifier"], checkpoint_files["purifier"])
    defense = Defense("atop", model, True)
    data = EvalData(images, labels, list(range(10, 14)), 10)
    calls = []
    monkeypatch.setattr(sanity_module, "run_one", _recording(calls, fake=True))
    reference = parse_attacks(
        [{"label": "pgd_linf", "name": "pgd", "eps": EPS, "alpha": 2 / 255, "steps": 1,
          "eot_iter": 2}]
    )[0]  # fmt: skip
    args = (defense, reference, correct(2, 4), correct(3, 4), [0.0, EPS], data)
    settings, params = EvalSettings(batch_size=4, draws=2), sanity_params(stronger={"steps": 4})
    study = _study(state_hash(model.state_dict()))
    runs = sanity_runs(*args, params, settings, None, study)
    assert calls == []  # no attack ran: the study's verdicts are the stronger attacks
    assert [label for label, _ in runs.stronger] == [
        "pgd3_eot2 (convergence study)",
        "pgd1_eot4 (convergence study)",
    ]
    runs = sanity_runs(*args, params, settings, None, _study("stale weights"))
    assert [c[0] for c in calls] == ["pgd_linf_stronger"] and runs.stronger[0][0] == "stronger"

"""The gradient-masking sanity checks (:mod:`atop.evaluation.sanity`), without Kedro."""

from __future__ import annotations

import pytest
import torch

from atop import load_defense
from atop.evaluation import sanity as sanity_module
from atop.evaluation.defenses import Defense
from atop.evaluation.protocol import AttackRun, EvalData, EvalSettings, parse_attacks, run_one
from atop.evaluation.sanity import SanityParams, paired_rise, sanity_checks, sanity_runs, sweep_spec
from atop.params import ParameterError

EPS = 8 / 255
CHECKS = {
    "eps_monotonic",
    "large_eps_near_zero",
    "stronger_attack",
    "iterative_beats_single_step",
    "bpda_vs_exact",
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
        "reference": "pgd_linf",
        "eps_sweep": [0, EPS, "64/255"],
        "stronger": {},
        "images": None,
        "large_eps_max_acc": 0.05,
        "z": 2.0,
        "min_images": 1,
    }
    return SanityParams(**{**values, **changes})


def correct(n_true: int, n: int = 10) -> torch.Tensor:
    """The first ``n_true`` of ``n`` images correct."""
    return torch.arange(n) < n_true


def runs_of(**verdicts: torch.Tensor) -> dict[str, AttackRun]:
    return {k: AttackRun(v, torch.zeros(len(v), 3, 2, 2), 0.0, 0.0) for k, v in verdicts.items()}


def test_paired_rise_tolerates_sampling_noise_only():
    # a rise of 4 images with 4 changed verdicts is noise (2·√4 = 4), 6 of 6 is not (4.9)
    before, after = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool), torch.ones(6, dtype=bool)
    assert paired_rise(before, after, z=2.0, min_images=1) == {
        "rise_images": 4,
        "allowed_images": 4.0,
        "within_noise": True,
    }
    rise = paired_rise(torch.zeros(6, dtype=torch.bool), after, z=2.0, min_images=1)
    assert rise == {"rise_images": 6, "allowed_images": 4.899, "within_noise": False}
    # a fall is never a problem; with no changed verdict, min_images is what is tolerated
    assert paired_rise(after, ~after, z=2.0, min_images=1)["within_noise"]
    assert paired_rise(after, after, z=2.0, min_images=3)["allowed_images"] == 3.0
    # a single lucky image is tolerated even with z = 0
    assert paired_rise(correct(3), correct(4), z=0.0, min_images=1)["within_noise"]
    assert not paired_rise(correct(3), correct(5), z=0.0, min_images=1)["within_noise"]


def test_an_honest_defense_passes_every_check():
    clean, reference = correct(8), correct(4)
    runs = runs_of(
        fgsm=correct(6, 12), pgd_linf=correct(4, 12), bpda_linf=correct(5, 12)
    )  # the runs cover more images than the sanity checks: the first 10 are compared
    sweep = [(0.0, clean), (EPS, reference), (64 / 255, correct(0))]
    checks = sanity_checks(clean, runs, ENTRIES, sweep, correct(3), REFERENCE, sanity_params())
    assert set(checks) == CHECKS
    assert {name: c["status"] for name, c in checks.items()} == dict.fromkeys(CHECKS, "pass")
    assert checks["bpda_vs_exact"]["stronger"] == "exact"
    assert all(c["n_images"] == 10 for c in checks.values())
    assert "0/255->8/255: -4 img" in checks["eps_monotonic"]["detail"]
    assert "at eps 64/255 (limit 0.05)" in checks["large_eps_near_zero"]["detail"]


def test_masked_gradients_fail_the_checks():
    n = 20
    clean, reference = correct(16, n), correct(6, n)
    runs = runs_of(fgsm=correct(0, n), pgd_linf=reference, bpda_linf=correct(0, n))
    # accuracy rises with eps and stays high at 64/255; more steps raise it
    sweep = [(0.0, clean), (EPS, correct(0, n)), (64 / 255, correct(n, n))]
    checks = sanity_checks(clean, runs, ENTRIES, sweep, correct(n, n), REFERENCE, sanity_params())
    assert {name: c["status"] for name, c in checks.items()} == dict.fromkeys(CHECKS, "fail")
    assert checks["bpda_vs_exact"]["stronger"] == "bpda"  # BPDA beats the exact gradients
    assert "8/255->64/255: +20 img (allowed +8.944)" in checks["eps_monotonic"]["detail"]
    assert "robust acc 1.000 at eps 64/255" in checks["large_eps_near_zero"]["detail"]
    assert "+14 img, allowed +7.483" in checks["stronger_attack"]["detail"]


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
    checks = sanity_checks(clean, runs, entries, [(0.0, clean)], None, entries[1], sanity_params())
    assert {name: c["status"] for name, c in checks.items()} == dict.fromkeys(CHECKS, "not run")


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
    assert sanity_params().eps_sweep == [0.0, EPS, pytest.approx(64 / 255)]
    with pytest.raises(ParameterError, match=r"eps_sweep\[1\]=8.0 is out of range"):
        sanity_params(eps_sweep=[0, 8])
    with pytest.raises(ParameterError, match="unknown key 'n_images'.*Valid keys: .*images"):
        SanityParams.from_dict({**sanity_params().to_dict(), "n_images": 4})


def _recording(calls: list, fake: bool):
    """A ``run_one`` that records its specs (and, ``fake``, returns all-wrong verdicts)."""

    def record(defense, label, spec, norm, eps, data, settings, validate=None):
        calls.append((label, dict(spec), eps))
        if fake:
            n = len(data.labels)
            return AttackRun(torch.zeros(n, dtype=torch.bool), data.images, 0.0, 0.0, spec)
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
    clean = correct(5, 8)
    names, calls = [], []
    monkeypatch.setattr(sanity_module, "run_one", _recording(calls, fake=False))
    sweep, stronger = sanity_runs(
        defense,
        REFERENCE,
        {"pgd_linf": reference},
        clean,
        [0.0, EPS, 32 / 255],
        data.head(4),  # the sanity checks run on the first images only
        sanity_params(stronger={"steps": 2, "eot_iter": 3}),
        settings,
        lambda *args: names.append(args[5]),
    )
    assert [eps for eps, _ in sweep] == [0.0, EPS, 32 / 255]
    assert torch.equal(sweep[0][1], clean[:4])  # eps 0 is the clean verdict
    assert torch.equal(sweep[1][1], reference.correct[:4])  # the reference run is reused
    assert sweep[2][1].shape == (4,) and stronger.shape == (4,)
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
    reference = AttackRun(correct(2, 4), images, 0.0, 0.0)
    calls = []
    monkeypatch.setattr(sanity_module, "run_one", _recording(calls, fake=True))
    args = (defense, REFERENCE, {"pgd_linf": reference}, correct(3, 4), [0.0, EPS], data)
    settings = EvalSettings(batch_size=4, draws=2)
    sweep, stronger = sanity_runs(*args, sanity_params(stronger={"steps": 4}), settings)
    assert calls == [("pgd_linf_stronger", {**REFERENCE.spec, "steps": 4}, EPS)]
    assert calls[0][1]["eot_iter"] == 2 and stronger is not None
    calls.clear()
    sweep, stronger = sanity_runs(*args, sanity_params(), settings)
    assert calls == [] and stronger is None and len(sweep) == 2

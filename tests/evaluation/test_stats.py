"""The report's statistics (:mod:`atop.evaluation.stats`): exact intervals and exact McNemar
tests, checked against scipy and against published values."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as scipy_stats

from atop.evaluation.stats import (
    McNemar,
    accuracy_ci,
    clopper_pearson,
    hierarchical_bootstrap,
    holm,
    mcnemar,
    paired_test,
    seed_summary,
    standard_error,
)


def _bools(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (3, 8), (5, 10), (118, 256), (255, 256)])
def test_clopper_pearson_equals_scipys_exact_interval(k, n):
    expected = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    low, high = clopper_pearson(k, n)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert 0 <= low <= k / n <= high <= 1
    other = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
    assert clopper_pearson(k, n, level=0.9) == pytest.approx((other.low, other.high), abs=1e-12)


def test_clopper_pearson_known_values():
    # tabulated exact 95 % intervals (e.g. Clopper & Pearson 1934; the "rule of three" edge)
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.30850), abs=1e-5)
    assert clopper_pearson(10, 10) == pytest.approx((0.69150, 1.0), abs=1e-5)
    assert clopper_pearson(5, 10) == pytest.approx((0.18709, 0.81291), abs=1e-5)
    assert clopper_pearson(1, 20) == pytest.approx((0.00127, 0.24873), abs=1e-5)
    # more images: a narrower interval around the same accuracy
    narrow, wide = clopper_pearson(50, 100), clopper_pearson(5, 10)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


def test_clopper_pearson_accepts_fractional_counts_between_the_integer_ones():
    low, high = clopper_pearson(4.5, 10)  # a sum of single-draw accuracies
    assert clopper_pearson(4, 10)[0] < low < clopper_pearson(5, 10)[0]
    assert clopper_pearson(4, 10)[1] < high < clopper_pearson(5, 10)[1]
    for successes, n in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(ValueError, match="successes <= n"):
            clopper_pearson(successes, n)


def test_mcnemar_counts_the_discordant_images_and_matches_binomtest():
    a = _bools(1, 1, 1, 1, 1, 1, 0, 0, 1, 0)
    b = _bools(0, 0, 0, 0, 0, 1, 1, 0, 1, 0)
    test = mcnemar(a, b)
    assert isinstance(test, McNemar) and (test.only_a, test.only_b) == (5, 1)
    assert test.difference == 4
    assert test.p_value == pytest.approx(scipy_stats.binomtest(5, 6, 0.5).pvalue)
    assert test.p_value == pytest.approx(14 / 64)  # 2 * P(X >= 5), X ~ Bin(6, 1/2)
    # two-sided: symmetric; one-sided: "a right more often than b"
    assert mcnemar(b, a).p_value == pytest.approx(test.p_value)
    greater = mcnemar(a, b, alternative="greater")
    assert greater.p_value == pytest.approx(7 / 64)
    assert greater.p_value == pytest.approx(
        scipy_stats.binomtest(5, 6, 0.5, alternative="greater").pvalue
    )
    assert mcnemar(b, a, alternative="greater").p_value == pytest.approx(63 / 64)
    # concordant images only: no evidence either way
    assert mcnemar(a, a) == McNemar(0, 0, 1.0)
    # integer 0/1 verdicts are read as booleans
    assert mcnemar(a.long(), b.long()) == test


def test_mcnemar_refuses_unpaired_verdicts():
    with pytest.raises(ValueError, match="same"):
        mcnemar(_bools(1, 0, 1), _bools(1, 0))
    with pytest.raises(ValueError, match="same"):
        mcnemar(torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool))


def test_accuracy_ci_and_standard_error_of_per_image_scores():
    verdicts = _bools(1, 1, 1, 0, 0, 0, 0, 0)
    acc, low, high = accuracy_ci(verdicts)
    assert acc == 3 / 8 and (low, high) == pytest.approx(clopper_pearson(3, 8))
    fractions = torch.tensor([1.0, 0.5, 0.5, 0.0])  # single-draw accuracies
    acc, low, high = accuracy_ci(fractions)
    assert acc == 0.5 and (low, high) == pytest.approx(clopper_pearson(2.0, 4))
    assert standard_error(verdicts) == pytest.approx(math.sqrt(3 / 8 * 5 / 8 / 8))
    assert standard_error(torch.ones(5)) == 0.0


def test_paired_test_on_0_1_verdicts_is_the_exact_mcnemar_test():
    a = _bools(1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 1, 1)
    b = _bools(0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1)
    for alternative in ("two-sided", "greater", "less"):
        test = paired_test(a.float(), b.float(), alternative=alternative)
        assert test.exact and test.n_nonzero == 6
        assert test.p_value == pytest.approx(mcnemar(a, b, alternative).p_value, abs=1e-12)
    test = paired_test(a.float(), b.float())
    assert test.delta == pytest.approx(4 / 12)
    assert test.ci[0] <= test.delta <= test.ci[1]
    assert paired_test(a.float(), a.float()).p_value == 1.0  # no difference, nothing to flip


def test_paired_test_on_single_draw_fractions_matches_a_brute_force_sign_flip():
    a = torch.tensor([0.9, 0.5, 0.3, 0.7, 0.2, 0.0, 0.4])
    b = torch.tensor([0.6, 0.5, 0.1, 0.8, 0.0, 0.0, 0.1])
    diff = (a - b).double()
    nonzero = diff[diff != 0]
    observed = abs(float(nonzero.sum()))
    signs = torch.tensor(
        [
            [1 if (k >> i) & 1 else -1 for i in range(len(nonzero))]
            for k in range(2 ** len(nonzero))
        ],
        dtype=torch.float64,
    )
    expected = float(((signs @ nonzero).abs() >= observed - 1e-12).double().mean())
    test = paired_test(a, b)
    assert test.exact and test.p_value == pytest.approx(expected)
    # many differing images: a Monte Carlo test close to the normal approximation
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(200, generator=generator)
    y = (x - 0.03 + 0.2 * torch.randn(200, generator=generator)).clamp(0, 1)
    mc = paired_test(x, y)
    d = (x - y).double()
    z = float(d.mean() / (d.std() / 200**0.5))
    normal = 2 * scipy_stats.norm.sf(abs(z))
    assert not mc.exact and mc.p_value == pytest.approx(normal, abs=0.02)
    assert mc.ci[0] < float(d.mean()) < mc.ci[1]
    with pytest.raises(ValueError, match="same"):
        paired_test(x, y[:10])


def test_holm_adjusts_a_family_step_down():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1, made monotone
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert holm({"only": 0.2}) == {"only": 0.2}
    assert holm({"a": 0.6, "b": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0})


def test_hierarchical_bootstrap_widens_with_the_seed_variance():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 300, generator=generator)
    same = images.repeat(5, 1)
    # five seeds of an arm 2 points better on every image, no seed-to-seed variance
    tight = hierarchical_bootstrap(same + 0.02, same, resamples=2000)
    assert tight["delta"] == pytest.approx(0.02) and tight["seed_sd"] == pytest.approx(0.0)
    assert tight["ci"][0] == pytest.approx(0.02) and tight["ci"][1] == pytest.approx(0.02)
    # the same mean difference, but seeds that disagree by +-8 points: no longer shown
    offsets = torch.tensor([0.1, -0.06, 0.1, -0.06, 0.02])[:, None]
    loose = hierarchical_bootstrap(same + offsets, same, resamples=2000)
    assert loose["delta"] == pytest.approx(0.02)
    assert loose["ci"][0] < 0 < loose["ci"][1] and loose["seed_sd"] > 0.07
    with pytest.raises(ValueError, match=r"\[S, N\]"):
        hierarchical_bootstrap(images[0], images[0])


def test_seed_summary_gives_the_mean_and_the_sample_sd():
    summary = seed_summary([0.1, 0.2, 0.3])
    assert summary == pytest.approx({"mean": 0.2, "sd": 0.1, "seeds": 3})
    assert seed_summary([0.4])["sd"] == 0.0

"""The report's statistics (:mod:`atop.evaluation.stats`): exact intervals and exact McNemar
tests, checked against scipy and against published values."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as scipy_stats

from atop.evaluation.stats import McNemar, accuracy_ci, clopper_pearson, mcnemar, standard_error


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

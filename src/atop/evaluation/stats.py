"""The statistics of the report: exact confidence intervals and paired exact tests.

* :func:`clopper_pearson`: the exact binomial 95 % interval of an accuracy over ``n``
  images. For a single-draw accuracy (the mean over images of each image's fraction of
  correct draws) the same interval is used with the fractional count: the per-image
  fractions vary no more than 0/1 verdicts with the same mean, so it is conservative.
* :func:`mcnemar`: the exact McNemar test of two paired 0/1 verdict vectors (same images):
  a two-sided binomial test of the discordant pairs (``scipy.stats.binomtest``).
* :func:`paired_test`: the test of the numbers the report prints: the mean difference of two
  per-image score vectors on the same images (single-draw fractions, or 0/1 verdicts), its
  95 % paired bootstrap interval over images, and a sign-flip permutation test of the
  per-image differences (exact when at most :data:`EXACT_FLIPS` differences are non-zero;
  on 0/1 verdicts it is the exact McNemar test).
* :func:`holm`: Holm's step-down adjustment of a family of p-values.
* :func:`hierarchical_bootstrap`: an interval for a mean difference that covers both the
  training-seed and the image variance (seeds and images resampled, both paired).

Core module: torch, numpy and scipy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

#: A sign-flip test enumerates all 2**m sign patterns when m <= this many differences are
#: non-zero (65,536 patterns), and draws :data:`RESAMPLES` random patterns otherwise.
EXACT_FLIPS = 16
#: Random sign patterns / bootstrap resamples when the exact enumeration is too large.
RESAMPLES = 100_000


def clopper_pearson(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval of a proportion, in ``[0, 1]``.

    Args:
        successes: correct images (may be fractional: a sum of single-draw accuracies).
        n: images.
        level: coverage (0.95).

    Raises:
        ValueError: ``n < 1`` or ``successes`` outside ``[0, n]``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"Need 0 <= successes <= n and n >= 1, got {successes} of {n}.")
    alpha = 1.0 - level
    low = 0.0 if successes <= 0 else float(stats.beta.ppf(alpha / 2, successes, n - successes + 1))
    high = (
        1.0
        if successes >= n
        else float(stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    )
    return low, high


@dataclass(frozen=True)
class McNemar:
    """An exact McNemar test of ``a`` vs ``b`` on the same images.

    Attributes:
        only_a: images right under ``a`` only; only_b: right under ``b`` only.
        p_value: two-sided exact p-value (1.0 without discordant images).
    """

    only_a: int
    only_b: int
    p_value: float

    @property
    def difference(self) -> int:
        """``only_a - only_b``: how many more images ``a`` gets right."""
        return self.only_a - self.only_b


def mcnemar(a: Tensor, b: Tensor, alternative: str = "two-sided") -> McNemar:
    """Exact McNemar test of two bool ``[N]`` verdict vectors on the same images
    (``alternative="greater"``: ``a`` right more often than ``b``).

    Raises:
        ValueError: shapes differ or are not ``[N]``.
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"Paired verdicts need the same [N] shape, got {a.shape} and {b.shape}.")
    a, b = a.bool(), b.bool()
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    if only_a + only_b == 0:
        return McNemar(only_a, only_b, 1.0)
    p_value = stats.binomtest(only_a, only_a + only_b, 0.5, alternative=alternative).pvalue
    return McNemar(only_a, only_b, float(p_value))


def accuracy_ci(per_image: Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """``(accuracy, low, high)`` of per-image scores in ``[0, 1]`` (0/1 verdicts or
    single-draw fractions) with :func:`clopper_pearson`."""
    scores = per_image.float()
    total = float(scores.sum())
    low, high = clopper_pearson(total, len(scores), level)
    return total / len(scores), low, high


def standard_error(per_image: Tensor) -> float:
    """The binomial standard error ``sqrt(p (1 - p) / n)`` of an accuracy (an upper bound for
    single-draw fractions)."""
    p = float(per_image.float().mean())
    return float(torch.tensor(p * (1 - p) / len(per_image)).sqrt())


def paired_se(a: Tensor, b: Tensor) -> float:
    """The standard error of the mean per-image difference ``a - b`` (float ``[N]`` scores
    on the same images): ``sd(a - b) / sqrt(N)`` with the ``N - 1`` denominator (0 for
    ``N < 2``)."""
    diff = (a.double() - b.double()).flatten()
    if len(diff) < 2:
        return 0.0
    return float(diff.std(unbiased=True) / len(diff) ** 0.5)


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of two per-image score vectors (:func:`paired_test`).

    Attributes:
        delta: mean of ``a - b`` (in the scores' unit: fractions in ``[-1, 1]``).
        ci: ``(low, high)`` percentile interval of ``delta`` from a paired bootstrap over
            images (``level``).
        p_value: two-sided sign-flip permutation p-value of the per-image differences.
        n: images; n_nonzero: images whose difference is not 0 (the only ones a sign flip
            moves); exact: whether every sign pattern was enumerated.
    """

    delta: float
    ci: tuple[float, float]
    p_value: float
    n: int
    n_nonzero: int
    exact: bool

    def to_dict(self) -> dict[str, float | int | bool | list[float]]:
        """JSON-ready fields."""
        return {
            "delta": self.delta,
            "ci": list(self.ci),
            "p_value": self.p_value,
            "n": self.n,
            "n_nonzero": self.n_nonzero,
            "exact": self.exact,
        }


def _flip_p_value(diff: np.ndarray, alternative: str, seed: int) -> tuple[float, bool]:
    """Sign-flip permutation p-value of the sum of the non-zero ``diff``: every sign pattern
    when there are at most :data:`EXACT_FLIPS`, else :data:`RESAMPLES` random ones (with the
    +1 correction of Phipson & Smyth 2010)."""
    nonzero = diff[diff != 0]
    m = len(nonzero)
    if m == 0:
        return 1.0, True
    observed = nonzero.sum()
    exact = m <= EXACT_FLIPS
    if exact:
        patterns = ((np.arange(2**m)[:, None] >> np.arange(m)) & 1) * 2 - 1
    else:
        patterns = np.random.default_rng(seed).integers(0, 2, size=(RESAMPLES, m)) * 2 - 1
    null = patterns @ nonzero
    tol = 1e-12 * max(1.0, abs(observed))
    if alternative == "two-sided":
        hits = int((np.abs(null) >= abs(observed) - tol).sum())
    elif alternative == "greater":
        hits = int((null >= observed - tol).sum())
    elif alternative == "less":
        hits = int((null <= observed + tol).sum())
    else:
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    if exact:
        return hits / len(null), True
    return (hits + 1) / (len(null) + 1), False


def paired_test(
    a: Tensor,
    b: Tensor,
    *,
    level: float = 0.95,
    alternative: str = "two-sided",
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedTest:
    """Compare per-image scores ``a`` and ``b`` (float or bool ``[N]`` in ``[0, 1]``, the same
    images): ``delta = mean(a - b)``, its paired bootstrap interval, and a sign-flip test.

    The test flips the sign of each image's difference independently (under H0 the two
    scores of an image are exchangeable); zero differences never move, so only the ``m``
    non-zero ones count: every pattern is enumerated for ``m <=`` :data:`EXACT_FLIPS` (an
    exact test; on 0/1 verdicts it is the exact McNemar test), else :data:`RESAMPLES` random
    patterns (p-value with the +1 correction). The interval resamples images with
    replacement (``resamples`` times, percentile method).

    Args:
        alternative: ``"two-sided"``, ``"greater"`` (``a`` above ``b``) or ``"less"``.

    Raises:
        ValueError: shapes differ or are not ``[N]`` with ``N >= 1``.
    """
    if a.shape != b.shape or a.dim() != 1 or len(a) == 0:
        raise ValueError(f"Paired scores need the same [N] shape, got {a.shape} and {b.shape}.")
    diff = (a.double() - b.double()).numpy()
    p_value, exact = _flip_p_value(diff, alternative, seed)
    rng = np.random.default_rng(seed)
    n = len(diff)
    means = diff[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedTest(
        float(diff.mean()), (float(low), float(high)), p_value, n, int((diff != 0).sum()), exact
    )


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values of a family (name -> p): sorted ascending, the
    i-th (0-based) of m is multiplied by ``m - i``, made monotone and capped at 1. A test
    is significant at level α when its adjusted p-value is below α (family-wise error ≤ α).
    """
    order = sorted(p_values, key=lambda k: p_values[k])
    m, running, adjusted = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        adjusted[key] = running
    return {key: adjusted[key] for key in p_values}


def hierarchical_bootstrap(
    a: Tensor,
    b: Tensor,
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """A percentile interval for ``mean(a) - mean(b)`` over training seeds AND images.

    Args:
        a, b: float ``[S, N]`` per-seed, per-image scores of two arms on the same ``N``
            images; seed ``s`` of ``a`` and of ``b`` share their seed (data order, attack
            and transform draws), so seeds are paired, as are images.

    Each resample draws ``S`` seeds with replacement and, independently, ``N`` images with
    replacement (the same images for every seed and both arms), and takes the mean
    difference over the drawn cells. Resampling both levels counts the image variance once
    more inside the seed means, so the interval is slightly conservative (Ren et al. 2010,
    "Nonparametric bootstrapping for hierarchical data").

    Returns:
        ``{"delta", "ci": [low, high], "seed_sd"}`` (``seed_sd``: the sd over seeds of the
        per-seed mean difference).

    Raises:
        ValueError: shapes differ or are not ``[S, N]``.
    """
    if a.shape != b.shape or a.dim() != 2 or 0 in a.shape:
        raise ValueError(f"Need two [S, N] score matrices of one shape, got {a.shape}, {b.shape}.")
    diff = (a.double() - b.double()).numpy()
    n_seeds, n_images = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        images = rng.integers(0, n_images, n_images)
        means[r] = diff[np.ix_(seeds, images)].mean()
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    per_seed = diff.mean(axis=1)
    sd = float(per_seed.std(ddof=1)) if n_seeds > 1 else 0.0
    return {"delta": float(diff.mean()), "ci": [float(low), float(high)], "seed_sd": sd}


def seed_summary(scores: Sequence[float]) -> dict[str, float]:
    """Mean and sample sd (``ddof=1``; 0 for one value) of per-seed accuracies."""
    values = np.asarray(list(scores), dtype=float)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "sd": sd, "seeds": len(values)}

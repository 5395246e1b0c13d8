"""The statistics of the report: exact confidence intervals and paired exact tests.

* :func:`clopper_pearson`: the exact binomial 95 % interval of an accuracy over ``n``
  images. For a single-draw accuracy (the mean over images of each image's fraction of
  correct draws) the same interval is used with the fractional count: the per-image
  fractions vary no more than 0/1 verdicts with the same mean, so it is conservative.
* :func:`mcnemar`: the exact McNemar test of two paired 0/1 verdict vectors (same images):
  a two-sided binomial test of the discordant pairs (``scipy.stats.binomtest``).

Core module: torch and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy import stats
from torch import Tensor


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

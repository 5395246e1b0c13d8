"""Nodes of the PGD adversarial-training baseline (Madry et al., ICLR 2018).

Thin callers of :mod:`atop.trainers.pgd_at`, then the quick check
(:func:`atop.trainers.quick_check.robust_quick_check`: clean accuracy on the full test set,
PGD-20 on the first images of ``monitor_indices``); the full robustness evaluation is the
evaluation stage's. Plain functions, no Kedro imports.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from atop.pipelines import history_seconds
from atop.trainers import pgd_at
from atop.trainers.pgd_at import PGDATParams
from atop.trainers.quick_check import robust_quick_check


def train_pgd_at(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    monitor_indices: list[int],
    params: PGDATParams,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`atop.trainers.pgd_at.train_pgd_at`, monitored on ``monitor_indices``; the history
    as a DataFrame (``epoch, loss, adv_acc, test_acc, lr, seconds``)."""
    checkpoint, history = pgd_at.train_pgd_at(
        train_set, test_set, class_names, monitor_indices, params
    )
    return pd.DataFrame(history), checkpoint  # the checkpoint saved last


def quick_check_pgd_at(
    classifier: dict[str, Any],
    test_set: dict[str, torch.Tensor],
    monitor_indices: list[int],
    history: pd.DataFrame,
    params: PGDATParams,
) -> dict[str, Any]:
    """The quick check of the PGD-AT classifier (``params.robust_eval``)."""
    check = params.robust_eval
    seconds = history_seconds(history)
    return robust_quick_check(classifier, test_set, monitor_indices, params, check, seconds)

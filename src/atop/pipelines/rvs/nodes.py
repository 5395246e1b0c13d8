"""Nodes of the Robustness-via-Synthesis baseline (Baytaş & Deb, Neurocomputing 2023).

Thin callers of :mod:`atop.trainers.rvs`, then the quick check
(:func:`atop.trainers.quick_check.robust_quick_check`). Label smoothing inflates PGD accuracy
(method.md §2): the evaluation stage judges RvS with AutoAttack. Plain functions, no Kedro
imports.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from atop.pipelines import history_seconds
from atop.trainers import rvs
from atop.trainers.quick_check import robust_quick_check
from atop.trainers.rvs import RvSParams


def train_rvs(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    monitor_indices: list[int],
    params: RvSParams,
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """:func:`atop.trainers.rvs.train_rvs`, monitored on ``monitor_indices``; the history as a
    DataFrame (``epoch, loss, ce, ot, adv_acc, generator_ot, test_acc, lr, seconds``)."""
    classifier, generator, history = rvs.train_rvs(
        train_set, test_set, class_names, monitor_indices, params
    )
    return pd.DataFrame(history), generator, classifier  # the classifier saved last


def quick_check_rvs(
    classifier: dict[str, Any],
    test_set: dict[str, torch.Tensor],
    monitor_indices: list[int],
    history: pd.DataFrame,
    params: RvSParams,
) -> dict[str, Any]:
    """The quick check of the RvS classifier (``params.robust_eval``)."""
    check = params.robust_eval
    seconds = history_seconds(history)
    return robust_quick_check(classifier, test_set, monitor_indices, params, check, seconds)

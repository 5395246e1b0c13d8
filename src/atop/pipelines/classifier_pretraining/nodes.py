"""Nodes of the classifier pretraining stage: standard (non-robust) training of ``f``.

Thin callers of :mod:`atop.trainers.classifier`; this module only turns the per-epoch
history into the CSV's DataFrame. Plain functions, no Kedro imports.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from atop.pipelines import history_seconds
from atop.trainers import classifier as trainer
from atop.trainers.classifier import ClassifierParams

#: History columns written to classifier_history.csv, in order.
HISTORY_COLUMNS = ["epoch", "loss", "train_acc", "test_acc", "lr", "seconds"]


def train_classifier(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    monitor_indices: list[int],
    params: ClassifierParams,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`atop.trainers.classifier.train_classifier`: the history as a DataFrame with
    :data:`HISTORY_COLUMNS`, then the checkpoint (saved last: a failed save of the history
    leaves the previous checkpoint)."""
    checkpoint, history = trainer.train_classifier(
        train_set, test_set, class_names, monitor_indices, params
    )
    return pd.DataFrame(history)[HISTORY_COLUMNS], checkpoint


def evaluate_classifier(
    classifier: dict[str, Any],
    test_set: dict[str, torch.Tensor],
    history: pd.DataFrame,
    params: ClassifierParams,
) -> dict[str, Any]:
    """:func:`atop.trainers.classifier.evaluate_classifier` (clean accuracy, full test set),
    with the training time from the history."""
    return trainer.evaluate_classifier(classifier, test_set, params, history_seconds(history))

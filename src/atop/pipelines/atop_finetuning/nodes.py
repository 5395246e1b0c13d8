"""Node of the AToP fine-tuning stage (paper Eq. 9, Algorithm 1).

A thin caller of :func:`atop.trainers.atop.finetune_purifier`; this module turns the history
into the CSV's DataFrame. Plain functions, no Kedro imports.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from torch import Tensor

from atop.trainers import atop as trainer
from atop.trainers.atop import AToPParams


def finetune_purifier(
    classifier: dict[str, Any],
    purifier: dict[str, Any],
    train_set: dict[str, Tensor],
    class_names: list[str],
    params: AToPParams,
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """:func:`atop.trainers.atop.finetune_purifier`; the history as a DataFrame."""
    checkpoint, history, metrics = trainer.finetune_purifier(
        classifier, purifier, train_set, class_names, params
    )
    return checkpoint, pd.DataFrame(history), metrics

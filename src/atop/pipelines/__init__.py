"""The Kedro pipelines of atop, one sub-package per stage (registered in atop.pipeline_registry)."""

from __future__ import annotations

import pandas as pd


def history_seconds(history: pd.DataFrame | None) -> float | None:
    """The training time of a stage from its history CSV: the sum of its epochs' ``seconds``
    (the one count, :func:`atop.training.training_seconds`; timings stay out of the
    checkpoints so a retrain with the same settings writes the same bytes)."""
    if history is None or "seconds" not in history:
        return None
    return float(history["seconds"].sum())

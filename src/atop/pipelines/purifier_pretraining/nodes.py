"""Nodes of the purifier pretraining stage: train ``g`` (and ``D``) to restore ``x`` from ``t(x)``.

Thin callers of :mod:`atop.trainers.purifier` (paper Eq. 8); this module turns the history
into the CSV's DataFrame and draws the samples figure. Plain functions, no Kedro imports.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from atop.pipelines import history_seconds
from atop.trainers import purifier as trainer
from atop.trainers.purifier import PurifierParams, psnr

#: History columns written to purifier_history.csv, in order.
HISTORY_COLUMNS = ["epoch", "loss", "l1", "gan_g", "d_loss", "val_psnr", "lr", "seconds"]


def train_purifier(
    train_set: dict[str, Tensor],
    test_set: dict[str, Tensor],
    monitor_indices: list[int],
    params: PurifierParams,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`atop.trainers.purifier.train_purifier`: the history with
    :data:`HISTORY_COLUMNS`, then the checkpoint (saved last)."""
    checkpoint, history = trainer.train_purifier(train_set, test_set, monitor_indices, params)
    return pd.DataFrame(history)[HISTORY_COLUMNS], checkpoint


def evaluate_purifier(
    purifier: dict[str, Any],
    classifier: dict[str, Any],
    test_set: dict[str, Tensor],
    eval_indices: list[int],
    history: pd.DataFrame,
    params: PurifierParams,
) -> tuple[dict[str, Any], Figure]:
    """:func:`atop.trainers.purifier.evaluate_purifier`'s metrics and the samples figure
    (clean, transformed with grey holes, purified; ``sample_images`` columns)."""
    seconds = history_seconds(history)
    result = trainer.evaluate_purifier(
        purifier, classifier, test_set, eval_indices, params, seconds
    )
    transform = result.metrics["transform"]
    figure = samples_figure(
        result.clean,
        result.transformed,
        result.purified,
        title=f"{transform['kind'].upper()} {_describe(transform)}: mean PSNR "
        f"{result.metrics['psnr']:.2f} dB on {result.metrics['n_val']} held-out test images",
    )
    return result.metrics, figure


def samples_figure(clean: Tensor, transformed: Tensor, purified: Tensor, title: str) -> Figure:
    """Clean, transformed and purified images side by side (one column per image).

    Args:
        clean, transformed, purified: float ``[n, 3, H, W]`` in [0, 1] (any device), n >= 1.
        title: the figure's title.

    Returns:
        A headless matplotlib figure (no pyplot state; rendered with Agg on save), 3 rows x
        n columns, each purified image titled with its PSNR.
    """
    n = len(clean)
    figure = Figure(figsize=(1.6 * n + 0.8, 5.6), layout="constrained")
    axes = figure.subplots(3, n, squeeze=False)
    rows = (("clean x", clean), ("t(x), holes grey", transformed), ("g(t(x))", purified))
    scores = psnr(purified, clean).tolist()
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 2:
                ax.set_title(f"{scores[c]:.1f} dB", fontsize=9)
        axes[r][0].set_ylabel(label, fontsize=10)
    figure.suptitle(title, fontsize=10)
    return figure


def _describe(transform: dict[str, Any]) -> str:
    parts = [f"sigma={transform['sigma']}", f"r={transform['missing_rate']}"]
    if transform["kind"] == "rt3":
        parts.append(f"N={transform['mask_number']}")
    if transform["kind"] == "rt1":
        parts = parts[1:]
    return ", ".join(parts)

"""Node of the sigma ablation: the purifier pretrained with another random transform.

The base transform adds the authors' noise (sigma 0.25 at 256 px, 0.03125 at 32 px:
``noise_resolution: 256``, method.md §5.1). The ablation pretrains the same purifier, with
the same settings, on sigma 0.25 added at 32 px (the project's earlier default) and
fine-tunes it with AToP, so the report shows what the harsher noise costs. Plain
functions, no Kedro imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import Tensor

from atop.params import Params
from atop.pipelines.purifier_pretraining.nodes import train_purifier
from atop.trainers.purifier import PurifierParams
from atop.transforms import TransformConfig


@dataclass(init=False, frozen=True)
class SigmaAblationParams(Params):
    """``sigma_ablation`` (conf/base/parameters_sigma_ablation.yml): the ablation's transform."""

    KEY = "sigma_ablation"

    transform: TransformConfig


def train_ablation_purifier(
    train_set: dict[str, Tensor],
    test_set: dict[str, Tensor],
    monitor_indices: list[int],
    params: PurifierParams,
    ablation: SigmaAblationParams,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Purifier pretraining (``params``) with the ablation's transform instead of the base one."""
    resume = params.resume_path and params.resume_path.replace(".pt", "_sigma025.pt")
    ablated = params.replace(transform=ablation.transform, resume_path=resume)
    return train_purifier(train_set, test_set, monitor_indices, ablated)

"""Node of the noise ablations: the purifier pretrained with another random transform.

The base transform adds the authors' noise (sigma 0.25 referred to 256 px, method.md §5.1,
§6.1) by the route of ``purifier_pretraining.transform.noise_route``. Each ablation of
``noise_ablation.ablations`` pretrains the same purifier, with the same settings, on its own
transform and fine-tunes it with AToP, so the report shows what the noise's reading costs
or buys: ``sigma025`` adds sigma 0.25 at 32 px (8x the authors' effective noise, the
project's first default); ``upsample`` / ``box`` is the other route of the authors' noise
at the working resolution. Plain functions, no Kedro imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import Tensor

from atop.params import Params
from atop.pipelines.purifier_pretraining.nodes import train_purifier
from atop.trainers.purifier import PurifierParams
from atop.transforms import TransformConfig


@dataclass(init=False, frozen=True)
class NoiseAblationParams(Params):
    """``noise_ablation`` (conf/base/parameters_noise_ablation.yml): each ablation's
    transform, keyed by its name (``purifier_<name>``, defenses ``ap_<name>`` and
    ``atop_<name>``)."""

    KEY = "noise_ablation"

    ablations: dict[str, TransformConfig]


def ablation_node(
    name: str,
) -> Callable[..., tuple[pd.DataFrame, dict[str, Any]]]:
    """The node function ``train_purifier_<name>``: purifier pretraining (``params``) with
    ablation ``name``'s transform instead of the base one (its own resume file)."""

    def train(
        train_set: dict[str, Tensor],
        test_set: dict[str, Tensor],
        monitor_indices: list[int],
        params: PurifierParams,
        ablation: NoiseAblationParams,
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        if name not in ablation.ablations:
            raise ValueError(
                f"noise_ablation.ablations has no {name!r} (have {sorted(ablation.ablations)}): "
                "add its transform in conf/<profile>/parameters_noise_ablation.yml."
            )
        resume = params.resume_path and params.resume_path.replace(".pt", f"_{name}.pt")
        ablated = params.replace(transform=ablation.ablations[name], resume_path=resume)
        return train_purifier(train_set, test_set, monitor_indices, ablated)

    train.__name__ = train.__qualname__ = f"train_purifier_{name}"
    return train

"""Nodes of the fine-tuning stages: one per arm (paper Eq. 9 and its controls).

Thin callers of :func:`atop.trainers.atop.finetune_purifier`; this module only makes one
node function per arm and turns the history into the CSV's DataFrame. Plain functions, no
Kedro imports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
from torch import Tensor

from atop.trainers import atop as trainer
from atop.trainers.atop import AToPParams

#: The arms of the main job (``atop_finetuning``): the 2 x 2 of Eq. 9's terms (AToP with FGSM).
MAIN_ARMS = ("ap_continued", "ap_classifier_aware", "adversarial_reconstruction", "atop")


def finetune_node(
    arm: str, suffix: str = "", change: Callable[..., dict[str, Any]] | None = None
) -> Callable[..., tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]]:
    """The node function of arm ``arm`` (named ``finetune_<arm><suffix>``): its history
    DataFrame, its metrics and the fine-tuned purifier checkpoint (saved last); its resume file is
    ``resume_path`` with ``{arm}`` = ``<arm><suffix>``. ``change(**study)``: the
    ``atop_finetuning`` values a study changes (e.g. the seed), from the study's parameters
    passed to the node as ``study``."""

    def finetune(
        classifier: dict[str, Any],
        purifier: dict[str, Any],
        train_set: dict[str, Tensor],
        test_set: dict[str, Tensor],
        monitor_indices: list[int],
        class_names: list[str],
        params: AToPParams,
        study: Any = None,
    ) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
        if change is not None:
            params = params.replace(**change(study))
        if params.resume_path:
            params = params.replace(resume_path=params.resume_path.replace("{arm}", arm + suffix))
        checkpoint, history, metrics = trainer.finetune_purifier(
            classifier, purifier, train_set, test_set, monitor_indices, class_names, params, arm
        )
        return pd.DataFrame(history), metrics, checkpoint  # the checkpoint saved last

    finetune.__name__ = finetune.__qualname__ = f"finetune_{arm}{suffix}"
    return finetune

"""Wiring of the fine-tuning stages: one node per arm, all from the same pretrained purifier.

``classifier`` + ``purifier`` (+ the training split and the monitor images) ->
``finetune_<arm>`` -> ``purifier_<arm>`` (checkpoint), ``finetuning_history_<arm>``,
``finetuning_metrics_<arm>``. Each fine-tuned purifier is written beside the pretrained one,
so the evaluation compares them all. ``atop_finetuning`` holds the main job's arms
(:data:`MAIN_ARMS`); ``atop_pgd`` the PGD arm of the full comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kedro.pipeline import Node, Pipeline

from atop.pipelines.atop_finetuning.nodes import MAIN_ARMS, finetune_node


def arm_nodes(
    arms: Sequence[str],
    purifier: str = "purifier",
    suffix: str = "",
    study: tuple[str, Callable[..., dict[str, Any]]] | None = None,
) -> list[Node]:
    """One node per arm fine-tuning the checkpoint ``purifier``; outputs end in ``suffix``.
    ``study``: ``(parameters, change)``, a study's parameters entry (``params:seeds``) and
    the ``atop_finetuning`` values it changes (:func:`finetune_node`)."""
    extra = {} if study is None else {"study": study[0]}
    change = None if study is None else study[1]
    return [
        Node(
            func=finetune_node(arm, suffix, change),
            inputs={
                "classifier": "classifier",
                "purifier": purifier,
                "train_set": "train_set",
                "test_set": "test_set",
                "monitor_indices": "monitor_indices",
                "class_names": "class_names",
                "params": "params:atop_finetuning",
                **extra,
            },
            outputs=[  # the checkpoint saved last
                f"finetuning_history_{arm}{suffix}",
                f"finetuning_metrics_{arm}{suffix}",
                f"purifier_{arm}{suffix}",
            ],
            name=f"finetune_{arm}{suffix}",
        )
        for arm in arms
    ]


def create_pipeline(**kwargs) -> Pipeline:
    """The ``atop_finetuning`` pipeline: the main job's arms."""
    return Pipeline(arm_nodes(MAIN_ARMS))


def create_pgd_pipeline(**kwargs) -> Pipeline:
    """The ``atop_pgd`` pipeline: AToP with a PGD inner maximisation (full comparison)."""
    return Pipeline(arm_nodes(("atop_pgd",)))

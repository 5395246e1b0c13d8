"""Wiring of the sigma ablation (full comparison only).

``train_set``, ``test_set``, ``monitor_indices`` -> ``train_purifier_sigma025`` ->
``purifier_sigma025``, ``purifier_history_sigma025``; then AToP (the ``atop`` arm of
``atop_finetuning``) on it -> ``purifier_atop_sigma025``. The comparison evaluates both
(``ap_sigma025``, ``atop_sigma025``).
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.pipelines.atop_finetuning.pipeline import arm_nodes
from atop.pipelines.sigma_ablation.nodes import train_ablation_purifier


def create_pipeline(**kwargs) -> Pipeline:
    """The ``sigma_ablation`` pipeline (pretraining + AToP)."""
    return Pipeline(
        [
            Node(
                train_ablation_purifier,
                inputs=[
                    "train_set",
                    "test_set",
                    "monitor_indices",
                    "params:purifier_pretraining",
                    "params:sigma_ablation",
                ],
                outputs=["purifier_history_sigma025", "purifier_sigma025"],
                name="train_purifier_sigma025",
            ),
            *arm_nodes(("atop",), purifier="purifier_sigma025", suffix="_sigma025"),
        ]
    )

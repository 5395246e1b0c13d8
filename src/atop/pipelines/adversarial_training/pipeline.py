"""Wiring of the PGD adversarial-training stage.

``train_set``, ``test_set``, ``class_names``, ``monitor_indices`` (from data_ingestion) ->
``train_pgd_at`` -> ``pgd_at_classifier`` (checkpoint), ``adversarial_training_history`` ->
``quick_check_pgd_at`` -> ``adversarial_training_metrics`` (clean and PGD-20 accuracy).
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.pipelines.adversarial_training.nodes import quick_check_pgd_at, train_pgd_at


def create_pipeline(**kwargs) -> Pipeline:
    """The adversarial_training pipeline (two nodes)."""
    return Pipeline(
        [
            Node(
                func=train_pgd_at,
                inputs=[
                    "train_set",
                    "test_set",
                    "class_names",
                    "monitor_indices",
                    "params:adversarial_training",
                ],
                outputs=["adversarial_training_history", "pgd_at_classifier"],
                name="train_pgd_at",
            ),
            Node(
                func=quick_check_pgd_at,
                inputs=[
                    "pgd_at_classifier",
                    "test_set",
                    "monitor_indices",
                    "adversarial_training_history",
                    "params:adversarial_training",
                ],
                outputs="adversarial_training_metrics",
                name="quick_check_pgd_at",
            ),
        ]
    )

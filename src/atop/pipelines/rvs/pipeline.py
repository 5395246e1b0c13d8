"""Wiring of the RvS stage.

``train_set``, ``test_set``, ``class_names``, ``monitor_indices`` (from data_ingestion) ->
``train_rvs`` -> ``rvs_classifier``, ``rvs_generator`` (checkpoints), ``rvs_history`` ->
``quick_check_rvs`` -> ``rvs_metrics`` (clean and PGD-20 accuracy).
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.pipelines.rvs.nodes import quick_check_rvs, train_rvs


def create_pipeline(**kwargs) -> Pipeline:
    """The rvs pipeline (two nodes)."""
    return Pipeline(
        [
            Node(
                func=train_rvs,
                inputs=["train_set", "test_set", "class_names", "monitor_indices", "params:rvs"],
                outputs=["rvs_history", "rvs_generator", "rvs_classifier"],
                name="train_rvs",
            ),
            Node(
                func=quick_check_rvs,
                inputs=[
                    "rvs_classifier",
                    "test_set",
                    "monitor_indices",
                    "rvs_history",
                    "params:rvs",
                ],
                outputs="rvs_metrics",
                name="quick_check_rvs",
            ),
        ]
    )

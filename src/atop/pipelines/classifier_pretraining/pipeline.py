"""Wiring of the classifier pretraining stage.

``train_set``, ``test_set``, ``class_names`` (from data_ingestion) ->
``train_classifier`` -> ``classifier`` (checkpoint), ``classifier_history`` ->
``evaluate_classifier`` -> ``classifier_metrics`` (clean accuracy on the full test set).
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.pipelines.classifier_pretraining.nodes import evaluate_classifier, train_classifier


def create_pipeline(**kwargs) -> Pipeline:
    """The classifier_pretraining pipeline (two nodes)."""
    return Pipeline(
        [
            Node(
                func=train_classifier,
                inputs=[
                    "train_set",
                    "test_set",
                    "class_names",
                    "monitor_indices",
                    "params:classifier_pretraining",
                ],
                outputs=["classifier_history", "classifier"],  # the checkpoint saved last
                name="train_classifier",
            ),
            Node(
                func=evaluate_classifier,
                inputs=[
                    "classifier",
                    "test_set",
                    "classifier_history",
                    "params:classifier_pretraining",
                ],
                outputs="classifier_metrics",
                name="evaluate_classifier",
            ),
        ]
    )

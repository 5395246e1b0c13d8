"""Wiring of the purifier pretraining stage.

``train_set``, ``test_set``, ``eval_indices`` (from data_ingestion) -> ``train_purifier`` ->
``purifier`` (checkpoint, ``meta.transform``), ``purifier_history``;
``purifier`` + the frozen ``classifier`` -> ``evaluate_purifier`` -> ``purifier_metrics``
(PSNR, "AP" clean accuracy), ``purifier_samples`` (figure).
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.pipelines.purifier_pretraining.nodes import evaluate_purifier, train_purifier


def create_pipeline(**kwargs) -> Pipeline:
    """The purifier_pretraining pipeline (two nodes)."""
    return Pipeline(
        [
            Node(
                func=train_purifier,
                inputs=["train_set", "test_set", "monitor_indices", "params:purifier_pretraining"],
                outputs=["purifier_history", "purifier"],  # the checkpoint saved last
                name="train_purifier",
            ),
            Node(
                func=evaluate_purifier,
                inputs=[
                    "purifier",
                    "classifier",
                    "test_set",
                    "eval_indices",
                    "purifier_history",
                    "params:purifier_pretraining",
                ],
                outputs=["purifier_metrics", "purifier_samples"],
                name="evaluate_purifier",
            ),
        ]
    )

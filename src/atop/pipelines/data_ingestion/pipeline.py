"""Data ingestion: read -> validate with Great Expectations -> fix the evaluation subset and
the disjoint monitor subset (held-out test images for training-time monitoring)."""

from kedro.pipeline import Node, Pipeline

from atop.pipelines.data_ingestion.nodes import (
    ingest_dataset,
    select_eval_subset,
    select_monitor_subset,
    validate_dataset,
)


def create_pipeline(**kwargs) -> Pipeline:
    """The ``data_ingestion`` pipeline.

    ``raw_dataset`` stays in memory: only data that passed validation is written.
    """
    return Pipeline(
        [
            Node(
                ingest_dataset,
                inputs="params:data_ingestion",
                outputs="raw_dataset",
                name="ingest_dataset",
            ),
            Node(
                validate_dataset,
                inputs=["raw_dataset", "params:data_ingestion"],
                outputs=["train_set", "test_set", "class_names", "data_validation"],
                name="validate_dataset",
            ),
            Node(
                select_eval_subset,
                inputs=["test_set", "params:data_ingestion"],
                outputs="eval_indices",
                name="select_eval_subset",
            ),
            Node(
                select_monitor_subset,
                inputs=["test_set", "eval_indices", "params:data_ingestion"],
                outputs="monitor_indices",
                name="select_monitor_subset",
            ),
        ]
    )

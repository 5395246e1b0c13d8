"""Data ingestion stage: real datasets in, validated uint8 tensors and the evaluation subset out."""

from atop.pipelines.data_ingestion.pipeline import create_pipeline

__all__ = ["create_pipeline"]

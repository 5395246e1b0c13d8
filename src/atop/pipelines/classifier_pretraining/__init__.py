"""Classifier pretraining stage: standard training of the classifier ``f`` (paper §4)."""

from atop.pipelines.classifier_pretraining.pipeline import create_pipeline

__all__ = ["create_pipeline"]

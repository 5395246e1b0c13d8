"""Robustness vs fine-tuning budget: three arms at 200, 800 and 3,200 steps."""

from atop.pipelines.scaling.pipeline import create_pipeline

__all__ = ["create_pipeline"]

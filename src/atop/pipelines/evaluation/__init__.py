"""Robust evaluation of every defense and the robustness report (method.md §4, issue 6)."""

from atop.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]

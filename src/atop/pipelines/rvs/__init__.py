"""Robustness-via-Synthesis baseline (Baytaş & Deb 2023): classifier + perturbation generator."""

from atop.pipelines.rvs.pipeline import create_pipeline

__all__ = ["create_pipeline"]

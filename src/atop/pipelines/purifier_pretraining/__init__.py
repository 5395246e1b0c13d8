"""Purifier pretraining stage: the GAN purifier ``g`` learns to restore ``x`` from ``t(x)``
(paper Eq. 8)."""

from atop.pipelines.purifier_pretraining.pipeline import create_pipeline

__all__ = ["create_pipeline"]

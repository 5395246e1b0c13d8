"""The sigma ablation: AP and AToP with sigma = 0.25 added at 32 px (8x the authors' noise)."""

from atop.pipelines.sigma_ablation.pipeline import create_pipeline

__all__ = ["create_pipeline"]

"""AToP adversarial fine-tuning of the purifier (paper Eq. 9, Algorithm 1)."""

from atop.pipelines.atop_finetuning.pipeline import create_pipeline

__all__ = ["create_pipeline"]

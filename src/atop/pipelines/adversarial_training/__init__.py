"""PGD adversarial training baseline (Madry et al. 2018): a robust classifier from scratch."""

from atop.pipelines.adversarial_training.pipeline import create_pipeline

__all__ = ["create_pipeline"]

"""The attack-convergence study: robust accuracy vs PGD steps and vs EOT samples."""

from atop.pipelines.convergence.pipeline import create_pipeline

__all__ = ["create_pipeline"]

"""The training-seeds study: every arm of the 2 x 2 fine-tuned with several seeds."""

from atop.pipelines.seeds.pipeline import create_pipeline

__all__ = ["create_pipeline"]

"""The noise ablations: the purifier pretrained (and AToP fine-tuned) with other noise."""

from atop.pipelines.noise_ablation.pipeline import create_pipeline

__all__ = ["create_pipeline"]

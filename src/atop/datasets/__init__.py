"""Project Kedro datasets (Kedro-dependent; the core modules never import this package)."""

from atop.datasets.torch_dataset import TorchDataset

__all__ = ["TorchDataset"]

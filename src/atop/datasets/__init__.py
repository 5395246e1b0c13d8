"""Project Kedro datasets (Kedro-dependent; the core modules never import this package)."""

from atop.datasets.atomic import CSVDataset, FigureDataset, JSONDataset, TextDataset
from atop.datasets.optional_json import OptionalJSONDataset
from atop.datasets.torch_dataset import TorchDataset

__all__ = [
    "CSVDataset",
    "FigureDataset",
    "JSONDataset",
    "OptionalJSONDataset",
    "TextDataset",
    "TorchDataset",
]

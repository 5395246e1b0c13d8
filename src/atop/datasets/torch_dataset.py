"""A Kedro dataset for torch objects (tensors, state dicts, checkpoints).

Every tensor file of the project goes through :class:`TorchDataset`: ingested splits
(``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``), model checkpoints
(``{"arch": str, "config": dict, "state_dict": dict, "meta": dict}``) and evaluation
artefacts. Saving is atomic and loading uses ``weights_only=True``
(see :mod:`atop.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from atop.checkpoint import load_safe, save_atomic


class TorchDataset(AbstractDataset[Any, Any]):
    """Kedro dataset for torch objects: atomic save, ``weights_only=True`` load.

    Catalog example::

        classifier:
          type: atop.datasets.TorchDataset
          filepath: data/06_models/cifar10/classifier.pt
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> Any:
        return load_safe(self._filepath)

    def save(self, data: Any) -> None:
        save_atomic(data, self._filepath)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

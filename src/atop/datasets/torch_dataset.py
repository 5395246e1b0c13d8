"""A Kedro dataset for torch objects (tensors, state dicts, checkpoints).

Every tensor file of the project goes through :class:`TorchDataset`: ingested splits
(``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``), model checkpoints
(``{"arch": str, "config": dict, "state_dict": dict, "meta": dict}``) and evaluation
artefacts. Saving is atomic and loading uses ``weights_only=True``
(see :mod:`atop.checkpoint`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from atop.checkpoint import load_safe, save_atomic

log = logging.getLogger(__name__)


class TorchDataset(AbstractDataset[Any, Any]):
    """Kedro dataset for torch objects: atomic save, ``weights_only=True`` load.

    Args:
        filepath: the ``.pt`` file.
        metadata: free-form metadata (e.g. the kedro-viz layer); not used by the dataset.
        optional: when true, :meth:`load` returns ``None`` if the file does not exist
            (instead of raising), so a pipeline can take an artefact that another,
            optional stage may or may not have produced -- e.g. the evaluation takes the
            baselines' checkpoints and skips the missing ones. A file that exists but is
            corrupted still raises. ``exists()`` stays truthful (False for a missing file).

    Catalog example::

        classifier:
          type: atop.datasets.TorchDataset
          filepath: data/06_models/cifar10/classifier.pt

        pgd_at_classifier:          # evaluated only when the baseline stage has run
          type: atop.datasets.TorchDataset
          filepath: data/06_models/cifar10/pgd_at_classifier.pt
          optional: true
    """

    def __init__(
        self, filepath: str, metadata: dict[str, Any] | None = None, optional: bool = False
    ) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata
        self._optional = bool(optional)

    def load(self) -> Any:
        """The saved object, or ``None`` when the dataset is optional and the file is missing.

        Raises:
            atop.checkpoint.CheckpointError: (wrapped in Kedro's ``DatasetError``) the file is
                missing and the dataset is not optional, or it is truncated/corrupted.
        """
        if self._optional and not self._filepath.is_file():
            log.info("Optional torch file '%s' does not exist: loading None", self._filepath)
            return None
        return load_safe(self._filepath)

    def save(self, data: Any) -> None:
        save_atomic(data, self._filepath)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "optional": self._optional}

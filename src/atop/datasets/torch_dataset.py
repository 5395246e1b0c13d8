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
          filepath: data/06_models/cifar10/base/classifier.pt

        pgd_at_classifier:          # evaluated only when the baseline stage has run
          type: atop.datasets.TorchDataset
          filepath: data/06_models/cifar10/base/pgd_at_classifier.pt
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

    def preview(self) -> str:
        """kedro-viz preview (``--include-previews``): a checkpoint's ``arch``, ``config`` and
        the numbers of its ``meta`` (no tensors); a split's shapes and dtypes."""
        import json

        from kedro_datasets._typing import JSONPreview

        if not self._filepath.is_file():
            return JSONPreview(json.dumps({"file": str(self._filepath), "exists": False}))
        data = load_safe(self._filepath)
        return JSONPreview(json.dumps(_summary(data), default=str))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "optional": self._optional}


def _summary(data: Any, depth: int = 0) -> Any:
    """A JSON-able outline of a saved object: tensors as ``"<dtype>[shape]"``, long lists
    cut, nested dicts kept two levels deep below a checkpoint's ``state_dict``."""
    import torch

    if torch.is_tensor(data):
        return f"{str(data.dtype).removeprefix('torch.')}{list(data.shape)}"
    if isinstance(data, dict):
        if depth > 3:
            return f"{{{len(data)} keys}}"
        return {str(k): _summary(v, depth + 1) for k, v in data.items() if k != "state_dict"} | (
            {"state_dict": f"{_count(data['state_dict'])} tensors"} if "state_dict" in data else {}
        )
    if isinstance(data, list | tuple):
        return [_summary(v, depth + 1) for v in data[:8]] + (
            [f"... {len(data)} items"] if len(data) > 8 else []
        )
    return data


def _count(state: Any) -> int:
    if isinstance(state, dict):
        return sum(_count(v) for v in state.values())
    return 1

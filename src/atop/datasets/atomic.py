"""The project's file datasets: Kedro's JSON, CSV, text and figure datasets, saved atomically.

Each ``save`` writes the file beside its target (``.<name>.tmp-<random><suffix>``) and
renames it over the target, so an interrupted or failed save (a full disk, a killed run)
leaves the previous complete file, never a truncated one; the temporary file is removed on
failure, and the next run removes any a killed process left (:func:`atop.hooks.remove_orphans`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path, PurePosixPath
from typing import Any

from kedro_datasets.json import JSONDataset as _JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset as _MatplotlibDataset
from kedro_datasets.pandas import CSVDataset as _CSVDataset
from kedro_datasets.text import TextDataset as _TextDataset

#: The glob of the temporary files of an interrupted atomic save.
TEMPORARY = ".*.tmp-*"


class AtomicSave:
    """Mixin for a local-file Kedro dataset: save to a temporary sibling, then rename."""

    _atomic_path: PurePosixPath | None = None

    def _get_save_path(self) -> PurePosixPath:
        if self._atomic_path is not None:
            return self._atomic_path
        return super()._get_save_path()  # type: ignore[misc]

    def save(self, data: Any) -> None:
        final = Path(str(super()._get_save_path()))  # type: ignore[misc]
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(f".{final.stem}.tmp-{secrets.token_hex(4)}{final.suffix}")
        self._atomic_path = PurePosixPath(temporary)
        try:
            super().save(data)  # type: ignore[misc]
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        finally:
            self._atomic_path = None


class JSONDataset(AtomicSave, _JSONDataset):
    """``json.JSONDataset``, saved atomically."""


class CSVDataset(AtomicSave, _CSVDataset):
    """``pandas.CSVDataset``, saved atomically."""


class TextDataset(AtomicSave, _TextDataset):
    """``text.TextDataset``, saved atomically."""


class FigureDataset(AtomicSave, _MatplotlibDataset):
    """``matplotlib.MatplotlibDataset`` (one figure), saved atomically."""

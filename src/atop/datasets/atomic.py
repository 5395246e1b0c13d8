"""The project's file datasets: Kedro's JSON, CSV, text and figure datasets, saved atomically.

Each ``save`` writes the file beside its target (``.<name>.tmp-<random><suffix>``) and
renames it over the target, so an interrupted or failed save (a full disk, a killed run)
leaves the previous complete file, never a truncated one; the temporary file is removed on
failure, and the next run removes any a killed process left (:func:`atop.hooks.remove_orphans`).
"""

from __future__ import annotations

import json
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
#: Environment variable holding the running pipeline's provenance as JSON (dataset, profile,
#: commit, machine: :func:`atop.machine.machine`), set by :class:`atop.hooks.RunGuardHooks`
#: for the duration of a Kedro run.
PROVENANCE_ENV = "ATOP_PROVENANCE"


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
    """``json.JSONDataset``, saved atomically. During a Kedro run a dict record gains a
    ``provenance`` block (``dataset``, ``profile``, ``commit``, ``machine``:
    :data:`PROVENANCE_ENV`). With
    ``metrics_filepath`` (a stage's record under ``data/08_reporting``), each save also writes
    the record's metrics there (:func:`atop.datasets.metrics.metrics_only`: numbers only), for
    ``dvc metrics``."""

    def __init__(
        self, *, metrics_filepath: str | None = None, provenance: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._metrics_filepath = metrics_filepath
        self._provenance = provenance

    def save(self, data: Any) -> None:
        provenance = os.environ.get(PROVENANCE_ENV) if self._provenance else None
        if provenance and isinstance(data, dict) and "provenance" not in data:
            # which dataset, profile and code the record describes (text: not a DVC metric)
            data = {**data, "provenance": json.loads(provenance)}
        super().save(data)
        if self._metrics_filepath:
            from atop.datasets.metrics import metrics_only

            metrics = JSONDataset(
                filepath=self._metrics_filepath, save_args={"indent": 2}, provenance=False
            )
            # provenance is text plus the machine's thread count: never a DVC metric
            numbers = {k: v for k, v in data.items() if k != "provenance"}
            metrics.save(metrics_only(numbers if isinstance(data, dict) else data))

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "metrics_filepath": self._metrics_filepath}


class CSVDataset(AtomicSave, _CSVDataset):
    """``pandas.CSVDataset``, saved atomically. ``optional=True``: :meth:`load` returns
    ``None`` for a missing file (the history of a baseline the evaluation may skip)."""

    def __init__(self, *, optional: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._optional = optional

    def load(self) -> Any:
        if self._optional and not Path(str(self._get_load_path())).is_file():
            return None
        return super().load()


class TextDataset(AtomicSave, _TextDataset):
    """``text.TextDataset``, saved atomically."""


class FigureDataset(AtomicSave, _MatplotlibDataset):
    """``matplotlib.MatplotlibDataset`` (one figure), saved atomically."""

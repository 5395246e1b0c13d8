"""A JSON dataset that loads ``None`` when its file does not exist yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atop.datasets.atomic import JSONDataset


class OptionalJSONDataset(JSONDataset):
    """An atomic ``JSONDataset`` whose :meth:`load` returns ``None`` for a missing file, for a
    report that cites another stage's latest results when they exist (the robustness report
    and the last full comparison's convergence study). Saves with indent 2; ``metrics_filepath``
    as :class:`~atop.datasets.atomic.JSONDataset`."""

    def __init__(
        self,
        filepath: str,
        metadata: dict[str, Any] | None = None,
        metrics_filepath: str | None = None,
    ) -> None:
        super().__init__(
            filepath=filepath,
            save_args={"indent": 2},
            metadata=metadata,
            metrics_filepath=metrics_filepath,
        )
        self._path = Path(filepath)

    def load(self) -> Any:
        return super().load() if self._path.is_file() else None

"""Safe, atomic torch files: the one place checkpoints are written and read.

Core module (torch only): the trainers use it for resume checkpoints, and the Kedro
dataset :class:`atop.datasets.TorchDataset` wraps it for the catalog.

* **Saving is atomic**: the object is written to a temporary file in the target folder,
  flushed, fsynced and renamed over the target, so an interrupted save never leaves a
  half-written or corrupted file behind (the previous file, if any, stays intact).
* **Loading never unpickles arbitrary objects**: ``torch.load(..., weights_only=True)``
  accepts only tensors, primitive containers (dict, list, tuple), str, int, float, bool
  and None. A file that is missing, truncated or not a torch file raises
  :class:`CheckpointError` naming the path and what to do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A torch file is missing, truncated, corrupted or holds objects that are not allowed."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Save ``obj`` with ``torch.save`` to ``path`` atomically (temp file + ``os.replace``).

    Args:
        obj: anything ``torch.load(weights_only=True)`` can read back: tensors, dicts,
            lists, tuples, str, int, float, bool, None.
        path: destination file; parent folders are created.

    Raises:
        OSError: the folder is not writable. The destination is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_safe(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by :func:`save_atomic` with ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        map_location: where tensors go (default CPU).

    Returns:
        The saved object.

    Raises:
        CheckpointError: the file does not exist, is truncated/corrupted, or contains
            objects other than tensors and primitive containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"No torch file at '{path}'. Run the pipeline stage that produces it first "
            f"(see `kedro registry list`), or check the catalog's filepath."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"Cannot load '{path}' ({type(exc).__name__}). "
            f"The file is truncated, corrupted or not a safe torch checkpoint. Delete it and "
            f"rerun the stage that writes it (or `dvc pull` to restore it)."
        ) from exc

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

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from atop.errors import UserError


class CheckpointError(UserError, RuntimeError):
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
    if path.is_dir():
        raise CheckpointError(
            f"'{path}' is a folder, not a torch file. An exported defense is a folder holding "
            "config.json and model.safetensors (written by `atop export`); a checkpoint is a "
            ".pt file such as data/06_models/<dataset>/<profile>/classifier.pt."
        )
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


#: The largest value an integer architecture setting of a checkpoint may request (widths,
#: depths, sides): a safe file cannot make the loader allocate an absurd model.
MAX_ARCH_VALUE = 4096


def check_values(
    state: dict[str, Any], config: dict[str, Any], what: str, limits: dict[str, int] | None = None
) -> None:
    """Validate a checkpoint's values, not only its types: every floating tensor of ``state``
    (nested dicts allowed) is finite, and every integer of ``config`` is at most its limit
    (``limits[key]``, else :data:`MAX_ARCH_VALUE`).

    Raises:
        CheckpointError: NaN / inf weights (named), or an absurd architecture setting.
    """
    limits = limits or {}
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool):
            limit = limits.get(key, MAX_ARCH_VALUE)
            if not 0 <= value <= limit:
                raise CheckpointError(
                    f"The {what} checkpoint asks for {key}={value} (allowed 0..{limit}): the file "
                    "is corrupted or not from this project. Retrain it or restore it (dvc pull)."
                )
    stack = [("", state)]
    while stack:
        prefix, node = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                stack.append((f"{prefix}{key}.", value))
            elif torch.is_tensor(value) and value.is_floating_point():
                if not torch.isfinite(value).all():
                    raise CheckpointError(
                        f"The {what} checkpoint holds NaN or infinite weights ({prefix}{key}): "
                        "the training diverged or the file is corrupted. Retrain it (lower the "
                        "learning rate) or restore it (dvc pull)."
                    )


def state_hash(state_dict: dict[str, Any]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values (hex, 64 characters): the
    identity of a set of weights, e.g. the classifier an AToP purifier was fine-tuned against.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

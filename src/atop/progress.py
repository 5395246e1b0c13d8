"""Progress bars that stay on a terminal: the one place the project makes a tqdm bar.

A bar is drawn only when asked for AND standard error is a terminal; a non-interactive run
(``make run > log``, DVC, CI) gets no redraws, only the log lines each loop writes (one per
epoch, per attack). Core module: tqdm and the standard library.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether standard error is an interactive terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable[T], enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled unless ``enabled`` and on a terminal."""
    return tqdm(iterable, disable=not (enabled and on_terminal()), **kwargs)

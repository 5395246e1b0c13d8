"""User errors: the project's own errors, told in one line.

A *user error* is one the user causes and fixes: a parameter out of range, a checkpoint
that is missing or broken, a run refused by the run guard, run outputs that do not exist
yet. Its message names the problem and the fix. The ``atop`` command and ``kedro run``
(:mod:`atop.cli`) print it as one line and exit with :data:`EXIT_USER`; the traceback only
with ``--verbose`` or ``ATOP_DEBUG=1``. Anything else is a bug and keeps its traceback.

:class:`UserError` is the base of the project's own user errors
(:class:`atop.params.ParameterError`, :class:`atop.checkpoint.CheckpointError`,
:class:`atop.hooks.RunRefused`, :class:`MissingOutputs`); errors of other packages that are
user errors by nature (Kedro's ``ParameterValidationError``, the dataset reader's
``DatasetNotFoundError``) are recognised by class name, also when wrapped (Kedro wraps a
dataset's error in its ``DatasetError``).

Core module: standard library only.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TextIO

#: Exit code of a user error (2, as argparse's usage errors).
EXIT_USER = 2
#: Environment variable that turns the traceback of a user error back on (``1``).
DEBUG_ENV = "ATOP_DEBUG"
#: Class names of other packages' errors that are user errors.
FOREIGN = frozenset({"ParameterValidationError", "DatasetNotFoundError"})


class UserError(Exception):
    """An error the user fixes (a parameter, a file, a refused run): printed in one line."""


class MissingOutputs(UserError):
    """Outputs of a run that a command or the notebook reads do not exist (the message
    names them and the command that makes them)."""

    def _render_traceback_(self) -> list[str]:  # IPython: the message alone, no traceback
        return [f"{type(self).__name__}: {self}"]


class RunInterrupted(Exception):
    """A run stopped by SIGTERM or SIGINT (raised by the run guard's signal handler, so the
    run ends through Kedro's error path: log line, lock released, Data Docs).

    Attributes:
        signum: the signal's number; the exit code is ``128 + signum``.
    """

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(
            f"The run was stopped by {name}: its lock is released and the finished stages' "
            "outputs are kept; rerun with `kedro run --only-missing-outputs` to resume."
        )
        self.signum = signum


def debug() -> bool:
    """Whether ``ATOP_DEBUG`` asks for tracebacks (set and not ``0`` / ``false``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def user_error(exc: BaseException) -> BaseException | None:
    """The user error in ``exc``'s chain (itself, its ``__cause__``, its ``__context__``,
    ...), or ``None`` when it is not one."""
    for item in _chain(exc):
        if isinstance(item, UserError | RunInterrupted):
            return item
        if any(cls.__name__ in FOREIGN for cls in type(item).__mro__):
            return item
    return None


_KEDRO_PREFIX = re.compile(
    r"^Parameter '[^']*': (?:Failed to instantiate \w+ for parameter '[^']*': )?"
)


def one_line(exc: BaseException) -> str:
    """The message of a user error in one line: whitespace collapsed; Kedro's parameter
    validation wrapper ("Parameter validation failed: - Parameter 'x': Failed to instantiate
    ...") reduced to the project's own messages, joined by ``; ``."""
    text = str(exc)
    if type(exc).__name__ == "ParameterValidationError":
        items = [line[2:] for line in text.splitlines() if line.startswith("- ")]
        text = "; ".join(_KEDRO_PREFIX.sub("", item) for item in items) or text
    return " ".join(text.split())


def report(
    exc: BaseException, prog: str, *, verbose: bool = False, stream: TextIO | None = None
) -> int | None:
    """Print a user error in one line (``<prog>: error: <message>``) and return its exit
    code (:data:`EXIT_USER`; ``128 + signum`` for :class:`RunInterrupted`).

    Returns:
        ``None`` when ``exc`` holds no user error, or when ``verbose`` / ``ATOP_DEBUG`` asks
        for the traceback (the caller then re-raises).
    """
    found = user_error(exc)
    if found is None or verbose or debug():
        return None
    stream = stream or sys.stderr
    print(f"{prog}: error: {one_line(found)}", file=stream, flush=True)
    if isinstance(found, RunInterrupted):
        return 128 + found.signum
    return EXIT_USER

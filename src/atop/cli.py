"""The project's own ``kedro`` commands (Kedro loads ``<package>.cli`` and puts its commands
before its built-in ones): ``kedro run`` with user errors in one line.

``kedro run`` here is Kedro's own ``run`` (every option unchanged) plus ``--verbose``. A user
error (:mod:`atop.errors`: a refused parameter, a broken checkpoint, a refused run, missing
inputs) ends the run with one line naming the problem and the fix and exit code 2 (SIGTERM /
SIGINT: ``128 + signal``); Kedro's own repetitions of it (the node's failure, the resume hint,
the parameter validator's log line) are left out. ``--verbose`` or ``ATOP_DEBUG=1`` shows
everything, traceback included. Other errors are bugs and keep their traceback.

The console script ``atop`` (:mod:`atop.command`) is another module: this one is Kedro's
extension point for a project's commands.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run

from atop.errors import EXIT_USER, RunInterrupted, UserError, debug, one_line, user_error


class QuietUserErrors(logging.Filter):
    """Drop Kedro's warning and error records logged while a user error is being handled
    (they repeat its message with a traceback or a resume hint); everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith("kedro"):
            return True
        handled = sys.exc_info()[1]
        return handled is None or user_error(handled) is None


class ParamsError(UserError):
    """A ``--params`` override that the config loader cannot merge."""


class UnknownPipeline(UserError):
    """``--pipelines`` names no registered pipeline (Kedro's message, with its suggestions)."""


def _quiet() -> tuple[logging.Filter, list[logging.Handler]]:
    quiet = QuietUserErrors()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(quiet)
    return quiet, handlers


def run_command(verbose: bool = False, **kwargs: Any) -> Any:
    """Kedro's ``run`` with one-line user errors (module doc).

    Raises:
        SystemExit: code 2 after a user error (``128 + signal`` after SIGTERM / SIGINT).
    """
    loud = verbose or debug()
    quiet, handlers = (None, []) if loud else _quiet()
    try:
        return kedro_run.callback(**kwargs)
    except Exception as exc:
        if type(exc).__module__.startswith("omegaconf") and kwargs.get("params"):
            problem = ParamsError(
                f"--params {kwargs['params']} cannot be merged into the parameters "
                f"({str(exc).splitlines()[0]}). --params sets single keys (a.b=1); an item of "
                "a list such as evaluation.attacks cannot be set that way: edit the conf file "
                "(or params/overrides.yaml) instead."
            )
            if loud:
                raise problem from exc
            exc = problem
        if isinstance(exc, ValueError) and str(exc).startswith("Failed to find the pipeline"):
            exc = UnknownPipeline(" ".join(str(exc).split()))  # a typo in --pipelines
        found = user_error(exc)
        if found is None or loud:
            raise
        if not getattr(exc, "_atop_reported", False):
            click.echo(f"kedro: error: {one_line(found)}", err=True)
        code = 128 + found.signum if isinstance(found, RunInterrupted) else EXIT_USER
        sys.exit(code)
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


@click.group(name="atop")
def cli() -> None:
    """The atop project's commands."""


#: ``kedro run`` (and ``python -m atop``, which runs this module's ``run``).
run = click.Command(
    name="run",
    params=[
        *kedro_run.params,
        click.Option(
            ["--verbose"],
            is_flag=True,
            help="Show the traceback of a user error (also: ATOP_DEBUG=1).",
        ),
    ],
    callback=run_command,
    help=(kedro_run.help or "Run the pipeline.")
    + " A user error (parameter, checkpoint, refused run) is one line, exit code 2.",
    short_help="Run the pipeline.",
)
cli.add_command(run)

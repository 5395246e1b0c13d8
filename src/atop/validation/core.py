"""Running a Great Expectations suite on a pandas table, the project's one GX entry point.

GX Core 1.x has no Kedro plugin, so the suites are plain functions: build a per-row table
(one row per image), describe the expectations, and :func:`validate_table` runs them and
either returns a JSON-able summary or raises :class:`DataValidationError` naming every failed
expectation.

Outside a Kedro run the GX context is ephemeral (nothing written). In a Kedro run,
:class:`atop.hooks.DataDocsHooks` sets :data:`ROOT_ENV` and :data:`RUN_ENV`: the context is
then file-backed (``data/08_reporting/<dataset>/<profile>/gx``, created on first use, one
process at a time under a file lock), every validation result is stored under the run's name
(the pipelines), and :func:`build_data_docs` renders the Data Docs once at the end of the run
(``gx/uncommitted/data_docs/local_site/index.html``), readable offline: the CDN assets of
GX's pages are copied into the site and linked relatively (:mod:`atop.validation.docs_assets`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# GX logs every registered function at INFO on import; keep our logs readable.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

#: The folder holding the file-backed GX project (``<folder>/gx``); unset: ephemeral context.
ROOT_ENV = "ATOP_GX_ROOT"
#: The name validation results are stored under (the Kedro run's pipelines).
RUN_ENV = "ATOP_GX_RUN"
#: Inside the GX project folder: the stored validation results and the Data Docs' front page.
VALIDATIONS = Path("gx/uncommitted/validations")
DOCS_INDEX = Path("gx/uncommitted/data_docs/local_site/index.html")


class DataValidationError(ValueError):
    """A Great Expectations suite failed; the message lists each failed expectation."""

    def __init__(self, suite_name: str, failures: list[dict[str, Any]], summary: dict[str, Any]):
        self.suite_name = suite_name
        self.failures = failures
        self.summary = summary
        lines = [f"Great Expectations suite '{suite_name}' failed {len(failures)} expectation(s):"]
        for failure in failures:
            lines.append(
                f"  - {failure['expectation']}({_short_kwargs(failure['kwargs'])}): "
                f"observed {failure['observed']}"
            )
        lines.append("Nothing downstream was written. Fix the input data (or the suite) and rerun.")
        super().__init__("\n".join(lines))


def _short_kwargs(kwargs: dict[str, Any]) -> str:
    items = []
    for key, value in kwargs.items():
        if key == "batch_id":
            continue
        text = repr(value)
        items.append(f"{key}={text if len(text) <= 60 else text[:57] + '...'}")
    return ", ".join(items)


def _observed(result: dict[str, Any]) -> Any:
    if result.get("observed_value") is not None:
        value = result["observed_value"]
        text = repr(value)
        return value if len(text) <= 120 else text[:117] + "..."
    if "unexpected_count" in result:
        return {
            "unexpected_count": result.get("unexpected_count"),
            "unexpected_examples": result.get("partial_unexpected_list", [])[:5],
        }
    return result


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the GX project under ``root`` (parallel nodes write its files)."""
    import fcntl

    (root / "gx").mkdir(parents=True, exist_ok=True)
    with open(root / "gx" / ".atop.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _context() -> Iterator[Any]:
    """The GX context: file-backed under ``$ATOP_GX_ROOT`` (locked), else ephemeral."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    root = os.environ.get(ROOT_ENV)
    if not root:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        yield context
        return
    with _locked(Path(root)):
        context = gx.get_context(mode="file", project_root_dir=root)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        yield context


def start_data_docs(root: str | Path, run_name: str) -> None:
    """Store this process's validation results in the GX project under ``root`` (under
    ``run_name``), replacing those of the previous run of that name; sets :data:`ROOT_ENV`
    and :data:`RUN_ENV` (:func:`stop_data_docs` unsets them)."""
    root = Path(root).resolve()
    for previous in (root / VALIDATIONS).glob(f"*/{run_name}"):
        shutil.rmtree(previous, ignore_errors=True)
    os.environ[ROOT_ENV], os.environ[RUN_ENV] = str(root), run_name


def stop_data_docs() -> None:
    """Back to ephemeral contexts (:func:`start_data_docs` undone)."""
    os.environ.pop(ROOT_ENV, None)
    os.environ.pop(RUN_ENV, None)


def build_data_docs(root: str | Path) -> Path | None:
    """Render the Data Docs of the GX project under ``root`` (every stored validation
    result and suite), when some result is stored, with local copies of the assets GX's
    pages load from CDNs (:func:`atop.validation.docs_assets.make_offline`).

    Returns:
        The front page (``<root>/gx/uncommitted/data_docs/local_site/index.html``), or
        ``None`` when no validation result is stored (GX is not even imported).
    """
    root = Path(root).resolve()
    if not any((root / VALIDATIONS).glob("*/*/*/*.json")):
        return None
    import great_expectations as gx

    from atop.validation.docs_assets import make_offline

    with _locked(root):
        context = gx.get_context(mode="file", project_root_dir=str(root))
        context.clean_data_docs()  # drop the pages of results replaced since the last build
        context.build_data_docs()
        make_offline((root / DOCS_INDEX).parent)
    return root / DOCS_INDEX


def validate_table(
    table: pd.DataFrame,
    suite_name: str,
    expectations: Iterable[Any],
    *,
    raise_on_failure: bool = True,
) -> dict[str, Any]:
    """Validate ``table`` against ``expectations`` (``great_expectations.expectations`` objects).

    Args:
        table: the per-row table to check (e.g. one row per image).
        suite_name: a name for the suite, used in the summary and error messages.
        expectations: instances such as ``gxe.ExpectTableRowCountToEqual(value=...)``.
        raise_on_failure: raise :class:`DataValidationError` when any expectation fails.

    Returns:
        A JSON-able summary: ``{"suite", "success", "evaluated", "successful", "rows",
        "results": [{"expectation", "kwargs", "success", "observed"}, ...]}``.

    Raises:
        DataValidationError: some expectation failed and ``raise_on_failure`` is true; the
            message names each failed expectation with its arguments and observed value.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    with _context() as context:
        batch_definition = (
            context.data_sources.add_or_update_pandas(f"{suite_name}_source")
            .add_dataframe_asset(f"{suite_name}_table")
            .add_batch_definition_whole_dataframe("whole_table")
        )
        suite = context.suites.add_or_update(
            gx.ExpectationSuite(name=suite_name, expectations=list(expectations))
        )
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=suite_name, data=batch_definition, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": table},
            run_id=RunIdentifier(
                run_name=os.environ.get(RUN_ENV), run_time=datetime.now(timezone.utc)
            ),
        )

    rows = []
    for item in result.results:
        config = item.expectation_config
        rows.append(
            {
                "expectation": config.type,
                "kwargs": {k: _jsonable(v) for k, v in config.kwargs.items() if k != "batch_id"},
                "success": bool(item.success),
                "observed": _jsonable(_observed(item.result)),
            }
        )
    summary = {
        "suite": suite_name,
        "success": bool(result.success),
        "evaluated": len(rows),
        "successful": sum(r["success"] for r in rows),
        "rows": len(table),
        "results": rows,
    }
    failures = [r for r in rows if not r["success"]]
    if failures:
        logger.error("GX suite '%s': %d expectation(s) failed", suite_name, len(failures))
        if raise_on_failure:
            raise DataValidationError(suite_name, failures, summary)
    else:
        logger.info(
            "GX suite '%s': all %d expectations passed on %d rows",
            suite_name,
            len(rows),
            len(table),
        )
    return summary


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars / containers into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)

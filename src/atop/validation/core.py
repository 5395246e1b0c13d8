"""Running a Great Expectations suite on a pandas table, the project's one GX entry point.

GX Core 1.x has no Kedro plugin, so the suites are plain functions: build a per-row table
(one row per image), describe the expectations, and :func:`validate_table` runs them in an
ephemeral GX context and either returns a JSON-able summary or raises
:class:`DataValidationError` naming every failed expectation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# GX logs every registered function at INFO on import; keep our logs readable.
logging.getLogger("great_expectations").setLevel(logging.WARNING)


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


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


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

    context = _context()
    batch_definition = (
        context.data_sources.add_pandas(f"{suite_name}_source")
        .add_dataframe_asset(f"{suite_name}_table")
        .add_batch_definition_whole_dataframe("whole_table")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    result = batch_definition.get_batch(batch_parameters={"dataframe": table}).validate(suite)

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

"""Project pipelines.

Each stage is registered under its own name (``data_ingestion``,
``classifier_pretraining``, ...). ``atop`` is the paper's method end to end:
ingestion -> classifier pretraining -> purifier pretraining -> AToP fine-tuning ->
evaluation. ``__default__`` is every registered stage (AToP plus the baselines).
"""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

#: The stages of the paper's method, in DAG order (those that exist are chained).
ATOP_STAGES = (
    "data_ingestion",
    "classifier_pretraining",
    "purifier_pretraining",
    "atop_finetuning",
    "evaluation",
)


def register_pipelines() -> dict[str, Pipeline]:
    """Register every stage, the ``atop`` DAG and ``__default__`` (all stages)."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["atop"] = sum(
        (pipelines[name] for name in ATOP_STAGES if name in pipelines), Pipeline([])
    )
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines

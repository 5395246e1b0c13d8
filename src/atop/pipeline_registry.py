"""Project pipelines.

Each stage is registered under its own name (``data_ingestion``,
``classifier_pretraining``, ...). ``atop`` is the paper's method end to end:
ingestion -> classifier pretraining -> purifier pretraining -> AToP fine-tuning ->
evaluation. ``__default__`` is every stage: AToP plus the baselines.

The stages are listed explicitly rather than discovered with ``find_pipelines``: Kedro 1.7
only imports the pipeline folders named on the command line, which would hide the stages
that make up the composite ``atop`` pipeline.
"""

from __future__ import annotations

import importlib

from kedro.pipeline import Pipeline

#: The stages of the paper's method, in DAG order.
ATOP_STAGES = (
    "data_ingestion",
    "classifier_pretraining",
    "purifier_pretraining",
    "atop_finetuning",
    "evaluation",
)
#: The baselines' training stages (evaluated by ``evaluation``).
BASELINE_STAGES = ("adversarial_training", "rvs")


def _stage(name: str) -> Pipeline | None:
    """``atop.pipelines.<name>.create_pipeline()``, or None while the stage does not exist."""
    module_name = f"atop.pipelines.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    return module.create_pipeline()


def register_pipelines() -> dict[str, Pipeline]:
    """Register every stage, the ``atop`` DAG and ``__default__`` (all stages)."""
    stages = {name: _stage(name) for name in ATOP_STAGES + BASELINE_STAGES}
    pipelines = {name: pipe for name, pipe in stages.items() if pipe is not None}
    pipelines["atop"] = sum((pipelines[n] for n in ATOP_STAGES if n in pipelines), Pipeline([]))
    pipelines["__default__"] = sum(
        (pipelines[n] for n in ATOP_STAGES + BASELINE_STAGES if n in pipelines), Pipeline([])
    )
    return pipelines

"""Project pipelines.

Each stage is registered under its own name (``data_ingestion``, ``classifier_pretraining``,
...). ``atop`` is the paper's method end to end: ingestion -> classifier pretraining ->
purifier pretraining -> AToP fine-tuning -> evaluation. ``__default__`` is every stage: AToP
plus the baselines.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from atop.pipelines import (
    adversarial_training,
    atop_finetuning,
    classifier_pretraining,
    data_ingestion,
    evaluation,
    purifier_pretraining,
    rvs,
)

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

_MODULES = {
    "data_ingestion": data_ingestion,
    "classifier_pretraining": classifier_pretraining,
    "purifier_pretraining": purifier_pretraining,
    "atop_finetuning": atop_finetuning,
    "evaluation": evaluation,
    "adversarial_training": adversarial_training,
    "rvs": rvs,
}


def register_pipelines() -> dict[str, Pipeline]:
    """Register every stage, the ``atop`` DAG and ``__default__`` (all stages)."""
    pipelines = {name: module.create_pipeline() for name, module in _MODULES.items()}
    pipelines["atop"] = sum((pipelines[n] for n in ATOP_STAGES), Pipeline([]))
    pipelines["__default__"] = sum(
        (pipelines[n] for n in ATOP_STAGES + BASELINE_STAGES), Pipeline([])
    )
    return pipelines

"""Project pipelines.

Each stage is registered under its own name (``data_ingestion``, ``classifier_pretraining``,
...). ``atop`` is the main job, the paper's method end to end with its controls: ingestion ->
classifier pretraining -> purifier pretraining -> fine-tuning arms -> evaluation.
``__default__`` is the full comparison: the main job plus AToP with PGD, the robust-training
baselines, the noise ablations, their comparison report and the attack-convergence study.
``seeds`` (every arm with several training seeds) and ``scaling`` (three arms at larger
budgets) are studies run alone.

The training nodes and the per-defense evaluation nodes of every stage run data-parallel
when their stage's ``distributed`` block asks for more than one process
(:func:`atop.pipelines.distributed_launch.launch.scale_out`; README "Scaling out").
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from atop.pipelines import (
    adversarial_training,
    atop_finetuning,
    classifier_pretraining,
    convergence,
    data_ingestion,
    evaluation,
    noise_ablation,
    purifier_pretraining,
    rvs,
    scaling,
    seeds,
)
from atop.pipelines.atop_finetuning.pipeline import create_pgd_pipeline
from atop.pipelines.distributed_launch.launch import scale_out
from atop.pipelines.evaluation.pipeline import create_comparison_pipeline

#: The stages of the paper's method, in DAG order.
ATOP_STAGES = (
    "data_ingestion",
    "classifier_pretraining",
    "purifier_pretraining",
    "atop_finetuning",
    "evaluation",
)
#: The full comparison's extra stages (the comparison report reads every defense).
COMPARISON_STAGES = (
    "atop_pgd",
    "adversarial_training",
    "rvs",
    "noise_ablation",
    "convergence",
    "comparison",
)
#: The studies of the training variance and of the budget: each its own stage, run alone
#: (``kedro run --pipelines seeds``), in neither the main job nor the full comparison.
STUDIES = ("seeds", "scaling")

_STAGES = {
    "data_ingestion": data_ingestion.create_pipeline,
    "classifier_pretraining": classifier_pretraining.create_pipeline,
    "purifier_pretraining": purifier_pretraining.create_pipeline,
    "atop_finetuning": atop_finetuning.create_pipeline,
    "evaluation": evaluation.create_pipeline,
    "atop_pgd": create_pgd_pipeline,
    "adversarial_training": adversarial_training.create_pipeline,
    "rvs": rvs.create_pipeline,
    "noise_ablation": noise_ablation.create_pipeline,
    "seeds": seeds.create_pipeline,
    "scaling": scaling.create_pipeline,
    "convergence": convergence.create_pipeline,
    "comparison": create_comparison_pipeline,
}


def register_pipelines() -> dict[str, Pipeline]:
    """Register every stage (its training and evaluation nodes launchable on several
    processes), the ``atop`` main job and ``__default__`` (every stage)."""
    pipelines = {name: scale_out(create()) for name, create in _STAGES.items()}
    pipelines["atop"] = sum((pipelines[n] for n in ATOP_STAGES), Pipeline([]))
    pipelines["__default__"] = sum(
        (pipelines[n] for n in ATOP_STAGES + COMPARISON_STAGES), Pipeline([])
    )
    return pipelines

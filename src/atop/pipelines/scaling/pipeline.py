"""Wiring of the budget study (its own DVC stage; not in the main job).

For each arm of :data:`ARMS` and each budget of :data:`BUDGETS` (fine-tuning steps of
``atop_finetuning.batch_size`` images): ``finetune_<arm>_steps<b>`` (``atop_finetuning`` with
the budget's ``train_images`` and ``epochs`` from ``scaling.budgets``; seed as the main job)
and ``evaluate_<arm>_steps<b>`` (the main job's protocol on the same images). The main job's
run (200 steps on the base profile) is the first budget. ``scaling_report`` gathers them.
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.evaluation.defenses import variant
from atop.pipelines.scaling.nodes import budget_settings, scaling_report
from atop.pipelines.studies import variant_nodes

#: The budgets (steps) trained by the study, besides the main job's; a budget is part of a
#: node's name, so the list lives in code (its settings in scaling.budgets).
BUDGETS = (800, 3200)
#: The arms of the study: the two single-term arms and AToP.
ARMS = ("adversarial_reconstruction", "ap_classifier_aware", "atop")


def create_pipeline(**kwargs) -> Pipeline:
    """The ``scaling`` pipeline: :data:`ARMS` at every budget of :data:`BUDGETS`, evaluated,
    then the report."""
    nodes = [
        node
        for arm in ARMS
        for steps in BUDGETS
        for node in variant_nodes(
            arm, "steps", steps, "params:scaling", lambda p, b=steps: budget_settings(p, b)
        )
    ]
    runs = {
        f"{arm}_steps{b}": f"evaluation_{variant(arm, 'steps', b)}" for arm in ARMS for b in BUDGETS
    }
    nodes.append(
        Node(
            func=scaling_report,
            inputs={
                "params": "params:scaling",
                "evaluation_params": "params:evaluation",
                "finetuning": "params:atop_finetuning",
                **{arm: f"evaluation_{arm}" for arm in ARMS},
                **runs,
            },
            outputs=["scaling", "scaling_table", "scaling_report", "scaling_plot"],
            name="scaling_report",
        )
    )
    return Pipeline(nodes)

"""Wiring of the training-seeds study (its own DVC stage; not in the main job).

For every arm of the 2 x 2 (:data:`atop.evaluation.defenses.FACTORIAL`) and every seed of
:data:`SEEDS`: ``finetune_<arm>_seed<k>`` (``atop_finetuning`` with ``seed: k``: another data
order, other training-attack and transform draws; the same training images) and
``evaluate_<arm>_seed<k>`` (the main job's protocol on the same images). The main job's own
run is the first seed (``atop_finetuning.seed``). ``seeds_report`` gathers all of them.
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.evaluation.defenses import FACTORIAL, variant
from atop.pipelines.seeds.nodes import seeds_report
from atop.pipelines.studies import variant_nodes

#: The seeds trained by the study, besides the main job's (``atop_finetuning.seed``: 0):
#: five in all. A seed is part of a node's name, so the list lives in code.
SEEDS = (1, 2, 3, 4)
#: The arms of the study, in report order.
ARMS = tuple(FACTORIAL.values())


def create_pipeline(**kwargs) -> Pipeline:
    """The ``seeds`` pipeline: the 2 x 2's arms at every seed of :data:`SEEDS`, evaluated,
    then the report."""
    nodes = [
        node
        for arm in ARMS
        for seed in SEEDS
        for node in variant_nodes(arm, "seed", seed, "params:seeds", lambda _, s=seed: {"seed": s})
    ]
    runs = {
        f"{arm}_seed{s}": f"evaluation_{variant(arm, 'seed', s)}" for arm in ARMS for s in SEEDS
    }
    nodes.append(
        Node(
            func=seeds_report,
            inputs={
                "params": "params:seeds",
                "evaluation_params": "params:evaluation",
                "finetuning": "params:atop_finetuning",
                **{arm: f"evaluation_{arm}" for arm in ARMS},
                **runs,
            },
            outputs=["seeds", "seeds_table", "seeds_report", "seeds_plot"],
            name="seeds_report",
        )
    )
    return Pipeline(nodes)

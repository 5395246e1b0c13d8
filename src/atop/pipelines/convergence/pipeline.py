"""Wiring of the convergence study (full comparison only).

``study_<defense>`` (``test_set``, ``eval_indices``, ``class_names``,
``params:convergence``, the defense's checkpoints and its main-job evaluation
``evaluation_<defense>`` with ``params:evaluation``: the headline it is compared with) ->
``convergence_<defense>`` (every setting's per-draw verdicts) -> ``convergence_report`` ->
``convergence`` (metrics JSON, cited by the robustness reports), ``convergence_table``,
``convergence_markdown``, ``convergence_plot``.
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.evaluation.defenses import NEEDS, STUDIED
from atop.pipelines.convergence.nodes import convergence_report, study_node


def create_pipeline(**kwargs) -> Pipeline:
    """The convergence pipeline: one study node per defense, then the report."""
    shared = {
        "test_set": "test_set",
        "eval_indices": "eval_indices",
        "class_names": "class_names",
        "params": "params:convergence",
    }
    nodes = [
        Node(
            func=study_node(name),
            inputs={
                **shared,
                "evaluation": f"evaluation_{name}",
                "evaluation_params": "params:evaluation",
                **{key: key for key in NEEDS[name]},
            },
            outputs=f"convergence_{name}",
            name=f"study_{name}",
        )
        for name in STUDIED
    ]
    nodes.append(
        Node(
            func=convergence_report,
            inputs={"params": "params:convergence", **{n: f"convergence_{n}" for n in STUDIED}},
            outputs=[
                "convergence",
                "convergence_table",
                "convergence_markdown",
                "convergence_plot",
            ],
            name="convergence_report",
        )
    )
    return Pipeline(nodes)

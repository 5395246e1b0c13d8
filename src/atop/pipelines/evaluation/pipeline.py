"""Wiring of the evaluation stage.

One node per defense (``evaluate_standard``, ``evaluate_ap``, ``evaluate_atop``,
``evaluate_pgd_at``, ``evaluate_rvs``): ``test_set``, ``eval_indices``, ``class_names``,
``params:evaluation`` and the defense's checkpoints -> ``evaluation_<defense>`` (per-image
results, a torch file: a defense can be re-evaluated alone with
``kedro run --pipelines evaluation --from-nodes evaluate_ap``). Then ``collect_results`` ->
in-memory ``robustness_results`` -> ``robustness`` (metrics JSON) -> ``robustness_table``
(CSV), ``robustness_report`` (Markdown), and the figures ``robust_accuracy_vs_eps`` and
``adversarial_grid``.

The baselines' checkpoints are ``optional`` catalog entries (``None`` when their stages have
not run: that defense is skipped); taking them as inputs orders the evaluation after their
stages in ``__default__``. If an attack's output fails its Great Expectations suite, its node
raises and none of the report nodes run.
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.evaluation.defenses import DEFENSES
from atop.pipelines.evaluation.figures import plot_adversarial_grid, plot_robust_accuracy_vs_eps
from atop.pipelines.evaluation.metrics import robustness_metrics, robustness_table
from atop.pipelines.evaluation.nodes import INPUTS, collect_results, evaluate_node
from atop.pipelines.evaluation.report import robustness_report

SHARED = {
    "test_set": "test_set",
    "eval_indices": "eval_indices",
    "class_names": "class_names",
    "params": "params:evaluation",
}


def create_pipeline(**kwargs) -> Pipeline:
    """The evaluation pipeline: one node per defense, the gathering node, five report nodes."""
    per_defense = [
        Node(
            func=evaluate_node(name),
            inputs={**SHARED, **{key: key for key in INPUTS[name]}},
            outputs=f"evaluation_{name}",
            name=f"evaluate_{name}",
        )
        for name in DEFENSES
    ]
    return Pipeline(
        [
            *per_defense,
            Node(
                func=collect_results,
                inputs={
                    "params": "params:evaluation",
                    "eval_indices": "eval_indices",
                    "class_names": "class_names",
                    "atop_purifier": "atop_purifier",
                    **{name: f"evaluation_{name}" for name in DEFENSES},
                },
                outputs="robustness_results",
                name="collect_results",
            ),
            Node(robustness_metrics, "robustness_results", "robustness", name="robustness_metrics"),
            Node(robustness_table, "robustness", "robustness_table", name="robustness_table"),
            Node(
                robustness_report,
                ["robustness_results", "robustness"],
                "robustness_report",
                name="robustness_report",
            ),
            Node(
                plot_robust_accuracy_vs_eps,
                "robustness_results",
                "robust_accuracy_vs_eps",
                name="plot_robust_accuracy_vs_eps",
            ),
            Node(
                plot_adversarial_grid,
                "robustness_results",
                "adversarial_grid",
                name="plot_adversarial_grid",
            ),
        ]
    )

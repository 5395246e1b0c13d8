"""Wiring of the evaluation stage.

``test_set``, ``eval_indices``, ``class_names``, ``classifier``, ``purifier``,
``atop_purifier`` and the optional baselines ``pgd_at_classifier``, ``rvs_classifier``
(``None`` when their stages have not run) -> ``evaluate_defenses`` -> in-memory
``robustness_results`` -> ``robustness`` (metrics JSON) -> ``robustness_table`` (CSV),
``robustness_report`` (Markdown), and the figures ``robust_accuracy_vs_eps`` and
``adversarial_grid``.

Taking the baselines' checkpoints as inputs orders the evaluation after their stages in the
full ``__default__`` pipeline; in ``atop`` they are free inputs, loaded as ``None`` when
missing (``TorchDataset(optional=True)``). If an attack's output fails its Great
Expectations suite, ``evaluate_defenses`` raises and none of the report nodes run.
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.pipelines.evaluation.nodes import evaluate_defenses
from atop.pipelines.evaluation.report import (
    plot_adversarial_grid,
    plot_robust_accuracy_vs_eps,
    robustness_metrics,
    robustness_report,
    robustness_table,
)


def create_pipeline(**kwargs) -> Pipeline:
    """The evaluation pipeline (one attack node, five report nodes)."""
    return Pipeline(
        [
            Node(
                func=evaluate_defenses,
                inputs=[
                    "test_set",
                    "eval_indices",
                    "class_names",
                    "classifier",
                    "purifier",
                    "atop_purifier",
                    "pgd_at_classifier",
                    "rvs_classifier",
                    "params:evaluation",
                ],
                outputs="robustness_results",
                name="evaluate_defenses",
            ),
            Node(
                func=robustness_metrics,
                inputs="robustness_results",
                outputs="robustness",
                name="robustness_metrics",
            ),
            Node(
                func=robustness_table,
                inputs="robustness",
                outputs="robustness_table",
                name="robustness_table",
            ),
            Node(
                func=robustness_report,
                inputs=["robustness_results", "robustness"],
                outputs="robustness_report",
                name="robustness_report",
            ),
            Node(
                func=plot_robust_accuracy_vs_eps,
                inputs="robustness_results",
                outputs="robust_accuracy_vs_eps",
                name="plot_robust_accuracy_vs_eps",
            ),
            Node(
                func=plot_adversarial_grid,
                inputs="robustness_results",
                outputs="adversarial_grid",
                name="plot_adversarial_grid",
            ),
        ]
    )

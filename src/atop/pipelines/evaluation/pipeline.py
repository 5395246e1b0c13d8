"""Wiring of the evaluation stages.

One node per defense (``evaluate_<defense>``): ``test_set``, ``eval_indices``,
``class_names``, ``params:evaluation`` and the defense's checkpoints -> ``evaluation_<defense>``
(per-image results, a torch file: a defense can be re-evaluated alone with
``kedro run --pipelines evaluation --from-nodes evaluate_ap``). A gathering node then feeds
the report nodes (metrics JSON, CSV table, Markdown report, figures).

* ``evaluation`` (the main job): the defenses of :data:`atop.evaluation.defenses.MAIN`,
  reported as ``robustness*``, without the sanity checks' own attacks (the ε sweep, the
  stronger attack, the fixed-randomness row: a third of its time). The report reads each
  defense's convergence study when one exists for this evaluation (full comparison).
* ``comparison`` (the full comparison): evaluates the :data:`~atop.evaluation.defenses.EXTRA`
  defenses with their sanity checks, completes the main defenses' sanity checks
  (``sanity_<defense>``) and reports every defense together as ``comparison*``.

If an attack's output fails its Great Expectations suite, its node raises and no report
node runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from kedro.pipeline import Node, Pipeline

from atop.evaluation.defenses import DEFENSES, EXTRA, HISTORIES, MAIN, NEEDS, STUDIED
from atop.pipelines.evaluation.figures import plot_adversarial_grid, plot_robust_accuracy_vs_eps
from atop.pipelines.evaluation.metrics import (
    accuracy_vs_eps_table,
    robustness_metrics,
    robustness_table,
    verdicts_table,
)
from atop.pipelines.evaluation.nodes import STUDY, collect_results, evaluate_node, sanity_node
from atop.pipelines.evaluation.report import robustness_report

SHARED = {
    "test_set": "test_set",
    "eval_indices": "eval_indices",
    "class_names": "class_names",
    "params": "params:evaluation",
}


def defense_nodes(names: Sequence[str], sanity: bool = True) -> list[Node]:
    """``evaluate_<name>`` for each defense: its checkpoints -> ``evaluation_<name>``
    (``sanity``: with the sanity checks' own attacks)."""
    return [
        Node(
            func=evaluate_node(name, sanity),
            inputs={**SHARED, **{key: key for key in NEEDS[name] + HISTORIES[name]}},
            outputs=f"evaluation_{name}",
            name=f"evaluate_{name}",
        )
        for name in names
    ]


def sanity_nodes(names: Sequence[str]) -> list[Node]:
    """``sanity_<name>``: the sanity checks of a defense the main job evaluated without
    them, ``evaluation_<name>`` (and ``convergence_<name>`` for a defense of the
    convergence study) -> ``sanity_<name>`` (the completed result)."""
    return [
        Node(
            func=sanity_node(name),
            inputs={
                **SHARED,
                "evaluation": f"evaluation_{name}",
                **({"convergence": f"convergence_{name}"} if name in STUDIED else {}),
                **{key: key for key in NEEDS[name] + HISTORIES[name]},
            },
            outputs=f"sanity_{name}",
            name=f"sanity_{name}",
        )
        for name in names
    ]


def report_nodes(
    names: Sequence[str], prefix: str, sources: dict[str, str], studies: Sequence[str] = ()
) -> list[Node]:
    """Gather the results of ``names`` (dataset ``sources[name]``) and write ``<prefix>`` (JSON), ``<prefix>_table``,
    ``<prefix>_verdicts`` (every per-image, per-draw verdict), ``<prefix>_report``,
    ``<prefix>_accuracy_vs_eps`` (figure) and ``<prefix>_accuracy_vs_eps_table`` (its CSV,
    a DVC plot). ``studies``: defenses whose convergence study (``convergence_<name>``, read
    when it exists) the gathering node may add to their headline."""
    results = f"{prefix}_results"
    return [
        Node(
            func=collect_results,
            inputs={
                "params": "params:evaluation",
                "eval_indices": "eval_indices",
                "class_names": "class_names",
                "purifier_atop": "purifier_atop",
                **{name: sources[name] for name in names},
                **{f"{STUDY}{name}": f"convergence_{name}" for name in studies},
            },
            outputs=results,
            name=f"collect_{prefix}",
        ),
        Node(robustness_metrics, results, prefix, name=f"{prefix}_metrics"),
        Node(robustness_table, prefix, f"{prefix}_table", name=f"{prefix}_table"),
        Node(
            verdicts_table,
            [results, "eval_indices"],
            f"{prefix}_verdicts",
            name=f"{prefix}_verdicts",
        ),
        Node(
            robustness_report,
            [results, prefix, "convergence"],
            f"{prefix}_report",
            name=f"{prefix}_report",
        ),
        Node(
            plot_robust_accuracy_vs_eps,
            results,
            f"{prefix}_accuracy_vs_eps",
            name=f"plot_{prefix}_accuracy_vs_eps",
        ),
        Node(
            accuracy_vs_eps_table,
            results,
            f"{prefix}_accuracy_vs_eps_table",
            name=f"{prefix}_accuracy_vs_eps_table",
        ),
    ]


def create_pipeline(**kwargs) -> Pipeline:
    """The main job's evaluation: its defenses, the report and the adversarial grid."""
    return Pipeline(
        [
            *defense_nodes(MAIN, sanity=False),
            *report_nodes(
                MAIN,
                "robustness",
                {n: f"evaluation_{n}" for n in MAIN},
                studies=[n for n in MAIN if n in STUDIED],
            ),
            Node(
                plot_adversarial_grid,
                "robustness_results",
                "adversarial_grid",
                name="plot_adversarial_grid",
            ),
        ]
    )


def create_comparison_pipeline(**kwargs) -> Pipeline:
    """The full comparison: the extra defenses (with their sanity checks), the sanity checks
    of the main job's defenses, then every defense in one report."""
    sources = {**{n: f"sanity_{n}" for n in MAIN}, **{n: f"evaluation_{n}" for n in EXTRA}}
    return Pipeline(
        [
            *defense_nodes(EXTRA),
            *sanity_nodes(MAIN),
            *report_nodes(DEFENSES, "comparison", sources),
        ]
    )

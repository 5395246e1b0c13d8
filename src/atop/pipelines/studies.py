"""What the ``seeds`` and ``scaling`` studies share: an arm fine-tuned again with changed
settings (a seed, a budget) and evaluated with the main job's protocol on the same images,
and the check that a study's every cell was evaluated (the per-image scores they compare:
:func:`atop.pipelines.evaluation.metrics.outcome_scores`).

A variant ``<arm>_<kind><value>`` (``atop_seed3``, ``atop_steps800``;
:func:`atop.evaluation.defenses.variant`) is fine-tuned from the main job's pretrained
purifier by ``finetune_<variant>`` and evaluated by ``evaluate_<variant>`` (the main job's
attack list, its draws and images; no sanity attacks). Plain functions and wiring.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kedro.pipeline import Node

from atop.evaluation.defenses import histories, needs, variant
from atop.pipelines.atop_finetuning.pipeline import arm_nodes
from atop.pipelines.evaluation.nodes import evaluate_node
from atop.pipelines.evaluation.pipeline import SHARED


def variant_nodes(
    arm: str, kind: str, value: int, parameters: str, change: Callable[..., dict[str, Any]]
) -> list[Node]:
    """``finetune_<variant>`` (``atop_finetuning`` changed by ``change(study parameters)``)
    and ``evaluate_<variant>`` for arm ``arm`` at ``kind`` = ``value``."""
    name = variant(arm, kind, value)
    finetune = arm_nodes((arm,), suffix=f"_{kind}{value}", study=(parameters, change))
    evaluate = Node(
        func=evaluate_node(name, sanity=False),
        inputs={**SHARED, **{key: key for key in needs(name) + histories(name)}},
        outputs=f"evaluation_{name}",
        name=f"evaluate_{name}",
    )
    return [*finetune, evaluate]


def evaluated(results: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The evaluation result of defense ``name``; a skipped one is an error here (a study
    compares every cell of its design).

    Raises:
        ValueError: ``name`` is missing or was skipped.
    """
    result = results.get(name)
    if result is None or "skipped" in result:
        reason = "missing" if result is None else result["skipped"]
        raise ValueError(
            f"The study needs the evaluation of {name!r}, which is {reason}: run the main job "
            "(kedro run --pipelines atop) first, then the study."
        )
    return result

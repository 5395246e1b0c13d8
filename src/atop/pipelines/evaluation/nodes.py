"""Nodes of the evaluation stage: one per defense, then one that gathers the results.

Each ``evaluate_<defense>`` node rebuilds its defense from its checkpoints
(:func:`atop.evaluation.build_defense`), runs the protocol of :mod:`atop.evaluation.suite` on
the first ``images`` of ``eval_indices`` and checks every attack's output with the Great
Expectations suite (:func:`atop.validation.adversarial.validate_adversarial`) before it is
judged. A defense whose checkpoints are missing (a baseline stage that did not run) or that
``evaluation.defenses`` leaves out is recorded as skipped. :func:`collect_results` gathers the
per-defense results for the report nodes. Plain functions, no Kedro imports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor

from atop.evaluation.defenses import (
    DEFENSES,
    base_name,
    build_defense,
    histories,
    needs,
    unseen_attacks,
)
from atop.evaluation.protocol import select_images
from atop.evaluation.suite import EvalParams, complete_sanity, evaluate_defense
from atop.pipelines import history_seconds
from atop.pipelines.evaluation.metrics import study_fits
from atop.training import resolve_device

log = logging.getLogger(__name__)
#: Keyword prefix of a defense's convergence study among :func:`collect_results`' inputs.
STUDY = "study_"


def _gx_validator(tolerance: float) -> Callable[..., None]:
    """The Great Expectations suite of an attack's output (ε + ``tolerance``, [0, 1], shape)."""
    from atop.validation.adversarial import validate_adversarial

    def validate(clean, adversarial, labels, eps, norm, name, indices) -> None:
        validate_adversarial(
            clean, adversarial, labels, eps, norm, name, tolerance=tolerance, indices=indices
        )

    return validate


def _prepare(name: str, test_set, eval_indices, class_names, params: EvalParams, inputs):
    """The evaluation images and the defense ``name`` rebuilt from its checkpoints, or the
    reason it is skipped (a string)."""
    checkpoints = {key: inputs.get(key) for key in needs(name)}
    if base_name(name) == name and name not in params.defenses:
        return "not listed in evaluation.defenses"
    missing = [key for key in needs(name) if checkpoints.get(key) is None]
    if missing:
        reason = f"checkpoint {', '.join(missing)} not found (stage not run)"
        log.warning("Skipping defense %r: %s", name, reason)
        return reason
    device = resolve_device(params.device)
    data = select_images(test_set, eval_indices, params.images, len(class_names), device)
    defense = build_defense(name, checkpoints, device)
    defense.train_seconds = {h: history_seconds(inputs.get(h)) for h in histories(name)}
    return data, defense


def evaluate_node(name: str, sanity: bool = True) -> Callable[..., dict[str, Any]]:
    """The node function of defense ``name`` (named ``evaluate_<name>``).

    Its inputs are ``test_set``, ``eval_indices``, ``class_names``, ``params`` (the
    ``evaluation`` block), the checkpoints of :func:`atop.evaluation.defenses.needs` and the
    training histories of :func:`~atop.evaluation.defenses.histories` (a seed or budget
    variant of an arm, ``atop_seed3``, runs whatever ``evaluation.defenses`` lists); its output is
    :func:`atop.evaluation.suite.evaluate_defense`'s result (``sanity``: with the sanity
    checks' own attacks), or ``{"skipped": reason}``.
    """

    def evaluate(
        test_set: dict[str, Tensor],
        eval_indices: list[int],
        class_names: list[str],
        params: EvalParams,
        **inputs: Any,
    ) -> dict[str, Any]:
        ready = _prepare(name, test_set, eval_indices, class_names, params, inputs)
        if isinstance(ready, str):
            return {"skipped": ready}
        data, defense = ready
        validate = _gx_validator(params.tolerance)
        return evaluate_defense(defense, data, params, validate, sanity=sanity)

    evaluate.__name__ = evaluate.__qualname__ = f"evaluate_{name}"
    return evaluate


def sanity_node(name: str) -> Callable[..., dict[str, Any]]:
    """The node function ``sanity_<name>`` of the full comparison: the sanity checks'
    own attacks and the fixed-randomness row for a defense the main job evaluated without
    them (:func:`atop.evaluation.suite.complete_sanity`). Inputs: those of
    :func:`evaluate_node` plus ``evaluation`` (the main job's result) and, for a defense of
    the convergence study, ``convergence`` (its study: the stronger attack is read from it);
    output: the completed result (a skipped defense stays skipped)."""

    def sanity(
        test_set: dict[str, Tensor],
        eval_indices: list[int],
        class_names: list[str],
        params: EvalParams,
        evaluation: dict[str, Any],
        convergence: dict[str, Any] | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        if "skipped" in evaluation:
            return evaluation
        ready = _prepare(name, test_set, eval_indices, class_names, params, inputs)
        if isinstance(ready, str):
            return {"skipped": ready}
        data, defense = ready
        validate = _gx_validator(params.tolerance)
        return complete_sanity(defense, data, params, evaluation, validate, study=convergence)

    sanity.__name__ = sanity.__qualname__ = f"sanity_{name}"
    return sanity


def collect_results(
    params: EvalParams,
    eval_indices: list[int],
    class_names: list[str],
    purifier_atop: dict[str, Any] | None,
    **per_defense: dict[str, Any],
) -> dict[str, Any]:
    """Gather the per-defense results (keyword ``<defense>``, report order) for the reports.

    A keyword ``study_<defense>`` is that defense's convergence study (or ``None``): when it
    was run against this very evaluation (:func:`~atop.pipelines.evaluation.metrics.study_fits`)
    it is attached as the result's ``study``, so a headline the study did not find converged
    becomes the worst case over the evaluation's and the study's attacks (method.md §5.2).

    Returns:
        ``settings``, ``attacks`` (entries), ``defenses`` (evaluated ones, report order),
        ``skipped`` (``{name: reason}``), ``unseen`` (which attacks AToP saw in training),
        ``grid`` (images for the adversarial grid) and ``class_names``.

    Raises:
        ValueError: no defense was evaluated.
    """
    entries = params.entries
    studies = {
        k[len(STUDY) :]: per_defense.pop(k) for k in list(per_defense) if k.startswith(STUDY)
    }
    names = [n for n in DEFENSES if n in per_defense]
    defenses = {n: per_defense[n] for n in names if "skipped" not in per_defense[n]}
    attacks = [
        {
            "label": e.label,
            "name": e.name,
            "norm": e.norm,
            "eps": e.eps,
            "spec": dict(e.spec),
            "survivors": e.survivors,
        }
        for e in entries
    ]
    for n, found in studies.items():
        if n in defenses and "study" not in defenses[n]:
            if study_fits(defenses[n], found, attacks):
                defenses[n] = {**defenses[n], "study": found}
            elif found and "skipped" not in found:
                log.warning("Convergence study of %r is of another evaluation: not used.", n)
    skipped = {
        n: per_defense[n]["skipped"]
        for n in names
        if "skipped" in per_defense[n] and n in params.defenses
    }
    if not defenses:
        raise ValueError("No defense could be evaluated: check evaluation.defenses and inputs.")
    grid = next((r["grid"] for r in defenses.values() if r.get("grid") is not None), None)
    if grid is None:
        log.warning(
            "No adversarial grid: defense %r or attack %r was not evaluated.",
            params.grid.defense,
            params.grid.attack,
        )
    n_images = len(next(iter(defenses.values()))["clean"])
    # torch files hold the per-draw verdicts; the report nodes read them as tensors
    sanity = params.sanity
    n_sanity = n_images if sanity.images is None else min(sanity.images, n_images)
    return {
        "settings": {
            "dataset_classes": len(class_names),
            "n_images": n_images,
            "n_eval_indices": len(eval_indices),
            "n_sanity_images": n_sanity,
            "seed": params.seed,
            "draws": params.draws,
            "batch_size": params.batch_size,
            "tolerance": params.tolerance,
            "device": str(resolve_device(params.device)),
            "profile_note": params.profile_note,
            "primary": params.primary.to_dict(),
            "sanity": {
                "references": list(sanity.references),
                "eps_sweep": {k: sorted(set(v)) for k, v in sanity.eps_sweep.items()},
                "stronger": dict(sanity.stronger),
                "alpha": sanity.alpha,
                "large_eps_max_acc": sanity.large_eps_max_acc,
            },
        },
        "attacks": attacks,
        "defenses": {n: {k: v for k, v in r.items() if k != "grid"} for n, r in defenses.items()},
        "skipped": skipped,
        "unseen": unseen_attacks(purifier_atop, [(e.label, e.name, e.norm) for e in entries]),
        "grid": grid,
        "class_names": list(class_names),
    }

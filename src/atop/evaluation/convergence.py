"""Convergence evidence: robust accuracy vs PGD steps and vs EOT samples (method.md §5.2).

An attack on a stochastic defense is only trustworthy where more steps and more draws per
step no longer lower the accuracy. :func:`study` runs the PGD of ``convergence.attack`` on a
defense with each step count of ``steps`` (at ``eot_at`` EOT samples; one run of the largest
count, read off at the others) and each EOT count of ``eot`` (at ``steps_at`` steps), judges
every output with ``draws`` fresh draws, and
:func:`summarize` finds where each curve is flat: the smallest setting whose single-draw
accuracy is within one standard error of the strongest setting tried.

Core module: torch, torchattacks and the project's core modules only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atop.attacks import build_attack
from atop.checkpoint import state_hash
from atop.evaluation.defenses import PURIFIED, Defense
from atop.evaluation.protocol import (
    EvalData,
    EvalSettings,
    judge,
    max_perturbation,
    per_image,
    run_one,
    uses_amp,
)
from atop.evaluation.stats import standard_error
from atop.params import Params, run_only, spec
from atop.progress import progress
from atop.training import autocast, seed_everything

log = logging.getLogger(__name__)

ALPHA_RULES = ("fixed", "2.5eps/steps")


@dataclass(init=False, frozen=True)
class ConvergenceParams(Params):
    """``convergence`` (conf/base/parameters_convergence.yml)."""

    KEY = "convergence"

    defenses: list[str] = spec(choices=PURIFIED)
    images: int = spec(ge=1, unit="(the first images of eval_indices)")
    attack: dict[str, Any]
    alpha_rule: str = spec(choices=ALPHA_RULES)
    steps: list[int] = spec(ge=1)
    eot_at: int = spec(ge=1)
    eot: list[int] = spec(ge=1)
    steps_at: int = spec(ge=1)
    draws: int = spec(ge=1)
    batch_size: int = spec(ge=1)
    attack_amp: bool
    seed: int = spec(ge=0)
    device: str = run_only()
    progress: bool = run_only()

    def check(self) -> None:
        if self.attack.get("name") != "pgd" or "steps" in self.attack or "eot_iter" in self.attack:
            self.fail("attack", "give a 'pgd' spec without steps and eot_iter (they are swept).")

    @property
    def settings(self) -> EvalSettings:
        """Batch size, draws, seed, progress, attack precision as :class:`EvalSettings`."""
        return EvalSettings(self.batch_size, self.draws, self.seed, self.progress, self.attack_amp)

    def spec_for(self, steps: int, eot: int) -> dict[str, Any]:
        """The PGD spec with ``steps`` steps of ``eot`` EOT samples; ``alpha`` as given
        (``fixed``) or ``2.5 eps / steps`` (Madry et al.'s rule)."""
        alpha = self.attack["alpha"]
        if self.alpha_rule != "fixed":
            alpha = 2.5 * self.attack["eps"] / steps
        return {**self.attack, "alpha": alpha, "steps": steps, "eot_iter": eot}


def study(defense: Defense, data: EvalData, params: ConvergenceParams) -> dict[str, Any]:
    """Run both sweeps on ``defense`` (stochastic) and judge every output with fresh draws.

    With a fixed ``alpha`` the steps sweep is one run of the largest step count that keeps
    its iterates at the smaller counts (:class:`atop.attacks.PackedEOTPGD` ``snapshots``):
    PGD-k is the first k steps of PGD-K from the same start, so this is the same estimator
    at a fraction of the cost (k passes less per point), with other random numbers than
    separate runs. A sharded run (``torch.distributed``) and Madry's step-size rule run
    each setting on its own.

    Returns:
        ``{"steps": [(k, bool [N, D])], "eot": [(k, bool [N, D])], "norm", "eps",
        "eot_at", "steps_at", "indices", "model"}`` (the images' test-set indices, the
        weights' :func:`atop.checkpoint.state_hash`); a setting present in both sweeps runs
        once.

    Raises:
        ValueError: a bad spec.
    """
    settings = params.settings
    norm = params.attack.get("norm", "Linf")
    done: dict[tuple[int, int], Tensor] = {}
    if params.alpha_rule == "fixed" and norm == "Linf" and not settings.by_batch:
        done.update(_trajectory(defense, data, params))

    def verdicts(steps: int, eot: int) -> Tensor:
        if (steps, eot) not in done:
            spec_ = params.spec_for(steps, eot)
            label = f"pgd{steps}_eot{eot}"
            run = run_one(defense, label, spec_, norm, spec_["eps"], data, settings)
            done[(steps, eot)] = run.draws
        return done[(steps, eot)]

    return {
        "steps": [(k, verdicts(k, params.eot_at)) for k in sorted(params.steps)],
        "eot": [(k, verdicts(params.steps_at, k)) for k in sorted(params.eot)],
        "norm": norm,
        "eps": params.attack["eps"],
        "eot_at": params.eot_at,
        "steps_at": params.steps_at,
        "indices": list(data.indices),
        "model": state_hash(defense.model.state_dict()),
    }


def _trajectory(
    defense: Defense, data: EvalData, params: ConvergenceParams
) -> dict[tuple[int, int], Tensor]:
    """The steps sweep read off one PGD run of the largest step count (at ``eot_at``):
    ``{(k, eot_at): bool [N, D]}``, every iterate judged with fresh draws (seeded and in
    bf16 as :func:`run_one`)."""
    settings, steps = params.settings, sorted(set(params.steps))
    spec_ = params.spec_for(steps[-1], params.eot_at)
    seed_everything(settings.seed)
    attack = build_attack(
        defense.model, spec_, data.n_classes, settings.batch_size, tuple(steps[:-1])
    )
    iterates: dict[int, list[Tensor]] = {k: [] for k in steps}
    began = time.perf_counter()
    size = settings.batch_size
    with autocast(data.images.device, uses_amp(spec_, settings)):
        for start in progress(range(0, len(data.labels), size), settings.progress, desc="pgd"):
            rows = slice(start, start + size)
            iterates[steps[-1]].append(attack(data.images[rows], data.labels[rows]))
            for k in steps[:-1]:
                iterates[k].append(attack.iterates[k])
    seconds = time.perf_counter() - began
    out = {}
    for k in steps:
        adversarial = torch.cat(iterates[k])
        label = f"pgd{k}_eot{params.eot_at}"
        out[(k, params.eot_at)] = draws = judge(defense, adversarial, data.labels, settings, label)
        log.info(
            "%s / %s: robust accuracy %.4f single-draw (one %d-step run, %.1f s; max "
            "perturbation %.4g)",
            defense.name,
            label,
            per_image(draws, "single").mean().item(),
            steps[-1],
            seconds,
            max_perturbation(data.images, adversarial, "Linf"),
        )
    return out


def flat_point(curve: list[tuple[int, float, float]]) -> dict[str, Any]:
    """The smallest setting of a curve ``[(k, accuracy, standard error)]`` whose accuracy is
    within one standard error (of the strongest point) of the strongest (lowest) one."""
    strongest = min(curve, key=lambda point: point[1])
    flat = next(k for k, acc, _ in curve if acc <= strongest[1] + strongest[2])
    return {
        "strongest": strongest[0],
        "strongest_acc": strongest[1],
        "se": strongest[2],
        "flat_from": flat,
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Single-draw accuracy (and its standard error) of every setting, and each curve's
    :func:`flat_point`: ``{"steps": {"points": {k: {acc, se, worst_of_n}}, **flat},
    "eot": ...}``."""
    out: dict[str, Any] = {}
    for sweep in ("steps", "eot"):
        curve, points = [], {}
        for k, draws in result[sweep]:
            single = per_image(draws, "single")
            acc, se = single.mean().item(), standard_error(single)
            worst = per_image(draws, "worst_of_n").float().mean().item()
            curve.append((k, acc, se))
            points[str(k)] = {"acc": acc, "se": se, "worst_of_n": worst}
        out[sweep] = {"points": points, **flat_point(curve)}
    return out

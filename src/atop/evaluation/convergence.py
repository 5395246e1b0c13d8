"""Convergence evidence: robust accuracy vs PGD steps and vs EOT samples, both norms
(method.md §5.2), and whether any stronger setting lowers the headline.

An attack on a stochastic defense is only trustworthy where more steps and more draws per
step no longer lower the accuracy. :func:`study` runs the PGD of each ``convergence.attacks``
entry (one per threat model, exact gradients through ``t`` and ``g``) on a defense at every
setting ``(steps, eot)`` of the steps sweep (``steps`` at ``eot_at`` EOT samples), the EOT
sweep (``eot`` at ``steps_at`` steps) and the ``extra`` points (e.g. PGD-200 x EOT-20, the
strongest published protocol), and judges every output with ``draws`` fresh draws.

Cost: the settings with ``steps x eot <= all_images_cost`` passes per image run on every
image (one run per EOT count, read off at its smaller step counts: PGD-k is the first k
steps of PGD-K from the same start with a fixed step size). The costlier ones run, in the
same way, only on the images still standing (AutoAttack's cascade,
:func:`atop.evaluation.protocol.run_on_survivors`): a right draw in every earlier set (clean,
the cheaper points and the defense's own headline attacks of that norm). Elsewhere they keep
the cheaper points' best example, judged afresh.

:func:`summarize` compares every setting with the defense's **headline** (the cross-fitted
per-image worst case over clean and the evaluation's attacks of the same norm,
:func:`atop.evaluation.protocol.crossfit_worst`): a setting *lowers the headline* when the
mean per-image difference exceeds its **paired** standard error, floored at one image's
share (``1 / n``: with every score at 0 the standard error is 0, and no attack can do
better than 0). Where one does, the headline is not converged; the reports then take the
worst case over the headline's attacks and the settings that lower it.

Core module: torch, torchattacks and the project's core modules only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from atop.checkpoint import state_hash
from atop.evaluation.defenses import STUDIED, Defense
from atop.evaluation.protocol import (
    AttackEntry,
    AttackRun,
    EvalData,
    EvalSettings,
    crossfit_worst,
    format_eps,
    judge,
    per_image,
    run_on_survivors,
    run_one,
)
from atop.evaluation.stats import paired_se, standard_error
from atop.params import Params, fraction, run_only, spec

log = logging.getLogger(__name__)


@dataclass(init=False, frozen=True)
class ConvergenceParams(Params):
    """``convergence`` (conf/base/parameters_convergence.yml)."""

    KEY = "convergence"

    defenses: list[str] = spec(choices=STUDIED)
    images: int = spec(ge=1, unit="(the first images of eval_indices)")
    attacks: list[dict[str, Any]]
    steps: list[int] = spec(ge=1)
    eot_at: int = spec(ge=1)
    eot: list[int] = spec(ge=1)
    steps_at: int = spec(ge=1)
    extra: list[list[int]]
    all_images_cost: int = spec(ge=1, unit="(steps x EOT passes per image)")
    draws: int = spec(ge=1)
    batch_size: int = spec(ge=1)
    attack_amp: bool
    seed: int = spec(ge=0)
    device: str = run_only()
    progress: bool = run_only()

    def check(self) -> None:
        norms = []
        for i, attack in enumerate(self.attacks):
            if attack.get("name") != "pgd" or "steps" in attack or "eot_iter" in attack:
                self.fail(
                    f"attacks[{i}]",
                    "give a 'pgd' spec without steps and eot_iter (they are swept).",
                )
            norms.append(attack.get("norm"))
        if len(set(norms)) != len(norms):
            self.fail("attacks", f"one pgd spec per norm, got norms {norms}.")
        for i, point in enumerate(self.extra):
            if len(point) != 2 or any(not isinstance(v, int) or v < 1 for v in point):
                self.fail(f"extra[{i}]", f"give [steps, eot] (positive integers), got {point}.")

    @property
    def settings(self) -> EvalSettings:
        """Batch size, draws, seed, progress, attack precision as :class:`EvalSettings`."""
        return EvalSettings(self.batch_size, self.draws, self.seed, self.progress, self.attack_amp)

    @property
    def points(self) -> list[tuple[int, int]]:
        """Every ``(steps, eot)`` setting, sorted by cost then steps."""
        settings = {(k, self.eot_at) for k in self.steps}
        settings |= {(self.steps_at, e) for e in self.eot}
        settings |= {(int(k), int(e)) for k, e in self.extra}
        return sorted(settings, key=lambda p: (p[0] * p[1], p[0]))

    def entry(self, norm: str) -> AttackEntry:
        """The swept PGD of ``norm`` as an attack entry (no steps / EOT yet)."""
        (attack,) = [a for a in self.attacks if a.get("norm", "Linf") == norm]
        spec_ = {**attack, "eps": fraction(attack["eps"]), "alpha": fraction(attack["alpha"])}
        return AttackEntry(f"pgd_{norm.lower()}", spec_, norm, spec_["eps"])


def point_key(steps: int, eot: int) -> str:
    """The record key of a setting: ``"200x20"``."""
    return f"{steps}x{eot}"


def _groups(points: Sequence[tuple[int, int]], cheap: bool, limit: int) -> dict[int, list[int]]:
    """``{eot: sorted step counts}`` of the points on the cheap (or the costly) side."""
    groups: dict[int, list[int]] = {}
    for steps, eot in points:
        if (steps * eot <= limit) == cheap:
            groups.setdefault(eot, []).append(steps)
    return {e: sorted(ks) for e, ks in sorted(groups.items())}


def study(
    defense: Defense,
    data: EvalData,
    params: ConvergenceParams,
    headline: Mapping[str, Sequence[Tensor]] | None = None,
) -> dict[str, Any]:
    """Run every setting of both norms on ``defense`` and judge each output with fresh draws.

    Args:
        defense: a stochastic defense; data: the study's images.
        params: ``convergence``.
        headline: ``{norm: [bool [N, D] verdict sets]}``: clean and the evaluation's attacks
            of that norm on the same images (the defense's headline); they also decide which
            images the costly settings still attack. ``None``: no headline to compare with.

    Returns:
        ``{"model": weights hash, "indices", "norms": {norm: {"eps", "alpha", "points":
        {key: {"steps", "eot", "draws": bool [N, D], "attacked": bool [N] | None,
        "seconds"}}, "headline": [bool [N, D]] | None}}}``.

    Raises:
        ValueError: a bad spec.
    """
    settings = params.settings
    out: dict[str, Any] = {
        "model": state_hash(defense.model.state_dict()),
        "indices": list(data.indices),
        "norms": {},
    }
    clean = AttackRun(judge(defense, data.images, data.labels, settings), data.images, 0.0, 0.0)
    for attack in params.attacks:
        norm = attack.get("norm", "Linf")
        entry = params.entry(norm)
        earlier = list(headline.get(norm, [])) if headline else []
        points, runs = {}, [clean]
        for cheap in (True, False):
            for eot, steps in _groups(params.points, cheap, params.all_images_cost).items():
                spec_ = {**entry.spec, "steps": steps[-1], "eot_iter": eot}
                label = f"{entry.label}_{point_key(steps[-1], eot)}"
                snapshots = tuple(steps[:-1])
                if cheap:
                    run = run_one(
                        defense, label, spec_, norm, entry.eps, data, settings, None, snapshots
                    )
                else:
                    standing = runs + [_verdicts_only(d) for d in earlier]
                    costly = AttackEntry(label, spec_, norm, entry.eps, survivors=True)
                    run = run_on_survivors(
                        defense, costly, spec_, data, settings, standing, None, snapshots
                    )
                for k in steps:
                    draws = run.draws if k == steps[-1] else run.iterates[k]
                    points[point_key(k, eot)] = {
                        "steps": k,
                        "eot": eot,
                        "draws": draws,
                        "attacked": run.attacked,
                        "seconds": round(run.seconds, 3),
                    }
                runs.append(run)
        out["norms"][norm] = {
            "eps": entry.eps,
            "alpha": entry.spec["alpha"],
            "points": {k: points[k] for k in map(lambda p: point_key(*p), params.points)},
            "headline": earlier or None,
        }
    return out


def _verdicts_only(draws: Tensor) -> AttackRun:
    """An earlier verdict set without its examples (it only decides who still stands; an
    image it beat keeps the study's own best example instead)."""
    return AttackRun(draws, torch.empty(0), 0.0, None)


def summarize(result: Mapping[str, Any]) -> dict[str, Any]:
    """Per norm: every setting's single-draw accuracy (± binomial SE), worst-of-N, the
    images it attacked, and its comparison with the headline (``gap`` = headline − setting,
    mean over images; ``paired_se`` with its floor; ``lowers``: gap > paired SE); then
    ``converged`` (no setting lowers it), ``max_gap`` and the strongest setting.

    Returns:
        ``{norm: {"eps", "points": {key: {...}}, "headline", "converged", "max_gap",
        "strongest"}}`` (``headline``: the cross-fitted single-draw worst case, ``None``
        without one; then ``converged`` is ``None``).
    """
    out: dict[str, Any] = {}
    for norm, record in result["norms"].items():
        headline = crossfit_worst(record["headline"]) if record["headline"] else None
        points = {}
        for key, point in record["points"].items():
            single = per_image(point["draws"], "single")
            n = len(single)
            entry = {
                "steps": point["steps"],
                "eot": point["eot"],
                "acc": single.mean().item(),
                "se": standard_error(single),
                "worst_of_n": per_image(point["draws"], "worst_of_n").float().mean().item(),
                "attacked": n if point["attacked"] is None else int(point["attacked"].sum()),
            }
            if headline is not None:
                gap = (headline - single).mean().item()
                se = max(paired_se(headline, single), 1.0 / n)
                entry.update(gap=gap, paired_se=se, lowers=gap > se)
            points[key] = entry
        strongest = min(points, key=lambda k: points[k]["acc"])
        out[norm] = {
            "eps": record["eps"],
            "points": points,
            "headline": None if headline is None else headline.mean().item(),
            "converged": None
            if headline is None
            else not any(p["lowers"] for p in points.values()),
            "max_gap": None if headline is None else max(p["gap"] for p in points.values()),
            "strongest": strongest,
        }
    return out


def describe(norm: str, eps: float) -> str:
    """``"PGD Linf eps 8/255"``."""
    return f"PGD {norm} eps {format_eps(eps, norm)}"

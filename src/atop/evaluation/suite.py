"""The evaluation stage's protocol for one defense: its parameters, every attack, the
sanity checks, the per-image results (:func:`evaluate_defense`).

The Kedro stage runs :func:`evaluate_defense` once per defense (one node each), so a defense
can be re-evaluated alone; the report gathers the results.

Core module: torch, torchattacks and the project's core modules only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from atop.attacks import build_attack
from atop.defense import (
    PurifiedClassifier,
    from_working,
    purify_draw,
    to_working,
    working_side,
)
from atop.distributed import DistributedParams
from atop.evaluation.defenses import DEFENSES, PURIFIED, Defense
from atop.evaluation.protocol import (
    AttackEntry,
    AttackRun,
    EvalData,
    EvalSettings,
    Validator,
    attack_defense,
    defense_results,
    defense_spec,
    judge,
    parse_attacks,
    run_one,
)
from atop.evaluation.sanity import SanityParams, sanity_checks, sanity_runs
from atop.params import Params, run_only, spec

log = logging.getLogger(__name__)


@dataclass(init=False, frozen=True)
class GridParams(Params):
    """``evaluation.grid``: the defense and attack whose images the grid figure shows."""

    defense: str = spec(choices=DEFENSES)
    attack: str
    images: int = spec(ge=1)


@dataclass(init=False, frozen=True)
class EvalParams(Params):
    """``evaluation`` (conf/base/parameters_evaluation.yml)."""

    KEY = "evaluation"

    images: int | None = spec(ge=1, unit="(the first images of eval_indices; null = all)")
    defenses: list[str] = spec(choices=DEFENSES)
    batch_size: int = spec(ge=1)
    draws: int = spec(ge=1, unit="(fresh draws judging each image: N of the N-evaluation)")
    attack_amp: bool
    fixed_randomness: bool
    tolerance: float = spec(ge=0, le=0.01)
    seed: int = spec(ge=0)
    device: str = run_only()
    progress: bool = run_only()
    profile_note: str
    attacks: list[dict[str, Any]]
    sanity: SanityParams
    grid: GridParams
    distributed: DistributedParams

    def check(self) -> None:
        try:
            entries = parse_attacks(self.attacks)
        except ValueError as exc:
            self.fail("attacks", str(exc))
        reference = next((e for e in entries if e.label == self.sanity.reference), None)
        if reference is None or reference.name != "pgd" or reference.survivors:
            self.fail(
                "sanity.reference",
                f"{self.sanity.reference!r} must be the label of a 'pgd' attack entry that "
                "runs on every image (not `survivors`) "
                f"(have {[e.label for e in entries if not e.survivors]}).",
            )
        covered = set(self.sanity.defenses or DEFENSES)
        if reference.applies_to != "all":  # stochastic = the purified defenses
            skipped = sorted(
                n for n in covered if (n in PURIFIED) != (reference.applies_to == "stochastic")
            )
            if skipped:
                self.fail(
                    "sanity.defenses",
                    f"{skipped} are not attacked by the reference {reference.label!r} "
                    f"(applies_to: {reference.applies_to}); name a reference that applies "
                    "to every checked defense.",
                )
        if reference.defenses is not None and not covered <= set(reference.defenses):
            self.fail(
                "sanity.defenses",
                f"{sorted(covered - set(reference.defenses))} are not attacked by the "
                f"reference {reference.label!r} (its defenses: {list(reference.defenses)}).",
            )
        named = {"sanity.defenses": self.sanity.defenses or []}
        named.update({f"attacks.{e.label}.defenses": e.defenses or [] for e in entries})
        for key, names in named.items():
            unknown = sorted(set(names) - set(DEFENSES))
            if unknown:
                self.fail(key, f"unknown defenses {unknown}; choose from {list(DEFENSES)}.")

    @property
    def entries(self) -> list[AttackEntry]:
        """The parsed ``attacks``."""
        return parse_attacks(self.attacks)

    @property
    def settings(self) -> EvalSettings:
        """Batch size, draws, seed and progress as :class:`EvalSettings`."""
        return EvalSettings(self.batch_size, self.draws, self.seed, self.progress, self.attack_amp)


def check_plan(defense: Defense, params: EvalParams, n_classes: int) -> None:
    """Build every attack of ``params`` on ``defense`` once, before the first (long) run.

    Raises:
        ValueError: a spec that cannot be built.
    """
    for entry in params.entries:
        spec_ = defense_spec(entry, defense, params.draws, params.seed)
        if spec_ is not None:
            build_attack(defense.model, spec_, n_classes)


def evaluate_defense(
    defense: Defense,
    data: EvalData,
    params: EvalParams,
    validate: Validator | None = None,
    *,
    sanity: bool = True,
) -> dict[str, Any]:
    """Every attack of ``params`` on ``defense``, the sanity checks, and the grid images.

    Args:
        defense: the model under attack.
        data: the evaluation images (the first ``params.images`` of ``eval_indices``).
        params: ``evaluation``.
        validate: an extra check of every attack output (the Great Expectations suite).
        sanity: also run the sanity checks' own attacks (the ε sweep, the stronger attack)
            and the fixed-randomness row; ``False`` (the main job) leaves them to
            :func:`complete_sanity` (the full comparison) and checks only what the attacks
            above decide (PGD vs FGSM, exact vs BPDA).

    Returns:
        :func:`atop.evaluation.protocol.defense_results` plus ``fixed_randomness`` and
        ``grid`` (images for the figure when this is ``params.grid.defense``, else ``None``).

    Raises:
        ValueError: a spec that cannot be built; anything ``validate`` raises.
    """
    check_plan(defense, params, data.n_classes)
    runs = attack_defense(defense, params.entries, data, params.settings, validate)
    clean = runs.pop("clean").draws
    result = defense_results(defense, clean, runs, [], {})
    result["fixed_randomness"] = None
    result = complete_sanity(defense, data, params, result, validate, run=sanity)
    grid = params.grid
    result["grid"] = None
    if defense.name == grid.defense and grid.attack in runs:
        result["grid"] = {
            **grid_images(defense, data, runs[grid.attack], grid.images),
            "attack": grid.attack,
        }
    return result


def complete_sanity(
    defense: Defense,
    data: EvalData,
    params: EvalParams,
    result: dict[str, Any],
    validate: Validator | None = None,
    *,
    run: bool = True,
    study: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sanity checks of a defense already attacked (``result``: its
    :func:`evaluate_defense` output): the ε sweep and the stronger reference attack on the
    first ``params.sanity.images`` (the stronger attack read from ``study``, the defense's
    convergence study, where it fits: :func:`atop.evaluation.sanity.study_points`), the
    fixed-randomness row (stochastic defenses), then every check
    (:func:`atop.evaluation.sanity.sanity_checks`).

    A defense outside ``params.sanity.defenses``, or ``run=False``, runs no extra attack:
    its sweep / stronger checks are "not run" with the reason. Returns a new result dict
    (``sweep``, ``sanity``, ``fixed_randomness`` replaced).
    """
    (reference,) = [e for e in params.entries if e.label == params.sanity.reference]
    clean = result["clean"]
    draws = {label: a["draws"] for label, a in result["attacks"].items()}
    n = min(params.sanity.images or len(clean), len(clean))
    listed = params.sanity.defenses is None or defense.name in params.sanity.defenses
    sweep, stronger, fixed, not_run = [], [], None, None
    if not listed:
        not_run = "not in evaluation.sanity.defenses"
    elif not run:
        not_run = "runs in the full comparison (comparison_report.md)"
    else:
        sweep, stronger = sanity_runs(
            defense, reference, draws[reference.label], clean, sorted(set(params.sanity.eps_sweep)),
            data.head(n), params.sanity, params.settings, validate, study,
        )  # fmt: skip
        if params.fixed_randomness and defense.stochastic:
            fixed = fixed_randomness_run(defense, reference, data, params.settings)
    checks = sanity_checks(
        clean[:n], draws, params.entries, sweep, stronger, reference, params.sanity, not_run
    )
    return {
        **result,
        "sweep": [{"eps": eps, "draws": d} for eps, d in sweep],
        "sanity": checks,
        "fixed_randomness": fixed,
    }


class FixedRandomness(nn.Module):
    """A purified defense with ONE draw of its randomness per call (seeded afresh at every
    call): a deterministic model, for the diagnostic that attacks and judges with the same
    noise and masks. The gap to the fresh-draw accuracy is how much of the defense's
    robustness comes from its randomness (method.md §5.2). The draw depends on the call's
    batch, so the attack and the judging must call it on the same batches (both use the
    settings' batch size, and PGD calls it on whole batches)."""

    def __init__(self, defense: PurifiedClassifier, seed: int) -> None:
        super().__init__()
        self.defense = defense
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.defense.generator = torch.Generator(device=x.device).manual_seed(self.seed)
        try:
            return self.defense(x)
        finally:
            self.defense.generator = None


def fixed_randomness_run(
    defense: Defense, reference: AttackEntry, data: EvalData, settings: EvalSettings
) -> dict[str, Any]:
    """The reference attack (EOT 1) on :class:`FixedRandomness` of ``defense``, judged with
    the same fixed draw: ``{"attack", "clean", "draws"}`` (bool ``[N, 1]`` verdicts)."""
    fixed = Defense(f"{defense.name}_fixed", FixedRandomness(defense.model, settings.seed), False)
    spec_ = {**reference.spec, "eot_iter": 1}
    run = run_one(fixed, reference.label, spec_, reference.norm, reference.eps, data, settings)
    clean = judge(fixed, data.images, data.labels, settings)
    return {"attack": reference.label, "clean": clean, "draws": run.draws}


@torch.no_grad()
def grid_images(defense: Defense, data: EvalData, run: AttackRun, n: int) -> dict[str, Any]:
    """Images for the adversarial grid: clean, adversarial, transformed, purified rows.

    For a purified defense the transform is drawn once on the adversarial images; the
    "transformed" row shows ``t(x')`` with the holes black, the "purified" row
    ``g(t(x'))`` of that same draw, and ``prediction`` is ``f`` on it. For a bare
    classifier the last two rows are ``None``.

    Returns:
        ``{"clean", "adversarial", "transformed", "purified"}`` float ``[n, 3, H, W]`` CPU
        tensors in ``[0, 1]`` (or ``None``), ``labels`` and ``prediction`` (lists of int),
        ``defense`` name.
    """
    n = min(n, len(data.labels))
    clean, adversarial = data.images[:n], run.adversarial[:n]
    out: dict[str, Any] = {
        "defense": defense.name,
        "clean": clean.cpu(),
        "adversarial": adversarial.cpu(),
        "labels": data.labels[:n].tolist(),
        "transformed": None,
        "purified": None,
    }
    model = defense.model
    if isinstance(model, PurifiedClassifier):
        side = adversarial.shape[-1]
        draw = model.transform(to_working(adversarial, working_side(model.purifier, side)))
        _, purified = purify_draw(model.purifier, draw, model.transform.config)
        purified = from_working(purified, side)
        out["transformed"] = from_working(draw.image * (1 - draw.masks[0]), side).cpu()
        out["purified"] = purified.cpu()
        out["prediction"] = model.classifier(purified).argmax(1).tolist()
    else:
        out["prediction"] = model(adversarial).argmax(1).tolist()
    return out

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

from atop.attacks import NORMS, build_attack
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
from atop.evaluation.sanity import ReferenceRuns, SanityParams, sanity_checks, sanity_runs
from atop.params import Params, run_only, spec

log = logging.getLogger(__name__)


@dataclass(init=False, frozen=True)
class GridParams(Params):
    """``evaluation.grid``: the defense and attack whose images the grid figure shows."""

    defense: str = spec(choices=DEFENSES)
    attack: str
    images: int = spec(ge=1)


@dataclass(init=False, frozen=True)
class PrimaryParams(Params):
    """``evaluation.primary``: the confirmatory family, declared before any run. Each test
    compares ``focus`` with one defense of ``versus`` on one threat model of ``norms``
    (the single-draw worst case, paired over images); the family's p-values are
    Holm-adjusted at ``level``. Every other comparison in a report is exploratory."""

    focus: str = spec(choices=DEFENSES)
    versus: list[str] = spec(choices=DEFENSES)
    norms: list[str] = spec(choices=NORMS)
    level: float = spec(gt=0, lt=1)


@dataclass(init=False, frozen=True)
class EvalParams(Params):
    """``evaluation`` (conf/base/parameters_evaluation.yml)."""

    KEY = "evaluation"

    images: int | None = spec(ge=1, unit="(the first images of eval_indices; null = all)")
    defenses: list[str] = spec(choices=DEFENSES)
    batch_size: int = spec(ge=1)
    draws: int = spec(ge=2, unit="(fresh draws judging each image: N of the N-evaluation)")
    attack_amp: bool
    fixed_randomness: bool
    tolerance: float = spec(ge=0, le=0.01)
    seed: int = spec(ge=0)
    device: str = run_only()
    progress: bool = run_only()
    profile_note: str
    attacks: list[dict[str, Any]]
    primary: PrimaryParams
    sanity: SanityParams
    grid: GridParams
    distributed: DistributedParams

    def check(self) -> None:
        try:
            entries = parse_attacks(self.attacks)
        except ValueError as exc:
            self.fail("attacks", str(exc))
        by_label = {e.label: e for e in entries}
        covered = set(self.sanity.defenses or DEFENSES)
        norms = []
        for i, label in enumerate(self.sanity.references):
            reference = by_label.get(label)
            if reference is None or reference.name != "pgd" or reference.survivors:
                self.fail(
                    f"sanity.references[{i}]",
                    f"{label!r} must be the label of a 'pgd' attack entry that runs on every "
                    f"image (not `survivors`) (have {[e.label for e in entries if not e.survivors]}).",
                )
            norms.append(reference.norm)
            if reference.norm not in self.sanity.eps_sweep:
                self.fail("sanity.eps_sweep", f"give a sweep for {reference.norm} ({label!r}).")
            self._covers(reference, covered, f"sanity.references[{i}]")
        if len(set(norms)) != len(norms):
            self.fail("sanity.references", f"one reference per threat model, got norms {norms}.")
        named = {"sanity.defenses": self.sanity.defenses or []}
        named.update({f"attacks.{e.label}.defenses": e.defenses or [] for e in entries})
        for key, names in named.items():
            unknown = sorted(set(names) - set(DEFENSES))
            if unknown:
                self.fail(key, f"unknown defenses {unknown}; choose from {list(DEFENSES)}.")
        if self.images is not None:
            for key, count in (
                ("sanity.images", self.sanity.images),
                ("grid.images", self.grid.images),
            ):
                if count is not None and count > self.images:
                    self.fail(
                        key,
                        f"{count} is above evaluation.images={self.images}: it uses the first "
                        "evaluation images, so choose at most that many.",
                    )
        if self.primary.focus in self.primary.versus:
            self.fail(
                "primary.versus", f"{self.primary.focus!r} is the focus: compare it with others."
            )

    def _covers(self, reference: AttackEntry, covered: set[str], key: str) -> None:
        """Refuse a reference that skips some of the defenses the checks cover."""
        if reference.applies_to != "all":  # stochastic = the purified defenses
            skipped = sorted(
                n for n in covered if (n in PURIFIED) != (reference.applies_to == "stochastic")
            )
            if skipped:
                self.fail(
                    "sanity.defenses",
                    f"{skipped} are not attacked by the reference {reference.label!r} "
                    f"(applies_to: {reference.applies_to}); name a reference that applies "
                    f"to every checked defense ({key}).",
                )
        if reference.defenses is not None and not covered <= set(reference.defenses):
            self.fail(
                "sanity.defenses",
                f"{sorted(covered - set(reference.defenses))} are not attacked by the "
                f"reference {reference.label!r} (its defenses: {list(reference.defenses)}).",
            )

    @property
    def entries(self) -> list[AttackEntry]:
        """The parsed ``attacks``."""
        return parse_attacks(self.attacks)

    @property
    def references(self) -> list[AttackEntry]:
        """The sanity checks' reference entries (one per threat model)."""
        by_label = {e.label: e for e in self.entries}
        return [by_label[label] for label in self.sanity.references]

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
    result = defense_results(defense, clean, runs, {}, {})
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
    :func:`evaluate_defense` output): for each reference PGD (one per threat model), the ε
    sweep and the stronger attack on the first ``params.sanity.images`` (the stronger attack
    read from ``study``, the defense's convergence study, where it fits:
    :func:`atop.evaluation.sanity.study_points`) and the fixed-randomness row (stochastic
    defenses), then every check (:func:`atop.evaluation.sanity.sanity_checks`).

    A defense outside ``params.sanity.defenses``, or ``run=False``, runs no extra attack:
    its sweep / stronger checks are "not run" with the reason. Returns a new result dict
    (``sweep``: ``{norm: [{"eps", "draws"}]}``, ``sanity``, ``fixed_randomness``: ``{norm:
    row}`` replaced; ``study`` kept for the report when given).
    """
    clean = result["clean"]
    draws = {label: a["draws"] for label, a in result["attacks"].items()}
    n = len(clean) if params.sanity.images is None else params.sanity.images
    listed = params.sanity.defenses is None or defense.name in params.sanity.defenses
    not_run = None
    if not listed:
        not_run = "not in evaluation.sanity.defenses"
    elif not run:
        not_run = "runs in the full comparison (comparison_report.md)"
    references = [ReferenceRuns(r) for r in params.references if r.label in draws]
    fixed: dict[str, Any] = {}
    if not_run is None:
        references = [
            sanity_runs(
                defense, r.reference, draws[r.reference.label], clean,
                sorted(set(params.sanity.eps_sweep[r.reference.norm])), data.head(n),
                params.sanity, params.settings, validate, study,
            )
            for r in references
        ]  # fmt: skip
        if params.fixed_randomness and defense.stochastic:
            fixed = {
                r.reference.norm: fixed_randomness_run(defense, r.reference, data, params.settings)
                for r in references
            }
    checks = sanity_checks(clean[:n], draws, params.entries, references, params.sanity, not_run)
    out = {
        **result,
        "sweep": {
            r.reference.norm: [{"eps": eps, "draws": d} for eps, d in r.sweep] for r in references
        },
        "sanity": checks,
        "fixed_randomness": fixed or None,
    }
    if study is not None:
        out["study"] = study
    return out


class FixedRandomness(nn.Module):
    """A stochastic defense with ONE draw of its randomness per call (seeded afresh at every
    call): a deterministic model, for the diagnostic that attacks and judges with the same
    draw. The gap to the fresh-draw accuracy is how much of the defense's robustness comes
    from its randomness (method.md §5.2). A :class:`atop.defense.PurifiedClassifier` draws
    from its own generator; any other module runs with the global random generators
    reseeded (and restored afterwards), so it works for a user's randomized defense that
    draws from torch's global RNG. The draw depends on the call's batch, so the attack and
    the judging must call it on the same batches (both use the settings' batch size, and
    PGD calls it on whole batches). Inputs and outputs as the wrapped model."""

    def __init__(self, defense: nn.Module, seed: int) -> None:
        super().__init__()
        self.defense = defense
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.defense, PurifiedClassifier):
            self.defense.generator = torch.Generator(device=x.device).manual_seed(self.seed)
            try:
                return self.defense(x)
            finally:
                self.defense.generator = None
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return self.defense(x)


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

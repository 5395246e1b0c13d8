"""Gradient-masking sanity checks of one defense (Carlini et al., "On Evaluating
Adversarial Robustness", 2019; method.md §4).

Accuracy must fall as ε grows and reach ~0 at a large ε; more steps / EOT samples must not
raise it; iterative attacks must beat single-step ones; exact gradients must be at least as
strong as BPDA. Every comparison is paired (same images) with a noise margin
(:func:`paired_rise`). :func:`sanity_runs` runs the extra attacks (the ε sweep and the stronger
reference attack); :func:`sanity_checks` turns the verdicts into pass / fail.

Core module: torch and the project's core modules only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from atop.evaluation.defenses import Defense
from atop.evaluation.protocol import (
    AttackEntry,
    AttackRun,
    EvalData,
    EvalSettings,
    Validator,
    defense_spec,
    format_eps,
    run_one,
)
from atop.params import Params, spec


@dataclass(init=False, frozen=True)
class SanityParams(Params):
    """``evaluation.sanity``: the reference PGD entry, the ε sweep, the stronger attack."""

    reference: str
    eps_sweep: list[float] = spec(ge=0, le=1, unit="on the [0, 1] pixel scale")
    stronger: dict[str, Any]
    images: int | None = spec(ge=1)
    large_eps_max_acc: float = spec(ge=0, le=1)
    z: float = spec(ge=0)
    min_images: int = spec(ge=0)


def paired_rise(before: Tensor, after: Tensor, z: float, min_images: int) -> dict[str, Any]:
    """How many more images are correct in ``after`` than in ``before``, against sampling noise.

    Paired comparison on the same images (McNemar): ``c`` = images correct only in
    ``after``, ``b`` = correct only in ``before``; the rise ``c - b`` is within noise when
    ``c - b <= max(min_images, z * sqrt(b + c))`` (under "no real change" the discordant
    images split like fair coin flips: ``c - b`` has standard deviation ``sqrt(b + c)``).

    Args:
        before, after: bool ``[N]`` per-image correctness on the same images.
        z: how many standard deviations of noise are tolerated (2: a rise that large
            happens by chance in about 2 % of comparisons).
        min_images: the rise always tolerated (1 image: a single lucky draw).

    Returns:
        ``{"rise_images": int, "allowed_images": float, "within_noise": bool}``.
    """
    c = int((after & ~before).sum())
    b = int((before & ~after).sum())
    allowed = max(float(min_images), z * math.sqrt(b + c))
    return {
        "rise_images": c - b,
        "allowed_images": round(allowed, 3),
        "within_noise": c - b <= allowed,
    }


def _acc(correct: Tensor) -> float:
    return correct.float().mean().item()


def sanity_checks(
    clean: Tensor,
    runs: Mapping[str, AttackRun],
    entries: Sequence[AttackEntry],
    sweep: Sequence[tuple[float, Tensor]],
    stronger: Tensor | None,
    reference: AttackEntry,
    params: SanityParams,
) -> dict[str, dict[str, Any]]:
    """Gradient-masking sanity checks for one defense (Carlini et al. 2019; method.md §4).

    All comparisons are paired (same images) with the noise margin of :func:`paired_rise`
    (``params.z``, ``params.min_images``). Checks (``status``: ``"pass"``, ``"fail"`` or
    ``"not run"``):

    * ``eps_monotonic``: robust accuracy under the reference PGD-EOT never rises (beyond
      noise) from one ε of the sweep to the next larger one (ε = 0 is clean accuracy).
    * ``large_eps_near_zero``: at the largest ε of the sweep the robust accuracy is at most
      ``params.large_eps_max_acc`` (an unbounded-ish attack must win; if not, gradients
      are masked or the attack is too weak).
    * ``stronger_attack``: the reference PGD with more steps and EOT samples
      (``params.stronger``) does not raise robust accuracy beyond noise.
    * ``iterative_beats_single_step``: PGD (reference) is not weaker than FGSM at the same ε.
    * ``bpda_vs_exact``: for each BPDA entry, the exact-gradient PGD entry of the same norm
      and ε is not weaker than BPDA beyond noise (a stronger BPDA means the exact gradients
      through ``g`` are obfuscated); reports which one is stronger.

    Args:
        clean: bool ``[N]`` clean correctness (first ``N`` images of the evaluation).
        runs: attack label -> run on the full evaluation set (the first ``N`` are used).
        entries: the attack entries.
        sweep: ``(eps, correct [N])`` for the reference attack, sorted by ε (incl. 0).
        stronger: correctness under the stronger reference attack, or ``None``.
        reference: the reference (PGD) entry.
        params: the ``sanity`` parameters.

    Returns:
        ``{check: {"status": ..., "detail": str, ...}}``.
    """
    z, min_images = params.z, params.min_images
    n = len(clean)
    checks: dict[str, dict[str, Any]] = {}

    rises = []
    for (eps_a, a), (eps_b, b) in zip(sweep, sweep[1:], strict=False):
        rise = paired_rise(a, b, z, min_images)
        rises.append((format_eps(eps_a, reference.norm), format_eps(eps_b, reference.norm), rise))
    if len(sweep) >= 2:
        bad = [r for r in rises if not r[2]["within_noise"]]
        checks["eps_monotonic"] = {
            "status": "fail" if bad else "pass",
            "detail": "; ".join(
                f"{lo}->{hi}: {r['rise_images']:+d} img (allowed +{r['allowed_images']:g})"
                for lo, hi, r in rises
            ),
        }
        eps_max, at_max = sweep[-1]
        limit = params.large_eps_max_acc
        checks["large_eps_near_zero"] = {
            "status": "pass" if _acc(at_max) <= limit else "fail",
            "detail": f"robust acc {_acc(at_max):.3f} at eps {format_eps(eps_max, reference.norm)} "
            f"(limit {limit:g})",
        }
    else:
        checks["eps_monotonic"] = {"status": "not run", "detail": "eps_sweep has < 2 points"}
        checks["large_eps_near_zero"] = {"status": "not run", "detail": "no eps sweep"}

    ref = runs[reference.label].correct[:n]
    if stronger is not None:
        rise = paired_rise(ref, stronger, z, min_images)
        checks["stronger_attack"] = {
            "status": "pass" if rise["within_noise"] else "fail",
            "detail": f"{reference.label} {_acc(ref):.3f} -> stronger {_acc(stronger):.3f} "
            f"({rise['rise_images']:+d} img, allowed +{rise['allowed_images']:g})",
        }
    else:
        checks["stronger_attack"] = {"status": "not run", "detail": "no stronger attack set"}

    fgsm = next(
        (e for e in entries if e.name == "fgsm" and e.label in runs and e.eps == reference.eps),
        None,
    )
    if fgsm is not None and reference.norm == "Linf":
        single = runs[fgsm.label].correct[:n]
        rise = paired_rise(single, ref, z, min_images)
        checks["iterative_beats_single_step"] = {
            "status": "pass" if rise["within_noise"] else "fail",
            "detail": f"{fgsm.label} {_acc(single):.3f} vs {reference.label} {_acc(ref):.3f} "
            f"({rise['rise_images']:+d} img, allowed +{rise['allowed_images']:g})",
        }
    else:
        checks["iterative_beats_single_step"] = {
            "status": "not run",
            "detail": "no FGSM entry at the reference eps",
        }

    pairs = []
    for bpda in (e for e in entries if e.name == "bpda" and e.label in runs):
        exact = next(
            (
                e
                for e in entries
                if e.name == "pgd" and e.norm == bpda.norm and e.eps == bpda.eps and e.label in runs
            ),
            None,
        )
        if exact is not None:
            pairs.append((bpda, exact))
    if pairs:
        details, statuses, stronger_names = [], [], []
        for bpda, exact in pairs:
            b_acc = runs[bpda.label].correct[:n]
            e_acc = runs[exact.label].correct[:n]
            rise = paired_rise(b_acc, e_acc, z, min_images)
            statuses.append(rise["within_noise"])
            if _acc(e_acc) < _acc(b_acc):
                winner = "exact"
            elif _acc(e_acc) > _acc(b_acc):
                winner = "bpda"
            else:
                winner = "tie"
            stronger_names.append(winner)
            details.append(
                f"exact {exact.label} {_acc(e_acc):.3f} vs BPDA {bpda.label} {_acc(b_acc):.3f}: "
                f"stronger = {winner}"
            )
        checks["bpda_vs_exact"] = {
            "status": "pass" if all(statuses) else "fail",
            "detail": "; ".join(details),
            "stronger": stronger_names[0] if len(set(stronger_names)) == 1 else "mixed",
        }
    else:
        checks["bpda_vs_exact"] = {
            "status": "not run",
            "detail": "no BPDA entry (deterministic defense) or no matching PGD entry",
        }
    for check in checks.values():
        check["n_images"] = n
    return checks


def sweep_spec(spec: Mapping[str, Any], eps: float) -> dict[str, Any]:
    """A PGD spec at another ε, with the step size ``alpha`` scaled in proportion."""
    return {**spec, "eps": eps, "alpha": spec["alpha"] * eps / spec["eps"]}


def sanity_runs(
    defense: Defense,
    reference: AttackEntry,
    runs: Mapping[str, AttackRun],
    clean: Tensor,
    sweep_eps: Sequence[float],
    data: EvalData,
    sanity: SanityParams,
    settings: EvalSettings,
    validate: Validator | None = None,
) -> tuple[list[tuple[float, Tensor]], Tensor | None]:
    """Run the ε sweep and the stronger attack of the reference PGD on ``data``.

    ε = 0 reuses the clean verdicts and the reference ε the reference run (first ``n``
    images); the others run the reference spec with ε (and α in proportion) changed.
    """
    n = len(data.labels)
    base = defense_spec(reference, defense, settings.draws, settings.seed)
    ref_run = runs[reference.label]
    sweep: list[tuple[float, Tensor]] = []
    for eps in sweep_eps:
        if eps == 0:
            sweep.append((0.0, clean[:n]))
        elif math.isclose(eps, reference.eps):
            sweep.append((eps, ref_run.correct[:n]))
        else:
            spec = sweep_spec(base, eps)
            label = f"{reference.label}_eps_{format_eps(eps, reference.norm)}".replace("/", "_")
            run = run_one(defense, label, spec, reference.norm, eps, data, settings, validate)
            sweep.append((eps, run.correct))
    stronger = None
    overrides = dict(sanity.stronger)
    if overrides:
        spec = {**base, **overrides}
        if not defense.stochastic:
            spec["eot_iter"] = 1
        run = run_one(
            defense,
            f"{reference.label}_stronger",
            spec,
            reference.norm,
            reference.eps,
            data,
            settings,
            validate,
        )
        stronger = run.correct
    return sweep, stronger

"""Gradient-masking sanity checks of one defense (Carlini et al., "On Evaluating
Adversarial Robustness", 2019; method.md §4).

Accuracy must fall as ε grows and reach ~0 at a large ε; more steps / EOT samples must not
raise it; iterative attacks must beat single-step ones; exact gradients must be at least as
strong as BPDA. Every comparison is paired (same images) with a one-sided exact McNemar test
(:func:`rise_test`). :func:`sanity_runs` runs the extra attacks (the ε sweep and the stronger
reference attack); :func:`sanity_checks` turns the verdicts into pass / fail.

Core module: torch and the project's core modules only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from atop.checkpoint import state_hash
from atop.evaluation.defenses import Defense
from atop.evaluation.protocol import (
    AttackEntry,
    EvalData,
    EvalSettings,
    Validator,
    defense_spec,
    format_eps,
    per_image,
    run_one,
)
from atop.evaluation.stats import mcnemar
from atop.params import Params, spec


@dataclass(init=False, frozen=True)
class SanityParams(Params):
    """``evaluation.sanity``: the reference PGD entry, the ε sweep, the stronger attack, the
    images and defenses they run on (``defenses``: names, ``None`` = every defense; the
    fixed-randomness diagnostic follows it) and the test's level."""

    reference: str
    defenses: list[str] | None
    eps_sweep: list[float] = spec(ge=0, le=1, unit="on the [0, 1] pixel scale")
    stronger: dict[str, Any]
    images: int | None = spec(ge=1)
    large_eps_max_acc: float = spec(ge=0, le=1)
    alpha: float = spec(gt=0, lt=1, unit="(level of the one-sided exact McNemar tests)")


def rise_test(before: Tensor, after: Tensor, alpha: float) -> dict[str, Any]:
    """Does accuracy rise from ``before`` to ``after`` (bool ``[N, D]`` per-draw verdicts of
    the same images) beyond chance?

    The paired verdicts are the worst-of-N ones (an image counts only if every draw is
    right); the test is the one-sided exact McNemar test (``scipy.stats.binomtest`` on the
    discordant images) at level ``alpha``.

    Returns:
        ``{"before", "after"}`` (single-draw accuracies), ``"only_after"``,
        ``"only_before"`` (discordant images), ``"p_value"``, ``"significant_rise"``.
    """
    a, b = per_image(after, "worst_of_n"), per_image(before, "worst_of_n")
    test = mcnemar(a, b, alternative="greater")
    return {
        "before": per_image(before, "single").mean().item(),
        "after": per_image(after, "single").mean().item(),
        "only_after": test.only_a,
        "only_before": test.only_b,
        "p_value": test.p_value,
        "significant_rise": test.p_value < alpha,
    }


def _text(rise: Mapping[str, Any]) -> str:
    return (
        f"{rise['before']:.3f} -> {rise['after']:.3f} single-draw (worst-of-N discordant "
        f"+{rise['only_after']}/-{rise['only_before']}, p = {rise['p_value']:.4g})"
    )


def sanity_checks(
    clean: Tensor,
    draws: Mapping[str, Tensor],
    entries: Sequence[AttackEntry],
    sweep: Sequence[tuple[float, Tensor]],
    stronger: Sequence[tuple[str, Tensor]],
    reference: AttackEntry,
    params: SanityParams,
    not_run: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Gradient-masking sanity checks for one defense (Carlini et al. 2019; method.md §4).

    Every comparison is paired (the same images) and tested with :func:`rise_test` (a
    one-sided exact McNemar test at ``params.alpha``). Checks (``status``: ``"pass"``,
    ``"fail"`` or ``"not run"``):

    * ``eps_monotonic``: accuracy under the reference PGD-EOT does not rise significantly
      from one ε of the sweep to the next larger one (ε = 0 is clean accuracy).
    * ``large_eps_near_zero``: at the largest ε the single-draw accuracy is at most
      ``params.large_eps_max_acc`` (a near-unbounded attack must win, or gradients are
      masked).
    * ``stronger_attack``: the reference PGD with more steps and EOT samples
      (``params.stronger``, or the convergence study's strongest points:
      :func:`study_points`) does not raise accuracy significantly.
    * ``iterative_beats_single_step``: PGD (reference) is not significantly weaker than FGSM.
    * ``bpda_vs_exact``: for each BPDA entry, the exact-gradient PGD of the same norm and ε is
      not significantly weaker (a stronger BPDA means obfuscated gradients through ``g``).

    Args:
        clean: bool ``[N, D]`` clean verdicts of the sanity images (the first ``N``).
        draws: attack label -> bool ``[M, D]`` verdicts on the evaluation images (their
            first ``N`` are used).
        entries: the attack entries; sweep: ``(eps, bool [N, D])`` of the reference attack,
            sorted by ε (0 included); stronger: ``(label, bool [N, D])`` of each stronger
            attack (none: the check is "not run").
        reference: the reference (PGD) entry; params: the ``sanity`` parameters.
        not_run: why the ε sweep and the stronger attack did not run (their detail), when
            ``sweep`` and ``stronger`` are empty on purpose.

    Returns:
        ``{check: {"status", "detail", "n_images", ...}}``.
    """
    alpha, n = params.alpha, len(clean)
    checks: dict[str, dict[str, Any]] = {}

    if len(sweep) >= 2:
        rises = [
            (format_eps(ea, reference.norm), format_eps(eb, reference.norm), rise_test(a, b, alpha))
            for (ea, a), (eb, b) in zip(sweep, sweep[1:], strict=False)
        ]
        checks["eps_monotonic"] = {
            "status": "fail" if any(r["significant_rise"] for *_, r in rises) else "pass",
            "detail": "; ".join(f"{lo}->{hi}: {_text(r)}" for lo, hi, r in rises),
        }
        eps_max, at_max = sweep[-1]
        acc = per_image(at_max, "single").mean().item()
        checks["large_eps_near_zero"] = {
            "status": "pass" if acc <= params.large_eps_max_acc else "fail",
            "detail": f"single-draw accuracy {acc:.3f} at eps "
            f"{format_eps(eps_max, reference.norm)} (limit {params.large_eps_max_acc:g})",
        }
    else:
        checks["eps_monotonic"] = {
            "status": "not run",
            "detail": not_run or "eps_sweep has < 2 points",
        }
        checks["large_eps_near_zero"] = {"status": "not run", "detail": not_run or "no eps sweep"}

    ref = draws[reference.label][:n]
    if stronger:
        rises = [(label, rise_test(ref, verdicts[:n], alpha)) for label, verdicts in stronger]
        checks["stronger_attack"] = {
            "status": "fail" if any(r["significant_rise"] for _, r in rises) else "pass",
            "detail": "; ".join(f"{reference.label} -> {label}: {_text(r)}" for label, r in rises),
        }
    else:
        checks["stronger_attack"] = {
            "status": "not run",
            "detail": not_run or "no stronger attack set",
        }

    fgsm = next(
        (e for e in entries if e.name == "fgsm" and e.label in draws and e.eps == reference.eps),
        None,
    )
    if fgsm is not None and reference.norm == "Linf":
        rise = rise_test(draws[fgsm.label][:n], ref, alpha)
        checks["iterative_beats_single_step"] = {
            "status": "fail" if rise["significant_rise"] else "pass",
            "detail": f"{fgsm.label} -> {reference.label}: {_text(rise)}",
        }
    else:
        checks["iterative_beats_single_step"] = {
            "status": "not run",
            "detail": "no FGSM entry at the reference eps",
        }

    pairs = []
    for bpda in (e for e in entries if e.name == "bpda" and e.label in draws):
        exact = next(
            (
                e
                for e in entries
                if e.name == "pgd"
                and not e.survivors
                and e.norm == bpda.norm
                and e.eps == bpda.eps
                and e.label in draws
            ),
            None,
        )
        if exact is not None:
            pairs.append((bpda, exact))
    if pairs:
        details, failed, winners = [], [], []
        for bpda, exact in pairs:
            rise = rise_test(draws[bpda.label][:n], draws[exact.label][:n], alpha)
            failed.append(rise["significant_rise"])
            winner = (
                "exact"
                if rise["after"] < rise["before"]
                else "bpda"
                if rise["after"] > rise["before"]
                else "tie"
            )
            winners.append(winner)
            details.append(
                f"BPDA {bpda.label} -> exact {exact.label}: {_text(rise)}; stronger = {winner}"
            )
        checks["bpda_vs_exact"] = {
            "status": "fail" if any(failed) else "pass",
            "detail": "; ".join(details),
            "stronger": winners[0] if len(set(winners)) == 1 else "mixed",
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


def study_points(
    study: Mapping[str, Any] | None,
    reference: AttackEntry,
    indices: Sequence[int],
    model: str,
) -> list[tuple[str, Tensor]]:
    """The convergence study's points that are the reference PGD made stronger: its largest
    step count (at ``eot_at`` EOT samples) and its largest EOT count (at ``steps_at``
    steps), where they exceed the reference's steps / EOT and lose nothing of the other.

    ``study``: :func:`atop.evaluation.convergence.study` of the defense whose weights hash
    to ``model`` (:func:`atop.checkpoint.state_hash`). Returns ``[(label, bool [n, D])]`` on
    the images ``indices`` (``n = len(indices)``), or ``[]`` when the study does not fit:
    absent or skipped, other weights (a stale study), another norm or ε, other images.
    """
    if not study or study.get("model") != model or study.get("norm") != reference.norm:
        return []
    n = len(indices)
    if not math.isclose(study["eps"], reference.eps) or list(study["indices"][:n]) != list(indices):
        return []
    steps, eot = reference.spec["steps"], reference.spec["eot_iter"]
    k_steps, at_steps = max(study["steps"], key=lambda point: point[0])
    k_eot, at_eot = max(study["eot"], key=lambda point: point[0])
    points = []
    if k_steps > steps and study["eot_at"] >= eot:
        points.append((f"pgd{k_steps}_eot{study['eot_at']} (convergence study)", at_steps[:n]))
    if k_eot > eot and study["steps_at"] >= steps:
        points.append((f"pgd{study['steps_at']}_eot{k_eot} (convergence study)", at_eot[:n]))
    return points


def sanity_runs(
    defense: Defense,
    reference: AttackEntry,
    reference_draws: Tensor,
    clean: Tensor,
    sweep_eps: Sequence[float],
    data: EvalData,
    sanity: SanityParams,
    settings: EvalSettings,
    validate: Validator | None = None,
    study: Mapping[str, Any] | None = None,
) -> tuple[list[tuple[float, Tensor]], list[tuple[str, Tensor]]]:
    """Run the ε sweep and the stronger attack of the reference PGD on ``data``.

    ε = 0 reuses the clean verdicts and the reference ε the reference run's verdicts
    (``reference_draws``, bool ``[M, D]``, first ``n`` images); the others run the reference
    spec with ε (and α in proportion) changed. The stronger attacks are the convergence
    study's strongest points where it fits (:func:`study_points`: the same defense and
    images, more steps / EOT samples), else the reference with ``sanity.stronger``.
    """
    n = len(data.labels)
    base = defense_spec(reference, defense, settings.draws, settings.seed)
    sweep: list[tuple[float, Tensor]] = []
    for eps in sweep_eps:
        if eps == 0:
            sweep.append((0.0, clean[:n]))
        elif math.isclose(eps, reference.eps):
            sweep.append((eps, reference_draws[:n]))
        else:
            spec = sweep_spec(base, eps)
            label = f"{reference.label}_eps_{format_eps(eps, reference.norm)}".replace("/", "_")
            run = run_one(defense, label, spec, reference.norm, eps, data, settings, validate)
            sweep.append((eps, run.draws))
    stronger = study_points(study, reference, data.indices, state_hash(defense.model.state_dict()))
    overrides = dict(sanity.stronger)
    if overrides and not stronger:
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
        stronger = [("stronger", run.draws)]
    return sweep, stronger

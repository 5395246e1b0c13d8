"""Gradient-masking sanity checks of one defense (Carlini et al., "On Evaluating
Adversarial Robustness", 2019; method.md §4), for each threat model.

Accuracy must fall as ε grows and reach ~0 at a large ε; more steps / EOT samples must not
raise it; iterative attacks must beat single-step ones; exact gradients must be at least as
strong as BPDA. Every comparison is paired (same images) and tests the **single-draw**
per-image scores with a one-sided sign-flip test (:func:`rise_test`), so a check can fail
where a worst-of-N test (≈ 0 everywhere at ℓ∞) could not. :func:`sanity_runs` runs the extra
attacks (the ε sweep and the stronger reference attack) of one reference PGD entry (one per
norm: ``sanity.references``); :func:`sanity_checks` turns the verdicts into pass / fail.

Core module: torch and the project's core modules only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from atop.attacks import NORMS
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
from atop.evaluation.stats import paired_test
from atop.params import Params, spec


@dataclass(init=False, frozen=True)
class SanityParams(Params):
    """``evaluation.sanity``: the reference PGD entries (one per threat model), their ε
    sweeps (``eps_sweep.<norm>``), the stronger attack, the images and defenses they run on
    (``defenses``: names, ``None`` = every defense; the fixed-randomness diagnostic follows
    it) and the tests' level."""

    references: list[str]
    defenses: list[str] | None
    eps_sweep: dict[str, list[float]]
    stronger: dict[str, Any]
    images: int | None = spec(ge=1)
    large_eps_max_acc: float = spec(ge=0, le=1)
    alpha: float = spec(gt=0, lt=1, unit="(level of the one-sided paired tests)")

    def check(self) -> None:
        for norm, values in self.eps_sweep.items():
            if norm not in NORMS:
                self.fail("eps_sweep", f"keys are threat models {NORMS}, got {norm!r}.")
            top = 1.0 if norm == "Linf" else math.inf
            bad = [v for v in values if not 0 <= v <= top]
            if bad:
                self.fail(
                    f"eps_sweep.{norm}",
                    f"{bad} out of range: eps >= 0 on the [0, 1] pixel scale"
                    + (" (and <= 1 for Linf)." if norm == "Linf" else "."),
                )


def rise_test(before: Tensor, after: Tensor, alpha: float) -> dict[str, Any]:
    """Does single-draw accuracy rise from ``before`` to ``after`` (bool ``[N, D]`` per-draw
    verdicts of the same images) beyond chance?

    A one-sided sign-flip test of the per-image single-draw differences
    (:func:`atop.evaluation.stats.paired_test`, ``alternative="greater"``) at level ``alpha``.

    Returns:
        ``{"before", "after"}`` (single-draw accuracies), ``"delta"``, ``"ci"``,
        ``"n_nonzero"`` (images whose score changed), ``"p_value"``, ``"significant_rise"``.
    """
    a, b = per_image(after, "single"), per_image(before, "single")
    test = paired_test(a, b, alternative="greater")
    return {
        "before": b.mean().item(),
        "after": a.mean().item(),
        "delta": test.delta,
        "ci": list(test.ci),
        "n_nonzero": test.n_nonzero,
        "p_value": test.p_value,
        "significant_rise": test.p_value < alpha,
    }


def _text(rise: Mapping[str, Any]) -> str:
    return (
        f"{rise['before']:.3f} -> {rise['after']:.3f} single-draw ({rise['n_nonzero']} images "
        f"changed, one-sided p = {rise['p_value']:.4g})"
    )


@dataclass(frozen=True)
class ReferenceRuns:
    """The extra runs of one reference PGD entry: its ε sweep ``[(eps, bool [N, D])]``
    (sorted, 0 = clean) and its stronger variants ``[(label, bool [N, D])]``."""

    reference: AttackEntry
    sweep: Sequence[tuple[float, Tensor]] = ()
    stronger: Sequence[tuple[str, Tensor]] = ()


def check_key(check: str, norm: str) -> str:
    """The key of a per-norm check: ``eps_monotonic_linf``."""
    return f"{check}_{norm.lower()}"


def sanity_checks(
    clean: Tensor,
    draws: Mapping[str, Tensor],
    entries: Sequence[AttackEntry],
    references: Sequence[ReferenceRuns],
    params: SanityParams,
    not_run: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Gradient-masking sanity checks for one defense (Carlini et al. 2019; method.md §4).

    Every comparison is paired (the same images) and tested with :func:`rise_test` (a
    one-sided sign-flip test of single-draw scores at ``params.alpha``). Checks
    (``status``: ``"pass"``, ``"fail"`` or ``"not run"``), per reference's norm ``<n>``:

    * ``eps_monotonic_<n>``: accuracy under the reference PGD-EOT does not rise
      significantly from one ε of the sweep to the next larger one (ε = 0 is clean).
    * ``large_eps_near_zero_<n>``: at the largest ε the single-draw accuracy is at most
      ``params.large_eps_max_acc`` (a near-unbounded attack must win, or gradients are
      masked).
    * ``stronger_attack_<n>``: the reference with more steps and EOT samples
      (``params.stronger``, or the convergence study's: :func:`study_points`) does not raise
      accuracy significantly.
    * ``iterative_beats_single_step``: the ℓ∞ reference is not significantly weaker than
      FGSM at its ε.
    * ``bpda_vs_exact_<n>``: for each BPDA entry, the exact-gradient PGD of the same norm
      and ε is not significantly weaker (a stronger BPDA means obfuscated gradients).

    Args:
        clean: bool ``[N, D]`` clean verdicts of the sanity images (the first ``N``).
        draws: attack label -> bool ``[M, D]`` verdicts on the evaluation images (their
            first ``N`` are used).
        entries: the attack entries; references: each reference's extra runs (empty ones:
            the checks are "not run" with ``not_run`` as the reason).
        params: the ``sanity`` parameters.

    Returns:
        ``{check: {"status", "detail", "n_images", ...}}``.
    """
    alpha, n = params.alpha, len(clean)
    checks: dict[str, dict[str, Any]] = {}
    for runs in references:
        ref, norm = runs.reference, runs.reference.norm
        if len(runs.sweep) >= 2:
            rises = [
                (format_eps(ea, norm), format_eps(eb, norm), rise_test(a, b, alpha))
                for (ea, a), (eb, b) in zip(runs.sweep, runs.sweep[1:], strict=False)
            ]
            checks[check_key("eps_monotonic", norm)] = {
                "status": "fail" if any(r["significant_rise"] for *_, r in rises) else "pass",
                "detail": "; ".join(f"{lo}->{hi}: {_text(r)}" for lo, hi, r in rises),
            }
            eps_max, at_max = runs.sweep[-1]
            acc = per_image(at_max, "single").mean().item()
            checks[check_key("large_eps_near_zero", norm)] = {
                "status": "pass" if acc <= params.large_eps_max_acc else "fail",
                "detail": f"single-draw accuracy {acc:.3f} at eps {format_eps(eps_max, norm)} "
                f"(limit {params.large_eps_max_acc:g})",
            }
        else:
            for check in ("eps_monotonic", "large_eps_near_zero"):
                reason = not_run or "eps_sweep has < 2 points"
                checks[check_key(check, norm)] = {"status": "not run", "detail": reason}
        base = draws[ref.label][:n]
        if runs.stronger:
            rises = [(label, rise_test(base, v[:n], alpha)) for label, v in runs.stronger]
            checks[check_key("stronger_attack", norm)] = {
                "status": "fail" if any(r["significant_rise"] for _, r in rises) else "pass",
                "detail": "; ".join(f"{ref.label} -> {label}: {_text(r)}" for label, r in rises),
            }
        else:
            checks[check_key("stronger_attack", norm)] = {
                "status": "not run",
                "detail": not_run or "no stronger attack set",
            }
    linf = next((r.reference for r in references if r.reference.norm == "Linf"), None)
    fgsm = None
    if linf is not None:
        fgsm = next(
            (e for e in entries if e.name == "fgsm" and e.label in draws and e.eps == linf.eps),
            None,
        )
    if fgsm is not None:
        rise = rise_test(draws[fgsm.label][:n], draws[linf.label][:n], alpha)
        checks["iterative_beats_single_step"] = {
            "status": "fail" if rise["significant_rise"] else "pass",
            "detail": f"{fgsm.label} -> {linf.label}: {_text(rise)}",
        }
    else:
        checks["iterative_beats_single_step"] = {
            "status": "not run",
            "detail": "no FGSM entry at the l-inf reference's eps",
        }
    checks.update(_bpda_checks(draws, entries, n, alpha))
    for check in checks.values():
        check["n_images"] = n
    return checks


def _bpda_checks(
    draws: Mapping[str, Tensor], entries: Sequence[AttackEntry], n: int, alpha: float
) -> dict[str, dict[str, Any]]:
    """``bpda_vs_exact_<norm>`` for each norm with a BPDA entry the defense ran."""
    out: dict[str, dict[str, Any]] = {}
    norms = [norm for norm in NORMS if any(e.name == "bpda" and e.norm == norm for e in entries)]
    for norm in norms:
        pairs = []
        for bpda in (
            e for e in entries if e.name == "bpda" and e.norm == norm and e.label in draws
        ):
            exact = next(
                (
                    e
                    for e in entries
                    if e.name == "pgd"
                    and not e.survivors
                    and e.norm == norm
                    and e.eps == bpda.eps
                    and e.label in draws
                ),
                None,
            )
            if exact is not None:
                pairs.append((bpda, exact))
        if not pairs:
            out[check_key("bpda_vs_exact", norm)] = {
                "status": "not run",
                "detail": "no BPDA entry (deterministic defense) or no matching PGD entry",
            }
            continue
        details, failed, winners = [], [], []
        for bpda, exact in pairs:
            rise = rise_test(draws[bpda.label][:n], draws[exact.label][:n], alpha)
            failed.append(rise["significant_rise"])
            winner = "exact" if rise["delta"] < 0 else "bpda" if rise["delta"] > 0 else "tie"
            winners.append(winner)
            details.append(
                f"BPDA {bpda.label} -> exact {exact.label}: {_text(rise)}; stronger = {winner}"
            )
        out[check_key("bpda_vs_exact", norm)] = {
            "status": "fail" if any(failed) else "pass",
            "detail": "; ".join(details),
            "stronger": winners[0] if len(set(winners)) == 1 else "mixed",
        }
    return out


def sweep_spec(spec: Mapping[str, Any], eps: float) -> dict[str, Any]:
    """A PGD spec at another ε, with the step size ``alpha`` scaled in proportion."""
    return {**spec, "eps": eps, "alpha": spec["alpha"] * eps / spec["eps"]}


def study_points(
    study: Mapping[str, Any] | None,
    reference: AttackEntry,
    indices: Sequence[int],
    model: str,
) -> list[tuple[str, Tensor]]:
    """The convergence study's settings that are the reference PGD made stronger: the one
    with the most steps (at no fewer EOT samples) and the one with the most EOT samples (at
    no fewer steps) among those run on every image.

    ``study``: :func:`atop.evaluation.convergence.study` of the defense whose weights hash
    to ``model`` (:func:`atop.checkpoint.state_hash`). Returns ``[(label, bool [n, D])]`` on
    the images ``indices`` (``n = len(indices)``), or ``[]`` when the study does not fit:
    absent or skipped, other weights (a stale study), another norm or ε, other images.
    """
    if not study or study.get("model") != model or reference.norm not in study.get("norms", {}):
        return []
    record, n = study["norms"][reference.norm], len(indices)
    if not math.isclose(record["eps"], reference.eps) or list(study["indices"][:n]) != list(
        indices
    ):
        return []
    steps, eot = reference.spec["steps"], reference.spec["eot_iter"]
    everywhere = [p for p in record["points"].values() if p["attacked"] is None]
    more_steps = [p for p in everywhere if p["steps"] > steps and p["eot"] >= eot]
    more_eot = [p for p in everywhere if p["eot"] > eot and p["steps"] >= steps]
    points = []
    if more_steps:
        p = max(more_steps, key=lambda p: (p["steps"], p["eot"]))
        points.append((f"pgd{p['steps']}_eot{p['eot']} (convergence study)", p["draws"][:n]))
    if more_eot:
        p = max(more_eot, key=lambda p: (p["eot"], p["steps"]))
        points.append((f"pgd{p['steps']}_eot{p['eot']} (convergence study)", p["draws"][:n]))
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
) -> ReferenceRuns:
    """Run the ε sweep and the stronger attack of one reference PGD on ``data``.

    ε = 0 reuses the clean verdicts and the reference ε the reference run's verdicts
    (``reference_draws``, bool ``[M, D]``, first ``n`` images); the others run the reference
    spec with ε (and α in proportion) changed. The stronger attacks are the convergence
    study's where it fits (:func:`study_points`: the same defense and images, more steps /
    EOT samples), else the reference with ``sanity.stronger``.
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
            spec_ = sweep_spec(base, eps)
            label = f"{reference.label}_eps_{format_eps(eps, reference.norm)}".replace("/", "_")
            run = run_one(defense, label, spec_, reference.norm, eps, data, settings, validate)
            sweep.append((eps, run.draws))
    stronger = study_points(study, reference, data.indices, state_hash(defense.model.state_dict()))
    overrides = dict(sanity.stronger)
    if overrides and not stronger:
        spec_ = {**base, **overrides}
        if not defense.stochastic:
            spec_["eot_iter"] = 1
        label = f"{reference.label}_stronger"
        run = run_one(
            defense, label, spec_, reference.norm, reference.eps, data, settings, validate
        )
        stronger = [("stronger", run.draws)]
    return ReferenceRuns(reference, sweep, stronger)

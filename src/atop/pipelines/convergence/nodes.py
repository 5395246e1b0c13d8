"""Nodes of the convergence study (full comparison): one per defense, then the report.

Each ``study_<defense>`` node runs :func:`atop.evaluation.convergence.study` on the first
``images`` of ``eval_indices``, both norms, against the defense's headline from the main
job's evaluation (``evaluation_<defense>``); :func:`convergence_report` turns the records
into the metrics JSON (cited by the robustness reports), a CSV table, a Markdown report
and a figure. Plain functions, no Kedro imports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from atop.evaluation.convergence import ConvergenceParams, describe, study, summarize
from atop.evaluation.defenses import build_defense
from atop.evaluation.protocol import select_images
from atop.evaluation.suite import EvalParams
from atop.pipelines.evaluation.metrics import attack_records, worst_draws
from atop.training import resolve_device

NORM_TEXT = {"Linf": "ℓ∞", "L2": "ℓ2"}


def _headline(
    evaluation: Mapping[str, Any] | None, entries: EvalParams | None, n: int
) -> dict[str, list[Tensor]] | None:
    """``{norm: [verdict sets]}`` of a defense's evaluation (its first ``n`` images)."""
    if not evaluation or "skipped" in evaluation or entries is None:
        return None
    attacks = attack_records(entries.entries)
    return {
        norm: [d[:n] for d in worst_draws(evaluation, attacks, norm)] for norm in ("Linf", "L2")
    }


def study_node(name: str) -> Callable[..., dict[str, Any]]:
    """The node function of defense ``name`` (``study_<name>``): its study, or ``{"skipped":
    reason}`` when ``convergence.defenses`` leaves it out. Its headline is read from
    ``evaluation`` (the main job's result, same images)."""

    def run(
        test_set: dict[str, Tensor],
        eval_indices: list[int],
        class_names: list[str],
        params: ConvergenceParams,
        evaluation: dict[str, Any] | None = None,
        evaluation_params: EvalParams = None,  # type: ignore[assignment]  (Kedro types it)
        **checkpoints: dict[str, Any] | None,
    ) -> dict[str, Any]:
        if name not in params.defenses:
            return {"skipped": "not listed in convergence.defenses"}
        device = resolve_device(params.device)
        data = select_images(test_set, eval_indices, params.images, len(class_names), device)
        headline = _headline(evaluation, evaluation_params, len(data.labels))
        return study(build_defense(name, checkpoints, device), data, params, headline)

    run.__name__ = run.__qualname__ = f"study_{name}"
    return run


def convergence_report(
    params: ConvergenceParams, **per_defense: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame, str, Figure]:
    """The study's metrics JSON, CSV table (one row per defense, norm and setting), Markdown
    report and figure (single-draw accuracy vs steps and vs EOT samples, ± 1 SE, per norm)."""
    studies = {n: r for n, r in per_defense.items() if "skipped" not in r}
    summary = {name: summarize(result) for name, result in studies.items()}
    norms = [a.get("norm", "Linf") for a in params.attacks]
    attacks = {norm: describe(norm, params.entry(norm).eps) for norm in norms}
    metrics = {
        "settings": {
            "images": params.images,
            "draws": params.draws,
            "attacks": attacks,
            "alpha": {norm: params.entry(norm).spec["alpha"] for norm in norms},
            "eot_at": params.eot_at,
            "steps_at": params.steps_at,
            "extra": [list(p) for p in params.extra],
            "all_images_cost": params.all_images_cost,
            "attack_amp": params.attack_amp,
        },
        "defenses": summary,
    }
    rows = [
        {"defense": name, "norm": norm, "setting": key, **values}
        for name, norms in summary.items()
        for norm, record in norms.items()
        for key, values in record["points"].items()
    ]
    return metrics, pd.DataFrame(rows), _markdown(metrics), _figure(summary, params)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _markdown(metrics: Mapping[str, Any]) -> str:
    s = metrics["settings"]
    out = [
        "# Attack convergence",
        "",
        f"PGD with exact gradients and EOT ({', '.join(s['attacks'].values())}; fixed step "
        f"size {s['alpha']}) on {s['images']} evaluation images, every output judged with "
        f"{s['draws']} fresh draws of its own stream. Steps sweep at EOT {s['eot_at']}, EOT "
        f"sweep at {s['steps_at']} steps, extra settings {s['extra']} (steps x EOT). Settings "
        f"costing at most {s['all_images_cost']} passes per image run on every image; the "
        "costlier ones only on the images still standing after the cheaper settings and the "
        "defense's headline attacks (AutoAttack's cascade; elsewhere the best earlier "
        "example, judged afresh), so their accuracy is the cascade's.",
        "",
        "**Rule.** A setting *lowers the headline* (the cross-fitted single-draw worst case "
        "over the evaluation's attacks of that norm) when the mean per-image difference "
        "headline − setting exceeds its paired standard error, floored at one image's share "
        "(1/n). The headline is converged when no setting lowers it.",
        "",
    ]
    for name, norms in metrics["defenses"].items():
        for norm, record in norms.items():
            verdict = {True: "converged", False: "**not converged**", None: "no headline"}[
                record["converged"]
            ]
            out.append(
                f"## {name}, {NORM_TEXT.get(norm, norm)}: {verdict} (headline "
                f"{_pct(record['headline'])} %, largest gap {_pct(record['max_gap'])} points)"
            )
            out += [
                "",
                "| steps x EOT | images attacked | single-draw (%) ± SE | worst-of-N (%) | "
                "gap to headline ± paired SE | lowers it |",
                "|---|---:|---:|---:|---:|---|",
            ]
            for key, p in record["points"].items():
                gap = (
                    "—" if "gap" not in p else f"{100 * p['gap']:+.2f} ± {100 * p['paired_se']:.2f}"
                )
                lowers = "—" if "lowers" not in p else ("**yes**" if p["lowers"] else "no")
                out.append(
                    f"| {key} | {p['attacked']} | {_pct(p['acc'])} ± {_pct(p['se'])} | "
                    f"{_pct(p['worst_of_n'])} | {gap} | {lowers} |"
                )
            out.append("")
    return "\n".join(out) + "\n"


def _figure(summary: Mapping[str, Any], params: ConvergenceParams) -> Figure:
    norms = [a.get("norm", "Linf") for a in params.attacks]
    figure = Figure(figsize=(9, 3.4 * len(norms)), dpi=110)
    axes = figure.subplots(len(norms), 2, squeeze=False)
    for row, norm in enumerate(norms):
        for ax, xlabel, fixed in (
            (axes[row][0], f"PGD steps (EOT {params.eot_at})", ("eot", params.eot_at, "steps")),
            (axes[row][1], f"EOT samples ({params.steps_at} steps)", ("steps", params.steps_at, "eot")),
        ):  # fmt: skip
            key, value, along = fixed
            for name, records in summary.items():
                if norm not in records:
                    continue
                points = [p for p in records[norm]["points"].values() if p[key] == value]
                points.sort(key=lambda p: p[along])
                ax.errorbar(
                    [p[along] for p in points],
                    [100 * p["acc"] for p in points],
                    yerr=[100 * p["se"] for p in points],
                    marker="o",
                    capsize=3,
                    label=name,
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{NORM_TEXT.get(norm, norm)} robust acc. (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    figure.tight_layout()
    return figure

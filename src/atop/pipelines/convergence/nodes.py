"""Nodes of the convergence study (full comparison): one per defense, then the report.

Each ``study_<defense>`` node runs :func:`atop.evaluation.convergence.study` on the first
``images`` of ``eval_indices``; :func:`convergence_report` turns the curves into the metrics
JSON (cited by the main robustness report), a CSV table, a Markdown report and a figure.
Plain functions, no Kedro imports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor

from atop.evaluation.convergence import ConvergenceParams, study, summarize
from atop.evaluation.defenses import build_defense
from atop.evaluation.protocol import format_eps, select_images
from atop.training import resolve_device


def study_node(name: str) -> Callable[..., dict[str, Any]]:
    """The node function of defense ``name`` (``study_<name>``): its sweeps' verdicts, or
    ``{"skipped": reason}`` when ``convergence.defenses`` leaves it out."""

    def run(
        test_set: dict[str, Tensor],
        eval_indices: list[int],
        class_names: list[str],
        params: ConvergenceParams,
        **checkpoints: dict[str, Any] | None,
    ) -> dict[str, Any]:
        if name not in params.defenses:
            return {"skipped": "not listed in convergence.defenses"}
        device = resolve_device(params.device)
        data = select_images(test_set, eval_indices, params.images, len(class_names), device)
        return study(build_defense(name, checkpoints, device), data, params)

    run.__name__ = run.__qualname__ = f"study_{name}"
    return run


def convergence_report(
    params: ConvergenceParams, **per_defense: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame, str, Figure]:
    """The study's metrics JSON, CSV table (one row per defense, sweep and setting), Markdown
    report and figure (single-draw accuracy vs steps and vs EOT samples, ± 1 SE)."""
    studies = {n: r for n, r in per_defense.items() if "skipped" not in r}
    summary = {name: summarize(result) for name, result in studies.items()}
    first = next(iter(studies.values()))
    eps = format_eps(first["eps"], first["norm"])
    metrics = {
        "settings": {
            "images": params.images,
            "draws": params.draws,
            "attack": f"PGD {first['norm']} eps {eps}",
            "alpha_rule": params.alpha_rule,
            "alpha": params.attack["alpha"],
            "eot_at": params.eot_at,
            "steps_at": params.steps_at,
            "attack_amp": params.attack_amp,
        },
        "defenses": summary,
    }
    rows = [
        {"defense": name, "sweep": sweep, "setting": int(k), **values}
        for name, curves in summary.items()
        for sweep in ("steps", "eot")
        for k, values in curves[sweep]["points"].items()
    ]
    return metrics, pd.DataFrame(rows), _markdown(metrics), _figure(summary, params)


def _markdown(metrics: Mapping[str, Any]) -> str:
    s = metrics["settings"]
    alpha = "2.5 ε / steps" if s["alpha_rule"] != "fixed" else f"α = {s['alpha']:.4g}"
    out = [
        "# Attack convergence",
        "",
        f"{s['attack']} with exact gradients and EOT on {s['images']} evaluation images, "
        f"every output judged with {s['draws']} fresh draws (single-draw accuracy ± one "
        f"standard error). Step size: {alpha}. Steps sweep at EOT {s['eot_at']}; EOT sweep at "
        f"{s['steps_at']} steps. A curve is flat from the smallest setting within one "
        "standard error of its strongest (lowest) point.",
        "",
    ]
    for name, curves in metrics["defenses"].items():
        for sweep, label in (("steps", "PGD steps"), ("eot", "EOT samples")):
            c = curves[sweep]
            points = ", ".join(
                f"{k}: {100 * v['acc']:.2f} ± {100 * v['se']:.2f}" for k, v in c["points"].items()
            )
            out.append(
                f"- **{name}**, {label}: {points} (%). Strongest: {c['strongest']}; flat from "
                f"**{c['flat_from']}**."
            )
    return "\n".join(out) + "\n"


def _figure(summary: Mapping[str, Any], params: ConvergenceParams) -> Figure:
    figure = Figure(figsize=(9, 3.6), dpi=110)
    axes = figure.subplots(1, 2)
    for ax, sweep, xlabel in (
        (axes[0], "steps", f"PGD steps (EOT {params.eot_at})"),
        (axes[1], "eot", f"EOT samples ({params.steps_at} steps)"),
    ):
        for name, curves in summary.items():
            points = curves[sweep]["points"]
            xs = [int(k) for k in points]
            ys = [100 * p["acc"] for p in points.values()]
            errors = [100 * p["se"] for p in points.values()]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("robust accuracy (%), single-draw")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure

"""The evaluation stage's figures: robust accuracy vs ε and the adversarial image grid.

Built on :class:`matplotlib.figure.Figure` (no pyplot state, no display: headless Agg) from
the gathered results (:func:`atop.pipelines.evaluation.nodes.collect_results`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure

from atop.evaluation.protocol import per_image
from atop.pipelines.evaluation.metrics import eps_points, references
from atop.pipelines.evaluation.report import NORM_TEXT


def plot_robust_accuracy_vs_eps(results: Mapping[str, Any]) -> Figure:
    """Robust accuracy vs ε of each reference PGD-EOT attack (one panel per threat model),
    one line per defense (the ε sweeps of the full comparison; clean and the reference ε
    alone in the main job)."""
    refs = references(results)
    figure = Figure(figsize=(6 * max(len(refs), 1), 4), dpi=120)
    axes_list = figure.subplots(1, max(len(refs), 1), squeeze=False)[0]
    for axes, reference in zip(axes_list, refs, strict=False):
        linf = reference["norm"] == "Linf"
        for name, res in results["defenses"].items():
            points = eps_points(res, reference)  # clean and the reference ε without a sweep
            if not points:
                continue
            xs = [p["eps"] * 255 if linf else p["eps"] for p in points]
            ys = [100 * per_image(p["draws"], "single").mean().item() for p in points]
            axes.plot(xs, ys, marker="o", label=name)
        axes.axvline(reference["eps"] * 255 if linf else reference["eps"], color="gray", ls=":")
        spec = reference["spec"]
        axes.set_xlabel("ε (× 1/255)" if linf else "ε (ℓ2)")
        axes.set_ylabel("robust accuracy (%), single-draw")
        axes.set_ylim(-2, 102)
        axes.set_title(
            f"PGD-{spec['steps']} {NORM_TEXT[reference['norm']]}, EOT {spec['eot_iter']} "
            f"({results['settings']['n_sanity_images']} images)",
            fontsize=10,
        )
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_adversarial_grid(results: Mapping[str, Any]) -> Figure:
    """Rows: clean, adversarial, transformed ``t(x')`` (holes black), purified ``g(t(x'))``."""
    grid = results["grid"]
    if grid is None:
        figure = Figure(figsize=(4, 1))
        figure.text(0.5, 0.5, "no adversarial grid (defense or attack not evaluated)", ha="center")
        return figure
    names = results["class_names"]
    rows = [
        (title, grid[key])
        for title, key in (
            ("clean", "clean"),
            ("adversarial", "adversarial"),
            ("transformed t(x')", "transformed"),
            ("purified g(t(x'))", "purified"),
        )
        if grid[key] is not None
    ]
    n = len(grid["labels"])
    figure = Figure(figsize=(1.3 * n + 1.2, 1.45 * len(rows) + 0.5), dpi=110)
    axes = figure.subplots(len(rows), n, squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
            if r == 0:
                ax.set_title(names[grid["labels"][c]], fontsize=8)
            if r == len(rows) - 1:
                pred = grid["prediction"][c]
                ok = pred == grid["labels"][c]
                ax.set_xlabel(f"f: {names[pred]}", fontsize=8, color="green" if ok else "red")
    figure.suptitle(f"{grid['defense']}: {grid['attack']}", fontsize=9)
    figure.tight_layout()
    return figure

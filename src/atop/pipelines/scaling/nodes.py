"""The budget study's report: clean and worst-case robust accuracy vs fine-tuning steps.

Each arm was fine-tuned at the main job's budget and at every budget of
``scaling.budgets`` (same pretrained purifier, seed, optimizer and learning rate; more
steps and more distinct images), then evaluated with the main job's protocol on the same
images. Per arm and budget: single-draw accuracy (worst cases cross-fitted over the
evaluation's attacks only: the convergence study covers the main job's budget alone, so
adding its settings would bias the comparison) with exact 95 % intervals over images; per
arm, the change from the smallest to the largest budget with a paired bootstrap interval and
sign-flip p-value (images and draws only: one training run per budget); at the largest budget,
AToP against each other arm, the same way (exploratory). Plain functions, no Kedro imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from atop.evaluation.stats import accuracy_ci, paired_test
from atop.evaluation.suite import EvalParams
from atop.params import Params, spec
from atop.pipelines.evaluation.metrics import (
    OUTCOME_TEXT,
    OUTCOMES,
    attack_records,
    outcome_scores,
)
from atop.pipelines.studies import evaluated
from atop.trainers.atop import AToPParams


@dataclass(init=False, frozen=True)
class BudgetParams(Params):
    """One budget: the ``atop_finetuning`` values that give it."""

    train_images: int = spec(ge=1, unit="(a fixed random subset of the training split)")
    epochs: int = spec(ge=1)


@dataclass(init=False, frozen=True)
class ScalingParams(Params):
    """``scaling`` (conf/base/parameters_scaling.yml): each budget's settings, keyed by its
    number of steps."""

    KEY = "scaling"

    budgets: dict[str, BudgetParams]


def budget_settings(params: ScalingParams, steps: int) -> dict[str, int]:
    """The ``atop_finetuning`` values of the budget of ``steps`` steps.

    Raises:
        ValueError: ``scaling.budgets`` has no entry for it.
    """
    budget = params.budgets.get(str(steps))
    if budget is None:
        raise ValueError(
            f"scaling.budgets has no entry '{steps}' (have {sorted(params.budgets)}): add its "
            "train_images and epochs in conf/<profile>/parameters_scaling.yml."
        )
    return {"train_images": budget.train_images, "epochs": budget.epochs}


def steps_of(finetuning: AToPParams, train_images: int | None, epochs: int) -> int:
    """Fine-tuning steps of ``epochs`` epochs over ``train_images`` images (batches of
    ``batch_size``, the last partial one dropped; ``max_batches_per_epoch`` caps them)."""
    per_epoch = (train_images or 0) // finetuning.batch_size
    if finetuning.max_batches_per_epoch is not None:
        per_epoch = min(per_epoch, finetuning.max_batches_per_epoch)
    return per_epoch * epochs


def scaling_report(
    params: ScalingParams,
    evaluation_params: EvalParams,
    finetuning: AToPParams,
    **results: Mapping[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, str, Figure]:
    """The study's JSON, CSV (one row per arm, budget and outcome), Markdown and figure.

    Args:
        results: ``<arm>`` (the main job's evaluation: its budget) and ``<arm>_steps<b>``.

    Raises:
        ValueError: an arm or budget was not evaluated.
    """
    attacks = attack_records(evaluation_params.entries)
    arms = [k for k in results if "_steps" not in k]
    budgets = sorted({int(k.rsplit("_steps", 1)[1]) for k in results if "_steps" in k})
    base = steps_of(finetuning, finetuning.train_images, finetuning.epochs)
    record: dict[str, Any] = {
        "settings": {
            "base_steps": base,
            "batch_size": finetuning.batch_size,
            "budgets": {
                str(b): {
                    **budget_settings(params, b),
                    "steps": steps_of(finetuning, **budget_settings(params, b)),
                }
                for b in budgets
            },
            "n_images": None,
            "rule": (
                "single-draw; worst cases cross-fitted over the draws, over the evaluation's "
                "attacks at every budget (no convergence-study settings)"
            ),
        },
        "arms": {},
    }
    rows = []
    largest: dict[str, dict[str, Any]] = {}  # per arm: its per-image scores at the largest budget
    for arm in arms:
        runs = {base: evaluated(results, arm)}  # keyed by the steps each run trained
        for b in budgets:
            runs[steps_of(finetuning, **budget_settings(params, b))] = evaluated(
                results, f"{arm}_steps{b}"
            )
        entry: dict[str, Any] = {"points": {}, "change": {}}
        scores = {
            s: {o: outcome_scores(r, attacks, o, study=False) for o in OUTCOMES}
            for s, r in runs.items()
        }
        for s, by_outcome in scores.items():
            point = {}
            for o, values in by_outcome.items():
                acc, low, high = accuracy_ci(values)
                point[o] = {"acc": acc, "ci": [low, high]}
                rows.append({"arm": arm, "steps": s, "outcome": o, "accuracy": acc,
                             "low": low, "high": high})  # fmt: skip
            entry["points"][str(s)] = point
        first, last = min(scores), max(scores)
        for o in OUTCOMES:
            entry["change"][o] = {
                "from": first,
                "to": last,
                **paired_test(scores[last][o], scores[first][o]).to_dict(),
            }
        record["settings"]["n_images"] = len(scores[first]["clean"])
        record["arms"][arm] = entry
        largest[arm] = scores[last]
    focus = "atop" if "atop" in largest else arms[-1]  # against each other arm
    record["at_largest"] = {
        f"{focus} - {other}": {
            o: paired_test(largest[focus][o], largest[other][o]).to_dict() for o in OUTCOMES
        }
        for other in arms
        if other != focus
    }
    return record, pd.DataFrame(rows), _markdown(record), _figure(record)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _markdown(record: Mapping[str, Any]) -> str:
    s = record["settings"]
    budgets = ", ".join(
        f"{b['steps']} steps ({b['train_images']} images x {b['epochs']} epochs)"
        for b in s["budgets"].values()
    )
    out = [
        "# Robustness vs fine-tuning budget",
        "",
        f"Each arm fine-tuned for {s['base_steps']} steps (the main job) and for {budgets}, "
        f"batches of {s['batch_size']}, the same pretrained purifier, optimizer, learning rate "
        f"and seed; each evaluated with the main job's protocol on the same {s['n_images']} "
        f"images ({s['rule']}). Accuracy (%) with exact 95 % intervals over images.",
        "",
    ]
    for arm, entry in record["arms"].items():
        out += [
            f"## {arm}",
            "",
            "| steps | " + " | ".join(OUTCOME_TEXT[o] for o in OUTCOMES) + " |",
            "|---:|" + "---:|" * len(OUTCOMES),
        ]
        for steps, point in entry["points"].items():
            cells = [
                f"{_pct(point[o]['acc'])} [{_pct(point[o]['ci'][0])}, {_pct(point[o]['ci'][1])}]"
                for o in OUTCOMES
            ]
            out.append(f"| {steps} | " + " | ".join(cells) + " |")
        changes = []
        for o in OUTCOMES:
            c = entry["change"][o]
            low, high = c["ci"]
            changes.append(
                f"{OUTCOME_TEXT[o]} {100 * c['delta']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] "
                f"points (p = {c['p_value']:.3g})"
            )
        out += [
            "",
            f"From {entry['change']['clean']['from']} to {entry['change']['clean']['to']} steps "
            f"(paired over images, one training run per budget): {'; '.join(changes)}.",
            "",
        ]
    for name, tests in record.get("at_largest", {}).items():
        cells = [
            f"{OUTCOME_TEXT[o]} {100 * t['delta']:+.2f} [{100 * t['ci'][0]:+.2f}, "
            f"{100 * t['ci'][1]:+.2f}] (p = {t['p_value']:.3g})"
            for o, t in tests.items()
        ]
        out.append(
            f"At the largest budget, {name} (exploratory, paired over images, one run each): "
            f"{'; '.join(cells)}.\n"
        )
    return "\n".join(out) + "\n"


def _figure(record: Mapping[str, Any]) -> Figure:
    figure = Figure(figsize=(10, 3.4), dpi=110)
    axes = figure.subplots(1, len(OUTCOMES))
    for ax, o in zip(axes, OUTCOMES, strict=True):
        for arm, entry in record["arms"].items():
            steps = [int(k) for k in entry["points"]]
            acc = [100 * p[o]["acc"] for p in entry["points"].values()]
            points = list(entry["points"].values())
            low = [a - 100 * p[o]["ci"][0] for a, p in zip(acc, points, strict=True)]
            high = [100 * p[o]["ci"][1] - a for a, p in zip(acc, points, strict=True)]
            ax.errorbar(steps, acc, yerr=[low, high], marker="o", capsize=3, label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(f"{OUTCOME_TEXT[o]} (%), single-draw", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure

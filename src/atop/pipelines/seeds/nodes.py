"""The seeds study's report: per-arm means over training seeds, and arm differences with
intervals that cover both training-seed and image variance.

Each arm of the 2 x 2 was fine-tuned with every seed (the main job's run is the first) and
evaluated on the same images with the same protocol. Per outcome (clean, worst ℓ∞, worst
ℓ2; single-draw, the worst cases cross-fitted) the report gives each arm's mean and sd over
seeds, and for each contrast (AToP vs each arm; the 2 x 2's main effects and interaction) a
**hierarchical bootstrap** interval over seeds AND images
(:func:`atop.evaluation.stats.hierarchical_bootstrap`). Why not a permutation test with
seeds as the unit: with five paired seeds its smallest two-sided p-value is 2/32 = 0.0625,
so it could never reject at 0.05. Plain functions, no Kedro imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from atop.evaluation.defenses import FACTORIAL
from atop.evaluation.stats import hierarchical_bootstrap, seed_summary
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
class SeedsParams(Params):
    """``seeds`` (conf/base/parameters_seeds.yml): the bootstrap of the report."""

    KEY = "seeds"

    resamples: int = spec(ge=100, unit="(hierarchical bootstrap resamples)")
    level: float = spec(gt=0, lt=1, unit="(coverage of the intervals)")
    seed: int = spec(ge=0, unit="(the bootstrap's random numbers)")


def contrasts() -> dict[str, dict[str, float]]:
    """Each reported contrast as weights on the arms (the 2 x 2 of
    :data:`atop.evaluation.defenses.FACTORIAL`): AToP minus each other arm, both main
    effects and the interaction."""
    n, c, r, a = (
        FACTORIAL[k] for k in ((False, False), (False, True), (True, False), (True, True))
    )
    return {
        f"atop - {n}": {a: 1.0, n: -1.0},
        f"atop - {c}": {a: 1.0, c: -1.0},
        f"atop - {r}": {a: 1.0, r: -1.0},
        "reconstruction from t(x') (main effect)": {r: 0.5, a: 0.5, n: -0.5, c: -0.5},
        "CE term (main effect)": {c: 0.5, a: 0.5, n: -0.5, r: -0.5},
        "interaction": {a: 1.0, c: -1.0, r: -1.0, n: 1.0},
    }


def seeds_report(
    params: SeedsParams,
    evaluation_params: EvalParams,
    finetuning: AToPParams,
    **results: Mapping[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, str, Figure]:
    """The study's JSON, CSV (one row per arm, seed and outcome), Markdown and figure.

    Args:
        results: ``<arm>`` (the main job's evaluation: the first seed) and
            ``<arm>_seed<k>`` (the study's) for every arm of the 2 x 2.

    Raises:
        ValueError: an arm or seed was not evaluated.
    """
    arms = list(FACTORIAL.values())
    extra = sorted({int(k.rsplit("_seed", 1)[1]) for k in results if "_seed" in k})
    seeds = [finetuning.seed, *extra]
    attacks = attack_records(evaluation_params.entries)
    scores: dict[str, dict[str, torch.Tensor]] = {}  # arm -> outcome -> [S, N]
    for arm in arms:
        runs = [evaluated(results, arm)]
        runs += [evaluated(results, f"{arm}_seed{s}") for s in extra]
        scores[arm] = {
            o: torch.stack([outcome_scores(r, attacks, o) for r in runs]) for o in OUTCOMES
        }
    per_arm = {
        arm: {
            o: {**seed_summary(scores[arm][o].mean(dim=1).tolist()),
                "per_seed": scores[arm][o].mean(dim=1).tolist()}
            for o in OUTCOMES
        }
        for arm in arms
    }  # fmt: skip
    tests = {}
    for name, weights in contrasts().items():
        tests[name] = {}
        for o in OUTCOMES:
            contrast = sum(w * scores[arm][o] for arm, w in weights.items())
            tests[name][o] = hierarchical_bootstrap(
                contrast,
                torch.zeros_like(contrast),
                level=params.level,
                resamples=params.resamples,
                seed=params.seed,
            )
    n_images = next(iter(scores.values()))["clean"].shape[1]
    record = {
        "settings": {
            "seeds": seeds,
            "n_images": n_images,
            "draws": evaluation_params.draws,
            "level": params.level,
            "resamples": params.resamples,
            "interval": "hierarchical bootstrap: seeds and images resampled (both paired), "
            "percentile",
            "rule": "single-draw; worst cases cross-fitted over the draws",
        },
        "arms": per_arm,
        "contrasts": tests,
    }
    rows = [
        {"arm": arm, "seed": seed, "outcome": o, "accuracy": value}
        for arm in arms
        for o in OUTCOMES
        for seed, value in zip(seeds, per_arm[arm][o]["per_seed"], strict=True)
    ]
    return record, pd.DataFrame(rows), _markdown(record), _figure(record)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _interval(test: Mapping[str, Any]) -> str:
    low, high = test["ci"]
    return f"{100 * test['delta']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def verdict(test: Mapping[str, Any]) -> str:
    """``higher`` / ``lower`` when the interval excludes 0, else ``no difference shown``."""
    low, high = test["ci"]
    return "higher" if low > 0 else "lower" if high < 0 else "no difference shown"


def _markdown(record: Mapping[str, Any]) -> str:
    s = record["settings"]
    out = [
        "# Training seeds: the 2 × 2 of Eq. 9's terms over several fine-tuning runs",
        "",
        f"Every arm fine-tuned with seeds {s['seeds']} (data order, training-attack and "
        "transform draws; the same training images and pretrained purifier), each evaluated "
        f"with the main job's protocol on the same {s['n_images']} images ({s['draws']} fresh "
        f"draws per verdict; {s['rule']}). Accuracy (%): mean ± sd over seeds, then the "
        "per-seed values.",
        "",
        "| arm | " + " | ".join(OUTCOME_TEXT[o] for o in OUTCOMES) + " |",
        "|---|" + "---:|" * len(OUTCOMES),
    ]
    for arm, outcomes in record["arms"].items():
        cells = [
            f"{_pct(v['mean'])} ± {_pct(v['sd'])} ({', '.join(_pct(x) for x in v['per_seed'])})"
            for v in (outcomes[o] for o in OUTCOMES)
        ]
        out.append(f"| {arm} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"**Differences** (points, mean over seeds and images, [{100 * s['level']:.0f} % "
        f"interval]): {s['interval']} ({s['resamples']} resamples). With five seeds a "
        "permutation test with seeds as the unit cannot reach p < 0.0625, so intervals "
        "are the evidence; an interval that excludes 0 is read as a difference.",
        "",
        "| contrast | " + " | ".join(OUTCOME_TEXT[o] for o in OUTCOMES) + " |",
        "|---|" + "---:|" * len(OUTCOMES),
    ]
    for name, by_outcome in record["contrasts"].items():
        cells = [f"{_interval(by_outcome[o])} ({verdict(by_outcome[o])})" for o in OUTCOMES]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _figure(record: Mapping[str, Any]) -> Figure:
    figure = Figure(figsize=(10, 3.4), dpi=110)
    axes = figure.subplots(1, len(OUTCOMES))
    arms = list(record["arms"])
    for ax, o in zip(axes, OUTCOMES, strict=True):
        for i, arm in enumerate(arms):
            values = [100 * v for v in record["arms"][arm][o]["per_seed"]]
            ax.scatter([i] * len(values), values, s=14, alpha=0.7)
            ax.errorbar(
                [i], [100 * record["arms"][arm][o]["mean"]],
                yerr=[100 * record["arms"][arm][o]["sd"]], fmt="_", color="black", capsize=6,
            )  # fmt: skip
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([a.replace("_", "\n") for a in arms], fontsize=7)
        ax.set_title(f"{OUTCOME_TEXT[o]} (%), single-draw", fontsize=9)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure

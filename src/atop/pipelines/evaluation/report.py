"""The Markdown robustness report (``robustness_report.md``), laid out like the paper's tables.

Every number comes from :func:`atop.pipelines.evaluation.metrics.robustness_metrics`;
accuracies are percentages with two decimals. Plain functions, no Kedro imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from atop.evaluation.protocol import format_eps
from atop.pipelines.evaluation.metrics import WORST_CASES, reference_attack

ALGORITHMS = {
    "fgsm": "FGSM",
    "pgd": "PGD+EOT (exact gradients)",
    "bpda": "BPDA+EOT",
    "cw": "C&W",
}
NORM_TEXT = {"Linf": "ℓ∞", "L2": "ℓ2"}
CHECKS = {
    "eps_monotonic": "accuracy does not rise with ε",
    "large_eps_near_zero": "≈ 0 at the largest ε",
    "stronger_attack": "more steps / EOT samples do not raise it",
    "iterative_beats_single_step": "PGD at least as strong as FGSM",
    "bpda_vs_exact": "exact gradients at least as strong as BPDA",
}


def _pct(value: float | None) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.2f}"
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    """A GitHub Markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _algorithm(attack: Mapping[str, Any]) -> str:
    spec = attack["spec"]
    if attack["name"] == "autoattack":
        return f"AutoAttack-{spec['version']}"
    return ALGORITHMS.get(attack["name"], attack["name"])


def _attack_settings(attack: Mapping[str, Any]) -> tuple[str, str, str]:
    """(steps, EOT, other settings) of an attack entry, as report text."""
    spec = attack["spec"]
    name = attack["name"]
    steps = str(spec.get("steps", 1 if name == "fgsm" else "-"))
    if name in ("pgd", "bpda") or (name == "autoattack" and spec["version"] == "rand"):
        eot = f"{spec.get('eot_iter', 20)} / 1"
    else:
        eot = "-"
    other = {
        "fgsm": "single step",
        "pgd": f"α {format_eps(spec.get('alpha'), attack['norm'])}, random start",
        "bpda": f"α {format_eps(spec.get('alpha'), attack['norm'])}, identity backward through g",
        "cw": f"c {spec.get('c')}, κ {spec.get('kappa')}, lr {spec.get('lr')}"
        + (", successes with ‖δ‖₂ > ε discarded" if attack["eps"] is not None else ", unbounded"),
        "autoattack": (
            "APGD-CE, APGD-DLR"
            if spec.get("version") == "rand"
            else f"APGD-CE, APGD-T, FAB-T, Square ({spec.get('n_queries', 5000)} queries)"
        )
        + ", success re-judged with fresh draws",
    }.get(name, "")
    return steps, eot, other


def robustness_report(results: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The Markdown report (``data/08_reporting/robustness_report.md``), laid out like the
    paper's tables: clean / robust accuracy per defense × attack with ε, steps, EOT, number of
    images and seed; training time per method; sanity checks; the unseen-attack table; the
    ε sweep; attack times; skipped defenses and gaps.

    Args:
        results: from :func:`atop.pipelines.evaluation.nodes.collect_results`.
        metrics: from :func:`robustness_metrics` (every number shown comes from it).
    """
    s = metrics["settings"]
    attacks = results["attacks"]
    labels = [a["label"] for a in attacks]
    defenses = metrics["defenses"]
    stochastic = [n for n, r in results["defenses"].items() if r["stochastic"]]
    reference = reference_attack(results)
    out = ["# Robustness report", ""]
    out.append(
        f"Clean and robust accuracy (%) of every defense on the **same {s['n_images']} test "
        f"images**: the first {s['n_images']} of the fixed evaluation subset `eval_indices` "
        f"({s['n_eval_indices']} images; the paper evaluates 512). Seed {s['seed']}, device "
        f"{s['device']}, {s['n_classes']} classes."
    )
    note = results["settings"].get("profile_note")
    if note:
        out += ["", f"**Profile:** {note}"]
    out += [
        "",
        f"Stochastic defenses ({', '.join(stochastic) or 'none'}) are judged with "
        f"**{s['draws']} fresh draws** of their randomness and a strict majority vote (never the "
        "single pass an attack used); deterministic ones with one pass. Attacks use exact "
        "gradients through the transform and the purifier, with EOT on stochastic defenses; on "
        "deterministic defenses EOT is pointless and every `eot_iter` is 1. **Worst case** = "
        "per-image worst over clean and every ε-bounded attack (ℓ∞, ℓ2, or all). Every attack's "
        "output passed the Great Expectations suite (perturbation ≤ ε + "
        f"{results['settings']['tolerance']:g}, pixels in [0, 1], shape and count).",
        "",
        "## Clean and robust accuracy (%)",
        "",
    ]
    header = [
        "defense",
        "clean",
        *labels,
        "worst ℓ∞",
        "worst ℓ2",
        "**worst case**",
        "training time",
    ]
    rows = []
    for name, entry in defenses.items():
        rows.append(
            [
                name,
                _pct(entry["clean_acc"]),
                *(_pct(entry["robust_acc"].get(label)) for label in labels),
                *(_pct(entry.get(f"{key}_acc")) for key, _ in WORST_CASES[:2]),
                f"**{_pct(entry['worst_case_acc'])}**",
                _duration(entry["train_seconds"]),
            ]
        )
    out += [_table(header, rows), "", "— : not applicable (BPDA needs a purifier).", ""]

    out += ["## Defenses", ""]
    rows = [
        [
            name,
            res["description"],
            "stochastic" if res["stochastic"] else "deterministic",
            ", ".join(f"{k} {v}" for k, v in (res["transform"] or {}).items()) or "—",
        ]
        for name, res in results["defenses"].items()
    ]
    out += [_table(["defense", "model", "inference", "random transform t"], rows, 99), ""]

    seen = results["unseen"]["seen"]
    out += ["## Attacks", ""]
    rows = []
    for attack in attacks:
        steps, eot, other = _attack_settings(attack)
        rows.append(
            [
                attack["label"],
                _algorithm(attack),
                NORM_TEXT[attack["norm"]],
                format_eps(attack["eps"], attack["norm"]) if attack["eps"] is not None else "∞",
                steps,
                eot,
                other,
                "—"
                if attack["label"] not in seen
                else ("seen" if seen[attack["label"]] else "unseen"),
            ]
        )
    out += [
        _table(
            [
                "attack",
                "algorithm",
                "norm",
                "ε",
                "steps",
                "EOT (stoch. / det.)",
                "settings",
                "AToP",
            ],
            rows,
            numeric_from=99,
        ),
        "",
    ]

    out += _unseen_section(results, metrics)
    out += _sanity_section(results, metrics, reference)
    out += _sweep_section(results, metrics, reference)
    out += _time_sections(results, metrics, labels)
    return "\n".join(out).rstrip() + "\n"


def _unseen_section(results: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    unseen = metrics["unseen"]
    out = ["## Unseen attacks", ""]
    if unseen["training_attack"] is None:
        return out + [
            "The AToP purifier's fine-tuning attack is unknown (no `meta.atop.attack`).",
            "",
        ]
    out += [
        f"The AToP purifier was fine-tuned with **{unseen['training_attack']}** only; every other "
        "attack is unseen in training (paper: generalization to unseen attacks).",
        "",
    ]
    defenses = metrics["defenses"]
    if "atop" not in defenses:
        return out + ["AToP was not evaluated.", ""]
    rows = []
    for label, was_seen in unseen["seen"].items():
        atop = defenses["atop"]["robust_acc"].get(label)
        ap = defenses.get("ap", {}).get("robust_acc", {}).get(label)
        gain = "—" if atop is None or ap is None else f"{100 * (atop - ap):+.2f}"
        rows.append([label, "seen" if was_seen else "unseen", _pct(ap), _pct(atop), gain])
    out += [_table(["attack", "AToP training", "AP (%)", "AToP (%)", "AToP − AP"], rows, 2), ""]
    return out


def _sanity_section(
    results: Mapping[str, Any], metrics: Mapping[str, Any], reference: Mapping[str, Any]
) -> list[str]:
    sanity = results["settings"]["sanity"]
    stronger = ", ".join(f"{k} {v}" for k, v in sanity["stronger"].items()) or "none"
    out = [
        "## Gradient-masking sanity checks",
        "",
        f"Reference attack: `{reference['label']}`; stronger variant: {stronger}; "
        f"{metrics['settings']['n_sanity_images']} images. Comparisons are paired (same images). "
        "**Noise tolerance:** a rise of r = c − b images (c images correct only in the second "
        "result, b only in the first) counts as sampling noise when "
        f"r ≤ max({sanity['min_images']}, {sanity['z']:g}·√(b + c)) -- under no real change the "
        "b + c discordant images split like fair coin flips (McNemar). "
        f"'≈ 0 at the largest ε' means robust accuracy ≤ {sanity['large_eps_max_acc']:g}. "
        "A FAIL flags possible gradient masking or a too-weak attack: read the numbers above "
        "with care.",
        "",
    ]
    rows = []
    for name, res in results["defenses"].items():
        for check, value in res["sanity"].items():
            status = {"pass": "pass", "fail": "**FAIL**"}.get(value["status"], value["status"])
            rows.append([name, CHECKS.get(check, check), status, value["detail"]])
    out += [_table(["defense", "check", "result", "details"], rows, numeric_from=99), ""]
    bpda = [
        (name, res["sanity"]["bpda_vs_exact"]["stronger"])
        for name, res in results["defenses"].items()
        if "stronger" in res["sanity"].get("bpda_vs_exact", {})
    ]
    if bpda:
        out += [
            "BPDA vs exact gradients, the stronger attack (lower accuracy): "
            + ", ".join(f"{name}: {winner}" for name, winner in bpda)
            + ". Both enter the worst case.",
            "",
        ]
    return out


def _sweep_section(
    results: Mapping[str, Any], metrics: Mapping[str, Any], reference: Mapping[str, Any]
) -> list[str]:
    sweep = metrics["robust_acc_vs_eps"]
    if not sweep:
        return []
    keys = list(next(iter(sweep.values())))
    out = [
        f"## Robust accuracy (%) vs ε ({_algorithm(reference)} {NORM_TEXT[reference['norm']]}, "
        f"{metrics['settings']['n_sanity_images']} images)",
        "",
        "ε = 0 is clean accuracy; α scales with ε. Plot: `robust_accuracy_vs_eps.png`.",
        "",
    ]
    rows = [[name, *(_pct(values.get(k)) for k in keys)] for name, values in sweep.items()]
    return out + [_table(["defense", *keys], rows), ""]


def _time_sections(
    results: Mapping[str, Any], metrics: Mapping[str, Any], labels: Sequence[str]
) -> list[str]:
    out = [
        "## Training time",
        "",
        "From each checkpoint's `meta` (seconds of training per stage).",
        "",
    ]
    rows, gaps = [], []
    for name, res in results["defenses"].items():
        stages = ", ".join(f"{k} {_duration(v)}" for k, v in res["train_seconds"].items())
        rows.append([name, stages, _duration(res["total_train_seconds"])])
        gaps += [
            f"{name}: `{k}` records no training time"
            for k, v in res["train_seconds"].items()
            if v is None
        ]
    out += [_table(["defense", "stages", "total"], rows, numeric_from=2), ""]
    out += ["## Attack time (s)", ""]
    rows = [
        [
            name,
            *(
                f"{res['attacks'][label]['seconds']:.1f}" if label in res["attacks"] else "—"
                for label in labels
            ),
        ]
        for name, res in results["defenses"].items()
    ]
    out += [_table(["defense", *labels], rows), ""]
    notes = [f"{name}: not evaluated ({reason})" for name, reason in results["skipped"].items()]
    if results["grid"] is None:
        notes.append("no adversarial grid (its defense or attack was not evaluated)")
    if notes or gaps:
        out += ["## Skipped and gaps", "", *(f"- {line}" for line in notes + gaps), ""]
    return out

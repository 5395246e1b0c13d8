"""The evaluation's numbers: the metrics JSON (``dvc metrics show``) and the CSV table.

Every number of the report comes from :func:`robustness_metrics`; the CSV and the Markdown
tables are formatted from it, so they always agree. Accuracies are fractions in ``[0, 1]``.
Plain functions, no Kedro imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from atop.evaluation.protocol import format_eps

WORST_CASES = (("worst_case_linf", "Linf"), ("worst_case_l2", "L2"), ("worst_case", "all"))


def _acc(values: Sequence[bool]) -> float:
    return sum(bool(v) for v in values) / len(values)


def eps_key(eps: float, norm: str) -> str:
    """JSON key of one ε of the sweep: ``"8/255"`` (ℓ∞) or ``"0.5"`` (ℓ2)."""
    return format_eps(eps, norm)


def reference_attack(results: Mapping[str, Any]) -> dict[str, Any]:
    label = results["settings"]["sanity"]["reference"]
    return next(a for a in results["attacks"] if a["label"] == label)


def robustness_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics JSON (``data/08_reporting/robustness.json``, tracked by DVC).

    Layout (nested dicts of scalars; ``dvc metrics show`` flattens them with dots)::

        settings:   n_images, n_eval_indices, n_sanity_images, seed, draws, batch_size,
                    device, n_classes,
                    attacks.<label>: {name, norm, eps, steps, eot_iter, ...} (the spec;
                        eot_iter is the stochastic defenses'; deterministic ones use 1),
                    sanity: {reference, z, min_images, large_eps_max_acc, ...}
        defenses.<defense>: clean_acc, robust_acc.<label>, worst_case_acc,
                    worst_case_linf_acc, worst_case_l2_acc, train_seconds (total, or null),
                    attack_seconds
        robust_acc_vs_eps.<defense>.<eps>   ("8/255" keys for ℓ∞)
        sanity.<defense>.<check>            "pass" | "fail" | "not run"
        unseen: training_attack (text), seen.<label> (bool)
        skipped.<defense>                   why it was not evaluated

    Args:
        results: the output of :func:`atop.pipelines.evaluation.nodes.collect_results`.
    """
    settings = results["settings"]
    reference = reference_attack(results)
    attacks = {}
    for attack in results["attacks"]:
        spec = {k: v for k, v in attack["spec"].items() if k != "name"}
        attacks[attack["label"]] = {"name": attack["name"], **spec, "norm": attack["norm"]}
        attacks[attack["label"]]["eps"] = attack["eps"]
    sanity_settings = dict(settings["sanity"])
    stronger = sanity_settings.pop("stronger")
    sanity_settings.pop("eps_sweep")
    sanity_settings.update({f"stronger_{k}": v for k, v in stronger.items()})
    defenses, vs_eps, sanity = {}, {}, {}
    for name, res in results["defenses"].items():
        entry = {
            "clean_acc": _acc(res["clean"]),
            "robust_acc": {label: _acc(a["correct"]) for label, a in res["attacks"].items()},
        }
        for key, scope in WORST_CASES:
            if scope in res["worst_case"]:
                entry[f"{key}_acc"] = _acc(res["worst_case"][scope])
        entry["train_seconds"] = res["total_train_seconds"]
        entry["attack_seconds"] = round(sum(a["seconds"] for a in res["attacks"].values()), 2)
        defenses[name] = entry
        vs_eps[name] = {eps_key(p["eps"], reference["norm"]): p["acc"] for p in res["sweep"]}
        sanity[name] = {check: value["status"] for check, value in res["sanity"].items()}
    unseen = results["unseen"]
    return {
        "settings": {
            "n_images": settings["n_images"],
            "n_eval_indices": settings["n_eval_indices"],
            "n_sanity_images": settings["n_sanity_images"],
            "seed": settings["seed"],
            "draws": settings["draws"],
            "batch_size": settings["batch_size"],
            "device": settings["device"],
            "n_classes": settings["dataset_classes"],
            "attacks": attacks,
            "sanity": sanity_settings,
        },
        "defenses": defenses,
        "robust_acc_vs_eps": vs_eps,
        "sanity": sanity,
        "unseen": {
            "training_attack": _attack_text(unseen["training_attack"]),
            "seen": dict(unseen["seen"]),
        },
        "skipped": dict(results["skipped"]),
    }


def _attack_text(spec: Mapping[str, Any] | None) -> str | None:
    """``"fgsm Linf 8/255"`` for a training attack spec (``None`` when unknown)."""
    if not spec:
        return None
    norm = spec.get("norm", "Linf")
    eps = spec.get("eps")
    return f"{spec.get('name')} {norm} {format_eps(eps, norm) if eps is not None else ''}".strip()


def robustness_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The CSV table: one row per defense; accuracies in ``[0, 1]``.

    Columns: ``defense``, ``clean``, one per attack label (empty where the attack does not
    apply), ``worst_case_linf``, ``worst_case_l2``, ``worst_case``, ``train_seconds``,
    ``n_images``.
    """
    labels = list(metrics["settings"]["attacks"])
    rows = []
    for name, entry in metrics["defenses"].items():
        row: dict[str, Any] = {"defense": name, "clean": entry["clean_acc"]}
        for label in labels:
            row[label] = entry["robust_acc"].get(label, math.nan)
        for key, _ in WORST_CASES:
            row[key] = entry.get(f"{key}_acc", math.nan)
        row["train_seconds"] = entry["train_seconds"]
        row["n_images"] = metrics["settings"]["n_images"]
        rows.append(row)
    columns = [
        "defense",
        "clean",
        *labels,
        *(k for k, _ in WORST_CASES),
        "train_seconds",
        "n_images",
    ]
    return pd.DataFrame(rows, columns=columns)

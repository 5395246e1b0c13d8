"""The evaluation's numbers: the metrics JSON (``dvc metrics show``), the CSV tables.

Every number of the report comes from :func:`robustness_metrics`; the CSV and the Markdown
tables are formatted from it, so they always agree. Accuracies are fractions in ``[0, 1]``.
Plain functions, no Kedro imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from atop.evaluation.protocol import format_eps, per_image, worst_case
from atop.evaluation.stats import accuracy_ci, mcnemar

#: The judging rules reported (atop.evaluation.protocol.RULES), and what they mean.
RULES = {
    "single": "each image's fraction of N fresh draws judged right, averaged over images",
    "worst_of_n": "an image counts only if all N fresh draws are right",
}
#: The threat models of the headline worst cases.
THREATS = ("Linf", "L2")
#: The defense the paired tests compare with every other one.
FOCUS = "atop"


def eps_key(eps: float, norm: str) -> str:
    """JSON key of one ε of the sweep: ``"8/255"`` (ℓ∞) or ``"0.5"`` (ℓ2)."""
    return format_eps(eps, norm)


def reference_attack(results: Mapping[str, Any]) -> dict[str, Any]:
    label = results["settings"]["sanity"]["reference"]
    return next(a for a in results["attacks"] if a["label"] == label)


def eps_points(res: Mapping[str, Any], reference: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The accuracy-vs-ε points of one defense: its ε sweep (``[{"eps", "draws"}]``), or,
    where the sweep did not run (the main job; a defense outside ``sanity.defenses``), the
    two points every evaluation has: clean (ε = 0) and the reference attack's ε."""
    if res["sweep"]:
        return list(res["sweep"])
    if reference["label"] not in res["attacks"]:
        return []
    return [
        {"eps": 0.0, "draws": res["clean"]},
        {"eps": reference["eps"], "draws": res["attacks"][reference["label"]]["draws"]},
    ]


def _summary(draws: Tensor) -> dict[str, Any]:
    """Single-draw and worst-of-N accuracy of bool ``[N, D]`` verdicts, each with its exact
    95 % interval (:func:`atop.evaluation.stats.accuracy_ci`)."""
    out: dict[str, Any] = {}
    for rule in RULES:
        acc, low, high = accuracy_ci(per_image(draws, rule))
        out[rule] = acc
        out[f"{rule}_ci"] = [low, high]
    return out


def _worst_summary(draws: Sequence[Tensor]) -> dict[str, Any]:
    """:func:`_summary` of the per-image worst case over verdict matrices: under each rule,
    each image's lowest score over clean and the attacks (single-draw: the attacker keeps,
    per image, the example with the lowest chance of being right)."""
    out: dict[str, Any] = {}
    for rule in RULES:
        acc, low, high = accuracy_ci(worst_case(draws, rule))
        out[rule] = acc
        out[f"{rule}_ci"] = [low, high]
    return out


def worst_draws(res: Mapping[str, Any], attacks: Sequence[Mapping[str, Any]], norm: str) -> list:
    """The verdict matrices of the per-image worst case of threat model ``norm``: clean and
    every ε-bounded attack of that norm the defense ran."""
    bounded = [
        a["label"]
        for a in attacks
        if a["eps"] is not None and a["norm"] == norm and a["label"] in res["attacks"]
    ]
    return [res["clean"], *(res["attacks"][label]["draws"] for label in bounded)]


def _paired(focus: Mapping[str, Any], other: Mapping[str, Any], attacks, norm: str) -> dict:
    """Exact McNemar tests of the focus defense vs another on the worst case of ``norm``."""
    out: dict[str, Any] = {}
    for rule in ("first", "worst_of_n"):
        a = worst_case(worst_draws(focus, attacks, norm), rule)
        b = worst_case(worst_draws(other, attacks, norm), rule)
        test = mcnemar(a, b)
        out[rule] = {"only_focus": test.only_a, "only_other": test.only_b, "p_value": test.p_value}
    single = [
        worst_case(worst_draws(r, attacks, norm), "single").mean().item() for r in (focus, other)
    ]
    out["single_difference"] = single[0] - single[1]
    return out


def _matched_clean(defenses: Mapping[str, Any], attacks) -> dict[str, Any]:
    """Worst-case single-draw accuracy of every purified defense on the images that every
    one of them classifies correctly when clean (worst-of-N): a comparison at matched clean
    accuracy."""
    purified = {n: r for n, r in defenses.items() if r["stochastic"]}
    if len(purified) < 2:
        return {}
    common = torch.stack([per_image(r["clean"], "worst_of_n") for r in purified.values()]).all(0)
    out: dict[str, Any] = {"images": int(common.sum())}
    if not common.any():
        return out
    for name, res in purified.items():
        out[name] = {
            norm: worst_case(worst_draws(res, attacks, norm), "single")[common].mean().item()
            for norm in THREATS
        }
    return out


def _attacked(attack: Mapping[str, Any]) -> dict[str, int]:
    """``{"attacked": k}`` for a ``survivors`` run (k images attacked), else ``{}``."""
    mask = attack.get("attacked")
    return {} if mask is None else {"attacked": int(mask.sum())}


def robustness_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics JSON (``data/08_reporting/<dataset>/<profile>/robustness.json``, tracked by DVC).

    Every accuracy comes in both judging rules (:data:`RULES`) with an exact 95 % interval
    where it is a headline. Layout (``dvc metrics show`` flattens it with dots)::

        settings:   n_images, draws, seed, ... and the attack specs
        defenses.<d>.clean.{single, single_ci, worst_of_n, worst_of_n_ci}
        defenses.<d>.attacks.<label>.{single, worst_of_n[, attacked]}
        defenses.<d>.worst_case.{Linf, L2}.{single, single_ci, worst_of_n, worst_of_n_ci}
        defenses.<d>.fixed_randomness.{clean, attack}  (purified defenses, single draw)
        defenses.<d>.{train_seconds, attack_seconds}
        paired.<d>.{Linf, L2}: exact McNemar of atop vs <d> on the worst-case verdicts
            (first: one draw per image; worst_of_n), and the single-draw difference
        matched_clean: images every purified defense gets right clean (worst-of-N), and each
            one's worst-case single-draw accuracy on them
        robust_acc_vs_eps.<d>.<eps>  (single-draw), sanity.<d>.<check>, unseen, skipped

    Args:
        results: the output of :func:`atop.pipelines.evaluation.nodes.collect_results`.
    """
    settings = results["settings"]
    reference = reference_attack(results)
    attacks = results["attacks"]
    specs = {}
    for attack in attacks:
        spec = {k: v for k, v in attack["spec"].items() if k != "name"}
        specs[attack["label"]] = {"name": attack["name"], **spec, "norm": attack["norm"]}
        specs[attack["label"]]["eps"] = attack["eps"]
    defenses, vs_eps, sanity = {}, {}, {}
    for name, res in results["defenses"].items():
        entry: dict[str, Any] = {
            "clean": _summary(res["clean"]),
            "attacks": {
                label: {
                    **{rule: per_image(a["draws"], rule).float().mean().item() for rule in RULES},
                    **_attacked(a),
                }
                for label, a in res["attacks"].items()
            },
            "worst_case": {
                norm: _worst_summary(worst_draws(res, attacks, norm)) for norm in THREATS
            },
            "train_seconds": res["total_train_seconds"],
            "attack_seconds": round(sum(a["seconds"] for a in res["attacks"].values()), 2),
        }
        fixed = res.get("fixed_randomness")
        if fixed:
            entry["fixed_randomness"] = {
                "clean": per_image(fixed["clean"], "single").mean().item(),
                "attack": per_image(fixed["draws"], "single").mean().item(),
                "label": fixed["attack"],
            }
        defenses[name] = entry
        points = eps_points(res, reference)
        if points:
            vs_eps[name] = {
                eps_key(p["eps"], reference["norm"]): per_image(p["draws"], "single").mean().item()
                for p in points
            }
        sanity[name] = {check: value["status"] for check, value in res["sanity"].items()}
    focus = results["defenses"].get(FOCUS)
    paired = {}
    if focus is not None:
        for name, res in results["defenses"].items():
            if name != FOCUS:
                paired[name] = {norm: _paired(focus, res, attacks, norm) for norm in THREATS}
    unseen = results["unseen"]
    return {
        "settings": {
            "n_images": settings["n_images"],
            "n_eval_indices": settings["n_eval_indices"],
            "n_sanity_images": settings["n_sanity_images"],
            "seed": settings["seed"],
            "draws": settings["draws"],
            "rules": dict(RULES),
            "batch_size": settings["batch_size"],
            "device": settings["device"],
            "n_classes": settings["dataset_classes"],
            "attacks": specs,
        },
        "defenses": defenses,
        "paired": paired,
        "matched_clean": _matched_clean(results["defenses"], attacks),
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
    """The CSV table: one row per defense and judging rule; accuracies in ``[0, 1]``.

    Columns: ``defense``, ``rule`` (single | worst_of_n), ``clean``, one per attack label
    (empty where it does not apply), ``worst_case_linf``, ``worst_case_l2`` with their 95 %
    interval bounds, ``train_seconds``, ``n_images``, ``draws``.
    """
    labels = list(metrics["settings"]["attacks"])
    rows = []
    for name, entry in metrics["defenses"].items():
        for rule in RULES:
            row: dict[str, Any] = {"defense": name, "rule": rule, "clean": entry["clean"][rule]}
            for label in labels:
                row[label] = entry["attacks"].get(label, {}).get(rule, math.nan)
            for norm in THREATS:
                worst = entry["worst_case"][norm]
                key = f"worst_case_{norm.lower()}"
                row[key] = worst[rule]
                row[f"{key}_low"], row[f"{key}_high"] = worst[f"{rule}_ci"]
            row["train_seconds"] = entry["train_seconds"]
            row["n_images"] = metrics["settings"]["n_images"]
            row["draws"] = metrics["settings"]["draws"]
            rows.append(row)
    return pd.DataFrame(rows)


def accuracy_vs_eps_table(results: Mapping[str, Any]) -> pd.DataFrame:
    """The ε sweep of the reference attack (``evaluation.sanity``), one row per defense and
    ε: the CSV that ``dvc.yaml`` plots (x = ``eps``, y = ``robust_acc``, a line per
    defense) so that ``dvc plots diff`` overlays runs.

    Columns: ``defense``, ``norm``, ``eps`` (the budget on the [0, 1] pixel scale),
    ``eps_label`` (``"8/255"``), ``robust_acc`` (single-draw accuracy in ``[0, 1]``).
    """
    reference = reference_attack(results)
    norm = reference["norm"]
    rows = [
        {
            "defense": name,
            "norm": norm,
            "eps": point["eps"],
            "eps_label": eps_key(point["eps"], norm),
            "robust_acc": per_image(point["draws"], "single").mean().item(),
        }
        for name, res in results["defenses"].items()
        for point in eps_points(res, reference)
    ]
    return pd.DataFrame(rows, columns=["defense", "norm", "eps", "eps_label", "robust_acc"])


def verdicts_table(results: Mapping[str, Any], eval_indices: Sequence[int]) -> pd.DataFrame:
    """Every per-image, per-draw verdict of the evaluation: one row per defense, attack (or
    ``clean``) and image, with columns ``draw_0 .. draw_{D-1}`` (1 = right; deterministic
    defenses have one draw), so any statistic can be recomputed without rerunning attacks.

    Columns: ``defense``, ``attack``, ``norm``, ``eps``, ``image`` (test-set index),
    ``draws`` (count), ``correct`` (count of right draws), ``attacked`` (1; 0 where a
    ``survivors`` attack skipped an image already beaten and kept its all-wrong verdicts),
    ``draw_<d>``.
    """
    specs = {a["label"]: a for a in results["attacks"]}
    frames = []
    for name, res in results["defenses"].items():
        items = [("clean", res["clean"], None)]
        items += [(k, v["draws"], v.get("attacked")) for k, v in res["attacks"].items()]
        for label, draws, attacked in items:
            spec = specs.get(label, {})
            n, d = draws.shape
            frame = pd.DataFrame(
                draws.to(torch.int8).numpy(), columns=[f"draw_{i}" for i in range(d)]
            )
            frame.insert(0, "correct", frame.sum(axis=1))
            frame.insert(0, "draws", d)
            frame.insert(0, "image", list(eval_indices[:n]))
            frame.insert(0, "eps", spec.get("eps"))
            frame.insert(0, "norm", spec.get("norm"))
            frame.insert(0, "attack", label)
            frame.insert(0, "defense", name)
            ran = torch.ones(n, dtype=torch.int8) if attacked is None else attacked.to(torch.int8)
            frame.insert(7, "attacked", ran.numpy())
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)

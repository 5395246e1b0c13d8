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

from atop.evaluation.convergence import summarize
from atop.evaluation.defenses import FACTORIAL, NOISE_ABLATIONS
from atop.evaluation.protocol import format_eps, per_image, plugin_worst, worst_case
from atop.evaluation.stats import accuracy_ci, holm, paired_test

#: The judging rules reported (atop.evaluation.protocol.RULES), and what they mean.
RULES = {
    "single": "each image's fraction of N fresh draws judged right, averaged over images "
    "(worst cases: cross-fitted over the draws)",
    "worst_of_n": "an image counts only if all N fresh draws are right (worst cases: all N "
    "draws of every attack)",
}
#: The threat models of the headline worst cases.
THREATS = ("Linf", "L2")
#: What the studies and the effect tables report per defense: clean accuracy and the two
#: headline worst cases (single-draw; cross-fitted).
OUTCOMES = ("clean", *THREATS)
#: How the reports name them.
OUTCOME_TEXT = {"clean": "clean", "Linf": "worst ℓ∞", "L2": "worst ℓ2"}
#: The defense the exploratory paired tests compare with every other one.
FOCUS = "atop"


def eps_key(eps: float, norm: str) -> str:
    """JSON key of one ε of the sweep: ``"8/255"`` (ℓ∞) or ``"0.5"`` (ℓ2)."""
    return format_eps(eps, norm)


def references(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The sanity checks' reference attacks (one per threat model), as attack records."""
    labels = results["settings"]["sanity"]["references"]
    by_label = {a["label"]: a for a in results["attacks"]}
    return [by_label[label] for label in labels if label in by_label]


def eps_points(res: Mapping[str, Any], reference: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The accuracy-vs-ε points of one defense for the reference's norm: its ε sweep
    (``[{"eps", "draws"}]``), or, where the sweep did not run (the main job; a defense
    outside ``sanity.defenses``), the two points every evaluation has: clean (ε = 0) and the
    reference attack's ε."""
    sweep = (res.get("sweep") or {}).get(reference["norm"])
    if sweep:
        return list(sweep)
    if reference["label"] not in res["attacks"]:
        return []
    return [
        {"eps": 0.0, "draws": res["clean"]},
        {"eps": reference["eps"], "draws": res["attacks"][reference["label"]]["draws"]},
    ]


def _summary(scores: Mapping[str, Tensor]) -> dict[str, Any]:
    """Accuracy and exact 95 % interval (:func:`atop.evaluation.stats.accuracy_ci`) of
    per-image scores under each rule (``{rule: float or bool [N]}``)."""
    out: dict[str, Any] = {}
    for rule, values in scores.items():
        acc, low, high = accuracy_ci(values)
        out[rule] = acc
        out[f"{rule}_ci"] = [low, high]
    return out


def attack_records(entries: Sequence[Any]) -> list[dict[str, Any]]:
    """The records the metrics read of the evaluation's attack entries
    (:class:`atop.evaluation.protocol.AttackEntry`): ``[{"label", "norm", "eps"}]``."""
    return [{"label": e.label, "norm": e.norm, "eps": e.eps} for e in entries]


def worst_draws(res: Mapping[str, Any], attacks: Sequence[Mapping[str, Any]], norm: str) -> list:
    """The verdict sets of the per-image worst case of threat model ``norm``: clean and
    every ε-bounded attack of that norm the defense ran."""
    bounded = [
        a["label"]
        for a in attacks
        if a["eps"] is not None and a["norm"] == norm and a["label"] in res["attacks"]
    ]
    return [res["clean"], *(res["attacks"][label]["draws"] for label in bounded)]


def study_fits(res: Mapping[str, Any], study: Mapping[str, Any] | None, attacks) -> bool:
    """Whether ``study`` (a defense's convergence study, :func:`atop.evaluation.convergence.study`)
    was run against this very evaluation ``res``: for every norm it studied, the headline
    verdict sets it stored equal ``res``'s (same images, weights and attacks). A study of
    other weights or images, or an absent or skipped one, does not fit."""
    if not study or "skipped" in study or not study.get("norms"):
        return False
    for norm, record in study["norms"].items():
        stored, current = record.get("headline"), worst_draws(res, attacks, norm)
        if stored is None or len(stored) != len(current):
            return False
        if not all(map(torch.equal, stored, current)):  # False on another shape too
            return False
    return True


def headline_sets(res: Mapping[str, Any], attacks, norm: str) -> tuple[list[Tensor], bool]:
    """The verdict sets of ``norm``'s headline and whether the convergence study's were
    added: a defense whose study found a setting that lowers the evaluation's worst case by
    more than a paired standard error (:func:`atop.evaluation.convergence.summarize`) gets
    the worst case over the evaluation's attacks AND those settings. Only the settings that
    lower it are added: the cross-fitted worst case is not monotone in the number of
    verdict sets (each added set is one more chance to pick, on one half of the draws, an
    attack that scores higher on the other half; docs/protocol.md)."""
    sets = worst_draws(res, attacks, norm)
    study = res.get("study")
    if not study or norm not in study.get("norms", {}):
        return sets, False
    verdict = summarize(study)[norm]
    if verdict["converged"] is not False:
        return sets, False
    points = study["norms"][norm]["points"]
    lowering = [points[k]["draws"] for k, p in verdict["points"].items() if p.get("lowers")]
    return sets + lowering, True


def worst_scores(res: Mapping[str, Any], attacks, norm: str) -> Tensor:
    """Per-image cross-fitted single-draw worst case (float ``[N]``) of ``norm``'s headline."""
    return worst_case(headline_sets(res, attacks, norm)[0], "single")


def outcome_scores(res: Mapping[str, Any], attacks, outcome: str, *, study: bool = True) -> Tensor:
    """Per-image single-draw scores (float ``[N]``) of one evaluated defense for an
    :data:`OUTCOMES` entry: clean accuracy, or ``outcome``'s cross-fitted worst case (the
    headline's, :func:`headline_sets`; with ``study=False`` over the evaluation's attacks
    only, without a convergence study's settings)."""
    if outcome == "clean":
        return per_image(res["clean"], "single")
    if not study:
        return worst_case(worst_draws(res, attacks, outcome), "single")
    return worst_scores(res, attacks, outcome)


def _worst_entry(res: Mapping[str, Any], attacks, norm: str) -> dict[str, Any]:
    sets, with_study = headline_sets(res, attacks, norm)
    entry = _summary({rule: worst_case(sets, rule) for rule in RULES})
    entry["plugin"] = plugin_worst(sets).mean().item()  # the biased plain minimum
    entry["with_study"] = with_study
    return entry


def _test(a: Tensor, b: Tensor) -> dict[str, Any]:
    return paired_test(a.float(), b.float()).to_dict()


def _paired(focus: Mapping[str, Any], other: Mapping[str, Any], attacks, norm: str) -> dict:
    """Exploratory paired tests of the focus defense vs another on ``norm``'s worst case:
    single-draw (cross-fitted) and worst-of-N (0/1: the exact McNemar test)."""
    return {
        rule: _test(
            worst_case(headline_sets(focus, attacks, norm)[0], rule),
            worst_case(headline_sets(other, attacks, norm)[0], rule),
        )
        for rule in RULES
    }


def primary_family(
    defenses: Mapping[str, Any], attacks, primary: Mapping[str, Any]
) -> dict[str, Any]:
    """The confirmatory family declared in ``evaluation.primary``: ``focus`` vs each
    ``versus`` defense on each of ``norms`` (single-draw worst case, paired sign-flip test,
    bootstrap CI), with Holm-adjusted p-values. Defenses not evaluated are listed as
    missing (the family is then incomplete, and says so)."""
    focus = defenses.get(primary["focus"])
    tests, missing = {}, []
    for other in primary["versus"]:
        for norm in primary["norms"]:
            key = f"{primary['focus']} vs {other}, {norm}"
            if focus is None or other not in defenses:
                missing.append(key)
                continue
            tests[key] = {
                "focus": primary["focus"],
                "other": other,
                "norm": norm,
                **_test(
                    worst_scores(focus, attacks, norm), worst_scores(defenses[other], attacks, norm)
                ),
            }
    adjusted = holm({k: t["p_value"] for k, t in tests.items()}) if tests else {}
    for key, test in tests.items():
        test["p_holm"] = adjusted[key]
        test["significant"] = adjusted[key] < primary["level"]
    return {"declared": dict(primary), "tests": tests, "missing": missing}


def factorial_effects(defenses: Mapping[str, Any], attacks) -> dict[str, Any]:
    """The 2 x 2 of Eq. 9's terms (:data:`atop.evaluation.defenses.FACTORIAL`), per threat
    model and for clean accuracy: each main effect (the mean over the other factor's two
    levels of the difference its term makes) and the interaction, as per-image contrasts
    with their paired bootstrap CI and sign-flip p-value (exploratory). Empty without all
    four arms."""
    arms = {key: defenses.get(name) for key, name in FACTORIAL.items()}
    if any(res is None for res in arms.values()):
        return {}
    out: dict[str, Any] = {}
    for outcome in OUTCOMES:
        (a00, a01, a10, a11) = (outcome_scores(arms[k], attacks, outcome) for k in ((False, False), (False, True), (True, False), (True, True)))  # fmt: skip
        contrasts = {
            "reconstruction_from_x_adv": ((a10 - a00) + (a11 - a01)) / 2,
            "ce_term": ((a01 - a00) + (a11 - a10)) / 2,
            "interaction": (a11 - a01) - (a10 - a00),
        }
        zero = torch.zeros_like(a00)
        out[outcome] = {name: _test(c, zero) for name, c in contrasts.items()}
    return out


def noise_routes(defenses: Mapping[str, Any], attacks) -> dict[str, Any]:
    """The noise ablations against the default route (method.md §6.1, docs/protocol.md):
    for AP and AToP and each of :data:`~atop.evaluation.defenses.NOISE_ABLATIONS`
    evaluated beside its default (``ap_upsample`` vs ``ap``, ...), per :data:`OUTCOMES`
    entry, Δ = ablation − default per image (fractions in [-1, 1]; single-draw, worst cases
    cross-fitted over the evaluation's attacks only, on both sides: a convergence study's
    settings, which only the defaults have, are left out so that both face the same
    attacks) with its paired-bootstrap CI and sign-flip p-value (exploratory).

    Args:
        attacks: the evaluation's attack records (:func:`attack_records`).

    Returns:
        ``{"<ablation defense>": {"default": name, "clean" | "Linf" | "L2": test}}``; empty
        when no ablation was evaluated beside its default.
    """

    out: dict[str, Any] = {}
    for default in ("ap", FOCUS):
        for route in NOISE_ABLATIONS:
            name = f"{default}_{route}"
            if default not in defenses or name not in defenses:
                continue
            out[name] = {"default": default}
            for outcome in OUTCOMES:
                out[name][outcome] = _test(
                    outcome_scores(defenses[name], attacks, outcome, study=False),
                    outcome_scores(defenses[default], attacks, outcome, study=False),
                )
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
            norm: worst_scores(res, attacks, norm)[common].mean().item() for norm in THREATS
        }
    return out


def _attacked(attack: Mapping[str, Any]) -> dict[str, int]:
    """``{"attacked": k}`` for a ``survivors`` run (k images attacked), else ``{}``."""
    mask = attack.get("attacked")
    return {} if mask is None else {"attacked": int(mask.sum())}


def _fixed(fixed: Mapping[str, Any] | None, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The fixed-randomness rows, per norm: clean and attacked accuracy with one fixed draw,
    and the attack's fresh-draw accuracy beside it."""
    return {
        norm: {
            "label": row["attack"],
            "clean": per_image(row["clean"], "single").mean().item(),
            "attack": per_image(row["draws"], "single").mean().item(),
            "fresh": entry["attacks"][row["attack"]]["single"],
        }
        for norm, row in (fixed or {}).items()
    }


def robustness_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics JSON (``data/08_reporting/<dataset>/<profile>/robustness.json``, tracked by DVC).

    Every accuracy comes in both judging rules (:data:`RULES`) with an exact 95 % interval
    where it is a headline. Layout (``dvc metrics show`` flattens it with dots)::

        settings:   n_images, draws, seed, ..., the attack specs and the primary family
        defenses.<d>.clean.{single, single_ci, worst_of_n, worst_of_n_ci}
        defenses.<d>.attacks.<label>.{single, worst_of_n[, attacked]}
        defenses.<d>.worst_case.{Linf, L2}.{single, single_ci, worst_of_n, worst_of_n_ci,
            plugin (the biased plain minimum), with_study}
        defenses.<d>.fixed_randomness.{Linf, L2}.{clean, attack, fresh, label}
        defenses.<d>.{train_seconds, attack_seconds}
        primary: the declared family, its tests (delta, ci, p_value, p_holm, significant)
        factorial.{clean, Linf, L2}.{reconstruction_from_x_adv, ce_term, interaction}
        noise_routes.<ablation>.{default, clean, Linf, L2}: exploratory tests vs the default
        paired.<d>.{Linf, L2}.{single, worst_of_n}: exploratory tests of atop vs <d>
        matched_clean, robust_acc_vs_eps.<norm>.<d>.<eps>, sanity.<d>.<check>, unseen, skipped

    Args:
        results: the output of :func:`atop.pipelines.evaluation.nodes.collect_results`.
    """
    settings = results["settings"]
    attacks = results["attacks"]
    specs = {}
    for attack in attacks:
        spec = {k: v for k, v in attack["spec"].items() if k != "name"}
        specs[attack["label"]] = {"name": attack["name"], **spec, "norm": attack["norm"]}
        specs[attack["label"]]["eps"] = attack["eps"]
        specs[attack["label"]]["survivors"] = attack.get("survivors", False)
    defenses, sanity = {}, {}
    vs_eps: dict[str, dict[str, Any]] = {}
    for name, res in results["defenses"].items():
        entry: dict[str, Any] = {
            "clean": _summary({rule: per_image(res["clean"], rule) for rule in RULES}),
            "attacks": {
                label: {
                    **{rule: per_image(a["draws"], rule).float().mean().item() for rule in RULES},
                    **_attacked(a),
                }
                for label, a in res["attacks"].items()
            },
            "worst_case": {norm: _worst_entry(res, attacks, norm) for norm in THREATS},
            "train_seconds": res["total_train_seconds"],
            "attack_seconds": round(sum(a["seconds"] for a in res["attacks"].values()), 2),
        }
        fixed = _fixed(res.get("fixed_randomness"), entry)
        if fixed:
            entry["fixed_randomness"] = fixed
        defenses[name] = entry
        for reference in references(results):
            points = eps_points(res, reference)
            if points:
                vs_eps.setdefault(reference["norm"], {})[name] = {
                    eps_key(p["eps"], reference["norm"]): per_image(p["draws"], "single")
                    .mean()
                    .item()
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
        "primary": primary_family(results["defenses"], attacks, settings["primary"]),
        "factorial": factorial_effects(results["defenses"], attacks),
        "noise_routes": noise_routes(results["defenses"], attacks),
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
    """The ε sweeps of the reference attacks (``evaluation.sanity``), one row per defense,
    norm and ε: the CSV that ``dvc.yaml`` plots (x = ``eps``, y = ``robust_acc``, a line per
    defense) so that ``dvc plots diff`` overlays runs.

    Columns: ``defense``, ``norm``, ``eps`` (the budget on the [0, 1] pixel scale),
    ``eps_label`` (``"8/255"``), ``robust_acc`` (single-draw accuracy in ``[0, 1]``).
    """
    rows = [
        {
            "defense": name,
            "norm": reference["norm"],
            "eps": point["eps"],
            "eps_label": eps_key(point["eps"], reference["norm"]),
            "robust_acc": per_image(point["draws"], "single").mean().item(),
        }
        for reference in references(results)
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

"""The results pages, generated from the committed JSON records.

``python -m atop.results`` (``make results``) writes ``docs/results.md`` (every table of the
records) and the README's results block (between :data:`START` and :data:`END`: the headline
table, the verdict, the budget figure) from ``data/08_reporting/cifar10/base/``, and copies
the budget study's figure to ``docs/figures/``; ``--check`` only compares and exits 1 when a
page is stale. Every number is read from a record; the verdict sentences follow fixed rules
(a seeds-study difference counts when its hierarchical-bootstrap interval excludes 0, a
primary test when its Holm-adjusted p-value is below the declared level). A record that is
missing, or in an older schema, is said to be so instead of failing.

Pipeline glue (standard library only); the core never imports it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The records read, relative to the project root, and the pages written.
RECORDS = Path("data/08_reporting/cifar10/base")
RESULTS_MD = Path("docs/results.md")
README = Path("README.md")
FIGURE = Path("docs/figures/scaling.png")
#: The seeds study's design: the main job's seed and the four of
#: ``atop.pipelines.seeds.pipeline.SEEDS``; a record over fewer is said to be interim.
STUDY_SEEDS = 5
START, END = "<!-- results:start -->", "<!-- results:end -->"

NORMS = ("Linf", "L2")
NORM_TEXT = {"Linf": "ℓ∞", "L2": "ℓ2"}
OUTCOME_TEXT = {"clean": "clean", "Linf": "worst ℓ∞", "L2": "worst ℓ2"}
RULE_TEXT = {"single": "single-draw", "worst_of_n": "worst-of-N"}
#: The 2 x 2 of Eq. 9's terms (reconstruction from t(x'), CE term), in table order.
ARMS = ("ap_continued", "ap_classifier_aware", "adversarial_reconstruction", "atop")
FOCUS = "atop"
NAMES = {
    "standard": "standard classifier",
    "ap": "AP (pretrained purifier)",
    "ap_continued": "`ap_continued` (λ = 0, from t(x))",
    "ap_classifier_aware": "`ap_classifier_aware` (λ·CE, from t(x))",
    "adversarial_reconstruction": "`adversarial_reconstruction` (x from t(x′), λ = 0)",
    "atop": "**AToP** (Eq. 9: both terms)",
    "atop_pgd": "`atop_pgd` (AToP, PGD training attack)",
    "pgd_at": "PGD-AT (Madry et al.)",
    "rvs": "RvS (Baytaş & Deb)",
}
SHORT = {"pgd_at": "PGD-AT", "rvs": "RvS"}
CHECKS = {
    "eps_monotonic": "accuracy does not rise with ε",
    "large_eps_near_zero": "≈ 0 at the largest ε",
    "stronger_attack": "a stronger attack does not raise it",
    "iterative_beats_single_step": "PGD at least as strong as FGSM",
    "bpda_vs_exact": "exact gradients at least as strong as BPDA",
}
#: What refreshes each record (said where it is missing).
COMMANDS = {
    "robustness": "`make run`",
    "comparison": "`make repro`",
    "convergence": "`make repro`",
    "seeds": "`make seeds`",
    "scaling": "`make scaling`",
}


# --- records ------------------------------------------------------------------------------


def _evaluation_problem(record: Mapping[str, Any]) -> str | None:
    if not {"primary", "factorial", "defenses", "settings"} <= set(record):
        return "no primary family or 2 x 2 effects"
    for entry in record["defenses"].values():
        for norm in NORMS:
            worst = entry.get("worst_case", {}).get(norm, {})
            if "plugin" not in worst or "single_ci" not in worst:
                return "worst cases not cross-fitted (no `plugin` beside them)"
    return None


def _convergence_problem(record: Mapping[str, Any]) -> str | None:
    for norms in record.get("defenses", {}).values():
        for entry in norms.values():
            if not isinstance(entry, Mapping) or not {"points", "converged"} <= set(entry):
                return "no per-norm verdict against the headline"
    return None if "defenses" in record else "no defenses"


def _seeds_problem(record: Mapping[str, Any]) -> str | None:
    ok = {"settings", "arms", "contrasts"} <= set(record) and "seeds" in record["settings"]
    return None if ok else "no per-arm seeds and contrasts"


def _scaling_problem(record: Mapping[str, Any]) -> str | None:
    ok = {"settings", "arms"} <= set(record) and "budgets" in record["settings"]
    ok = ok and all({"points", "change"} <= set(a) for a in record["arms"].values())
    return None if ok else "no per-arm budgets and changes"


PROBLEMS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "robustness": _evaluation_problem,
    "comparison": _evaluation_problem,
    "convergence": _convergence_problem,
    "seeds": _seeds_problem,
    "scaling": _scaling_problem,
}


@dataclass
class Records:
    """The records of one run folder: ``main`` (name -> record, ``None`` when missing) for
    :data:`PROBLEMS`' names, ``stages`` (``<stage>_metrics`` -> record) and the folder as
    the pages name it."""

    folder: str
    main: dict[str, Mapping[str, Any] | None]
    stages: dict[str, Mapping[str, Any]] = field(default_factory=dict)

    def status(self, name: str) -> str | None:
        """``None`` when record ``name`` is usable, else why not (missing, older schema)."""
        record = self.main.get(name)
        if record is None:
            return f"not run yet ({COMMANDS[name]})"
        problem = PROBLEMS[name](record)
        if problem:
            return f"older schema: {problem} (rerun: {COMMANDS[name]})"
        return None

    def get(self, name: str) -> Mapping[str, Any] | None:
        """Record ``name`` when usable, else ``None``."""
        return None if self.status(name) else self.main[name]


def load(folder: Path, shown: str | None = None) -> Records:
    """Read ``<name>.json`` for each name of :data:`PROBLEMS` and every ``*_metrics.json``
    of ``folder`` (a missing file is ``None``)."""
    main = {}
    for name in PROBLEMS:
        path = folder / f"{name}.json"
        main[name] = json.loads(path.read_text()) if path.exists() else None
    stages = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*_metrics.json"))}
    return Records(shown or folder.as_posix(), main, stages)


# --- formatting ---------------------------------------------------------------------------


def pct(value: float | None) -> str:
    """An accuracy in % with two decimals (``—`` for ``None``)."""
    return "—" if value is None else f"{100 * value:.2f}"


def points(value: float) -> str:
    """A difference of accuracies in signed points."""
    return f"{100 * value:+.2f}"


def interval(pair: Sequence[float], signed: bool = False) -> str:
    """``[low, high]`` in % (``signed``: in signed points)."""
    show = points if signed else pct
    return f"[{show(pair[0])}, {show(pair[1])}]"


def pvalue(value: float) -> str:
    """A p-value: three decimals, two significant digits below 0.001."""
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def duration(seconds: float | None) -> str:
    """Seconds as ``42 s``, ``6.7 min`` or ``1.2 h``."""
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def eps_text(eps: float | None, norm: str) -> str:
    """``8/255`` for an ℓ∞ budget on the 1/255 grid, else ``0.5``."""
    if eps is None:
        return "∞"
    if norm == "Linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> list[str]:
    """A Markdown table; the first ``left`` columns left-aligned, the rest right-aligned."""
    align = ["---" if i < left else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def direction(test: Mapping[str, Any]) -> str:
    """``higher`` / ``lower`` when a difference's interval excludes 0, else ``no difference
    shown`` (the rule of :func:`atop.pipelines.seeds.nodes.verdict`)."""
    low, high = test["ci"]
    return "higher" if low > 0 else "lower" if high < 0 else "no difference shown"


def _delta(test: Mapping[str, Any]) -> str:
    return f"{points(test['delta'])} {interval(test['ci'], signed=True)}"


def _name(defense: str) -> str:
    return NAMES.get(defense, f"`{defense}`")


def _threats(record: Mapping[str, Any]) -> str:
    """``ℓ∞ 8/255, ℓ2 0.5``: the headline threat models' budgets of an evaluation record."""
    budgets = {}
    for spec in record["settings"]["attacks"].values():
        if spec.get("eps") is not None:
            budgets.setdefault(spec["norm"], spec["eps"])
    return ", ".join(f"{NORM_TEXT[n]} {eps_text(budgets[n], n)}" for n in NORMS if n in budgets)


# --- docs/results.md: the evaluation records ----------------------------------------------


def _headline(record: Mapping[str, Any]) -> list[str]:
    draws = record["settings"]["draws"]
    rows, marked = [], False
    for name, entry in record["defenses"].items():
        cells = [
            _name(name),
            f"{pct(entry['clean']['single'])} {interval(entry['clean']['single_ci'])}",
        ]
        for norm in NORMS:
            worst = entry["worst_case"][norm]
            mark = " †" if worst.get("with_study") else ""
            marked = marked or bool(mark)
            cells.append(f"{pct(worst['single'])} {interval(worst['single_ci'])}{mark}")
        cells += [pct(entry["clean"]["worst_of_n"])]
        cells += [pct(entry["worst_case"][n]["worst_of_n"]) for n in NORMS]
        cells += [" / ".join(pct(entry["worst_case"][n]["plugin"]) for n in NORMS)]
        rows.append(cells)
    header = [
        "defense",
        "clean",
        "**worst ℓ∞**",
        "**worst ℓ2**",
        f"clean, worst-of-{draws}",
        f"worst ℓ∞, worst-of-{draws}",
        f"worst ℓ2, worst-of-{draws}",
        "plugin ℓ∞ / ℓ2 (biased)",
    ]
    out = table(header, rows)
    if marked:
        out += [
            "† not converged by the convergence study's rule: the worst case over the "
            "evaluation's attacks and the study's settings that lower it.",
            "",
        ]
    return out


def _primary(record: Mapping[str, Any]) -> list[str]:
    primary = record["primary"]
    declared = primary["declared"]
    out = [
        f"Declared before the run (`evaluation.primary`): {declared['focus']} vs each of "
        f"{', '.join(declared['versus'])} on {', '.join(NORM_TEXT[n] for n in declared['norms'])}"
        "; the single-draw worst case per image, paired sign-flip test, Δ in points with its "
        f"paired-bootstrap 95 % interval, Holm-adjusted at level {declared['level']:g}.",
        "",
    ]
    rows = [
        [
            f"{t['focus']} vs {t['other']}",
            NORM_TEXT[t["norm"]],
            _delta(t),
            t["n_nonzero"],
            pvalue(t["p_value"]),
            pvalue(t["p_holm"]),
            "**yes**" if t["significant"] else "no",
        ]
        for t in primary["tests"].values()
    ]
    header = ["test", "threat", "Δ points [95 % CI]", "images differing", "p", "p (Holm)"]
    out += table([*header, "significant"], rows, left=2)
    if primary["missing"]:
        out += [f"Not evaluated (the family is incomplete): {', '.join(primary['missing'])}.", ""]
    return out


FACTORS = {
    "reconstruction_from_x_adv": "reconstruction from t(x′)",
    "ce_term": "CE term",
    "interaction": "interaction",
}


def _factorial(record: Mapping[str, Any]) -> list[str]:
    effects = record["factorial"]
    if not effects:
        return ["Not all four arms of the 2 × 2 were evaluated.", ""]
    outcomes = [o for o in ("clean", *NORMS) if o in effects]
    rows = [
        [
            FACTORS.get(k, k),
            *(f"{_delta(effects[o][k])}, p = {pvalue(effects[o][k]['p_value'])}" for o in outcomes),
        ]
        for k in effects[outcomes[0]]
    ]
    return [
        "Main effects (the mean over the other term's two levels of the difference a term "
        "makes) and the interaction, per image, single-draw; points with paired-bootstrap "
        "95 % intervals and sign-flip p-values (exploratory).",
        "",
        *table(["effect", *(OUTCOME_TEXT[o] for o in outcomes)], rows),
    ]


def _routes(record: Mapping[str, Any]) -> list[str]:
    routes = record.get("noise_routes") or {}
    if not routes:
        return []
    outcomes = ("clean", *NORMS)
    rows = [
        [
            f"`{name}` vs `{test['default']}`",
            *(f"{_delta(test[o])}, p = {pvalue(test[o]['p_value'])}" for o in outcomes),
        ]
        for name, test in routes.items()
    ]
    return [
        "Each noise ablation against the same defense with the default `box` route "
        "(docs/protocol.md): Δ = ablation − default per image, single-draw, points with "
        "paired-bootstrap 95 % intervals and sign-flip p-values (exploratory; one training "
        "run each).",
        "",
        *table(["ablation", *(OUTCOME_TEXT[o] for o in outcomes)], rows),
    ]


def _paired(record: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            f"{FOCUS} vs {other}",
            *(
                f"{_delta(tests[n][rule])}, p = {pvalue(tests[n][rule]['p_value'])}"
                for n in NORMS
                for rule in ("single", "worst_of_n")
            ),
        ]
        for other, tests in record["paired"].items()
    ]
    header = ["test", *(f"{NORM_TEXT[n]}, {RULE_TEXT[r]}" for n in NORMS for r in RULE_TEXT)]
    return table(header, rows) if rows else [f"No `{FOCUS}` in this record.", ""]


def _matched(record: Mapping[str, Any]) -> list[str]:
    matched = record["matched_clean"]
    if "images" not in matched:
        return ["Fewer than two purified defenses.", ""]
    rows = [
        [_name(n), *(pct(v[norm]) for norm in NORMS)] for n, v in matched.items() if n != "images"
    ]
    return [
        f"On the images every purified defense gets right clean on all draws "
        f"({matched['images']}): worst case, single-draw (%).",
        "",
        *table(["defense", "worst ℓ∞", "worst ℓ2"], rows),
    ]


def _per_attack(record: Mapping[str, Any]) -> list[str]:
    labels = list(record["settings"]["attacks"])
    out = []
    for rule, text in RULE_TEXT.items():
        rows = []
        for name, entry in record["defenses"].items():
            cells = [_name(name), pct(entry["clean"][rule])]
            for label in labels:
                attack = entry["attacks"].get(label)
                cell = "—" if attack is None else pct(attack[rule])
                if attack is not None and "attacked" in attack:
                    cell += f" ({attack['attacked']})"
                cells.append(cell)
            rows.append(cells)
        out += [f"**{text}** (%):", "", *table(["defense", "clean", *labels], rows)]
    return out + [
        "(k): a `survivors` attack ran on the k images the earlier attacks of its threat "
        "model left with a right draw. —: not applicable to that defense.",
        "",
    ]


def _attacks(record: Mapping[str, Any]) -> list[str]:
    rows = []
    for label, spec in record["settings"]["attacks"].items():
        name = spec["name"] + (f"-{spec['version']}" if "version" in spec else "")
        rows.append(
            [
                label,
                name,
                NORM_TEXT.get(spec["norm"], spec["norm"]),
                eps_text(spec.get("eps"), spec["norm"]),
                spec.get("steps", "—"),
                spec.get("eot_iter", "—"),
                "yes" if spec.get("survivors") else "no",
            ]
        )
    header = ["attack", "algorithm", "norm", "ε", "steps", "EOT", "survivors only"]
    return table(header, rows, left=3)


def _fixed(record: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            _name(n),
            NORM_TEXT[norm],
            f"`{row['label']}`",
            pct(row["clean"]),
            pct(row["attack"]),
            pct(row["fresh"]),
        ]
        for n, entry in record["defenses"].items()
        for norm, row in entry.get("fixed_randomness", {}).items()
    ]
    if not rows:
        return ["No fixed-randomness rows in this record (they run in the full comparison).", ""]
    return [
        "The same draw of the randomness for the attack and the judging: how much of the "
        "robustness is randomness. Single-draw (%).",
        "",
        *table(
            [
                "defense",
                "threat",
                "attack",
                "clean, fixed",
                "attacked, fixed",
                "attacked, fresh draws",
            ],
            rows,
            left=3,
        ),
    ]


def _check_text(key: str) -> str:
    """``eps_monotonic_linf`` -> ``eps_monotonic ℓ∞`` (the checks run per threat model)."""
    for suffix, norm in (("_linf", "Linf"), ("_l2", "L2")):
        if key.endswith(suffix):
            return f"`{key.removesuffix(suffix)}` {NORM_TEXT[norm]}"
    return f"`{key}`"


def _sanity(record: Mapping[str, Any]) -> list[str]:
    checks = list(dict.fromkeys(c for v in record["sanity"].values() for c in v))
    rows = [[_name(n), *(v.get(c, "—") for c in checks)] for n, v in record["sanity"].items()]
    bases = dict.fromkeys(_check_text(c).split("` ")[0].strip("`") for c in checks)
    legend = "; ".join(f"`{c}`: {CHECKS.get(c, c)}" for c in bases)
    header = ["defense", *(_check_text(c) for c in checks)]
    return [*table(header, rows, left=len(header)), legend + ".", ""]


def _sweep(record: Mapping[str, Any]) -> list[str]:
    out = []
    for norm, by_defense in record.get("robust_acc_vs_eps", {}).items():
        eps = list(dict.fromkeys(e for v in by_defense.values() for e in v))
        rows = [[_name(n), *(pct(v.get(e)) for e in eps)] for n, v in by_defense.items()]
        out += [f"{NORM_TEXT.get(norm, norm)}, single-draw (%):", ""]
        out += table(["defense", *(f"ε = {e}" for e in eps)], rows)
    return out or ["No ε sweep in this record.", ""]


def _times(record: Mapping[str, Any]) -> list[str]:
    rows = [
        [_name(n), duration(e["train_seconds"]), duration(e["attack_seconds"])]
        for n, e in record["defenses"].items()
    ]
    return [
        "Training: every stage the defense needs (classifier, purifier, fine-tuning); "
        "attacks: the evaluation's attack runs.",
        "",
        *table(["defense", "training", "attacks"], rows),
    ]


def evaluation_sections(record: Mapping[str, Any], level: str) -> list[str]:
    """Every table of an evaluation record (``robustness.json`` / ``comparison.json``)
    under ``level``-deep headings."""
    s = record["settings"]
    out = [
        f"{s['n_images']} test images (the first of the fixed {s['n_eval_indices']}-image "
        f"evaluation subset), N = {s['draws']} fresh draws per verdict, threat models "
        f"{_threats(record)}. Single-draw: {s['rules']['single']}; worst-of-N: "
        f"{s['rules']['worst_of_n']}. Brackets: exact 95 % intervals over the images.",
        "",
    ]
    sections = [
        ("Worst-case accuracy (%), the headline", _headline),
        ("The primary family (confirmatory)", _primary),
        ("The 2 × 2 of Eq. 9's terms", _factorial),
        ("The noise routes", _routes),
        ("Exploratory paired tests", _paired),
        ("At matched clean accuracy", _matched),
        ("Accuracy per attack", _per_attack),
        ("Attacks", _attacks),
        ("Fixed randomness", _fixed),
        ("Sanity checks", _sanity),
        ("Accuracy vs ε", _sweep),
        ("Time", _times),
    ]
    for title, section in sections:
        body = section(record)
        if body:  # a section with nothing to show (no noise ablation evaluated) is left out
            out += [f"{level} {title}", "", *body]
    if record.get("skipped"):
        skipped = "; ".join(f"`{k}`: {v}" for k, v in record["skipped"].items())
        out += [f"Not evaluated: {skipped}.", ""]
    return out


# --- docs/results.md: the studies and the stages ------------------------------------------


def convergence_sections(record: Mapping[str, Any]) -> list[str]:
    """Per defense and norm: the verdict, then every setting of the study."""
    s = record["settings"]
    attacks = s.get("attacks", {})
    out = [
        f"PGD with exact gradients and EOT ({', '.join(attacks.values())}) on {s['images']} "
        f"images, N = {s['draws']} draws. A setting lowers the headline when the mean "
        "per-image gap (headline − setting) exceeds its paired standard error (floor: one "
        "image's share); converged = no setting lowers it.",
        "",
    ]
    verdicts = {True: "converged", False: "**not converged**", None: "no headline"}
    rows = [
        [
            _name(n),
            NORM_TEXT[norm],
            verdicts[r["converged"]],
            pct(r["headline"]),
            "—" if r["max_gap"] is None else points(r["max_gap"]),
            f"{r['strongest']}: {pct(r['points'][r['strongest']]['acc'])}",
        ]
        for n, norms in record["defenses"].items()
        for norm, r in norms.items()
    ]
    header = ["defense", "threat", "verdict", "headline", "largest gap (points)"]
    out += table([*header, "lowest setting (steps x EOT)"], rows, left=3)
    for n, norms in record["defenses"].items():
        for norm, r in norms.items():
            rows = [
                [
                    key,
                    p["attacked"],
                    f"{pct(p['acc'])} ± {pct(p['se'])}",
                    pct(p["worst_of_n"]),
                    f"{points(p['gap'])} ± {pct(p['paired_se'])}" if "gap" in p else "—",
                    ("**yes**" if p["lowers"] else "no") if "lowers" in p else "—",
                ]
                for key, p in r["points"].items()
            ]
            header = ["steps x EOT", "images attacked", "single-draw ± SE", "worst-of-N"]
            out += [f"**{n}, {NORM_TEXT[norm]}** (%):", ""]
            out += table([*header, "gap ± paired SE (points)", "lowers it"], rows)
    return out


def seeds_sections(record: Mapping[str, Any]) -> list[str]:
    """Per arm and outcome: mean ± sd over seeds and the per-seed values; the contrasts
    with their hierarchical-bootstrap intervals."""
    s = record["settings"]
    outcomes = list(next(iter(record["arms"].values())))
    rows = [
        [
            _name(arm),
            *(
                f"{pct(v[o]['mean'])} ± {pct(v[o]['sd'])} ({', '.join(pct(x) for x in v[o]['per_seed'])})"
                for o in outcomes
            ),
        ]
        for arm, v in record["arms"].items()
    ]
    out = [
        f"Each arm fine-tuned with seeds {', '.join(map(str, s['seeds']))} and evaluated on "
        f"the same {s['n_images']} images (N = {s['draws']} draws; {s['rule']}). Accuracy (%): "
        "mean ± sd over seeds (per-seed values).",
        "",
        *table(["arm", *(OUTCOME_TEXT[o] for o in outcomes)], rows),
        f"Differences in points, [{100 * s['level']:.0f} % interval]: {s['interval']}, "
        f"{s['resamples']} resamples; a difference is read as shown when the interval "
        "excludes 0.",
        "",
    ]
    rows = [
        [name, *(f"{_delta(t[o])} ({direction(t[o])})" for o in outcomes)]
        for name, t in record["contrasts"].items()
    ]
    return out + table(["contrast", *(OUTCOME_TEXT[o] for o in outcomes)], rows)


def scaling_sections(record: Mapping[str, Any]) -> list[str]:
    """Per arm: accuracy with its interval at every budget, and the change from the
    smallest to the largest budget."""
    s = record["settings"]
    budgets = ", ".join(
        f"{b['steps']} steps ({b['epochs']} × {b['train_images']} images)"
        for b in s["budgets"].values()
    )
    out = [
        f"Each arm fine-tuned for {s['base_steps']} steps (the main job) and for {budgets}, "
        f"batches of {s['batch_size']}; evaluated on the same {s['n_images']} images "
        f"({s['rule']}). Accuracy (%) with exact 95 % intervals; the change is paired over "
        "images (one training run per budget).",
        "",
    ]
    for arm, entry in record["arms"].items():
        outcomes = list(next(iter(entry["points"].values())))
        rows = [
            [steps, *(f"{pct(p[o]['acc'])} {interval(p[o]['ci'])}" for o in outcomes)]
            for steps, p in entry["points"].items()
        ]
        change = entry["change"]
        first = change[outcomes[0]]
        rows.append(
            [
                f"change {first['from']} → {first['to']}",
                *(f"{_delta(change[o])}, p = {pvalue(change[o]['p_value'])}" for o in outcomes),
            ]
        )
        out += [
            f"**{_name(arm).replace('**', '')}**",
            "",
            *table(["steps", *(OUTCOME_TEXT[o] for o in outcomes)], rows),
        ]
    contrasts = record.get("at_largest", {})
    if contrasts:
        outcomes = list(next(iter(contrasts.values())))
        rows = [
            [name, *(f"{_delta(t[o])}, p = {pvalue(t[o]['p_value'])}" for o in outcomes)]
            for name, t in contrasts.items()
        ]
        out += [
            "At the largest budget (exploratory; paired over images, one training run each):",
            "",
            *table(["contrast", *(OUTCOME_TEXT[o] for o in outcomes)], rows),
        ]
    return out


def _value(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        if key.endswith("_acc"):
            return f"{pct(value)} %"
        if "seconds" in key:
            return duration(value)
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k} {_value(k, v)}" for k, v in value.items() if v is not None)
        return f"({inner})"
    return str(value)


VARIANT_SUFFIXES = ("_seed", "_steps")


def _is_variant(name: str) -> bool:
    """``finetuning_atop_seed3_metrics``: an arm retrained by the seeds or scaling study."""
    stem = name.removesuffix("_metrics")
    return any(s in stem and stem.rsplit(s, 1)[1].isdigit() for s in VARIANT_SUFFIXES)


def stage_sections(stages: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One row per ``<stage>_metrics.json``: its accuracies, training time and the rest
    (the studies' retrained arms in a table of their own, without the settings)."""
    if not stages:
        return ["No stage metrics yet (`make run`).", ""]
    rows, variants = [], []
    for name, record in stages.items():
        fields = {k: v for k, v in record.items() if k not in ("provenance", "classifier_hash")}
        accs = "; ".join(f"{k} {_value(k, v)}" for k, v in fields.items() if k.endswith("_acc"))
        time = duration(fields.get("train_seconds"))
        if _is_variant(name):
            size = f"{fields.get('epochs', '—')} × {fields.get('n_train', '—')}"
            variants.append([f"`{name}`", accs or "—", time, size, fields.get("seed", "—")])
            continue
        other = "; ".join(
            f"{k} {_value(k, v)}"
            for k, v in fields.items()
            if not k.endswith("_acc") and k != "train_seconds"
        )
        rows.append([f"`{name}`", accs or "—", other or "—", time])
    out = table(["record", "accuracies", "settings and other numbers", "training"], rows, left=3)
    if variants:
        header = ["record", "accuracies", "training", "epochs × images", "seed"]
        out += ["The arms retrained by the studies:", "", *table(header, variants, left=2)]
    return out


def provenance_sections(records: Records) -> list[str]:
    """Which run each record comes from (profile, code, machine), or why it is not used."""
    rows = []
    for name in PROBLEMS:
        record = records.main.get(name)
        prov = (record or {}).get("provenance") or {}
        machine = prov.get("machine") or {}
        rows.append(
            [
                f"`{name}.json`",
                records.status(name) or "used",
                prov.get("profile", "—"),
                prov.get("commit", "—"),
                machine.get("cpu", "not recorded") if record else "—",
            ]
        )
    header = ["record", "status", "profile", "code (commit)", "machine (CPU)"]
    return table(header, rows, left=len(header))


def results_markdown(records: Records) -> str:
    """The whole of ``docs/results.md``."""
    out = [
        "# Results",
        "",
        "<!-- Generated by `make results` (python -m atop.results) from the JSON records; "
        "do not edit: rerun it. -->",
        "",
        f"Every number below is read from the JSON records in `{records.folder}/` by "
        "`make results`, which also writes the README's results "
        "block; `tests/test_results.py` fails when a page disagrees with the committed "
        "records. Accuracies in %, differences in points. How the numbers are made: "
        "[README](../README.md), [reliability.md](reliability.md).",
        "",
        "## The records",
        "",
        *provenance_sections(records),
    ]
    parts: list[tuple[str, str, Callable[[Mapping[str, Any]], list[str]]]] = [
        ("robustness", "The main job (`robustness.json`)", lambda r: evaluation_sections(r, "###")),
        (
            "comparison",
            "The full comparison (`comparison.json`)",
            lambda r: evaluation_sections(r, "###"),
        ),
        ("convergence", "Is the attack converged? (`convergence.json`)", convergence_sections),
        ("seeds", "Training seeds (`seeds.json`)", seeds_sections),
        ("scaling", "Fine-tuning budget (`scaling.json`)", scaling_sections),
    ]
    for name, title, render in parts:
        out += [f"## {title}", ""]
        record = records.get(name)
        out += render(record) if record else [f"`{name}.json`: {records.status(name)}.", ""]
        if name == "scaling" and record:
            out += [f"![fine-tuning budget](figures/{FIGURE.name})", ""]
    out += ["## Training stages (`*_metrics.json`)", "", *stage_sections(records.stages)]
    return "\n".join(out).rstrip() + "\n"


# --- the README's block -------------------------------------------------------------------


def headline_rows(records: Records) -> list[list[str]]:
    """The README's table: the 2 x 2 (seed means where the seeds study ran), AP, standard
    and the full comparison's AToP-with-PGD and robust-training baselines; a row whose
    record is missing or unusable says why instead."""
    seeds = records.get("seeds")
    rows = []

    def single(name: str, source: str, text: str) -> list[str]:
        record = records.get(source)
        entry = None if record is None else record["defenses"].get(name)
        if entry is None:
            why = records.status(source) or f"not in `{source}.json`"
            return [_name(name), "—", "—", "—", why.split(" (")[0].split(":")[0]]
        summaries = [entry["clean"], *(entry["worst_case"][n] for n in NORMS)]
        return [
            _name(name),
            *(f"{pct(v['single'])} {interval(v['single_ci'])}" for v in summaries),
            text,
        ]

    for arm in reversed(ARMS):
        if seeds and arm in seeds["arms"]:
            v = seeds["arms"][arm]
            n = len(seeds["settings"]["seeds"])
            cells = [f"{pct(v[o]['mean'])} ± {pct(v[o]['sd'])}" for o in ("clean", *NORMS)]
            rows.append([_name(arm), *cells, f"{n} training seeds, mean ± sd"])
        else:
            rows.append(single(arm, "robustness", "main job, 1 run"))
    rows += [single(n, "robustness", "main job, 1 run") for n in ("ap", "standard")]
    rows += [
        single(n, "comparison", "full comparison, 1 run") for n in ("atop_pgd", "pgd_at", "rvs")
    ]
    return rows


def _listing(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def seeds_sentences(seeds: Mapping[str, Any] | None, status: str | None) -> list[str]:
    """Per threat model: which arms AToP's worst case is higher / lower than over training
    seeds (interval excludes 0), then the main effects of Eq. 9's terms."""
    if seeds is None:
        return [f"**Training seeds:** {status}."]
    n = len(seeds["settings"]["seeds"])
    level = f"{100 * seeds['settings']['level']:.0f} %"
    versus = {k: t for k, t in seeds["contrasts"].items() if k.startswith(f"{FOCUS} - ")}
    out = []
    if n < STUDY_SEEDS:
        out.append(
            f"**Training seeds (interim):** {n} of the study's {STUDY_SEEDS} seeds have run "
            f"(seeds {', '.join(map(str, seeds['settings']['seeds']))}); `make seeds` runs the "
            "rest and regenerates these sentences."
        )
    for norm in NORMS:
        groups: dict[str, list[str]] = {}
        for key, tests in versus.items():
            other = key.removeprefix(f"{FOCUS} - ")
            t = tests[norm]
            groups.setdefault(direction(t), []).append(f"`{other}` ({_delta(t)})")
        said = []
        if "higher" in groups:
            said.append(f"higher than {_listing(groups['higher'])}")
        if "lower" in groups:
            said.append(f"lower than {_listing(groups['lower'])}")
        if "no difference shown" in groups:
            said.append(f"not shown different from {_listing(groups['no difference shown'])}")
        out.append(
            f"**Worst case {NORM_TEXT[norm]}, over {n} training seeds** (hierarchical "
            f"bootstrap over seeds and images, {level} intervals, points): AToP is "
            f"{'; '.join(said)}."
        )
    effects = {k: t for k, t in seeds["contrasts"].items() if "main effect" in k}
    if effects:
        parts = [
            f"{k.replace(' (main effect)', '')} {' / '.join(f'{_delta(t[norm])} ({direction(t[norm])})' for norm in NORMS)}"
            for k, t in effects.items()
        ]
        out.append(
            f"**Eq. 9's two terms** (main effects over the seeds, worst ℓ∞ / ℓ2): {'; '.join(parts)}."
        )
    return out


def primary_sentence(main: Mapping[str, Any] | None, status: str | None) -> str:
    """How many tests of the declared primary family are significant after Holm, and
    which way."""
    if main is None:
        return f"**Primary family (main job):** {status}."
    primary = main["primary"]
    tests = list(primary["tests"].values())
    if not tests:
        return "**Primary family (main job):** no test could run (the arms were not evaluated)."
    level = primary["declared"]["level"]
    head = (
        f"**Primary family** (main job, one training run per arm; {len(tests)} paired tests "
        f"declared before the run, Holm-adjusted at {level:g})"
    )
    significant = [t for t in tests if t["significant"]]
    if not significant:
        best = min(tests, key=lambda t: t["p_holm"])
        return (
            f"{head}: no test is significant (the smallest adjusted p is {pvalue(best['p_holm'])}"
            f", AToP vs `{best['other']}` on {NORM_TEXT[best['norm']]}, Δ {_delta(best)})."
        )
    said = [
        f"{'higher' if t['delta'] > 0 else 'lower'} than `{t['other']}` on "
        f"{NORM_TEXT[t['norm']]} (Δ {_delta(t)}, p = {pvalue(t['p_holm'])})"
        for t in significant
    ]
    rest = len(tests) - len(significant)
    return f"{head}: AToP is {_listing(said)}; the other {rest} test(s) are not significant."


def baseline_sentence(comparison: Mapping[str, Any] | None, status: str | None) -> str:
    """AToP's worst ℓ∞ against the robust-training baselines' (full comparison, exploratory
    paired tests)."""
    if comparison is None:
        return f"**Baselines (full comparison):** {status}."
    defenses, paired = comparison["defenses"], comparison["paired"]
    if FOCUS not in defenses:
        return "**Baselines (full comparison):** AToP was not evaluated."
    parts = []
    for other in ("pgd_at", "rvs"):
        if other in defenses and other in paired:
            t = paired[other]["Linf"]["single"]
            worst = defenses[other]["worst_case"]["Linf"]["single"]
            short = SHORT[other]
            parts.append(f"{short} {pct(worst)} % (AToP − {short} {_delta(t)}: {direction(t)})")
    if not parts:
        return "**Baselines (full comparison):** PGD-AT and RvS were not evaluated."
    atop = defenses[FOCUS]["worst_case"]["Linf"]["single"]
    return (
        f"**Against the baselines** (full comparison, one run each, exploratory paired "
        f"tests): worst ℓ∞ of AToP {pct(atop)} %, {'; '.join(parts)}."
    )


def route_sentence(comparison: Mapping[str, Any] | None, status: str | None) -> str:
    """Each noise ablation against its default-route defense (full comparison,
    ``noise_routes``): clean and both worst cases, paired."""
    if comparison is None:
        return f"**Noise route (full comparison):** {status}."
    if "noise_routes" not in comparison:
        return (
            "**Noise route (full comparison):** not in this record (written before the route "
            "table: rerun the comparison's report nodes)."
        )
    routes = comparison["noise_routes"]
    if not routes:
        return "**Noise route (full comparison):** no noise ablation was evaluated."
    parts = [
        f"`{name}` − `{t['default']}` "
        + ", ".join(f"{OUTCOME_TEXT[o]} {_delta(t[o])}" for o in ("clean", *NORMS))
        for name, t in routes.items()
    ]
    return (
        "**Noise route** (full comparison, one run each, exploratory paired tests, points; the "
        "ablations are outside the convergence study and the sanity checks): "
        f"{'; '.join(parts)}."
    )


def budget_sentence(
    scaling: Mapping[str, Any] | None,
    status: str | None,
    seeds: Mapping[str, Any] | None = None,
) -> str:
    """How each arm's worst cases change from the smallest to the largest budget, beside
    the arm's sd over training seeds at the main job's budget (the seeds study), when it ran:
    a one-run change is only worth reading against that spread."""
    if scaling is None:
        return f"**Fine-tuning budget:** {status}."
    spread = (seeds or {}).get("arms", {})
    parts = []
    for arm, entry in scaling["arms"].items():
        change = entry["change"]
        moves = []
        for n in (n for n in NORMS if n in change):
            sd = spread.get(arm, {}).get(n, {}).get("sd")
            seed = f"; seed sd {pct(sd)}" if sd is not None else ""
            moves.append(f"{NORM_TEXT[n]} {_delta(change[n])} ({direction(change[n])}{seed})")
        parts.append(f"`{arm}` {', '.join(moves)}")
    first = next(iter(scaling["arms"].values()))["change"]["clean"]
    against = (
        f"; seed sd: the arm's sd over the seeds study's training runs at {first['from']} steps"
        if spread
        else ""
    )
    return (
        f"**Fine-tuning budget** (one training run per budget; paired over images, points, "
        f"95 % intervals{against}): from {first['from']} to {first['to']} steps, the worst "
        f"cases change by {'; '.join(parts)}."
    )


def convergence_sentence(convergence: Mapping[str, Any] | None, status: str | None) -> str:
    """Which headlines the convergence study finds converged."""
    if convergence is None:
        return f"**Convergence:** {status}."
    verdicts = [
        (f"{n} {NORM_TEXT[norm]}", r["converged"])
        for n, norms in convergence["defenses"].items()
        for norm, r in norms.items()
    ]
    not_converged = [k for k, v in verdicts if v is False]
    head = (
        f"**Convergence** (the study's rule): {sum(v is True for _, v in verdicts)} of "
        f"{len(verdicts)} headlines (defense × threat model) converged"
    )
    if not_converged:
        return f"{head}; not converged (their headline adds the study's settings that lower it): {_listing(not_converged)}."
    return head + "."


def readme_block(records: Records) -> str:
    """The README's results block (without the markers)."""
    main = records.get("robustness")
    if main:
        s, prov = main["settings"], main.get("provenance", {})
        intro = (
            f"Profile `{prov.get('profile', '?')}`, dataset `{prov.get('dataset', '?')}`: "
            f"single-draw accuracy (%) on the same {s['n_images']} test images, every verdict "
            f"judged with N = {s['draws']} fresh draws; worst case = per image over clean and "
            f"every attack of one threat model ({_threats(main)}), cross-fitted over the "
            "draws; brackets: exact 95 % intervals over the images."
        )
    else:
        intro = f"The main job's record: {records.status('robustness')}."
    intro += (
        " Generated by `make results` from the records (do not edit by hand); every table, "
        "interval and test: [docs/results.md](docs/results.md)."
    )
    header = ["defense", "from", "clean", "worst ℓ∞", "worst ℓ2"]
    rows = [[r[0], r[4], *r[1:4]] for r in headline_rows(records)]
    out = [intro, "", *table(header, rows, left=2)]
    sentences = [
        *seeds_sentences(records.get("seeds"), records.status("seeds")),
        primary_sentence(records.get("robustness"), records.status("robustness")),
        baseline_sentence(records.get("comparison"), records.status("comparison")),
        route_sentence(records.get("comparison"), records.status("comparison")),
        convergence_sentence(records.get("convergence"), records.status("convergence")),
        budget_sentence(records.get("scaling"), records.status("scaling"), records.get("seeds")),
    ]
    out += [f"- {s}" for s in sentences]
    if records.get("scaling"):
        out += ["", f"![worst-case accuracy vs fine-tuning steps]({FIGURE.as_posix()})"]
    return "\n".join(out)


def with_block(readme: str, block: str) -> str:
    """``readme`` with the text between :data:`START` and :data:`END` replaced by ``block``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the lines {START} and {END}, in that order.")
    return readme[: start + len(START)] + "\n" + block + "\n" + readme[end:]


def render(root: Path) -> dict[Path, str]:
    """The generated pages of the project at ``root``: ``{path: text}``."""
    records = load(root / RECORDS, RECORDS.as_posix())
    readme = (root / README).read_text()
    return {
        RESULTS_MD: results_markdown(records),
        README: with_block(readme, readme_block(records)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m atop.results [--root DIR] [--check]``: write (or check) the pages."""
    parser = argparse.ArgumentParser(
        prog="python -m atop.results", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="the project root")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args(argv)
    try:
        pages = render(args.root)
    except (ValueError, OSError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stale = [
        p
        for p, text in pages.items()
        if not (args.root / p).exists() or (args.root / p).read_text() != text
    ]
    if args.check:
        for path in stale:
            print(f"stale: {path} (run `make results`)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in pages.items():
        (args.root / path).parent.mkdir(parents=True, exist_ok=True)
        (args.root / path).write_text(text)
        print(f"{'wrote' if path in stale else 'unchanged'}: {path}")
    figure = args.root / RECORDS / FIGURE.name
    if figure.exists():
        (args.root / FIGURE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, args.root / FIGURE)
        print(f"copied: {FIGURE}")
    elif load(args.root / RECORDS).get("scaling"):
        print(
            f"warning: {RECORDS / FIGURE.name} is missing: {FIGURE} not refreshed", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

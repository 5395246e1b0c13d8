"""``atop compare RUN_A RUN_B``: do two runs of the same profile differ beyond numerics?

Two runs of the same code and profile give bitwise-equal records only on machines that
compute alike (:mod:`atop.machine`). On other hardware the training takes other rounding,
reaches other weights, and every number moves a little. This command tells "different
numerics" from "different results": per defense, and per measure (clean, each attack, the
worst case of each threat model), it pairs the two runs' verdicts image by image
(single-draw scores: each image's fraction of right draws; the worst cases by the
evaluation's own rule, :func:`atop.evaluation.protocol.worst_case`) and tests the
difference with :func:`atop.evaluation.stats.paired_test` (paired bootstrap interval,
sign-flip test). A
defense's family of tests is its headline: clean accuracy and the worst case of each threat
model, Holm-adjusted (the single attacks are listed with their own p-values). A defense whose
adjusted p-values all stay at or above ``alpha`` is *consistent*: its two runs differ by no
more than these images can tell apart; one below is *different*.

A RUN is a folder holding a run's records: ``data/08_reporting/<dataset>/<profile>`` (the
per-image verdicts are read from ``robustness_verdicts.csv`` beside the JSON record, or from
``data/07_model_output/<dataset>/<profile>/``), or a copy of it holding both files.

Exit code: 0 when every defense is consistent (or identical), 1 when one differs, 2 for a
user error (a folder without records, two different protocols).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from atop.errors import MissingOutputs, UserError

#: The records a run can hold: the main job's and the full comparison's.
RECORDS = ("robustness", "comparison")
#: The measures of a defense's test family besides the worst case of each threat model
#: (the report's headline numbers); the single attacks are shown with their own p-value.
HEADLINE = ("clean",)
#: Verdict columns this module relies on (the table may gain others).
COLUMNS = ("defense", "attack", "image", "draws", "correct")


class CompareError(UserError):
    """Two runs cannot be compared (another dataset, profile or protocol)."""


@dataclasses.dataclass
class Run:
    """A run's records.

    Attributes:
        folder: the folder given.
        record: the JSON record (``robustness.json``).
        verdicts: the per-image verdicts table (pandas DataFrame).
        verdicts_path: where they were read.
    """

    folder: Path
    record: dict[str, Any]
    verdicts: Any
    verdicts_path: Path

    @property
    def provenance(self) -> dict[str, Any]:
        """The record's provenance (``{}`` when absent)."""
        return dict(self.record.get("provenance") or {})


def _verdict_candidates(folder: Path, name: str) -> list[Path]:
    out = [folder / f"{name}_verdicts.csv"]
    parts = folder.resolve().parts
    if "08_reporting" in parts:
        i = parts.index("08_reporting")
        out.append(Path(*parts[:i], "07_model_output", *parts[i + 1 :]) / f"{name}_verdicts.csv")
    return out


def load_run(folder: str | Path, name: str = "robustness") -> Run:
    """Read a run's record and per-image verdicts (module doc: where they are looked for).

    Raises:
        atop.errors.MissingOutputs: no ``<name>.json`` or no verdicts CSV, naming the files
            looked for and the command that makes them.
        CompareError: the CSV lacks the columns :data:`COLUMNS` and ``draw_<d>``.
    """
    import pandas as pd

    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    record_path = folder / f"{name}.json"
    if not record_path.is_file():
        raise MissingOutputs(
            f"{folder} holds no {name}.json: give the folder of a run's records, e.g. "
            "data/08_reporting/cifar10/base (or a copy of it); `kedro run --pipelines atop` "
            "writes robustness.json, `kedro run` comparison.json."
        )
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as exc:
        raise CompareError(f"{record_path} is not a JSON record ({exc}).") from None
    candidates = _verdict_candidates(folder, name)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        shown = " or ".join(str(p) for p in candidates)
        raise MissingOutputs(
            f"{folder}: no per-image verdicts ({shown}); the paired tests need them. Restore "
            "them (`dvc pull`) or rerun the evaluation (`kedro run --pipelines evaluation`)."
        )
    table = pd.read_csv(path)
    draws = [c for c in table.columns if c.startswith("draw_")]
    missing = [c for c in COLUMNS if c not in table.columns] + ([] if draws else ["draw_<d>"])
    if missing:
        raise CompareError(f"{path} lacks the verdict columns {missing}: not a verdicts table.")
    return Run(folder, record, table, path)


def _threat_models(record: Mapping[str, Any]) -> dict[str, list[str]]:
    """Norm -> the attack labels of the record's settings that bound it (ε given)."""
    out: dict[str, list[str]] = {}
    attacks = (record.get("settings") or {}).get("attacks") or {}
    if isinstance(attacks, Mapping):
        for label, spec in attacks.items():
            if isinstance(spec, Mapping) and spec.get("norm") and spec.get("eps") is not None:
                out.setdefault(str(spec["norm"]), []).append(str(label))
    return out


def _verdicts(table, defense: str) -> dict[str, Any]:
    """Attack (or ``clean``) -> the defense's per-draw verdicts: a DataFrame indexed by image
    (sorted), one 0/1 column per draw it was judged with."""
    rows = table[table["defense"] == defense]
    out = {}
    for attack, part in rows.groupby("attack", sort=False):
        part = part.drop_duplicates("image").set_index("image").sort_index()
        draws = int(part["draws"].max())
        out[str(attack)] = part[[f"draw_{d}" for d in range(draws)]]
    return out


def _worst(frames: Sequence[Any]):
    """Per-image single-draw worst case over verdict frames of the same images, by the
    evaluation's own rule (:func:`atop.evaluation.protocol.worst_case`), as a Series."""
    import pandas as pd
    import torch

    from atop.evaluation.protocol import worst_case

    images = frames[0].index
    for frame in frames[1:]:
        images = images.intersection(frame.index)
    sets = [torch.tensor(f.loc[images].to_numpy() == 1) for f in frames]
    if len({tuple(t.shape) for t in sets}) != 1:  # draws differ: the plain minimum
        return pd.concat([f.loc[images].mean(axis=1) for f in frames], axis=1).min(axis=1)
    return pd.Series(worst_case(sets, "single").double().numpy(), index=images)


def _check_same_protocol(a: Run, b: Run) -> None:
    pa, pb = a.provenance, b.provenance
    for key in ("dataset", "profile"):
        if pa.get(key) and pb.get(key) and pa[key] != pb[key]:
            raise CompareError(
                f"The runs are of different {key}s ({pa[key]!r} in {a.folder}, {pb[key]!r} in "
                f"{b.folder}): compare two runs of the same profile."
            )
    sa, sb = a.record.get("settings") or {}, b.record.get("settings") or {}
    for key in ("n_images", "draws", "seed"):
        if key in sa and key in sb and sa[key] != sb[key]:
            raise CompareError(
                f"The runs used different protocols (settings.{key}: {sa[key]} vs {sb[key]}): "
                "their verdicts are not paired. Compare two runs of the same profile."
            )
    images_a, images_b = set(a.verdicts["image"]), set(b.verdicts["image"])
    if images_a != images_b:
        raise CompareError(
            f"The runs judged different images ({len(images_a)} vs {len(images_b)}, "
            f"{len(images_a & images_b)} shared): their verdicts are not paired."
        )


@dataclasses.dataclass(frozen=True)
class Row:
    """One paired comparison: ``defense``, ``measure`` (``clean``, an attack label or
    ``worst <norm>``), accuracies ``a``/``b`` (fractions), the :func:`paired_test` fields and
    the Holm-adjusted p-value (NaN outside the defense's headline family)."""

    defense: str
    measure: str
    a: float
    b: float
    delta: float
    ci: tuple[float, float]
    p_value: float
    n_nonzero: int
    n: int
    p_holm: float = 1.0


def compare_runs(
    a: Run, b: Run, *, level: float = 0.95, alpha: float = 0.05, seed: int = 0
) -> dict[str, Any]:
    """Paired per-image tests of every defense and measure the two runs share.

    Args:
        a, b: two runs of the same profile (:func:`load_run`).
        level: the bootstrap interval's level.
        alpha: the family-wise level of a defense's Holm-adjusted tests.
        seed: the bootstrap's seed.

    Returns:
        ``{"rows": [Row], "defenses": {name: "identical" | "consistent" | "different"},
        "identical": bool, "numerics": [differences of the machines], "machines": (A, B)}``.

    Raises:
        CompareError: another dataset, profile, protocol or image set.
    """
    import torch

    from atop.evaluation.stats import holm, paired_test
    from atop.machine import numerics_differences

    _check_same_protocol(a, b)
    norms = _threat_models(a.record)
    defenses = [d for d in dict.fromkeys(a.verdicts["defense"]) if d in set(b.verdicts["defense"])]
    rows: list[Row] = []
    verdict: dict[str, str] = {}
    for defense in defenses:
        va, vb = _verdicts(a.verdicts, defense), _verdicts(b.verdicts, defense)
        shared = [m for m in va if m in vb]
        measures = {m: (va[m].mean(axis=1), vb[m].mean(axis=1)) for m in shared}
        for norm, labels in norms.items():
            names = [m for m in ["clean", *labels] if m in measures]
            if len(names) > 1:
                worst_a = _worst([va[m] for m in names])
                worst_b = _worst([vb[m] for m in names])
                measures[f"worst {norm}"] = (worst_a, worst_b)
        found = []
        for measure, (x, y) in measures.items():
            x, y = x.align(y, join="inner")
            test = paired_test(
                torch.tensor(x.to_numpy(), dtype=torch.float64),
                torch.tensor(y.to_numpy(), dtype=torch.float64),
                level=level,
                seed=seed,
            )
            found.append(
                Row(
                    defense,
                    measure,
                    float(x.mean()),
                    float(y.mean()),
                    test.delta,
                    tuple(test.ci),
                    test.p_value,
                    test.n_nonzero,
                    len(x),
                )
            )
        family = [r for r in found if r.measure in HEADLINE or r.measure.startswith("worst ")]
        family = family or found
        adjusted = holm({r.measure: r.p_value for r in family}) if family else {}
        found = [dataclasses.replace(r, p_holm=adjusted.get(r.measure, math.nan)) for r in found]
        rows += found
        same = _same_draws(a.verdicts, b.verdicts, defense)
        if same:
            verdict[defense] = "identical"
        elif any(r.p_holm < alpha for r in found):
            verdict[defense] = "different"
        else:
            verdict[defense] = "consistent"
    ma = a.provenance.get("machine") or {}
    mb = b.provenance.get("machine") or {}
    return {
        "rows": rows,
        "defenses": verdict,
        "identical": bool(verdict) and all(v == "identical" for v in verdict.values()),
        "numerics": numerics_differences(ma, mb) if ma and mb else None,
        "machines": (ma, mb),
        "alpha": alpha,
        "level": level,
    }


def _same_draws(ta, tb, defense: str) -> bool:
    draws = sorted(c for c in ta.columns if c.startswith("draw_"))
    if draws != sorted(c for c in tb.columns if c.startswith("draw_")):
        return False
    keys = ["attack", "image"]
    xa = ta[ta["defense"] == defense].sort_values(keys)[keys + draws].reset_index(drop=True)
    xb = tb[tb["defense"] == defense].sort_values(keys)[keys + draws].reset_index(drop=True)
    return xa.shape == xb.shape and bool(xa.fillna(-1).eq(xb.fillna(-1)).all().all())


def _pct(x: float) -> str:
    return f"{100 * x:6.2f}"


def format_report(a: Run, b: Run, result: Mapping[str, Any]) -> str:
    """The comparison as text: the two runs, their machines, one line per defense and
    measure, and the verdict per defense."""
    from atop.machine import describe

    pa, pb = a.provenance, b.provenance
    ma, mb = result["machines"]
    settings = a.record.get("settings") or {}
    lines = [
        f"A: {a.folder} (commit {str(pa.get('commit', '?'))[:12]}; {describe(ma)})",
        f"B: {b.folder} (commit {str(pb.get('commit', '?'))[:12]}; {describe(mb)})",
        f"{pa.get('dataset', '?')} / {pa.get('profile', '?')}: {settings.get('n_images', '?')} "
        f"images, {settings.get('draws', '?')} fresh draws per verdict; single-draw accuracy (%)",
    ]
    numerics = result["numerics"]
    if numerics is None:
        lines.append("machines: not recorded in both records (records before provenance.machine)")
    elif numerics:
        lines.append("machines: different numerics (" + "; ".join(numerics) + ")")
    else:
        lines.append("machines: the same numerics (bitwise-equal results expected)")
    lines += [
        "",
        f"{'defense':22s} {'measure':22s} {'A':>6s} {'B':>6s}  {'delta points [95% CI]':>26s} "
        f"{'p':>8s} {'p Holm':>8s} {'differ':>6s}",
    ]
    level = int(round(100 * result["level"]))
    lines[-1] = lines[-1].replace("95%", f"{level}%")
    for r in result["rows"]:
        ci = f"{100 * r.delta:+6.2f} [{100 * r.ci[0]:+6.2f}, {100 * r.ci[1]:+6.2f}]"
        lines.append(
            f"{r.defense:22s} {r.measure:22s} {_pct(r.a)} {_pct(r.b)}  {ci:>26s} "
            f"{_p(r.p_value):>8s} {_p(r.p_holm):>8s} {r.n_nonzero:>3d}/{r.n}"
        )
    alpha = result["alpha"]
    lines += [
        "",
        "p: two-sided paired sign-flip test; p Holm: over a defense's headline (clean and the "
        "worst case of each threat model); differ: images whose scores differ.",
    ]
    for defense, verdict in result["defenses"].items():
        if verdict == "identical":
            text = "identical verdicts (every draw of every image)"
        elif verdict == "consistent":
            text = f"consistent: no measure differs (Holm-adjusted p >= {alpha:g})"
        else:
            hits = [
                f"{r.measure} {100 * r.delta:+.2f} points, p = {_p(r.p_holm).strip()}"
                for r in result["rows"]
                if r.defense == defense and r.p_holm < alpha
            ]
            text = "DIFFERENT beyond numerics: " + "; ".join(hits)
        lines.append(f"{defense}: {text}")
    return "\n".join(lines)


def _p(p: float) -> str:
    if math.isnan(p):
        return "-"
    if p >= 0.001 or p == 0:
        return f"{p:.3f}"
    return f"{p:.1e}" if math.isfinite(p) else str(p)


def main(
    run_a: str | Path,
    run_b: str | Path,
    *,
    record: str = "robustness",
    level: float = 0.95,
    alpha: float = 0.05,
    out: str | Path | None = None,
) -> int:
    """``atop compare``: print the comparison (and write it as JSON to ``out``).

    Returns:
        0 when every defense is identical or consistent, 1 when one differs.

    Raises:
        atop.errors.UserError: a folder without records, runs of different protocols, a
            level outside (0, 1).
    """
    for name, value in (("--level", level), ("--alpha", alpha)):
        if not 0 < value < 1:
            raise CompareError(f"{name} must lie strictly between 0 and 1, got {value}.")
    a, b = load_run(run_a, record), load_run(run_b, record)
    result = compare_runs(a, b, level=level, alpha=alpha)
    print(format_report(a, b, result))
    if out:
        payload = {
            "a": str(a.folder),
            "b": str(b.folder),
            "numerics": result["numerics"],
            "defenses": result["defenses"],
            "rows": [dataclasses.asdict(r) for r in result["rows"]],
            "alpha": alpha,
            "level": level,
        }
        Path(out).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if "different" in result["defenses"].values() else 0

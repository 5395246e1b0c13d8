"""Checks before any work: the parameters of the chosen pipelines and every checkpoint an
evaluation will use are refused within seconds, naming the key, the value, the rule and
the file to fix.

* :func:`check_parameters` walks the resolved parameters and finds every attack spec
  wherever it lives (``evaluation.attacks[i]``, ``convergence.attack``,
  ``atop_finetuning.arms.<arm>.attack``, ``atop_finetuning.val_attack``, the PGD blocks of
  the robust-training stages, ``evaluation.sanity.stronger``, any mapping whose ``name`` is
  an attack of :data:`atop.attacks.ATTACK_KEYS`): budgets and counts against ranges with
  their unit, then :func:`atop.attacks.check_spec`. Counts are checked against what they
  slice (``evaluation.sanity.images`` <= ``evaluation.images`` <= the evaluation subset,
  ``val_images`` <= the monitor subset, ``train_images`` <= the training split): a count
  above its limit is refused, never lowered.
* :class:`ConfSources` names the file that defines a dotted key: the ``--params``
  override, ``params/overrides.yaml``, ``conf/<env>/parameters*.yml`` (with the line) or
  ``conf/base/parameters*.yml``.
* :func:`check_transform` and :func:`check_defense` load-check checkpoints: the random
  transform of a purifier (``meta.transform``, key and file named), the defense rebuilt with
  the project's own loader (:func:`atop.evaluation.defenses.build_defense`) and one forward
  pass on one image.
* :func:`require_outputs` refuses to read run outputs that do not exist (the notebook, the
  ``atop`` command), naming them and the command that makes them.

The Kedro side (when these run) is :class:`atop.hooks.RunGuardHooks`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from atop.checkpoint import CheckpointError
from atop.errors import MissingOutputs
from atop.params import ParameterError, fraction

#: Upper limits of an attack's counts (far above any sensible protocol: the paper's
#: PGD-200, EOT-20, AutoAttack's 5000 queries): a larger value is a typo that would run for
#: days, refused.
MAX_STEPS = 10_000
MAX_EOT = 1_000
MAX_QUERIES = 1_000_000
MAX_DRAWS = 10_000
LINF_UNIT = (
    "on the [0, 1] pixel scale (8/255 = 0.0314; a value on the 0-255 scale is written "
    "${frac:8/255})"
)
#: Keys of an evaluation entry that are not part of the attack spec (fallback when
#: :mod:`atop.evaluation.protocol` does not say).
ENTRY_KEYS = ("label", "applies_to", "defenses", "survivors")
#: Spec keys the evaluation fills in itself (AutoAttack's seed and success-judge draws).
INJECTED_KEYS = ("seed", "draws")
#: Spec keys a template spec (one without an entry's ``label``) may leave out: its stage
#: sweeps or sets them (the convergence study's steps and EOT samples).
SWEPT_KEYS = ("steps", "eot_iter")
#: Placeholder values for the keys above, for :func:`atop.attacks.check_spec`.
PLACEHOLDERS = {"seed": 0, "draws": 1, "steps": 1, "eot_iter": 1}


# ----------------------------------------------------------------------------- dotted keys


def split_key(dotted: str) -> list[str | int]:
    """``"evaluation.attacks[2].eps"`` -> ``["evaluation", "attacks", 2, "eps"]``."""
    tokens: list[str | int] = []
    for match in re.finditer(r"\[(\d+)\]|([^.\[\]]+)", dotted):
        tokens.append(int(match.group(1)) if match.group(1) is not None else match.group(2))
    return tokens


def _yaml_line(text: str, tokens: Sequence[str | int]) -> int | None:
    """The 1-based line where a YAML document defines ``tokens``; ``None`` when it does not.
    A list defines every item below it (a profile's list replaces the base list whole)."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    inside_list = False
    for token in tokens:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if str(k.value) == str(token)), None)
            if found is None:
                return node.start_mark.line + 1 if inside_list else None
            node = found
        elif isinstance(node, yaml.SequenceNode):
            inside_list = True
            if not isinstance(token, int) or token >= len(node.value):
                return node.start_mark.line + 1
            node = node.value[token]
        else:
            return node.start_mark.line + 1 if node is not None else None
    return node.start_mark.line + 1 if node is not None else None


def _in_mapping(mapping: Any, tokens: Sequence[str | int]) -> bool:
    node = mapping
    for i, token in enumerate(tokens):
        if isinstance(node, Mapping):
            dotted = ".".join(str(t) for t in tokens[i:])
            if dotted in node:  # a dotted key ("a.b": 1), as --params and overrides give them
                return True
            if token not in node:
                return False
            node = node[token]
        elif isinstance(node, list):
            return True
        else:
            return True
    return True


@dataclasses.dataclass
class ConfSources:
    """Where the parameters of a run come from, highest precedence first: the ``--params``
    override (``runtime``), ``params/overrides.yaml``, ``conf/<env>``, ``conf/<base_env>``.

    Attributes:
        project: the project root (paths are shown relative to it).
        conf: the conf source folder (``<project>/conf``).
        env: the Kedro env (``None``: ``local``).
        runtime: the ``--params`` overrides (nested or dotted keys).
        base_env: the base env (``base``).
    """

    project: Path
    conf: Path
    env: str | None = None
    runtime: Mapping[str, Any] | None = None
    base_env: str = "base"

    def files(self) -> list[Path]:
        """The parameter files of the env, then of the base env (Kedro's ``parameters*``
        patterns)."""
        out: list[Path] = []
        envs = [self.env or "local", self.base_env]
        for env in dict.fromkeys(envs):
            folder = self.conf / env
            if folder.is_dir():
                found = {p for p in folder.rglob("parameters*") if p.suffix in (".yml", ".yaml")}
                found |= {
                    p for p in folder.glob("parameters*/**/*") if p.suffix in (".yml", ".yaml")
                }
                out += sorted(found)
        return out

    def locate(self, dotted: str) -> str | None:
        """The file (and line) to fix for ``dotted``, e.g. ``"conf/smoke/parameters_evaluation.yml
        line 31"``, ``"the --params override"`` or ``"params/overrides.yaml"``; ``None``
        when no source defines it."""
        from atop.config import OVERRIDES, read_overrides

        tokens = split_key(dotted)
        if self.runtime and _in_mapping(self.runtime, tokens):
            return "the --params override"
        overrides = self.project / OVERRIDES
        try:
            if overrides.is_file() and _in_mapping(read_overrides(overrides), tokens):
                return str(OVERRIDES)
        except (OSError, ValueError):
            pass
        for path in self.files():
            try:
                line = _yaml_line(path.read_text(encoding="utf-8"), tokens)
            except OSError:
                continue
            if line is not None:
                return f"{_relative(path, self.project)} line {line}"
        return None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """One refused value: ``key`` (dotted), ``text`` (what is wrong and the rule)."""

    key: str
    text: str

    def message(self, sources: ConfSources | None) -> str:
        """The refusal with the file to fix."""
        where = sources.locate(self.key) if sources is not None else None
        fix = where or f"conf/<profile>/parameters_{split_key(self.key)[0]}.yml"
        return f"{self.text} Fix it in {fix}."


def _parsed(value: Any) -> Any:
    """``value`` as a number when it is a fraction string (``"8/255"``), else unchanged (the
    checks then name it)."""
    if isinstance(value, str):
        try:
            return fraction(value)
        except ValueError:
            pass
    return value


@dataclasses.dataclass(frozen=True)
class Rule:
    """A numeric range: ``low``/``high`` bounds (``*_open``: strict), ``integer``, ``unit``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    unit: str = ""

    def describe(self) -> str:
        """``"> 0 and <= 1 on the [0, 1] pixel scale"``."""
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        kind = "an integer " if self.integer else ""
        unit = f" {self.unit}" if self.unit else ""
        return f"{kind}{' and '.join(parts)}{unit}"

    def check(self, key: str, value: Any) -> Problem | None:
        """A :class:`Problem` when ``value`` breaks the rule (type, NaN, range). A real
        number may be written as a fraction (``"8/255"``), as the attack entries accept."""
        if not self.integer:
            value = _parsed(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "an integer" if self.integer else "a number"
            return Problem(key, f"{key}={value!r}: expected {kind} ({self.describe()}).")
        if self.integer and not isinstance(value, int):
            return Problem(key, f"{key}={value!r}: expected an integer ({self.describe()}).")
        if not math.isfinite(value):
            return Problem(key, f"{key}={value!r}: expected a finite number {self.describe()}.")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        if below or above:
            return Problem(key, f"{key}={value!r} is out of range: it must be {self.describe()}.")
        return None


def budget_rule(norm: str, side: int | None, *, zero: bool = False) -> Rule:
    """The range of a budget (``eps``, ``alpha``) of threat model ``norm`` on images of
    ``side`` px: ℓ∞ ``(0, 1]`` on the pixel scale, ℓ2 ``(0, sqrt(3 side²)]`` (the largest
    distance between two images); ``zero``: 0 allowed (an ε sweep's clean point)."""
    if norm == "L2":
        high = math.sqrt(3 * side * side) if side else None
        size = f"3 x {side} x {side} values" if side else "all values"
        unit = (
            f"(an l2 radius on the [0, 1] scale over the {size} of an image; the paper's "
            "budget is 0.5)"
        )
        return Rule(0, round(high, 2) if high else None, not zero, False, False, unit)
    return Rule(0, 1, not zero, False, False, LINF_UNIT)


COUNT_RULES = {
    "steps": Rule(1, MAX_STEPS, integer=True, unit="(gradient steps of the attack)"),
    "eot_iter": Rule(1, MAX_EOT, integer=True, unit="(gradient samples per step: EOT)"),
    "n_queries": Rule(1, MAX_QUERIES, integer=True, unit="(queries of the Square attack)"),
    "draws": Rule(1, MAX_DRAWS, integer=True, unit="(fresh draws judging each image)"),
    "seed": Rule(0, None, integer=True, unit="(a random seed)"),
}


# -------------------------------------------------------------------------- attack specs


def _attack_keys() -> tuple[dict[str, tuple[frozenset[str], dict[str, Any]]], set[str]]:
    from atop.attacks import ATTACK_KEYS

    every = {"name"}
    for required, optional in ATTACK_KEYS.values():
        every |= set(required) | set(optional)
    return ATTACK_KEYS, every


def _entry_keys() -> tuple[set[str], set[str]]:
    try:
        from atop.evaluation import protocol

        entry = set(getattr(protocol, "ENTRY_ONLY_KEYS", ENTRY_KEYS))
        injected = set(getattr(protocol, "INJECTED_AUTOATTACK_KEYS", INJECTED_KEYS))
    except ImportError:  # pragma: no cover - the core always has it
        entry, injected = set(ENTRY_KEYS), set(INJECTED_KEYS)
    return entry | {"label"}, injected


@dataclasses.dataclass(frozen=True)
class FoundSpec:
    """An attack spec found in the parameters.

    Attributes:
        key: its dotted key (``evaluation.attacks[2]``).
        spec: the mapping as written.
        kind: ``"spec"`` (has a known ``name``), ``"pgd"`` (a PGD block without ``name``:
            ``eps`` with ``alpha`` or ``steps``) or ``"override"`` (counts that change another
            spec, e.g. ``evaluation.sanity.stronger``).
        in_list: an item of a list.
    """

    key: str
    spec: Mapping[str, Any]
    kind: str
    in_list: bool


def _walk(value: Any, key: str, in_list: bool = False) -> Iterator[tuple[str, Any, bool]]:
    yield key, value, in_list
    if isinstance(value, Mapping):
        for name, item in value.items():
            yield from _walk(item, f"{key}.{name}" if key else str(name), False)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _walk(item, f"{key}[{i}]", True)


def find_attack_specs(params: Mapping[str, Any]) -> list[FoundSpec]:
    """Every attack spec in ``params`` (plain nested dicts / lists), in walk order."""
    attack_keys, every = _attack_keys()
    found = []
    for key, value, in_list in _walk(params, ""):
        if not isinstance(value, Mapping) or not value or not key:
            continue
        name = value.get("name")
        if isinstance(name, str) and name.lower() in attack_keys:
            found.append(FoundSpec(key, value, "spec", in_list))
            continue
        if "name" in value:
            continue
        keys = set(map(str, value))
        if "eps" in keys and keys & {"alpha", "steps"} and keys <= every | {"images"}:
            found.append(FoundSpec(key, value, "pgd", in_list))
        elif "eps" not in keys and keys & {"steps", "eot_iter"} and keys <= every:
            found.append(FoundSpec(key, value, "override", in_list))
    return found


def _spec_problems(found: FoundSpec, side: int | None) -> list[Problem]:
    from atop.attacks import check_spec

    attack_keys, _ = _attack_keys()
    spec = dict(found.spec)
    name = str(spec.get("name", "pgd")).lower()
    norm = spec.get("norm", "L2" if name == "cw" else "Linf")
    if norm not in ("Linf", "L2"):
        return [
            Problem(
                f"{found.key}.norm",
                f"{found.key}.norm={norm!r}: choose one of ['Linf', 'L2'].",
            )
        ]
    problems = []
    for key, value in spec.items():
        dotted = f"{found.key}.{key}"
        if key in ("eps", "alpha"):
            problem = budget_rule(norm, side).check(dotted, value)
        elif key in COUNT_RULES:
            problem = COUNT_RULES[key].check(dotted, value)
        else:
            continue
        if problem is not None:
            problems.append(problem)
    if problems or found.kind != "spec":
        return problems
    entry_keys, injected = _entry_keys()
    required, optional = attack_keys[name]
    entry = bool(set(spec) & entry_keys)  # a labelled entry is built as written
    spec = {k: v for k, v in spec.items() if k not in entry_keys}
    if "eps" not in required | set(optional):
        spec.pop("eps", None)  # the threat model's budget of an attack without one (C&W)
    for key in sorted(required - set(spec)):
        if key in injected or (key in SWEPT_KEYS and not entry):
            spec[key] = PLACEHOLDERS.get(key, 1)
    for key in ("eps", "alpha"):  # fractions ("8/255"), as the evaluation parses them
        if key in spec:
            spec[key] = _parsed(spec[key])
    try:
        check_spec(spec)
    except ValueError as exc:
        problems.append(Problem(found.key, f"{found.key}: {exc}."))
    return problems


# --------------------------------------------------------------------------------- counts


def _plain(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and dataclasses.is_dataclass(value):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def image_side(params: Mapping[str, Any]) -> int | None:
    """The image side of the run's dataset (``data_ingestion.datasets.<dataset>.image_size``)."""
    ingestion = _plain(params.get("data_ingestion")) or {}
    facts = (ingestion.get("datasets") or {}).get(ingestion.get("dataset")) or {}
    side = facts.get("image_size")
    return side if isinstance(side, int) and not isinstance(side, bool) else None


def _count(key: str, value: Any, limit: int | None, unit: str) -> Problem | None:
    if value is None:
        return None
    return Rule(1, limit, integer=True, unit=unit).check(key, value)


def _count_problems(params: Mapping[str, Any], blocks: Iterable[str]) -> list[Problem]:
    ingestion = _plain(params.get("data_ingestion")) or {}
    eval_subset = (ingestion.get("eval_subset") or {}).get("images")
    monitor = (ingestion.get("monitor_subset") or {}).get("images")
    facts = (ingestion.get("datasets") or {}).get(ingestion.get("dataset")) or {}
    train_rows = (facts.get("expected_rows") or {}).get("train")
    problems: list[Problem] = []
    for block in blocks:
        values = params.get(block)
        if not isinstance(values, Mapping):
            continue
        evaluates = "defenses" in values and "images" in values
        if evaluates:
            # a stage that evaluates defenses on the first `images` of the evaluation subset
            own = _count(
                f"{block}.images",
                values["images"],
                eval_subset,
                f"(the first images of the fixed evaluation subset, "
                f"data_ingestion.eval_subset.images = {eval_subset}; null = all)",
            )
            problems.append(own)
            valid = own is None and isinstance(values["images"], int)
            outer = values["images"] if valid else eval_subset
            for name, child in values.items():
                if isinstance(child, Mapping) and "images" in child:
                    problems.append(
                        _count(
                            f"{block}.{name}.images",
                            child["images"],
                            outer,
                            f"(the first images of the {block}'s own, {block}.images = {outer}; "
                            "a larger value is refused, not lowered)",
                        )
                    )
        else:
            # a training stage's PGD check (robust_eval) runs on the first monitor images
            for name, child in values.items():
                if isinstance(child, Mapping) and "images" in child and _is_spec(child):
                    problems.append(
                        _count(
                            f"{block}.{name}.images",
                            child["images"],
                            monitor,
                            f"(monitor images, data_ingestion.monitor_subset.images = {monitor})",
                        )
                    )
        for key, value, _ in _walk(values, block):
            if key.endswith(".val_images"):
                problems.append(
                    _count(
                        key,
                        value,
                        monitor,
                        f"(monitor images, data_ingestion.monitor_subset.images = {monitor})",
                    )
                )
            elif key.endswith(".train_images"):
                problems.append(
                    _count(
                        key,
                        value,
                        train_rows,
                        f"(training images of {ingestion.get('dataset')}: {train_rows}; "
                        "null = all)",
                    )
                )
        for key in ("draws", "val_draws"):
            if key in values:
                problems.append(COUNT_RULES["draws"].check(f"{block}.{key}", values[key]))
    return [p for p in problems if p is not None]


def _is_spec(child: Mapping[str, Any]) -> bool:
    keys = set(map(str, child))
    return "eps" in keys and bool(keys & {"alpha", "steps"})


def _eps_sweep_problems(params: Mapping[str, Any], blocks: Iterable[str], side: int | None):
    """ε sweeps (``<block>.<child>.eps_sweep``): each budget >= 0 in its norm's range; a
    list takes the norm of the child's ``reference`` entry, a mapping is norm -> list."""
    for block in blocks:
        values = params.get(block)
        if not isinstance(values, Mapping):
            continue
        entries = values.get("attacks") if isinstance(values.get("attacks"), list) else []
        for name, child in values.items():
            if not isinstance(child, Mapping) or "eps_sweep" not in child:
                continue
            sweep = child["eps_sweep"]
            if isinstance(sweep, Mapping):
                sweeps = {
                    f"{block}.{name}.eps_sweep.{norm}": (str(norm), points)
                    for norm, points in sweep.items()
                }
            else:
                reference = child.get("reference")
                entry = next(
                    (e for e in entries if isinstance(e, Mapping) and e.get("label") == reference),
                    {},
                )
                sweeps = {f"{block}.{name}.eps_sweep": (entry.get("norm", "Linf"), sweep)}
            for key, (norm, points) in sweeps.items():
                if not isinstance(points, list):
                    continue
                rule = budget_rule(norm if norm in ("Linf", "L2") else "Linf", side, zero=True)
                for i, eps in enumerate(points):
                    problem = rule.check(f"{key}[{i}]", eps)
                    if problem is not None:
                        yield problem


def parameter_problems(
    params: Mapping[str, Any], blocks: Iterable[str] | None = None
) -> list[Problem]:
    """Every refused value of the blocks ``blocks`` of ``params`` (all blocks: ``None``).

    Args:
        params: the run's parameters (plain dicts, or typed blocks with ``to_dict``).
        blocks: the top-level keys the chosen pipelines take.

    Returns:
        The problems in walk order (empty: nothing refused).
    """
    params = {k: _plain(v) for k, v in params.items()}
    blocks = sorted(params if blocks is None else set(blocks) & set(params))
    side = image_side(params)
    problems: list[Problem] = []
    for found in find_attack_specs({b: params[b] for b in blocks}):
        problems += _spec_problems(found, side)
    problems += _eps_sweep_problems(params, blocks, side)
    problems += _count_problems(params, blocks)
    return problems


def check_parameters(
    params: Mapping[str, Any],
    blocks: Iterable[str] | None = None,
    sources: ConfSources | None = None,
) -> None:
    """Refuse the run's parameters before any node (see the module docstring).

    Args:
        params: the resolved parameters (plain, or typed blocks).
        blocks: the top-level keys the chosen pipelines take (``None``: all).
        sources: where they come from, to name the file to fix.

    Raises:
        ParameterError: the first problem (dotted key, value, allowed range with its unit,
            file and line to fix), with the number and keys of the others.
    """
    problems = parameter_problems(params, blocks)
    if not problems:
        return
    message = problems[0].message(sources)
    if len(problems) > 1:
        others = ", ".join(p.key for p in problems[1:4])
        if len(problems) > 4:
            others += f" and {len(problems) - 4} more"
        message += f" (also refused: {others}.)"
    raise ParameterError(message)


# ----------------------------------------------------------------------------- checkpoints


def check_transform(config: Any, where: str, side: int | None, fix: str) -> None:
    """Validate a purifier checkpoint's random transform (``meta.transform``) with
    :class:`atop.transforms.TransformConfig`, and its mask count against the image's blocks.

    Args:
        config: the ``meta.transform`` mapping.
        where: the checkpoint's file (for the message).
        side: the image side of the run's dataset (``None``: unknown, not checked).
        fix: what rewrites the file (e.g. ``kedro run --pipelines purifier_pretraining``).

    Raises:
        CheckpointError: naming the file, ``meta.transform.<key>``, its value and the rule.
    """
    from atop.transforms import TransformConfig

    def refuse(key: str, reason: str) -> CheckpointError:
        value = config.get(key) if isinstance(config, Mapping) else None
        return CheckpointError(
            f"{where}: meta.transform.{key}={value!r} is refused: {reason.rstrip('.')}. The "
            f"purifier was saved with a bad random transform: retrain it ({fix}) or restore it "
            "(dvc pull)."
        )

    if not isinstance(config, Mapping):
        raise CheckpointError(
            f"{where}: meta.transform={config!r} is not a mapping of the random transform's "
            f"parameters: retrain it ({fix}) or restore it (dvc pull)."
        )
    names = [f.name for f in dataclasses.fields(TransformConfig)]
    try:
        transform = TransformConfig.from_mapping(config)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        hits = [(text.find(n), n) for n in names if n in text]
        unknown = [k for k in config if k not in names]
        key = min(hits)[1] if hits else (unknown[0] if unknown else "kind")
        raise refuse(key, text) from None
    if side and transform.kind == "rt3":
        block = transform.mask_block or side // 8
        blocks = (side // block) ** 2 if block else 0
        if transform.mask_number > blocks:
            raise refuse(
                "mask_number",
                f"{transform.mask_number} disjoint masks do not fit the {blocks} mask blocks of a "
                f"{side}x{side} image",
            )


def check_defense(
    name: str,
    checkpoints: Mapping[str, Any],
    paths: Mapping[str, str],
    fixes: Mapping[str, str],
    side: int | None,
) -> None:
    """Load-check the checkpoints of defense ``name`` as the evaluation will use them: each
    one a model checkpoint, a purifier's random transform valid
    (:func:`check_transform`), the defense rebuilt by
    :func:`atop.evaluation.defenses.build_defense` (architecture, weights, NaN, the classifier
    a fine-tuned purifier belongs to) and one forward pass on one image (finite logits).
    The global random state is left as it was.

    Args:
        name: a defense of :data:`atop.evaluation.defenses.NEEDS`.
        checkpoints: its checkpoint dicts by catalog name.
        paths: catalog name -> file (for the messages).
        fixes: catalog name -> what rewrites it (``kedro run --pipelines <stage>``).
        side: the image side (``None``: 32).

    Raises:
        CheckpointError: naming the file, the problem and the fix.
    """
    import torch

    from atop.evaluation.defenses import NEEDS, build_defense

    keys = list(NEEDS[name])
    for key in keys:
        checkpoint = checkpoints[key]
        where = paths.get(key, key)
        fix = fixes.get(key, "rerun the stage that writes it")
        if not isinstance(checkpoint, Mapping) or not {"arch", "config", "state_dict"} <= set(
            checkpoint
        ):
            raise CheckpointError(
                f"{where}: not a model checkpoint of this project (a dict with arch, config, "
                f"state_dict and meta): retrain it ({fix}) or restore it (dvc pull)."
            )
        meta = checkpoint.get("meta") or {}
        if isinstance(meta, Mapping) and "transform" in meta:
            check_transform(meta["transform"], where, side, fix)
    files = " + ".join(paths.get(k, k) for k in keys)
    fix = "; ".join(dict.fromkeys(fixes.get(k, "rerun the stage that writes it") for k in keys))
    side = side or 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        image = torch.rand(1, 3, side, side)
        try:
            model = build_defense(name, checkpoints, torch.device("cpu")).model
            with torch.no_grad():
                logits = model(image)
        except CheckpointError as exc:
            raise CheckpointError(f"{files}: {exc}") from exc
        except Exception as exc:
            raise CheckpointError(
                f"{files}: defense {name!r} cannot be rebuilt or run on one {side}x{side} image "
                f"({type(exc).__name__}: {' '.join(str(exc).split())}). The checkpoint does not "
                f"fit this profile or is corrupted: retrain it ({fix}) or restore it (dvc pull)."
            ) from exc
    if not torch.is_tensor(logits) or logits.dim() != 2 or not torch.isfinite(logits).all():
        raise CheckpointError(
            f"{files}: defense {name!r} gives no finite logits [1, classes] on one image: the "
            f"weights are broken. Retrain them ({fix}) or restore them (dvc pull)."
        )


# -------------------------------------------------------------------------------- outputs


def require_outputs(
    exists: Mapping[str, bool], command: str, what: Mapping[str, str] | None = None
) -> None:
    """Refuse to read run outputs that do not exist.

    Args:
        exists: output name (a catalog name or a path) -> whether it exists.
        command: the command that makes them (e.g. ``kedro run --pipelines atop --env smoke``).
        what: optional output name -> its file, for the message.

    Raises:
        atop.errors.MissingOutputs: one line naming every missing output and the command.
    """
    missing = [name for name, ok in exists.items() if not ok]
    if not missing:
        return
    what = what or {}
    shown = ", ".join(f"{name} ({what[name]})" if name in what else name for name in missing)
    raise MissingOutputs(f"The run's outputs are missing: {shown}. Make them with `{command}`.")


def provenance_warnings(
    provenance: Mapping[str, Any] | None,
    commit: str,
    machine: Mapping[str, Any],
    what: str = "the record",
) -> list[str]:
    """Warnings for a record made by other code or on a machine with other numerics.

    Args:
        provenance: the record's ``provenance`` (``dataset``, ``profile``, ``commit``,
            ``machine``).
        commit: the current code's commit (:func:`atop.hooks.code_commit`).
        machine: the current machine (:func:`atop.machine.machine`).
        what: the record's name, for the message.

    Returns:
        One line per difference (empty: same commit and same numerics).
    """
    from atop.machine import describe, numerics_differences

    provenance = provenance or {}
    out = []
    made = str(provenance.get("commit") or "unknown")
    if made != commit:
        out.append(
            f"WARNING: {what} was made by commit {made[:12]}, this checkout is {commit[:12]}: "
            "its numbers may not be this code's (rerun the pipeline to refresh them)."
        )
    recorded = provenance.get("machine")
    if not recorded:
        out.append(
            f"WARNING: {what} does not say which machine made it: bitwise-equal numbers are "
            "expected only on the same hardware (docs/reliability.md)."
        )
    else:
        differences = numerics_differences(recorded, machine)
        if differences:
            out.append(
                f"WARNING: {what} was made on another machine ({describe(recorded)}; differs "
                f"in {', '.join(d.split(':')[0] for d in differences)}): a rerun here gives "
                "other numbers within training noise; `atop compare` tells the two apart "
                "(docs/reliability.md)."
            )
    return out


def check_run_outputs(catalog: Any, names: Sequence[str], env: str | None) -> list[str]:
    """The notebook's first check: every catalog output in ``names`` exists, and the report
    (``robustness``, when listed) comes from this code and this machine.

    Args:
        catalog: the Kedro catalog of the run's profile.
        names: the catalog names the notebook reads.
        env: the Kedro env (``None``: the base profile), for the command to run.

    Returns:
        The provenance warnings (also printed).

    Raises:
        atop.errors.MissingOutputs: one line naming the missing outputs (and their files)
            and the command that makes them.
    """
    exists, files = {}, {}
    for name in names:
        try:
            exists[name] = bool(catalog.exists(name))
        except Exception:
            exists[name] = False
        try:
            files[name] = catalog.get(name)._describe()["filepath"]
        except Exception:
            pass
    command = "kedro run --pipelines atop" + (f" --env {env}" if env else "")
    _one_line_in_ipython()
    require_outputs(exists, command, {k: _short(v) for k, v in files.items()})
    warnings: list[str] = []
    if "robustness" in names:
        from atop.hooks import code_commit
        from atop.machine import machine

        record = catalog.load("robustness")
        provenance = record.get("provenance") if isinstance(record, Mapping) else None
        warnings = provenance_warnings(provenance, code_commit(), machine(), "the report")
        for line in warnings:
            print(line)
    return warnings


def _short(path: str) -> str:
    parts = Path(path).parts
    return str(Path(*parts[parts.index("data") :])) if "data" in parts else str(path)


def _one_line_in_ipython() -> None:
    """In a notebook, show a :class:`MissingOutputs` as its one line: IPython's custom
    exception handler (the cell still fails, so "Run All" stops there), which also bypasses
    a rich traceback renderer Kedro's logging may have installed."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or tuple(getattr(shell, "custom_exceptions", ())) not in (
        (),
        (MissingOutputs,),
    ):
        return

    def show(shell, etype, value, tb, tb_offset=None):  # noqa: ARG001 (IPython's signature)
        print(f"{etype.__name__}: {value}", file=sys.stderr)
        return []

    shell.set_custom_exc((MissingOutputs,), show)

"""Typed parameter blocks: one dataclass per ``conf/*/parameters_<stage>.yml`` block.

Kedro 1.7 builds a node's ``params:<key>`` input from the YAML through the type hint of the
node's argument (``model_type(**raw)``), before any node runs, for every stage of the chosen
pipeline. :class:`Params` makes that construction a validation:

* every key of the dataclass is required (defaults live in the YAML only) and an unknown key
  is refused with the closest valid name;
* values are checked against the annotation (``int``, ``float``, ``bool``, ``str``,
  ``X | None``, ``list[X]``, ``dict[str, X]``, nested :class:`Params`) -- text where a number is
  expected, NaN and booleans posing as numbers are refused;
* numeric ranges and choices come from the field's metadata (:func:`spec`), with a unit;
* :meth:`Params.check` adds cross-field rules.

A refusal raises :class:`ParameterError` naming the dotted key, the value, the allowed range
and the fix. Budgets are written ``${frac:8/255}`` in the YAML (:func:`fraction` is the
OmegaConf resolver); a ``float`` field also accepts the text ``"8/255"`` (``--params``).

Core module: standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any, ClassVar

from atop.errors import UserError


class ParameterError(UserError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


#: Where a dotted key is defined (``"conf/smoke/parameters_evaluation.yml line 12"``), set by
#: the Kedro run guard for the run's profile (:func:`set_locator`); ``None``: say the generic
#: ``conf/<profile>/parameters_<stage>.yml``.
_locator: Callable[[str], str | None] | None = None


def set_locator(locator: Callable[[str], str | None] | None) -> None:
    """Name the file that defines a key in refusals: ``locator(dotted_key)`` returns the file
    (and line) to fix, or ``None`` when unknown. ``None`` restores the generic hint."""
    global _locator
    _locator = locator


def fraction(value: Any) -> float:
    """``"8/255"`` -> 0.0313..., ``"0.5"`` -> 0.5, numbers unchanged (the ``${frac:...}`` resolver).

    Raises:
        ParameterError: not a number or a fraction ``a/b`` with ``b != 0``.
    """
    if isinstance(value, bool):
        raise ParameterError(f"expected a number or a fraction like 8/255, got {value!r}")
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            raise ParameterError(f"expected a finite number, got {value!r}") from None
    try:
        return float(Fraction(str(value).replace(" ", "")))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ParameterError(f"expected a number or a fraction like 8/255, got {value!r}") from None


def spec(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: tuple[Any, ...] | None = None,
    unit: str = "",
    weights: bool = True,
) -> Any:
    """A dataclass field with a range or choices (checked by :class:`Params`).

    Args:
        gt, ge, lt, le: bounds of a number (or of every number of a list).
        choices: the allowed values.
        unit: said in the refusal, e.g. ``"on the [0, 1] pixel scale (8/255 = 0.0314)"``.
        weights: ``False`` for settings that do not change trained weights (device,
            progress, paths, evaluation sizes): left out of the resume fingerprint.
    """
    meta = {"gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "unit": unit}
    return dataclasses.field(metadata={**meta, "weights": weights})


#: Keys renamed when the counts got one name each (hinted when an old name is used).
RENAMED = {
    "n_images": "images",
    "n_train": "train_images",
    "train_subset": "train_images",
    "n_val": "val_images",
    "val_size": "val_images",
    "eval_subset": "val_images",
    "n_samples": "sample_images",
    "size": "images",
}

#: Settings that never change trained weights, in every block.
RUN_ONLY = {"weights": False, "gt": None, "ge": None, "lt": None, "le": None, "choices": None}


def run_only() -> Any:
    """A field that does not change the trained weights (device, progress, paths)."""
    return dataclasses.field(metadata={**RUN_ONLY, "unit": ""})


@dataclasses.dataclass(init=False, frozen=True)
class Params:
    """Base of the parameter blocks: keyword construction with validation.

    Subclasses are ``@dataclass(init=False, frozen=True)`` with no defaults; ``KEY`` is the
    block's dotted parameter key (for messages). ``Cls(**raw)`` (what Kedro calls) and
    :meth:`from_dict` validate; :meth:`to_dict` gives the plain mapping back.

    Raises:
        ParameterError: see the module docstring.
    """

    KEY: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        _build(self, values, type(self).KEY or type(self).__name__)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], path: str | None = None) -> typing.Self:
        """Build and validate from a mapping; ``path`` is the dotted key for messages."""
        obj = cls.__new__(cls)
        _build(obj, values, path or cls.KEY or cls.__name__)
        return obj

    def to_dict(self) -> dict[str, Any]:
        """The values as plain dicts / lists / scalars (nested blocks included)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> typing.Self:
        """A validated copy with top-level ``changes`` (nested blocks as dicts or objects)."""
        return type(self).from_dict({**self.to_dict(), **changes}, self._path)

    def fingerprint(self) -> dict[str, Any]:
        """The values that change the trained weights: fields not marked ``weights=False``,
        nested blocks by their own fingerprint (left out when it is empty)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("weights", True):
                continue
            value = getattr(self, f.name)
            value = value.fingerprint() if isinstance(value, Params) else _plain(value)
            if value != {} or not isinstance(getattr(self, f.name), Params):
                out[f.name] = value
        return out

    def check(self) -> None:
        """Cross-field rules of a block (override; raise :class:`ParameterError`)."""

    def fail(self, key: str, message: str) -> typing.NoReturn:
        """Raise a :class:`ParameterError` for ``<path>.<key>``."""
        raise ParameterError(f"{self._path}.{key}: {message}{_fix(f'{self._path}.{key}')}")


def _fix(path: str) -> str:
    stage = path.split(".", 1)[0].split("[", 1)[0]
    where = None
    if _locator is not None and stage and stage[0].islower():
        try:
            where = _locator(path)
        except Exception:  # naming the file is a courtesy: never hide the refusal
            where = None
    if where:
        return f" Fix it in {where}."
    return (
        f" Fix it in conf/<profile>/parameters_{stage}.yml (or the --params override)."
        if stage and stage[0].islower()
        else ""
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Params):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _build(obj: Params, values: Any, path: str) -> None:
    cls = type(obj)
    if not isinstance(values, Mapping):
        raise ParameterError(f"{path}: expected a mapping of keys, got {values!r}.{_fix(path)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            if RENAMED.get(key) in fields:
                close = [RENAMED[key]]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ParameterError(
                f"{path}: unknown key {key!r}.{hint} Valid keys: {', '.join(fields)}."
                f"{_fix(f'{path}.{key}')}"
            )
    missing = [name for name in fields if name not in values]
    if missing:
        raise ParameterError(f"{path}: missing key(s) {missing}.{_fix(path)}")
    object.__setattr__(obj, "_path", path)
    for name, f in fields.items():
        value = _coerce(values[name], hints[name], f"{path}.{name}")
        _check_range(value, f.metadata, f"{path}.{name}")
        object.__setattr__(obj, name, value)
    obj.check()


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """``value`` converted to / checked against the annotation ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, path)
            except ParameterError as exc:
                errors.append(str(exc))
        raise ParameterError(errors[0] if len(errors) == 1 else "; ".join(errors))
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, Params):
        return value if isinstance(value, hint) else hint.from_dict(value, path)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise _type_error(path, value, "a mapping")
        try:
            return hint(**value)
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"{path}: {exc}{_fix(path)}") from None
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _type_error(path, value, "a list")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise _type_error(path, value, "a mapping")
        item = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(path, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, value, "an integer")
        return value
    if hint is float:
        try:
            number = fraction(value)
        except ParameterError:
            raise _type_error(path, value, "a number (or a fraction like 8/255)") from None
        if not math.isfinite(number):
            raise _type_error(path, value, "a finite number")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(path, value, "text")
        return value
    return value


def _type_error(path: str, value: Any, expected: str) -> ParameterError:
    return ParameterError(f"{path}={value!r}: expected {expected}.{_fix(path)}")


def _check_range(value: Any, meta: Mapping[str, Any], path: str) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_range(v, meta, f"{path}[{i}]")
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ParameterError(f"{path}={value!r}: choose one of {list(choices)}{hint}.{_fix(path)}")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    bounds = [
        ("gt", lambda v, b: v > b, ">"),
        ("ge", lambda v, b: v >= b, ">="),
        ("lt", lambda v, b: v < b, "<"),
        ("le", lambda v, b: v <= b, "<="),
    ]
    rule = [f"{sign} {meta[key]:g}" for key, _, sign in bounds if meta.get(key) is not None]
    for key, ok, _ in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            unit = f" {meta['unit']}" if meta.get("unit") else ""
            raise ParameterError(
                f"{path}={value!r} is out of range: it must be {' and '.join(rule)}{unit}."
                f"{_fix(path)}"
            )

"""The project's Kedro config loader: the parameters of ``params/overrides.yaml`` merged last.

Parameters are ``conf/base``, deep-merged with ``conf/<env>``, then with the overrides file
``params/overrides.yaml`` (the file ``dvc exp run -S`` edits; ``{}`` when nothing is
overridden), then with ``kedro run --params``. Both ``kedro run`` and
``python -m atop.dvc_params`` (DVC's ``resolve_params`` stage) go through this loader
(``settings.CONFIG_LOADER_CLASS``), so they see the same values.

An override may only change a key that ``conf/`` defines: an unknown key raises
:class:`atop.params.ParameterError` naming the key and the closest valid ones. Types and
ranges are then checked by the typed blocks (:mod:`atop.params`) as for any value.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from kedro.config import OmegaConfigLoader
from omegaconf import OmegaConf

from atop.params import ParameterError

#: The overrides file, relative to the project root (the folder holding ``conf/``).
OVERRIDES = Path("params") / "overrides.yaml"


def read_overrides(path: str | Path) -> dict[str, Any]:
    """The overrides of ``path`` as a nested dict (dotted keys such as ``a.b: 1`` expanded);
    ``{}`` when the file is missing or empty.

    Raises:
        ParameterError: the file is not a YAML mapping.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ParameterError(f"{path}: expected a mapping of parameter keys, got {data!r}.")
    nested: dict[str, Any] = {}
    for key, value in data.items():
        *parents, last = str(key).split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(node.get(last), dict) and isinstance(value, Mapping):
            node[last] = OmegaConf.to_container(OmegaConf.merge(node[last], value))
        else:
            node[last] = value
    return nested


def _leaves(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        out += _leaves(value, f"{path}.") if isinstance(value, Mapping) and value else [path]
    return out


def check_overrides(
    overrides: Mapping[str, Any], config: Mapping[str, Any], source: str, prefix: str = ""
) -> None:
    """Refuse an override of a key that ``config`` (the merged ``conf/`` parameters) lacks.

    Raises:
        ParameterError: names the dotted key, the closest valid keys and the file.
    """
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in config:
            same_name = [p for p in _leaves(config, prefix) if p.rsplit(".", 1)[-1] == key]
            close = same_name or [
                f"{prefix}{k}" for k in difflib.get_close_matches(str(key), list(config), n=3)
            ]
            hint = f" Did you mean {', '.join(close[:4])}?" if close else ""
            valid = ", ".join(map(str, config)) or "(none)"
            raise ParameterError(
                f"{source}: unknown parameter {path!r}: conf/ defines no such key.{hint} "
                f"Valid keys{f' of {prefix[:-1]}' if prefix else ''}: {valid}."
            )
        if isinstance(value, Mapping) and isinstance(config[key], Mapping):
            check_overrides(value, config[key], source, f"{path}.")


class AtopConfigLoader(OmegaConfigLoader):
    """``OmegaConfigLoader`` with :data:`OVERRIDES` merged over the parameters (module doc)."""

    def __getitem__(self, key: str) -> dict[str, Any]:
        config = super().__getitem__(key)
        if key != "parameters":
            return config
        path = Path(self.conf_source).parent / OVERRIDES
        overrides = read_overrides(path)
        if not overrides:
            return config
        check_overrides(overrides, config, str(OVERRIDES))
        # --params (runtime) still win over the file.
        merged = OmegaConf.merge(config, overrides, self.runtime_params or {})
        return OmegaConf.to_container(merged, resolve=True)

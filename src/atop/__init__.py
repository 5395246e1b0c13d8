"""atop: Adversarial Training on Purification (AToP, ICLR 2024), reproducibly.

The library entry points, importable without Kedro::

    from atop import load_defense, evaluate

are loaded on first use (``import atop`` alone stays light, as Kedro's settings import it).
"""

from importlib import metadata as _metadata

try:  # one home for the version: the package metadata (pyproject.toml)
    __version__ = _metadata.version("atop")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "load_defense": "atop.evaluation.defenses",
    "evaluate": "atop.evaluation.protocol",
    "EvalSettings": "atop.evaluation.protocol",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'atop' has no attribute {name!r}")


__all__ = ["EvalSettings", "__version__", "evaluate", "load_defense"]

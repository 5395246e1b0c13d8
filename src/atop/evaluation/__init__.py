"""Robust evaluation as a library, importable without Kedro.

* :mod:`atop.evaluation.defenses`: the defenses and :func:`load_defense` (checkpoints in, a
  model out);
* :mod:`atop.evaluation.protocol`: :func:`evaluate` (a model, images, attacks -> per-image
  verdicts judged with fresh draws), the attack entries, the worst cases;
* :mod:`atop.evaluation.sanity`: the gradient-masking sanity checks;
* :mod:`atop.evaluation.suite`: the evaluation stage's parameters and its protocol for one
  defense (:func:`evaluate_defense`).
"""

from atop.evaluation.defenses import DEFENSES, Defense, build_defense, load_defense
from atop.evaluation.protocol import EvalResult, EvalSettings, evaluate

__all__ = [
    "DEFENSES",
    "Defense",
    "EvalResult",
    "EvalSettings",
    "build_defense",
    "evaluate",
    "load_defense",
]

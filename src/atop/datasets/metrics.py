"""The numbers of a stage's JSON record that are metrics (what ``dvc metrics`` shows).

A stage's record (``data/08_reporting/<dataset>/<profile>/<name>.json``) keeps everything its
node returned: metrics, the settings they were measured with, labels and statuses. The
catalog's ``metrics_filepath`` (``.../metrics/<name>.json``) receives :func:`metrics_only` of
it on every save: measured numbers only (accuracies, PSNR, p-values,
counts of outcomes, seconds), which ``dvc.yaml`` declares as the stage's ``metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Keys whose mapping value is a block of settings (left out with all it contains).
SETTING_BLOCKS = frozenset(
    {"settings", "transform", "purifier", "attack", "val_attack", "provenance", "declared"}
)
#: Keys whose number is a setting or a size chosen by the parameters, not a measurement.
SETTING_NUMBERS = frozenset(
    {
        "eps",
        "alpha",
        "steps",
        "eot_iter",
        "pgd_steps",
        "epochs",
        "lambda_cls",
        "seed",
        "draws",
        "val_draws",
        "batch_size",
        "n_train",
        "n_test",
        "n_val",
        "val_images",
        "robust_images",
    }
)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metrics_only(record: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics of ``record``: nested mappings of numbers, same keys, without settings
    (:data:`SETTING_BLOCKS`, :data:`SETTING_NUMBERS`), text, booleans, ``None`` and lists;
    a confidence interval ``<key>_ci: [low, high]`` becomes ``{"low": ..., "high": ...}``.
    Mappings left empty are dropped."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            if key not in SETTING_BLOCKS and (inner := metrics_only(value)):
                out[key] = inner
        elif _number(value):
            if key not in SETTING_NUMBERS:
                out[key] = value
        elif str(key).endswith("_ci") and isinstance(value, list | tuple) and len(value) == 2:
            if all(_number(v) for v in value):
                out[key] = {"low": value[0], "high": value[1]}
    return out

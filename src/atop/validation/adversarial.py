"""Great Expectations suite on the output of an attack (issue 6, method.md §4).

Each attack's adversarial examples must be valid before any robust accuracy is computed
from them: the perturbation stays within ε (plus a float tolerance) in the attack's norm,
every pixel lies in ``[0, 1]``, no value is NaN, and the batch has the clean batch's image
count and ``(C, H, W)`` shape. :func:`adversarial_table` builds one row per adversarial
image; :func:`validate_adversarial` runs the suite through
:func:`atop.validation.core.validate_table`, which raises
:class:`~atop.validation.core.DataValidationError` naming every failed expectation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

NORMS = ("Linf", "L2")

#: Columns of :func:`adversarial_table`.
COLUMNS = [
    "index", "label", "channels", "height", "width", "pixel_min", "pixel_max",
    "linf", "l2", "perturbation", "eps",
]  # fmt: skip


def _check_inputs(
    clean: Tensor, adv: Tensor, labels: Tensor, norm: str, indices: Sequence[int] | None
) -> None:
    for name, tensor in (("clean", clean), ("adv", adv)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D image tensor [N, C, H, W], got "
                f"{getattr(tensor, 'shape', type(tensor).__name__)}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be float images in [0, 1], got {tensor.dtype}")
    if not isinstance(labels, Tensor) or labels.shape != clean.shape[:1]:
        raise ValueError(
            f"labels must be a tensor [{len(clean)}] (one per clean image), got "
            f"{getattr(labels, 'shape', type(labels).__name__)}"
        )
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if indices is not None and len(indices) != len(clean):
        raise ValueError(
            f"indices must give one dataset index per clean image ({len(clean)}), got "
            f"{len(indices)}"
        )


def adversarial_table(
    clean: Tensor,
    adv: Tensor,
    labels: Tensor,
    eps: float | None,
    norm: str,
    indices: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per adversarial image: its size, pixel range and perturbation.

    Row ``i`` pairs ``adv[i]`` with ``clean[i]``, ``labels[i]`` and ``indices[i]``. When
    ``adv`` has a different image shape than ``clean`` the perturbation columns are NaN;
    rows beyond the clean batch have NaN ``index``, ``label`` and perturbation; the suite
    then fails on them.

    Args:
        clean: float ``[N, C, H, W]`` clean images in ``[0, 1]``.
        adv: float ``[M, C', H', W']`` adversarial images (``M = N`` and the same shape when
            valid).
        labels: ``[N]`` true classes of the clean images.
        eps: the attack's bound in ``norm`` (``None``: unbounded, e.g. C&W ℓ2); stored in
            the ``eps`` column (NaN when ``None``).
        norm: ``"Linf"`` or ``"L2"``: which norm the ``perturbation`` column holds.
        indices: dataset index of each clean image (e.g. the evaluation subset's
            ``eval_indices``); default ``0 .. N-1``.

    Returns:
        A DataFrame with columns ``index`` (dataset index), ``label``, ``channels``,
        ``height``, ``width`` (of the adversarial image), ``pixel_min``, ``pixel_max``,
        ``linf`` (max |δ|), ``l2`` (‖δ‖₂ over C, H, W), ``perturbation`` (``linf`` or ``l2``
        per ``norm``), ``eps``; all distances on the ``[0, 1]`` pixel scale.

    Raises:
        ValueError: tensors that are not 4-D float images, labels or indices not one per
            clean image, or an unknown norm.
    """
    _check_inputs(clean, adv, labels, norm, indices)
    adv = adv.detach().cpu().double()
    clean = clean.detach().cpu().double()
    n_adv = len(adv)
    nan = torch.full((n_adv,), float("nan"), dtype=torch.float64)
    linf, l2 = nan.clone(), nan.clone()
    paired = min(n_adv, len(clean))
    if adv.shape[1:] == clean.shape[1:] and paired:
        delta = (adv[:paired] - clean[:paired]).flatten(1)
        linf[:paired] = delta.abs().amax(dim=1)
        l2[:paired] = delta.norm(p=2, dim=1)
    label, index = nan.clone(), nan.clone()
    label[:paired] = labels[:paired].detach().cpu().double()
    all_indices = range(len(clean)) if indices is None else indices
    index[:paired] = torch.tensor([int(i) for i in all_indices[:paired]], dtype=torch.float64)
    flat = adv.flatten(1)
    empty = flat.shape[1] == 0
    table = pd.DataFrame(
        {
            "index": index.numpy(),
            "label": label.numpy(),
            "channels": adv.shape[1],
            "height": adv.shape[2],
            "width": adv.shape[3],
            "pixel_min": nan.numpy() if empty else flat.amin(dim=1).numpy(),
            "pixel_max": nan.numpy() if empty else flat.amax(dim=1).numpy(),
            "linf": linf.numpy(),
            "l2": l2.numpy(),
            "perturbation": (linf if norm == "Linf" else l2).numpy(),
            "eps": float("nan") if eps is None else float(eps),
        },
        columns=COLUMNS,
    )
    return table


def adversarial_expectations(
    n_images: int, image_shape: tuple[int, int, int], eps: float | None, tolerance: float
) -> list[Any]:
    """The suite's expectations (``great_expectations.expectations`` objects).

    Args:
        n_images: number of clean images (the expected row count).
        image_shape: the clean images' ``(C, H, W)``.
        eps: perturbation bound; ``None`` skips the bound (unbounded attacks such as C&W).
        tolerance: added to ``eps`` for float rounding.
    """
    import great_expectations.expectations as gxe

    channels, height, width = image_shape
    expectations = [
        gxe.ExpectTableRowCountToEqual(value=n_images),
        gxe.ExpectTableColumnsToMatchSet(column_set=COLUMNS, exact_match=True),
        gxe.ExpectColumnValuesToBeUnique(column="index"),
        gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[channels]),
        gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[height]),
        gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[width]),
    ]
    # GX value-range expectations skip nulls: NaN pixels/distances are caught here
    for column in ("index", "label", "pixel_min", "pixel_max", "perturbation"):
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
    expectations += [
        gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0.0, max_value=1.0),
    ]
    if eps is not None:
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="perturbation", min_value=0.0, max_value=float(eps) + tolerance
            )
        )
    return expectations


def validate_adversarial(
    clean: Tensor,
    adv: Tensor,
    labels: Tensor,
    eps: float | None,
    norm: str,
    attack_name: str,
    tolerance: float = 1e-4,
    indices: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Check one attack's adversarial examples with a Great Expectations suite.

    Expectations: row count = number of clean images; the table's columns; unique, non-null
    ``index``; every image has the clean ``(C, H, W)``; no NaN label, pixel or perturbation;
    ``pixel_min``/``pixel_max`` in ``[0, 1]`` (exactly); and, unless ``eps`` is ``None``,
    perturbation in ``norm`` ≤ ``eps + tolerance``.

    Args:
        clean: float ``[N, C, H, W]`` clean images in ``[0, 1]``.
        adv: the attack's output for ``clean`` (float ``[N, C, H, W]`` expected).
        labels: ``[N]`` true classes.
        eps: the attack's bound on the ``[0, 1]`` scale (8/255 for ℓ∞, 0.5 for ℓ2);
            ``None`` for attacks without a bound (C&W ℓ2): the norm is then recorded but
            not bounded.
        norm: ``"Linf"`` or ``"L2"`` (over C, H, W).
        attack_name: names the suite (``adversarial_<attack_name>``).
        tolerance: slack on ``eps`` for float rounding (default 1e-4).
        indices: dataset index of each clean image (default ``0 .. N-1``).

    Returns:
        :func:`~atop.validation.core.validate_table`'s JSON-able summary, with ``attack``,
        ``norm``, ``eps`` and the largest perturbation (``max_perturbation``) added.

    Raises:
        DataValidationError: some expectation failed; the message names each one (e.g.
            ``expect_column_values_to_be_between(column='perturbation', ...)``).
        ValueError: inputs that cannot be tabulated (not 4-D float images, labels or
            indices not ``[N]``, unknown norm) or a negative ``eps``/``tolerance``.
    """
    from atop.validation.core import validate_table

    if eps is not None and eps < 0:
        raise ValueError(f"eps must be >= 0 or None (unbounded), got {eps!r}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    table = adversarial_table(clean, adv, labels, eps, norm, indices)
    suite_name = "adversarial_" + re.sub(r"[^A-Za-z0-9_]+", "_", attack_name)
    expectations = adversarial_expectations(len(clean), tuple(clean.shape[1:]), eps, tolerance)
    summary = validate_table(table, suite_name, expectations)
    max_perturbation = table["perturbation"].max()
    summary.update(
        attack=attack_name,
        norm=norm,
        eps=eps,
        max_perturbation=None if pd.isna(max_perturbation) else float(max_perturbation),
    )
    return summary

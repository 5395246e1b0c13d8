"""Great Expectations suite for an ingested image split (one row per image)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from atop.validation.core import validate_table

#: Columns of the per-image table.
IMAGE_TABLE_COLUMNS = (
    "index",
    "label",
    "height",
    "width",
    "channels",
    "pixel_min",
    "pixel_max",
    "pixel_mean",
    "class_share",
)


def image_table(images: torch.Tensor, labels: torch.Tensor) -> pd.DataFrame:
    """Per-image statistics of a split.

    Args:
        images: ``uint8 [N, C, H, W]`` (values 0..255). Any other rank still yields a
            table (height/width/channels then record what was found) so that a wrong
            shape is reported by the suite rather than crashing here.
        labels: ``int64 [N]`` class indices.

    Returns:
        DataFrame with :data:`IMAGE_TABLE_COLUMNS`; ``class_share`` is the fraction of
        the split's images that carry this row's label (for the class-balance check).

    Raises:
        ValueError: ``images`` and ``labels`` disagree in length.
    """
    n = int(images.shape[0]) if images.dim() > 0 else 0
    if labels.shape[0] != n:
        raise ValueError(
            f"{n} images but {labels.shape[0]} labels: the split's files are inconsistent."
        )
    shape = tuple(images.shape[1:]) if images.dim() == 4 else (0, 0, 0)
    flat = images.reshape(n, -1)
    labels_np = labels.to(torch.int64).numpy()
    counts = pd.Series(labels_np).value_counts()
    return pd.DataFrame(
        {
            "index": range(n),
            "label": labels_np,
            "height": shape[1],
            "width": shape[2],
            "channels": shape[0],
            "pixel_min": flat.amin(dim=1).numpy().astype("int64") if n else [],
            "pixel_max": flat.amax(dim=1).numpy().astype("int64") if n else [],
            "pixel_mean": flat.float().mean(dim=1).numpy() if n else [],
            "class_share": (pd.Series(labels_np).map(counts) / max(n, 1)).to_numpy(),
        }
    )


def image_split_expectations(
    *,
    num_classes: int,
    image_size: int,
    expected_rows: int | None,
    class_share: tuple[float, float],
    all_classes_present: bool = True,
) -> list[Any]:
    """Expectations for one split's :func:`image_table`.

    Args:
        num_classes: labels must lie in ``0 .. num_classes - 1``.
        image_size: every image is ``3 x image_size x image_size``.
        expected_rows: exact number of images, or None for "at least ``num_classes``".
        class_share: ``(min, max)`` fraction of the split each present class may hold
            (``(0.1, 0.1)`` = perfectly balanced 10-class split).
        all_classes_present: every class index occurs at least once.
    """
    import great_expectations.expectations as gxe

    lo, hi = class_share
    eps = 1e-9
    expectations = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(IMAGE_TABLE_COLUMNS), exact_match=True),
        (
            gxe.ExpectTableRowCountToEqual(value=int(expected_rows))
            if expected_rows is not None
            else gxe.ExpectTableRowCountToBeBetween(min_value=num_classes)
        ),
        gxe.ExpectColumnValuesToBeUnique(column="index"),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnDistinctValuesToBeInSet(column="label", value_set=list(range(num_classes))),
        gxe.ExpectColumnValuesToBeBetween(
            column="class_share", min_value=lo - eps, max_value=hi + eps
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="height", min_value=image_size, max_value=image_size
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="width", min_value=image_size, max_value=image_size
        ),
        gxe.ExpectColumnValuesToBeBetween(column="channels", min_value=3, max_value=3),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
        # A split of natural images is neither blank nor saturated on average.
        gxe.ExpectColumnMeanToBeBetween(column="pixel_mean", min_value=20, max_value=235),
    ]
    if all_classes_present:
        expectations.append(
            gxe.ExpectColumnDistinctValuesToContainSet(
                column="label", value_set=list(range(num_classes))
            )
        )
    return expectations


def validate_image_split(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    split_name: str,
    num_classes: int,
    image_size: int,
    expected_rows: int | None,
    class_share: tuple[float, float],
    all_classes_present: bool = True,
) -> dict[str, Any]:
    """Run the image-split suite; see :func:`image_split_expectations` for the checks.

    Returns:
        the JSON-able summary of :func:`atop.validation.core.validate_table`.

    Raises:
        atop.validation.DataValidationError: an expectation failed (each one is named).
    """
    return validate_table(
        image_table(images, labels),
        split_name,
        image_split_expectations(
            num_classes=num_classes,
            image_size=image_size,
            expected_rows=expected_rows,
            class_share=class_share,
            all_classes_present=all_classes_present,
        ),
    )

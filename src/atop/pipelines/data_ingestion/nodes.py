"""Nodes of the data ingestion stage: read, validate (Great Expectations), fix the
evaluation subset. Plain functions, no Kedro imports."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from atop.pipelines.data_ingestion.sources import RawSplits, read_dataset
from atop.validation.data import validate_image_split

logger = logging.getLogger(__name__)

#: Searched after the explicit root; relative to the project folder Kedro runs from.
PROJECT_RAW = Path("data") / "01_raw"


def _dataset_params(params: dict[str, Any]) -> dict[str, Any]:
    name = params["dataset"]
    per_dataset = params.get("datasets", {})
    if name not in per_dataset:
        raise ValueError(
            f"data_ingestion.dataset='{name}' has no entry under data_ingestion.datasets "
            f"(known: {sorted(per_dataset)}). Add one in conf/base/parameters_data_ingestion.yml."
        )
    return per_dataset[name]


def ingest_dataset(params: dict[str, Any]) -> RawSplits:
    """Read the configured dataset's train and test splits (not yet validated).

    Args:
        params: ``data_ingestion`` parameters: ``dataset``, ``root``, ``download``,
            ``datasets.<name>.image_size``.

    Returns:
        :class:`RawSplits`: uint8 ``[N, 3, H, W]`` images, int64 labels, class names.
    """
    spec = _dataset_params(params)
    raw = read_dataset(
        params["dataset"],
        root=params.get("root"),
        project_raw=Path(params.get("raw_dir") or PROJECT_RAW),
        download=bool(params.get("download", False)),
        image_size=int(spec.get("image_size", 32)),
    )
    logger.info(
        "%s: %d train / %d test images of %s, %d classes (from %s)",
        params["dataset"],
        len(raw.train_labels),
        len(raw.test_labels),
        tuple(raw.train_images.shape[1:]),
        len(raw.class_names),
        raw.root,
    )
    return raw


def validate_dataset(
    raw: RawSplits, params: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """Check both splits with Great Expectations; only validated data goes downstream.

    Args:
        raw: output of :func:`ingest_dataset`.
        params: ``data_ingestion`` parameters (``datasets.<name>``: ``image_size``,
            ``expected_rows.{train,test}``, ``class_share.{train,test}``,
            ``all_classes_present``).

    Returns:
        ``train_set``, ``test_set`` (``{"images": uint8 [N,3,H,W], "labels": int64 [N]}``),
        ``class_names`` and the validation report (JSON-able).

    Raises:
        atop.validation.DataValidationError: an expectation failed; nothing is written.
    """
    spec = _dataset_params(params)
    num_classes = len(raw.class_names)
    report: dict[str, Any] = {"dataset": params["dataset"], "root": str(raw.root), "splits": {}}
    splits = {"train": (raw.train_images, raw.train_labels), "test": (raw.test_images, raw.test_labels)}
    for split, (images, labels) in splits.items():
        report["splits"][split] = validate_image_split(
            images,
            labels,
            split_name=f"{params['dataset']}_{split}",
            num_classes=num_classes,
            image_size=int(spec.get("image_size", 32)),
            expected_rows=spec.get("expected_rows", {}).get(split),
            class_share=tuple(spec["class_share"][split]),
            all_classes_present=bool(spec.get("all_classes_present", True)),
        )
    report["success"] = all(s["success"] for s in report["splits"].values())
    train_set = {"images": raw.train_images, "labels": raw.train_labels}
    test_set = {"images": raw.test_images, "labels": raw.test_labels}
    return train_set, test_set, list(raw.class_names), report


def select_eval_subset(test_set: dict[str, torch.Tensor], params: dict[str, Any]) -> list[int]:
    """Draw the fixed evaluation subset shared by every method (paper: 512 test images).

    Args:
        test_set: the validated test split.
        params: ``eval_subset.size`` (images) and ``eval_subset.seed``.

    Returns:
        ``size`` distinct test indices, sorted, drawn with ``torch.randperm`` from a
        generator seeded with ``seed`` (identical across runs and machines).

    Raises:
        ValueError: ``size`` is not in ``1 .. len(test_set)``.
    """
    n = int(test_set["labels"].shape[0])
    size = int(params["eval_subset"]["size"])
    if not 1 <= size <= n:
        raise ValueError(
            f"data_ingestion.eval_subset.size={size} but the test split has {n} images; "
            f"choose a size between 1 and {n}."
        )
    generator = torch.Generator().manual_seed(int(params["eval_subset"]["seed"]))
    indices = torch.randperm(n, generator=generator)[:size].sort().values
    return [int(i) for i in indices]

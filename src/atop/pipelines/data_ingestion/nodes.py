"""Nodes of the data ingestion stage: read, validate (Great Expectations), fix the
evaluation subset. Plain functions, no Kedro imports."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atop.data import random_subset
from atop.params import Params, run_only, spec
from atop.pipelines.data_ingestion.sources import DATASETS, RawSplits, read_dataset
from atop.validation.data import validate_image_split

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass(init=False, frozen=True)
class DatasetFacts(Params):
    """``data_ingestion.datasets.<name>``: facts the Great Expectations suite checks."""

    image_size: int = spec(ge=8, unit="(px; ImageNette images are resized to it)")
    expected_rows: dict[str, int | None]
    class_share: dict[str, list[float]]
    all_classes_present: bool

    def check(self) -> None:
        for key in ("expected_rows", "class_share"):
            if set(getattr(self, key)) != set(SPLITS):
                self.fail(key, f"give exactly the splits {SPLITS}.")
        for split, (low, high) in self.class_share.items():
            if not 0 <= low <= high <= 1:
                self.fail(f"class_share.{split}", f"need 0 <= low <= high <= 1, got {[low, high]}.")


@dataclass(init=False, frozen=True)
class EvalSubsetParams(Params):
    """``data_ingestion.eval_subset`` / ``monitor_subset``: a fixed subset of the test split."""

    images: int = spec(ge=1, unit="(test images; the paper: 512)")
    seed: int = spec(ge=0)


@dataclass(init=False, frozen=True)
class IngestionParams(Params):
    """``data_ingestion`` (conf/base/parameters_data_ingestion.yml)."""

    KEY = "data_ingestion"

    dataset: str = spec(choices=DATASETS)
    root: str | None = run_only()
    download: bool = run_only()
    raw_dir: str = run_only()
    eval_subset: EvalSubsetParams
    monitor_subset: EvalSubsetParams
    datasets: dict[str, DatasetFacts]

    def check(self) -> None:
        if self.dataset not in self.datasets:
            self.fail(
                "datasets",
                f"no entry for dataset {self.dataset!r} (known: {sorted(self.datasets)}).",
            )

    @property
    def facts(self) -> DatasetFacts:
        """The chosen dataset's :class:`DatasetFacts`."""
        return self.datasets[self.dataset]


def ingest_dataset(params: IngestionParams) -> RawSplits:
    """Read the configured dataset's train and test splits (not yet validated).

    Args:
        params: ``data_ingestion`` parameters: ``dataset``, ``root``, ``download``,
            ``datasets.<name>.image_size``.

    Returns:
        :class:`RawSplits`: uint8 ``[N, 3, H, W]`` images, int64 labels, class names.
    """
    raw = read_dataset(
        params.dataset,
        root=params.root,
        project_raw=Path(params.raw_dir),
        download=params.download,
        image_size=params.facts.image_size,
    )
    logger.info(
        "%s: %d train / %d test images of %s, %d classes (from %s)",
        params.dataset,
        len(raw.train_labels),
        len(raw.test_labels),
        tuple(raw.train_images.shape[1:]),
        len(raw.class_names),
        raw.root,
    )
    return raw


def validate_dataset(
    raw: RawSplits, params: IngestionParams
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
    facts = params.facts
    num_classes = len(raw.class_names)
    report: dict[str, Any] = {"dataset": params.dataset, "root": str(raw.root), "splits": {}}
    splits = {
        "train": (raw.train_images, raw.train_labels),
        "test": (raw.test_images, raw.test_labels),
    }
    for split, (images, labels) in splits.items():
        report["splits"][split] = validate_image_split(
            images,
            labels,
            split_name=f"{params.dataset}_{split}",
            num_classes=num_classes,
            image_size=facts.image_size,
            expected_rows=facts.expected_rows[split],
            class_share=tuple(facts.class_share[split]),
            all_classes_present=facts.all_classes_present,
        )
    report["success"] = all(s["success"] for s in report["splits"].values())
    train_set = {"images": raw.train_images, "labels": raw.train_labels}
    test_set = {"images": raw.test_images, "labels": raw.test_labels}
    return train_set, test_set, list(raw.class_names), report


def select_eval_subset(test_set: dict[str, torch.Tensor], params: IngestionParams) -> list[int]:
    """Draw the fixed evaluation subset shared by every method (paper: 512 test images).

    Returns:
        ``eval_subset.images`` distinct test indices, sorted, from a permutation seeded with
        ``eval_subset.seed`` (:func:`atop.data.random_subset`; identical across machines).

    Raises:
        ValueError: more images asked for than the test split holds.
    """
    n = int(test_set["labels"].shape[0])
    size = params.eval_subset.images
    if size > n:
        raise ValueError(
            f"data_ingestion.eval_subset.images={size} but the test split has {n} images; "
            f"choose 1 to {n}."
        )
    return [int(i) for i in random_subset(n, size, params.eval_subset.seed)]


def select_monitor_subset(
    test_set: dict[str, torch.Tensor], eval_indices: list[int], params: IngestionParams
) -> list[int]:
    """The held-out test images every stage monitors its training on (per-epoch accuracy,
    PSNR, validation), drawn outside the evaluation subset: no evaluated image is ever seen
    before the evaluation.

    Returns:
        ``monitor_subset.images`` test indices, sorted, disjoint from ``eval_indices``.

    Raises:
        ValueError: fewer test images outside the evaluation subset than asked for.
    """
    n = int(test_set["labels"].shape[0])
    size = params.monitor_subset.images
    if size > n - len(eval_indices):
        raise ValueError(
            f"data_ingestion.monitor_subset.images={size} but only {n - len(eval_indices)} test "
            "images lie outside the evaluation subset: lower it."
        )
    chosen = random_subset(n, size, params.monitor_subset.seed, exclude=eval_indices)
    return [int(i) for i in chosen]

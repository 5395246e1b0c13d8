"""End-to-end runs of the PGD adversarial-training stage on real CIFAR-10 and CIFAR-100
images with the smoke parameters (SequentialRunner, in-memory catalog)."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from atop.data import random_subset
from atop.datasets import TorchDataset
from atop.models import load_classifier
from atop.params import Params
from atop.pipelines.adversarial_training import create_pipeline
from tests.conftest import KeptMemoryDataset, run_kedro, stage_params

INPUTS = ("train_set", "test_set", "class_names", "monitor_indices")


def smoke_params(stage: str, tmp_path: Path, **changes) -> Params:
    """The typed ``params:<stage>`` of the smoke profile exactly as Kedro builds it
    (:func:`tests.conftest.stage_params`), with the resume file in ``tmp_path`` and the
    top-level ``changes``."""
    return stage_params(stage, resume_path=str(tmp_path / "resume" / f"{stage}.pt"), **changes)


def held_out(n_test: int, eval_indices: list[int], size: int) -> list[int]:
    """``size`` test indices outside ``eval_indices``, drawn as data_ingestion draws
    ``monitor_indices`` (the held-out images every stage monitors its training on)."""
    return [int(i) for i in random_subset(n_test, size, 1, exclude=eval_indices)]


def cifar10_inputs(data_root: Path) -> dict:
    """192 real CIFAR-10 train images, 64 real test images, class names, eval indices (the
    even test images) and monitor indices (the odd ones)."""
    from torchvision.datasets import CIFAR10

    def split(train: bool, n: int) -> dict:
        ds = CIFAR10(root=str(data_root), train=train, download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data[:n])).permute(0, 3, 1, 2)
        return {"images": images.contiguous(), "labels": torch.tensor(ds.targets[:n])}

    names = CIFAR10(root=str(data_root), train=False, download=False).classes
    eval_indices = list(range(0, 64, 2))
    return {
        "train_set": split(True, 192),
        "test_set": split(False, 64),
        "class_names": list(names),
        "eval_indices": eval_indices,
        "monitor_indices": held_out(64, eval_indices, 32),
    }


def cifar100_inputs(data_root: Path) -> dict:
    """The real CIFAR-100 sample: 486 train and 916 test images (100 classes), 58 eval and
    64 monitor indices."""
    folder = data_root / "cifar-100-sample"
    sample = np.load(folder / "cifar100_head.npz")
    with open(folder / "meta", "rb") as fh:
        names = pickle.load(fh, encoding="latin1")["fine_label_names"]

    def split(prefix: str) -> dict:
        rows = sample[f"{prefix}_data"]
        images = torch.from_numpy(rows.reshape(-1, 3, 32, 32).copy())
        labels = torch.from_numpy(sample[f"{prefix}_fine_labels"][: len(rows)].astype(np.int64))
        return {"images": images, "labels": labels}

    test_set = split("test")
    eval_indices = list(range(0, 916, 16))
    return {
        "train_set": split("train"),
        "test_set": test_set,
        "class_names": list(names),
        "eval_indices": eval_indices,
        "monitor_indices": held_out(len(test_set["labels"]), eval_indices, 64),
    }


def run_stage(pipeline, stage: str, inputs: dict, params: Params, outputs: tuple[str, ...]) -> dict:
    """Run ``pipeline`` on an in-memory catalog holding ``INPUTS`` and the typed
    ``params:<stage>``; returns every output."""
    assert pipeline.inputs() == {*INPUTS, f"params:{stage}"}  # monitored on monitor_indices
    catalog = DataCatalog()
    for name in INPUTS:
        catalog[name] = MemoryDataset(inputs[name])
    catalog[f"params:{stage}"] = MemoryDataset(params)
    for name in outputs:
        catalog[name] = KeptMemoryDataset()
    SequentialRunner().run(pipeline, catalog)
    return {name: catalog[name].load() for name in outputs}


def check_metrics(metrics: dict, params: Params, n_test: int) -> None:
    """The quick-check metrics are complete and in range."""
    for key in ("clean_test_acc", "subset_clean_acc", "pgd_robust_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["robust_images"] == params.robust_eval.images
    assert metrics["pgd_steps"] == params.robust_eval.steps
    assert metrics["n_test"] == n_test
    assert metrics["train_seconds"] > 0 and metrics["epochs"] == params.epochs


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_adversarial_training_runs_end_to_end(dataset, data_root, tmp_path):
    inputs = (cifar10_inputs if dataset == "cifar10" else cifar100_inputs)(data_root)
    params = smoke_params("adversarial_training", tmp_path)
    assert params.attack.eps == pytest.approx(8 / 255)  # base value kept by the merge
    outputs = ("pgd_at_classifier", "adversarial_training_history", "adversarial_training_metrics")
    out = run_stage(create_pipeline(), "adversarial_training", inputs, params, outputs)

    # the checkpoint survives the catalog's safe save/load and rebuilds as the evaluation does
    dataset_file = TorchDataset(str(tmp_path / "pgd_at_classifier.pt"))
    dataset_file.save(out["pgd_at_classifier"])
    model = load_classifier(dataset_file.load(), expected_arch="resnet-fast")
    num_classes = len(inputs["class_names"])
    assert model(inputs["test_set"]["images"][:4].float() / 255).shape == (4, num_classes)
    meta = out["pgd_at_classifier"]["meta"]
    assert meta["attack"]["steps"] == params.attack.steps
    assert meta["n_train"] == min(params.train_images, len(inputs["train_set"]["labels"]))

    history = out["adversarial_training_history"]
    assert list(history.columns) == ["epoch", "loss", "adv_acc", "lr", "seconds", "test_acc"]
    assert len(history) == params.epochs
    assert all(math.isfinite(v) for v in history.to_numpy().ravel())
    check_metrics(out["adversarial_training_metrics"], params, len(inputs["test_set"]["labels"]))
    assert not Path(params.resume_path).exists()  # removed after a successful run


def test_kedro_runs_both_baselines_with_the_project_catalog(ingested_project, monkeypatch):
    """`kedro run --pipelines adversarial_training` / `rvs` (smoke env) on the ingested real
    CIFAR-10 write every catalog output where the catalog says."""
    monkeypatch.chdir(ingested_project)  # parameters' resume paths are relative to the project
    run_kedro(ingested_project, "adversarial_training")
    run_kedro(ingested_project, "rvs")
    data = ingested_project / "data"
    for path in (
        "06_models/cifar10/smoke/pgd_at_classifier.pt",
        "06_models/cifar10/smoke/rvs_classifier.pt",
        "06_models/cifar10/smoke/rvs_generator.pt",
        "08_reporting/cifar10/smoke/adversarial_training_history.csv",
        "08_reporting/cifar10/smoke/rvs_history.csv",
    ):
        assert (data / path).is_file(), path
    for stage in ("adversarial_training", "rvs"):
        metrics = json.loads(
            (data / f"08_reporting/cifar10/smoke/{stage}_metrics.json").read_text()
        )
        assert metrics["n_test"] == 10_000 and 0 <= metrics["pgd_robust_acc"] <= 1
    assert not list((data / "06_models/cifar10/smoke/resume").glob("*.pt"))

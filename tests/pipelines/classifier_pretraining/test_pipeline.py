"""The classifier_pretraining pipeline end to end on real CIFAR-10 (smoke profile)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner

from atop.checkpoint import CheckpointError, load_safe
from atop.datasets import TorchDataset
from atop.models import load_classifier
from atop.pipelines.classifier_pretraining import create_pipeline
from atop.pipelines.classifier_pretraining.nodes import HISTORY_COLUMNS
from atop.trainers import common
from atop.trainers.classifier import ClassifierParams
from atop.trainers.common import channel_stats
from tests.conftest import KeptMemoryDataset, run_kedro, stage_params

CLASS_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
#: Held-out test images (data_ingestion's monitor_indices): the odd ones of the 256.
MONITOR = list(range(1, 256, 2))
OUTPUTS = ("classifier", "classifier_history", "classifier_metrics")


@pytest.fixture(scope="module")
def splits(data_root, cifar10_test_batch) -> tuple[dict, dict]:
    """512 real training images (data_batch_1) and the 256 real test images, as uint8."""
    with open(data_root / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")  # the official CIFAR-10 python format
    images = torch.from_numpy(np.asarray(batch["data"][:512], dtype=np.uint8))
    train = {
        "images": images.reshape(512, 3, 32, 32).contiguous(),
        "labels": torch.tensor(batch["labels"][:512], dtype=torch.int64),
    }
    test_images, test_labels = cifar10_test_batch
    test = {"images": (test_images * 255).round().to(torch.uint8), "labels": test_labels}
    return train, test


@pytest.fixture
def smoke_params(tmp_path) -> ClassifierParams:
    """The smoke profile's typed parameters (deep-merged over base), resume file in tmp_path."""
    params = stage_params("classifier_pretraining")
    assert isinstance(params, ClassifierParams)
    # the globals interpolation resolves inside parameters
    assert params.resume_path == "data/06_models/cifar10/smoke/resume/classifier_pretraining.pt"
    return params.replace(resume_path=str(tmp_path / "resume" / "classifier_pretraining.pt"))


def run_pipeline(splits, params: ClassifierParams, classifier_path=None) -> dict:
    """Run the pipeline on an in-memory catalog (typed parameters); returns every output."""
    train, test = splits
    catalog = DataCatalog()
    catalog["train_set"] = MemoryDataset(train, copy_mode="assign")
    catalog["test_set"] = MemoryDataset(test, copy_mode="assign")
    catalog["class_names"] = MemoryDataset(CLASS_NAMES)
    catalog["monitor_indices"] = MemoryDataset(MONITOR)
    catalog["params:classifier_pretraining"] = MemoryDataset(params)
    for name in OUTPUTS:
        catalog[name] = KeptMemoryDataset()
    if classifier_path is not None:
        catalog["classifier"] = TorchDataset(str(classifier_path))
    SequentialRunner().run(create_pipeline(), catalog)
    return {name: catalog[name].load() for name in OUTPUTS}


def test_pipeline_trains_saves_and_evaluates(splits, smoke_params, tmp_path):
    out = run_pipeline(splits, smoke_params, classifier_path=tmp_path / "classifier.pt")
    ckpt = load_safe(tmp_path / "classifier.pt")  # a safe (weights_only) file
    assert ckpt["arch"] == "resnet-fast" and ckpt["config"]["width"] == 8
    assert ckpt["config"]["num_classes"] == 10
    mean, std = channel_stats(splits[0]["images"])
    assert ckpt["config"]["mean"] == mean and ckpt["config"]["std"] == std
    model = load_classifier(ckpt, expected_arch="resnet-fast")
    with torch.no_grad():
        assert model(splits[1]["images"][:4].float() / 255).shape == (4, 10)

    history = out["classifier_history"]
    assert isinstance(history, pd.DataFrame) and list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2]
    assert history[["loss", "train_acc", "test_acc", "lr", "seconds"]].notna().all().all()
    assert history["test_acc"].between(0, 1).all() and (history["loss"] > 0).all()

    metrics = out["classifier_metrics"]
    assert set(metrics) == {
        "clean_test_acc",
        "train_seconds",
        "epochs",
        "arch",
        "device",
        "n_train",
        "n_test",
    }
    assert 0.0 <= metrics["clean_test_acc"] <= 1.0
    assert (metrics["arch"], metrics["epochs"], metrics["device"]) == ("resnet-fast", 2, "cpu")
    assert (metrics["n_train"], metrics["n_test"]) == (512, 256)
    assert metrics["train_seconds"] == pytest.approx(history["seconds"].sum())
    assert not (tmp_path / "resume" / "classifier_pretraining.pt").exists()


def test_each_epoch_scores_the_first_val_images_of_the_monitor_indices(
    splits, smoke_params, monkeypatch
):
    assert create_pipeline().inputs() == {
        "train_set",
        "test_set",
        "class_names",
        "monitor_indices",
        "params:classifier_pretraining",
    }
    real_accuracy = common.accuracy  # the per-epoch test_acc of the training loop
    scored: list[torch.Tensor] = []

    def recording(model, images, labels, *args, **kwargs):
        scored.append(images)
        return real_accuracy(model, images, labels, *args, **kwargs)

    monkeypatch.setattr(common, "accuracy", recording)
    out = run_pipeline(splits, smoke_params.replace(val_images=40, resume_path=None))
    expected = splits[1]["images"][MONITOR[:40]]
    assert len(scored) == 2 and all(torch.equal(images, expected) for images in scored)
    assert out["classifier_metrics"]["n_test"] == 256  # the final score: the full test set


def test_kedro_run_writes_the_catalog_outputs(ingested_project, monkeypatch):
    """`kedro run --env smoke --pipelines classifier_pretraining` after data_ingestion."""
    monkeypatch.chdir(ingested_project)  # the resume path is relative to the project
    run_kedro(ingested_project, "classifier_pretraining")
    data = ingested_project / "data"
    model = load_classifier(load_safe(data / "06_models/cifar10/smoke/classifier.pt"))
    assert model.feature_dim == 64  # smoke width 8
    history = pd.read_csv(data / "08_reporting/cifar10/smoke/classifier_history.csv")
    assert list(history.columns) == HISTORY_COLUMNS and len(history) == 2
    metrics = json.loads((data / "08_reporting/cifar10/smoke/classifier_metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_test"]) == (50_000, 10_000)
    assert not (data / "06_models/cifar10/smoke/resume/classifier_pretraining.pt").exists()


def test_interrupted_pipeline_resumes_to_the_same_classifier(
    splits, smoke_params, tmp_path, monkeypatch
):
    reference = run_pipeline(splits, smoke_params.replace(resume_path=None))

    class Crash(RuntimeError):
        pass

    real_accuracy = common.accuracy  # the per-epoch test_acc of the training loop
    calls: list[int] = []

    def crash_at_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # end of epoch 2, before its checkpoint
            raise Crash("simulated crash")
        return real_accuracy(*args, **kwargs)

    monkeypatch.setattr(common, "accuracy", crash_at_second_evaluation)
    with pytest.raises(Crash):
        run_pipeline(splits, smoke_params)
    resume_file = tmp_path / "resume" / "classifier_pretraining.pt"
    assert load_safe(resume_file)["epoch"] == 1
    monkeypatch.setattr(common, "accuracy", real_accuracy)

    resumed = run_pipeline(splits, smoke_params)
    pd.testing.assert_frame_equal(
        resumed["classifier_history"].drop(columns="seconds"),
        reference["classifier_history"].drop(columns="seconds"),
    )
    a, b = resumed["classifier"]["state_dict"], reference["classifier"]["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        resumed["classifier_metrics"]["clean_test_acc"]
        == (reference["classifier_metrics"]["clean_test_acc"])
    )
    assert not resume_file.exists()


def test_corrupted_checkpoints_raise_checkpoint_error(splits, smoke_params, tmp_path):
    resume_file = tmp_path / "resume" / "classifier_pretraining.pt"
    resume_file.parent.mkdir(parents=True)
    resume_file.write_bytes(b"\x80\x02 truncated")
    with pytest.raises(CheckpointError, match="corrupted"):
        run_pipeline(splits, smoke_params)

    classifier_file = tmp_path / "classifier.pt"
    classifier_file.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DatasetError) as info:
        TorchDataset(str(classifier_file)).load()
    assert isinstance(info.value.__cause__, CheckpointError)
    assert "rerun the stage" in str(info.value)

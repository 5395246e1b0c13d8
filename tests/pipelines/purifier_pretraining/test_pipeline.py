"""The purifier_pretraining pipeline end to end on real CIFAR-10 (smoke profile)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.matplotlib import MatplotlibDataset
from PIL import Image

from atop.checkpoint import load_safe
from atop.datasets import TorchDataset
from atop.models import build_classifier, classifier_checkpoint
from atop.models.purifier import build_purifier, load_purifier, purifier_checkpoint
from atop.params import ParameterError
from atop.pipelines.purifier_pretraining import create_pipeline
from atop.pipelines.purifier_pretraining.nodes import HISTORY_COLUMNS, evaluate_purifier
from atop.trainers import purifier as trainer
from atop.trainers.purifier import PurifierParams, psnr
from tests.conftest import PROJECT_ROOT, KeptMemoryDataset, run_kedro, stage_params

OUTPUTS = ("purifier", "purifier_history", "purifier_metrics")
TRANSFORM_KEYS = {
    "kind", "sigma", "missing_rate", "mask_block", "mask_number", "noise_resolution", "noise_route"
}  # fmt: skip


@pytest.fixture(scope="module")
def splits(data_root, cifar10_test_batch) -> tuple[dict, dict]:
    """256 real training images (data_batch_1) and the 256 real test images, as uint8."""
    with open(data_root / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")  # the official CIFAR-10 python format
    images = torch.from_numpy(np.asarray(batch["data"][:256], dtype=np.uint8))
    train = {
        "images": images.reshape(256, 3, 32, 32).contiguous(),
        "labels": torch.tensor(batch["labels"][:256], dtype=torch.int64),
    }
    test_images, test_labels = cifar10_test_batch
    test = {"images": (test_images * 255).round().to(torch.uint8), "labels": test_labels}
    return train, test


@pytest.fixture(scope="module")
def classifier() -> dict:
    """A small (randomly initialised) classifier checkpoint: the frozen f of the AP metric."""
    torch.manual_seed(0)
    config = {"num_classes": 10, "width": 8}
    return classifier_checkpoint(build_classifier("resnet-fast", **config), "resnet-fast", config)


#: The evaluation subset of these tests: every test image except 40; the monitor subset
#: (data_ingestion's monitor_indices) is those 40, so the 32 held-out images are its first 32.
EVAL_INDICES = [i for i in range(256) if i % 6 != 0 or i >= 240]
OUTSIDE = sorted(set(range(256)) - set(EVAL_INDICES))
MONITOR = OUTSIDE


@pytest.fixture
def smoke_params(tmp_path) -> PurifierParams:
    """The smoke profile's typed parameters (deep-merged over base), resume file in tmp_path."""
    params = stage_params("purifier_pretraining")
    assert isinstance(params, PurifierParams)
    assert params.resume_path == "data/06_models/cifar10/smoke/resume/purifier_pretraining.pt"
    return params.replace(resume_path=str(tmp_path / "resume" / "purifier_pretraining.pt"))


def run_pipeline(splits, classifier, params, tmp_path, eval_indices=EVAL_INDICES) -> dict:
    """Run the pipeline on an in-memory catalog (checkpoint and figure on disk)."""
    train, test = splits
    tmp_path.mkdir(parents=True, exist_ok=True)
    catalog = DataCatalog()
    catalog["train_set"] = MemoryDataset(train, copy_mode="assign")
    catalog["test_set"] = MemoryDataset(test, copy_mode="assign")
    catalog["eval_indices"] = MemoryDataset(eval_indices)
    catalog["monitor_indices"] = MemoryDataset(MONITOR)
    catalog["classifier"] = MemoryDataset(classifier, copy_mode="assign")
    catalog["params:purifier_pretraining"] = MemoryDataset(params)
    catalog["purifier"] = TorchDataset(str(tmp_path / "purifier.pt"))
    catalog["purifier_history"] = KeptMemoryDataset()
    catalog["purifier_metrics"] = KeptMemoryDataset()
    catalog["purifier_samples"] = MatplotlibDataset(filepath=str(tmp_path / "samples.png"))
    SequentialRunner().run(create_pipeline(), catalog)
    return {name: catalog[name].load() for name in OUTPUTS}


def test_pipeline_trains_saves_and_evaluates(splits, classifier, smoke_params, tmp_path):
    out = run_pipeline(splits, classifier, smoke_params, tmp_path)

    ckpt = load_safe(tmp_path / "purifier.pt")  # torch.load(weights_only=True)
    assert ckpt["arch"] == "gan-purifier" and ckpt["config"]["cnum"] == 8
    assert ckpt["config"]["generator"] == "unet" and ckpt["config"]["variant"] == "native"
    assert ckpt["config"]["image_size"] == 32  # from the data
    meta = ckpt["meta"]
    assert meta["stage"] == "purifier_pretraining"
    assert "train_seconds" not in meta  # same settings, same bytes: the history has the seconds
    assert meta["transform"] == {  # the authors' noise: sigma 0.25 at 256 px
        "kind": "rt2",
        "sigma": 0.25,
        "missing_rate": 0.25,
        "mask_block": None,
        "mask_number": 4,
        "noise_resolution": 256,
        "noise_route": "box",
    }
    assert set(meta["transform"]) == TRANSFORM_KEYS
    assert (meta["epochs"], meta["n_train"], meta["n_val"]) == (1, 64, 32)
    # held-out images: the first val_images of the monitor subset (outside eval_indices)
    assert meta["val_indices"] == MONITOR[:32]
    assert not set(meta["val_indices"]) & set(EVAL_INDICES)
    generator, discriminator = load_purifier(ckpt)
    assert discriminator is not None
    for name, module in (("generator", generator), ("discriminator", discriminator)):
        saved = ckpt["state_dict"][name]
        assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())

    history = out["purifier_history"]
    assert isinstance(history, pd.DataFrame) and list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1]
    assert history.notna().all().all() and (history["l1"] > 0).all()
    assert history["lr"].tolist() == [smoke_params.lr]
    assert history["val_psnr"].iloc[0] == pytest.approx(meta["val_psnr"])

    metrics = out["purifier_metrics"]
    assert set(metrics) >= {
        "psnr",
        "psnr_transformed",
        "ap_clean_acc",
        "classifier_clean_acc",
        "train_seconds",
        "epochs",
        "n_train",
        "transform",
        "purifier",
    }
    assert 0.0 <= metrics["ap_clean_acc"] <= 1.0 and 0.0 <= metrics["classifier_clean_acc"] <= 1.0
    assert 5.0 < metrics["psnr"] < 60.0 and metrics["psnr"] == pytest.approx(meta["val_psnr"])
    assert metrics["transform"] == meta["transform"] and metrics["purifier"] == ckpt["config"]
    assert (metrics["n_val"], metrics["draws"], metrics["n_train"]) == (32, 2, 64)
    # single-draw accuracy: the mean over 32 images x 2 fresh draws (a multiple of 1/64)
    assert metrics["ap_clean_acc"] * 64 == pytest.approx(round(metrics["ap_clean_acc"] * 64))
    assert metrics["train_seconds"] == pytest.approx(history["seconds"].sum())

    with Image.open(tmp_path / "samples.png") as png:  # 3 rows x n_samples columns
        assert png.format == "PNG" and png.width > png.height > 100
    assert not (tmp_path / "resume" / "purifier_pretraining.pt").exists()


def test_interrupted_pipeline_resumes_to_the_same_purifier(
    splits, classifier, smoke_params, tmp_path, monkeypatch
):
    params = smoke_params.replace(epochs=2)
    reference = run_pipeline(
        splits, classifier, params.replace(resume_path=None), tmp_path / "reference"
    )

    class Crash(RuntimeError):
        pass

    real_psnr = trainer.psnr  # called by the training's per-epoch evaluation
    calls: list[int] = []

    def crash_at_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # end of epoch 2, before its resume checkpoint
            raise Crash("simulated crash")
        return real_psnr(*args, **kwargs)

    monkeypatch.setattr(trainer, "psnr", crash_at_second_evaluation)
    with pytest.raises(Crash):
        run_pipeline(splits, classifier, params, tmp_path)
    resume_file = tmp_path / "resume" / "purifier_pretraining.pt"
    assert load_safe(resume_file)["epoch"] == 1
    monkeypatch.setattr(trainer, "psnr", real_psnr)

    resumed = run_pipeline(splits, classifier, params, tmp_path)
    pd.testing.assert_frame_equal(
        resumed["purifier_history"].drop(columns="seconds"),
        reference["purifier_history"].drop(columns="seconds"),
    )
    for name in ("generator", "discriminator"):
        a, b = (run["purifier"]["state_dict"][name] for run in (resumed, reference))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["purifier_metrics"]["psnr"] == reference["purifier_metrics"]["psnr"]
    assert not resume_file.exists()


def test_validation_uses_the_first_monitor_images(splits, smoke_params, monkeypatch):
    """The per-epoch PSNR is measured on test_set[monitor_indices[:val_images]]."""
    train, test = splits
    monitor = [5, 7, 11, 13] + MONITOR[4:]
    seen = []
    real_psnr = trainer.psnr

    def recording_psnr(x, reference):
        seen.append(reference.clone())
        return real_psnr(x, reference)

    monkeypatch.setattr(trainer, "psnr", recording_psnr)
    params = smoke_params.replace(val_images=4, max_batches_per_epoch=1, resume_path=None)
    ckpt, history = trainer.train_purifier(train, test, monitor, params)
    assert ckpt["meta"]["val_indices"] == [5, 7, 11, 13] and ckpt["meta"]["n_val"] == 4
    expected = test["images"][[5, 7, 11, 13]].float() / 255
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    assert history[-1]["val_psnr"] == pytest.approx(ckpt["meta"]["val_psnr"])


def test_psnr_of_known_errors():
    x = torch.full((2, 3, 4, 4), 0.5)
    noisy = x.clone()
    noisy[1] += 0.1  # MSE 0.01 -> 20 dB
    assert psnr(noisy, x).tolist() == pytest.approx([100.0, 20.0])


def test_dataset_purifier_mismatch_is_refused(splits, classifier, smoke_params):
    _, test = splits
    # image_size is taken from the data: a purifier.image_size parameter (here 64 on 32x32
    # images) is refused when the parameters are built, before any training.
    with pytest.raises(ParameterError, match=r"purifier\.image_size: .*taken from the data"):
        stage_params("purifier_pretraining", purifier={"cnum": 8, "image_size": 64})
    generator, discriminator = build_purifier({"cnum": 8, "disc_cnum": 8, "image_size": 64})
    meta = {"transform": {"kind": "rt2"}, "val_indices": MONITOR[:4]}
    ckpt = purifier_checkpoint(generator, discriminator, meta=meta)
    history = pd.DataFrame({"epoch": [1], "seconds": [2.0]})
    with pytest.raises(ValueError, match="trained on 64x64 images but test_set holds 32x32"):
        evaluate_purifier(ckpt, classifier, test, EVAL_INDICES, history, smoke_params)
    small, small_d = build_purifier({"cnum": 8, "disc_cnum": 8})
    bad = purifier_checkpoint(small, small_d, meta={**meta, "val_indices": EVAL_INDICES[:4]})
    with pytest.raises(ValueError, match="in the evaluation subset"):
        evaluate_purifier(bad, classifier, test, EVAL_INDICES, history, smoke_params)


def test_the_checkpoint_is_saved_last_and_its_time_read_from_the_history():
    """Kedro saves a node's outputs in their listed order: the history first, so a failed
    save of it leaves the previous checkpoint; the evaluation reads the time from it."""
    nodes = {node.name: node for node in create_pipeline().nodes}
    assert nodes["train_purifier"].outputs == ["purifier_history", "purifier"]
    assert "purifier_history" in nodes["evaluate_purifier"].inputs


def test_catalog_declares_the_outputs(tmp_path):
    """The base catalog: checkpoint via the safe dataset, CSV, JSON and PNG in 08_reporting."""
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="base") as session:
        catalog = session.load_context().catalog  # the catalog `kedro run --env base` builds
    assert isinstance(catalog["purifier"], TorchDataset)
    described = {name: str(catalog[name]) for name in (*OUTPUTS, "purifier_samples")}
    assert "data/06_models/cifar10/base/purifier.pt" in described["purifier"]
    assert "data/08_reporting/cifar10/base/purifier_history.csv" in described["purifier_history"]
    assert "data/08_reporting/cifar10/base/purifier_metrics.json" in described["purifier_metrics"]
    assert "data/08_reporting/cifar10/base/purifier_samples.png" in described["purifier_samples"]
    assert isinstance(catalog["purifier_samples"], MatplotlibDataset)


def test_kedro_run_writes_the_catalog_outputs(ingested_project, monkeypatch):
    """`kedro run --env smoke --pipelines purifier_pretraining` after the earlier stages."""
    monkeypatch.chdir(ingested_project)  # the resume path is relative to the project
    data = ingested_project / "data"
    if not (data / "06_models/cifar10/smoke/classifier.pt").exists():
        run_kedro(ingested_project, "classifier_pretraining")
    run_kedro(ingested_project, "purifier_pretraining")
    ckpt = load_safe(data / "06_models/cifar10/smoke/purifier.pt")
    assert set(ckpt["meta"]["transform"]) == TRANSFORM_KEYS and ckpt["config"]["cnum"] == 8
    eval_indices = json.loads((data / "05_model_input/cifar10/smoke/eval_indices.json").read_text())
    monitor = json.loads((data / "05_model_input/cifar10/smoke/monitor_indices.json").read_text())
    assert ckpt["meta"]["val_indices"] == monitor[:32]
    assert not set(ckpt["meta"]["val_indices"]) & set(eval_indices)
    history = pd.read_csv(data / "08_reporting/cifar10/smoke/purifier_history.csv")
    assert list(history.columns) == HISTORY_COLUMNS and len(history) == 1
    metrics = json.loads((data / "08_reporting/cifar10/smoke/purifier_metrics.json").read_text())
    assert metrics["n_train"] == 64 and metrics["transform"] == ckpt["meta"]["transform"]
    with Image.open(data / "08_reporting/cifar10/smoke/purifier_samples.png") as png:
        assert png.format == "PNG"
    assert not (data / "06_models/cifar10/smoke/resume/purifier_pretraining.pt").exists()

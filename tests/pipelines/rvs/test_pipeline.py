"""End-to-end runs of the RvS stage on real CIFAR-10 and CIFAR-100 images with the smoke
parameters (SequentialRunner, in-memory catalog)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from atop.checkpoint import load_safe, save_atomic
from atop.models import load_classifier
from atop.models.rvs import RvSGenerator
from atop.pipelines.rvs import create_pipeline
from tests.pipelines.adversarial_training.test_pipeline import (
    check_metrics,
    cifar10_inputs,
    cifar100_inputs,
    run_stage,
    smoke_params,
)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_rvs_runs_end_to_end(dataset, data_root, tmp_path):
    inputs = (cifar10_inputs if dataset == "cifar10" else cifar100_inputs)(data_root)
    params = smoke_params("rvs", tmp_path)
    assert params.label_smoothing == 0.5 and params.ot.reg == 0.01
    outputs = ("rvs_classifier", "rvs_generator", "rvs_history", "rvs_metrics")
    out = run_stage(create_pipeline(), "rvs", inputs, params, outputs)

    num_classes = len(inputs["class_names"])
    images = inputs["test_set"]["images"][:8].float() / 255
    save_atomic(out["rvs_classifier"], tmp_path / "rvs_classifier.pt")
    model = load_classifier(load_safe(tmp_path / "rvs_classifier.pt"))
    assert model(images).shape == (8, num_classes)

    # the generator checkpoint rebuilds and still respects eps
    save_atomic(out["rvs_generator"], tmp_path / "rvs_generator.pt")
    saved = load_safe(tmp_path / "rvs_generator.pt")
    assert saved["arch"] == "rvs-generator"
    # built for the dataset's image size, read from the data (nothing hard-coded)
    assert saved["config"]["image_size"] == inputs["train_set"]["images"].shape[-1]
    assert saved["config"]["eps"] == pytest.approx(8 / 255)
    generator = RvSGenerator(**saved["config"])
    generator.load_state_dict(saved["state_dict"])
    delta = generator.eval()(generator.sample_noise(8))
    assert delta.shape == images.shape
    assert delta.abs().max() <= params.generator.eps

    history = out["rvs_history"]
    assert {"loss", "ce", "ot", "adv_acc", "generator_ot", "test_acc", "lr"} <= set(history)
    assert len(history) == params.epochs
    assert all(math.isfinite(v) for v in history.to_numpy().ravel())
    assert (history["ot"] >= 0).all() and (history["generator_ot"] >= 0).all()
    check_metrics(out["rvs_metrics"], params, len(inputs["test_set"]["labels"]))
    assert not Path(params.resume_path).exists()

"""The noise ablations: the purifier pretrained and fine-tuned with AToP exactly as the main
job, but with sigma 0.25 added at 32 px (``sigma025``) or the authors' noise by the other
route (``upsample``: bilinear up to 256 px, noise, clip, area down)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from atop.checkpoint import load_safe
from atop.datasets import TorchDataset
from atop.evaluation.defenses import NOISE_ABLATIONS
from atop.models import build_classifier, classifier_checkpoint
from atop.models.purifier import load_purifier
from atop.pipelines.noise_ablation import create_pipeline
from atop.pipelines.noise_ablation import nodes as ablation_nodes
from atop.pipelines.noise_ablation.nodes import NoiseAblationParams, ablation_node
from atop.pipelines.noise_ablation.pipeline import ABLATIONS
from atop.transforms import TransformConfig
from tests.conftest import PROJECT_ROOT, KeptMemoryDataset, stage_params

#: The monitor subset of these tests: 40 of the 256 real test images.
MONITOR = list(range(0, 240, 6))
#: The outputs of the two nodes, in the order Kedro saves them: each checkpoint last.
PRETRAINING = ("purifier_history_sigma025", "purifier_sigma025")
FINETUNING = (
    "finetuning_history_atop_sigma025",
    "finetuning_metrics_atop_sigma025",
    "purifier_atop_sigma025",
)
OUTPUTS = (*PRETRAINING, *FINETUNING)


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


@pytest.mark.parametrize("env", ["base", "smoke", "paper"])
def test_each_ablation_changes_only_how_the_noise_is_added(env):
    """sigma025: the main transform with noise_resolution null (sigma 0.25 at the drawn
    side, 8x the authors' effective noise at 32 px); upsample: the main one by the authors'
    256-px route. The main one is the box route."""
    ablation = stage_params("noise_ablation", env=env)
    assert isinstance(ablation, NoiseAblationParams) and tuple(ablation.ablations) == ABLATIONS
    assert ABLATIONS == NOISE_ABLATIONS  # the evaluation's names for them
    main = stage_params("purifier_pretraining", env=env).transform
    assert main.noise_resolution == 256 and main.noise_route == "box"
    sigma025, upsample = ablation.ablations["sigma025"], ablation.ablations["upsample"]
    assert sigma025 == TransformConfig(
        "rt2", sigma=0.25, missing_rate=0.25, mask_block=None, mask_number=4
    )
    assert sigma025.to_dict() == {**main.to_dict(), "noise_resolution": None}
    assert sigma025.sigma_at(32) == 8 * main.sigma_at(32) == 0.25
    assert upsample.to_dict() == {**main.to_dict(), "noise_route": "upsample"}
    assert upsample.upsamples(32) and not main.upsamples(32)


def test_ablation_pretrains_with_the_main_settings_but_its_transform(splits, monkeypatch):
    seen = {}

    def recording_train(train_set, test_set, monitor_indices, params):
        seen.update(params=params, monitor=monitor_indices)
        return None, {"meta": {}}  # the node's order: history, then the checkpoint

    monkeypatch.setattr(ablation_nodes, "train_purifier", recording_train)
    main = stage_params("purifier_pretraining")
    ablation = stage_params("noise_ablation")
    node = ablation_node("upsample")
    assert node.__name__ == "train_purifier_upsample"
    node(*splits, MONITOR, main, ablation)
    assert seen["monitor"] == MONITOR
    assert seen["params"].transform == ablation.ablations["upsample"]
    # its own resume file (the main pretraining's is not overwritten); nothing else changed
    assert seen["params"].resume_path == main.resume_path.replace(".pt", "_upsample.pt")
    same = seen["params"].replace(transform=main.transform, resume_path=main.resume_path)
    assert same == main
    with pytest.raises(ValueError, match="noise_ablation.ablations has no 'sigma1'"):
        ablation_node("sigma1")(*splits, MONITOR, main, ablation)


def test_pipeline_wires_pretraining_then_atop():
    nodes = {node.name: node for node in create_pipeline().nodes}
    assert set(nodes) == {f"{kind}_{name}" for name in ABLATIONS
                          for kind in ("train_purifier", "evaluate_purifier", "finetune_atop")}  # fmt: skip
    # each ablation's purifier gets the main purifier's metrics (AP clean accuracy, PSNR)
    evaluate = nodes["evaluate_purifier_upsample"]
    assert evaluate.inputs[:2] == ["purifier_upsample", "classifier"]
    assert evaluate.outputs == ["purifier_metrics_upsample", "purifier_samples_upsample"]
    pretrain, atop = nodes["train_purifier_sigma025"], nodes["finetune_atop_sigma025"]
    assert pretrain.inputs == [
        "train_set",
        "test_set",
        "monitor_indices",
        "params:purifier_pretraining",
        "params:noise_ablation",
    ]
    assert pretrain.outputs == list(PRETRAINING)
    assert "purifier_sigma025" in atop.inputs and "purifier" not in atop.inputs
    assert "params:atop_finetuning" in atop.inputs  # the main job's fine-tuning settings
    assert atop.outputs == list(FINETUNING)


def test_catalog_declares_the_outputs():
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="base") as session:
        catalog = session.load_context().catalog
    described = {name: str(catalog[name]) for name in OUTPUTS}
    assert isinstance(catalog["purifier_sigma025"], TorchDataset)
    assert isinstance(catalog["purifier_atop_sigma025"], TorchDataset)
    assert "data/06_models/cifar10/base/purifier_sigma025.pt" in described["purifier_sigma025"]
    assert (
        "data/06_models/cifar10/base/purifier_atop_sigma025.pt"
        in described["purifier_atop_sigma025"]
    )
    assert "purifier_sigma025_history.csv" in described["purifier_history_sigma025"]
    assert "finetuning_atop_sigma025_metrics.json" in described["finetuning_metrics_atop_sigma025"]


def test_pipeline_runs_on_real_images(splits, tmp_path):
    """Smoke profile on real CIFAR-10: the ablation purifier carries its transform, and AToP
    fine-tunes that purifier (not the main one) with it."""
    train, test = splits
    torch.manual_seed(0)
    config = {"num_classes": 10, "width": 8}
    classifier = classifier_checkpoint(
        build_classifier("resnet-fast", **config), "resnet-fast", config
    )
    pretraining = stage_params(
        "purifier_pretraining", device="cpu", resume_path=str(tmp_path / "pretrain.pt")
    )
    finetuning = stage_params(
        "atop_finetuning", device="cpu", resume_path=str(tmp_path / "finetune_{arm}.pt")
    )
    catalog = DataCatalog()
    inputs = {
        "train_set": train,
        "test_set": test,
        "monitor_indices": MONITOR,
        "classifier": classifier,
        "class_names": [str(i) for i in range(10)],
        "params:purifier_pretraining": pretraining,
        "params:noise_ablation": stage_params("noise_ablation"),
        "params:atop_finetuning": finetuning,
    }
    for name, value in inputs.items():
        catalog[name] = MemoryDataset(value, copy_mode="assign")
    catalog["purifier_sigma025"] = TorchDataset(str(tmp_path / "purifier_sigma025.pt"))
    for name in OUTPUTS:
        if name != "purifier_sigma025":
            catalog[name] = KeptMemoryDataset()
    pipeline = create_pipeline().only_nodes("train_purifier_sigma025", "finetune_atop_sigma025")
    SequentialRunner().run(pipeline, catalog)

    ablated = load_safe(tmp_path / "purifier_sigma025.pt")
    expected = {**pretraining.transform.to_dict(), "noise_resolution": None}
    assert ablated["meta"]["transform"] == expected
    assert ablated["meta"]["val_indices"] == MONITOR[:32]
    atop = catalog["purifier_atop_sigma025"].load()
    assert atop["meta"]["transform"] == expected and atop["meta"]["stage"] == "atop_finetuning"
    metrics = catalog["finetuning_metrics_atop_sigma025"].load()
    assert metrics["arm"] == "atop" and metrics["transform"] == expected
    assert atop["meta"]["atop"] == {k: v for k, v in metrics.items() if k != "train_seconds"}
    assert "train_seconds" not in ablated["meta"]  # timings are in the histories
    assert atop["config"] == ablated["config"]
    generator, discriminator = load_purifier(atop)
    assert discriminator is not None
    assert len(catalog["purifier_history_sigma025"].load()) == 1

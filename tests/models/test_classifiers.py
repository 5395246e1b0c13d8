"""Tests of the classifier zoo (atop.models.classifiers) on real CIFAR-10 images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atop.checkpoint import CheckpointError, load_safe, save_atomic
from atop.models import (
    CLASSIFIERS,
    DATASET_STATS,
    build_classifier,
    classifier_checkpoint,
    load_classifier,
)

#: Small configurations of every architecture (fast tests) and the input side they take.
SMALL = {
    "wrn-28-10": ({"depth": 10, "widen_factor": 1}, 32, 64),
    "wrn-34-10": ({"depth": 10, "widen_factor": 2, "dropout": 0.3}, 32, 128),
    "wrn-70-16": ({"depth": 16, "widen_factor": 1}, 32, 64),
    "preact-resnet18": ({"width": 8}, 32, 64),
    "resnet-fast": ({"width": 8}, 32, 64),
    "resnet18": ({}, 32, 512),
    "resnet34": ({}, 32, 512),
    "resnet50": ({}, 32, 2048),
}


def test_registry_lists_every_architecture():
    assert set(CLASSIFIERS) == set(SMALL)
    with pytest.raises(ValueError, match="Unknown classifier 'vgg'"):
        build_classifier("vgg", 10)
    with pytest.raises(ValueError, match="depth = 6n"):
        build_classifier("wrn-28-10", 10, depth=27)
    with pytest.raises(TypeError):
        build_classifier("resnet-fast", 10, widen_factor=3)


@pytest.mark.parametrize("name", list(SMALL))
def test_shapes_features_and_input_gradients(name, cifar10_test_batch):
    kwargs, side, feature_dim = SMALL[name]
    images, _ = cifar10_test_batch
    x = F.interpolate(images[:4], size=side, mode="bilinear").clamp(0, 1)
    torch.manual_seed(0)
    model = build_classifier(name, num_classes=7, **kwargs).eval()
    x.requires_grad_(True)
    logits, features = model(x, return_features=True)
    assert logits.shape == (4, 7) and features.shape == (4, feature_dim)
    assert model.feature_dim == feature_dim
    assert torch.equal(logits, model(x))  # same logits with or without features
    logits.logsumexp(dim=1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["resnet-fast", "resnet18"])
def test_input_contract_rejects_bad_images(name, cifar10_test_batch):
    model = build_classifier(name, num_classes=10, **SMALL[name][0]).eval()
    x = cifar10_test_batch[0][:2]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model(x * 255)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model(x - 0.5)
    with pytest.raises(ValueError, match="float"):
        model((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(x[:, :1])
    model.check_range = False  # documented switch: no check, the model still runs
    assert model(x * 255).shape == (2, 10)


def test_normalization_happens_inside_with_the_given_statistics(cifar10_test_batch):
    mean, std = DATASET_STATS["cifar10"]
    model = build_classifier("resnet-fast", 10, width=8, mean=mean, std=std).eval()
    x = cifar10_test_batch[0][:8]
    normalized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected = model.head(model.embed(normalized)) * model.logit_scale
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert torch.allclose(model.mean.flatten(), torch.tensor(mean))
    with pytest.raises(ValueError, match="std > 0"):
        build_classifier("resnet-fast", 10, mean=mean, std=(0.2, 0.0, 0.2))


def test_real_wrn_28_10_builds_with_paper_size(cifar10_test_batch):
    model = build_classifier("wrn-28-10", num_classes=10).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 36_400_000 < n_params < 36_600_000  # WRN-28-10: 36.5 M
    with torch.no_grad():
        logits, features = model(cifar10_test_batch[0][:2], return_features=True)
    assert logits.shape == (2, 10) and features.shape == (2, 640)


def test_checkpoint_round_trip_through_a_safe_file(tmp_path, cifar10_test_batch):
    torch.manual_seed(0)
    config = {"num_classes": 10, "width": 8, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    model = build_classifier("resnet-fast", **config)
    model.train()
    model(cifar10_test_batch[0][:16])  # update BN running statistics
    model.eval()
    ckpt = classifier_checkpoint(model, "resnet-fast", config, {"epochs": 1})
    save_atomic(ckpt, tmp_path / "classifier.pt")
    loaded = load_classifier(load_safe(tmp_path / "classifier.pt"), expected_arch="resnet-fast")
    assert not loaded.training
    x = cifar10_test_batch[0][:8]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert ckpt["meta"] == {"epochs": 1}


def test_channels_last_classifier_computes_the_same_logits_and_gradients(cifar10_test_batch):
    from atop.training import autocast

    torch.manual_seed(0)
    config = {"num_classes": 10, "width": 16}
    model = build_classifier("resnet-fast", **config).train()
    model(cifar10_test_batch[0][:64])  # BN running statistics away from their init
    ckpt = classifier_checkpoint(model, "resnet-fast", config)
    nchw = load_classifier(ckpt).requires_grad_(False)
    nhwc = load_classifier(ckpt, channels_last=True).requires_grad_(False)
    assert not nhwc.training
    assert nhwc.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = cifar10_test_batch[0][:32], cifar10_test_batch[1][:32]
    for amp, tol in ((False, 1e-4), (True, 2e-2)):  # float32, then bf16 where available
        results = []
        for model in (nchw, nhwc):
            images = x.clone().requires_grad_(True)  # an NCHW input, as the attacks give
            with autocast(x.device, amp):
                logits = model(images).float()
            grad = torch.autograd.grad(F.cross_entropy(logits, y), images)[0]
            results.append((logits.detach(), grad))
        (la, ga), (lb, gb) = results
        assert torch.allclose(la, lb, atol=tol, rtol=tol)
        # a max-pool near-tie may route a pixel's gradient elsewhere: compare directions
        assert F.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.99
        assert torch.equal(la.argmax(1), lb.argmax(1))


def test_load_classifier_gives_clear_errors():
    config = {"num_classes": 10, "width": 8}
    ckpt = classifier_checkpoint(build_classifier("resnet-fast", **config), "resnet-fast", config)
    with pytest.raises(CheckpointError, match=r"keys \['state_dict'\] are missing"):
        load_classifier({k: v for k, v in ckpt.items() if k != "state_dict"})
    with pytest.raises(CheckpointError, match="'vgg' is unknown"):
        load_classifier({**ckpt, "arch": "vgg"})
    with pytest.raises(CheckpointError, match="'wrn-28-10' was expected"):
        load_classifier(ckpt, expected_arch="wrn-28-10")
    with pytest.raises(CheckpointError, match="do not fit 'preact-resnet18'"):
        load_classifier({**ckpt, "arch": "preact-resnet18"})  # other architecture's keys
    with pytest.raises(CheckpointError, match="do not fit"):
        load_classifier({**ckpt, "config": {**config, "width": 16}})  # shape mismatch
    with pytest.raises(CheckpointError, match="Cannot rebuild"):
        load_classifier({**ckpt, "config": {**config, "depth": 3}})
    with pytest.raises(ValueError, match="num_classes"):
        classifier_checkpoint(build_classifier("resnet-fast", 10), "resnet-fast", {})

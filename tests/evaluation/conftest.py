"""Checkpoint files for the library tests: a tiny classifier briefly trained on 512 real
CIFAR-10 training images (seconds) and a randomly initialised purifier (cnum 8).

Written with :func:`atop.checkpoint.save_atomic` exactly as the stages write theirs, so
:func:`atop.evaluation.load_defense` is tested on files, not on dicts held in memory.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atop.checkpoint import save_atomic
from atop.models import build_classifier, classifier_checkpoint
from atop.models.purifier import build_purifier, purifier_checkpoint

#: The paper's RT2 (noise + one mask), as the purifier stages record it in ``meta.transform``.
TRANSFORM = {
    "kind": "rt2",
    "sigma": 0.25,
    "missing_rate": 0.25,
    "mask_block": None,
    "mask_number": 4,
}
CLASSIFIER_CONFIG = {"num_classes": 10, "width": 8}


def classifier_dict(seed: int = 0, meta: dict | None = None) -> dict:
    """A randomly initialised resnet-fast (width 8) as a classifier checkpoint dict."""
    torch.manual_seed(seed)
    model = build_classifier("resnet-fast", 10, width=8)
    return classifier_checkpoint(model, "resnet-fast", CLASSIFIER_CONFIG, meta=meta)


def purifier_dict(seed: int = 0, meta: dict | None = None) -> dict:
    """A randomly initialised purifier (cnum 8) as a purifier checkpoint dict."""
    torch.manual_seed(seed)
    generator, discriminator = build_purifier({"cnum": 8})
    return purifier_checkpoint(generator, discriminator, meta=meta)


def trained_classifier_dict(data_root: Path) -> dict:
    """resnet-fast (width 8) trained for 4 epochs on the first 512 real training images."""
    with open(data_root / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")  # the official CIFAR-10 python format
    images = torch.from_numpy(np.asarray(batch["data"][:512], dtype=np.uint8))
    images = images.reshape(512, 3, 32, 32).float() / 255
    labels = torch.tensor(batch["labels"][:512])
    torch.manual_seed(0)
    model = build_classifier("resnet-fast", 10, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(4):
        for start in range(0, 512, 64):
            loss = F.cross_entropy(model(images[start : start + 64]), labels[start : start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return classifier_checkpoint(model, "resnet-fast", CLASSIFIER_CONFIG, meta={})


@pytest.fixture(scope="session")
def checkpoint_files(tmp_path_factory, data_root) -> dict[str, Path]:
    """``classifier.pt`` (briefly trained) and ``purifier.pt`` (meta.transform = RT2),
    saved atomically."""
    folder = tmp_path_factory.mktemp("checkpoints")
    files = {"classifier": folder / "classifier.pt", "purifier": folder / "purifier.pt"}
    save_atomic(trained_classifier_dict(data_root), files["classifier"])
    save_atomic(purifier_dict(meta={"transform": TRANSFORM}), files["purifier"])
    return files


@pytest.fixture(scope="session")
def eval_batch(checkpoint_files, cifar10_test_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """16 real test images: 12 the trained classifier gets right, then 4 it gets wrong."""
    from atop.evaluation import load_defense

    images, labels = cifar10_test_batch
    with torch.no_grad():
        right = load_defense(checkpoint_files["classifier"])(images).argmax(1) == labels
    assert right.sum() >= 12, "the briefly trained classifier should be right on a few images"
    index = torch.cat([right.nonzero()[:12, 0], (~right).nonzero()[:4, 0]])
    return images[index].contiguous(), labels[index].contiguous()

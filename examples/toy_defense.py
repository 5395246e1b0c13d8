"""A toy randomized defense whose robustness is all randomness: evaluate it as you would yours.

It stands in for YOUR model. The protocol needs only a ``torch.nn.Module`` mapping float32
``[N, 3, H, W]`` images in ``[0, 1]`` to logits ``[N, classes]``, random or not; a random one
must draw its randomness afresh at every call, in eval mode (here from torch's global RNG,
so :class:`atop.evaluation.suite.FixedRandomness` can hold one draw fixed).

* :class:`NoisyDefense`: fresh Gaussian noise (σ = 0.5 per pixel, 16x the 8/255 budget) is
  added to every input on every call, then a classifier trained on noisy images decides.
  Its only defense is the noise: with one draw held fixed it is a plain, nearly linear
  classifier.
* :class:`PatchClassifier`: the classifier behind the noise, trained in seconds on a CPU:
  random-patch convolution features (Coates & Ng 2011: whitened 5x5 patches of training
  images as filters, a two-sided ReLU, 2x2 average pooling) and a linear head fitted in
  closed form (ridge regression) on noisy CIFAR-10 training images.
* :func:`factory`: zero arguments, for ``atop evaluate --model examples.toy_defense:factory``.

The CIFAR-10 files (``cifar-10-batches-py``) are looked up in ``$ATOP_DATA_ROOT``, then
``../shared/datasets`` and ``data/01_raw`` beside the project (:func:`find_cifar10`).
"""

from __future__ import annotations

import functools
import os
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECT = Path(__file__).resolve().parents[1]
#: Noise of the defense, per pixel on the [0, 1] scale.
SIGMA = 0.5
#: The classifier's training recipe (fixed, so the example and ``factory()`` agree).
TRAIN_IMAGES = 10_000
FILTERS = 32
SEED = 0


def find_cifar10(root: str | os.PathLike | None = None) -> Path:
    """The folder holding ``cifar-10-batches-py``: ``root``, else ``$ATOP_DATA_ROOT``, else
    ``../shared/datasets`` or ``data/01_raw`` beside the project.

    Raises:
        FileNotFoundError: none of them holds the CIFAR-10 python batches.
    """
    given = root or os.environ.get("ATOP_DATA_ROOT")
    candidates = [Path(given)] if given else []
    candidates += [PROJECT.parent / "shared" / "datasets", PROJECT / "data" / "01_raw"]
    for folder in candidates:
        if (folder / "cifar-10-batches-py" / "test_batch").is_file():
            return folder / "cifar-10-batches-py"
    raise FileNotFoundError(
        f"CIFAR-10 (cifar-10-batches-py) not found in {[str(c) for c in candidates]}: set "
        "ATOP_DATA_ROOT to the folder that holds it."
    )


def load_cifar10(
    split: str, root: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """CIFAR-10 ``"train"`` (50,000 images, in file order) or ``"test"`` (10,000), the first
    ``limit`` only when given: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]`` labels."""
    folder = find_cifar10(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        if limit is not None and sum(map(len, labels)) >= limit:
            break
        with open(folder / name, "rb") as fh:  # the dataset's own format (pickled dicts)
            batch = pickle.load(fh, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    images, labels = np.concatenate(images)[:limit], np.concatenate(labels)[:limit]
    return torch.from_numpy(images), torch.from_numpy(labels)


class PatchClassifier(nn.Module):
    """Random-patch features and a linear head: float32 ``[N, 3, 32, 32]`` -> logits ``[N, 10]``.

    For each filter response ``z = w·patch + b``: ``relu(z - 0.25)`` and ``relu(-z - 0.25)``
    (one convolution with the filters ``w`` and ``-w``), average-pooled over the four image
    quadrants and standardized; logits = a linear layer. Everything is differentiable, so
    attacks get exact gradients.
    """

    def __init__(self, filters: int = FILTERS, size: int = 5, classes: int = 10) -> None:
        super().__init__()
        features = 2 * filters * 4
        self.register_buffer("weight", torch.zeros(2 * filters, 3, size, size))
        self.register_buffer("bias", torch.zeros(2 * filters))
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.head = nn.Linear(features, classes)

    def features(self, x: Tensor) -> Tensor:
        """Standardized features ``[N, 8 * filters]``."""
        h = F.relu(F.conv2d(x, self.weight, self.bias))
        return (F.adaptive_avg_pool2d(h, 2).flatten(1) - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class NoisyDefense(nn.Module):
    """``classifier(clip(x + σ·n))`` with fresh ``n ~ N(0, I)`` from torch's global RNG at
    every call (also in eval mode): a stochastic defense."""

    name = "toy_noise"  # its name in the verdicts and random streams
    stochastic = True  # read by `atop evaluate --model` when neither flag is given

    def __init__(self, classifier: nn.Module, sigma: float = SIGMA) -> None:
        super().__init__()
        self.classifier = classifier
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


def _whitened_filters(images: Tensor, filters: int, size: int, g: torch.Generator):
    """``filters`` random training patches, ZCA-whitened and normalized, and their negatives:
    conv weights ``[2 * filters, 3, size, size]`` and biases (the patch mean off, then the
    0.25 threshold)."""
    n = 10_000
    rows = torch.randint(0, len(images), (n,), generator=g)
    top, left = torch.randint(0, 33 - size, (2, n), generator=g)
    offsets = torch.arange(size)
    ys = (top[:, None] + offsets)[:, :, None]  # [n, size, 1]
    xs = (left[:, None] + offsets)[:, None, :]  # [n, 1, size]
    patches = images[
        rows[:, None, None, None], torch.arange(3)[None, :, None, None], ys[:, None], xs[:, None]
    ]
    patches = patches.flatten(1).double()
    mean = patches.mean(0)
    centred = patches - mean
    values, vectors = torch.linalg.eigh(centred.T @ centred / n)
    zca = vectors @ torch.diag((values + 1e-2).rsqrt()) @ vectors.T
    directions = centred[:filters] @ zca
    weight = (directions / directions.norm(dim=1, keepdim=True)) @ zca
    weight = torch.cat([weight, -weight]).float().reshape(2 * filters, 3, size, size)
    bias = -(weight.flatten(1).double() @ mean).float() - 0.25
    return weight, bias


@torch.no_grad()
def train_classifier(
    root: str | os.PathLike | None = None,
    images: int = TRAIN_IMAGES,
    filters: int = FILTERS,
    sigma: float = SIGMA,
    seed: int = SEED,
) -> PatchClassifier:
    """Fit :class:`PatchClassifier` on the first ``images`` CIFAR-10 training images, each
    with one draw of the defense's noise: filters from training patches, then the ridge
    head in closed form (float64). Deterministic for a seed on one machine.

    Returns:
        The classifier (eval mode, parameters frozen); ``fit_info``: ``{"seconds",
        "images", "train_accuracy"}``.
    """
    began = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x, labels = load_cifar10("train", root, limit=images)
    x = x.float() / 255
    model = PatchClassifier(filters)
    model.weight, model.bias = _whitened_filters(x, filters, 5, g)
    noisy = [
        (part + sigma * torch.randn(part.shape, generator=g)).clamp(0, 1) for part in x.split(100)
    ]
    features = torch.cat([model.features(part) for part in noisy])
    model.mean, model.std = features.mean(0), features.std(0) + 1e-3
    z = (features - model.mean) / model.std
    design = torch.cat([z, torch.ones(len(z), 1)], dim=1).double()
    targets = F.one_hot(labels, 10).double()
    gram = design.T @ design + 1e-3 * len(z) * torch.eye(design.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, design.T @ targets).float()
    scale = 10.0  # ridge fits 0/1 targets; scaled, the logits give cross-entropy some bite
    model.head.weight.copy_(scale * solution[:-1].T)
    model.head.bias.copy_(scale * solution[-1])
    accuracy = (design.float() @ solution).argmax(1).eq(labels).float().mean().item()
    model.eval().requires_grad_(False)
    seconds = time.perf_counter() - began
    model.fit_info = {"seconds": seconds, "images": len(labels), "train_accuracy": accuracy}
    return model


@functools.cache
def _trained(root: str | None) -> PatchClassifier:
    return train_classifier(root)


def build(root: str | os.PathLike | None = None) -> NoisyDefense:
    """The toy defense (eval mode, frozen); its classifier is trained once per process."""
    return NoisyDefense(_trained(None if root is None else str(root))).eval()


def factory() -> NoisyDefense:
    """Zero-argument factory for ``atop evaluate --model examples.toy_defense:factory``."""
    return build()

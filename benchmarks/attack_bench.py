"""Throughput of PGD with EOT on a stochastic defended model (issue 6 "Measurements").

Two figures per run: image-steps per second (``images x steps / s``: what an evaluation
protocol's cost scales with) and forward-backward passes per second (``images x steps x
eot_iter / s``: each EOT sample is one pass through the whole defended model).

Models (random weights: throughput does not depend on them):

* ``small``: a small CNN behind the project's RT2 random transform (Gaussian noise sigma
  0.25 and random block masks; the holes are zeroed, no purifier);
* ``defense``: the base-profile defended model ``f(g(t(x)))`` =
  ``PurifiedClassifier(resnet-fast width 16, native purifier (cnum 32), RT2)``.

Usage::

    python benchmarks/attack_bench.py [--models small,defense] [--images 16] [--steps 2]
        [--eot-iter 4] [--norm Linf] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from atop.attacks import build_attack, run_attack
from atop.defense import PurifiedClassifier
from atop.models.classifiers import build_classifier
from atop.models.purifier import build_purifier
from atop.transforms import RandomTransform

REPO = Path(__file__).resolve().parents[1]

#: ε and step size per norm (method.md §1: ℓ∞ 8/255, ℓ2 0.5).
NORM_SETTINGS = {"Linf": (8 / 255, 2 / 255), "L2": (0.5, 0.1)}


def pgd_eot_throughput(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    steps: int,
    eot_iter: int,
    norm: str = "Linf",
    batch_size: int | None = None,
    n_classes: int = 10,
) -> dict[str, Any]:
    """Time one PGD-EOT attack (after a one-step warm-up) on ``model``.

    Args:
        model: maps float32 ``[N, C, H, W]`` in ``[0, 1]`` to logits (on its device).
        images: float32 ``[N, C, H, W]`` in ``[0, 1]``.
        labels: int64 ``[N]``.
        steps: PGD steps.
        eot_iter: EOT samples (forward-backward passes) per step.
        norm: "Linf" (ε 8/255, α 2/255) or "L2" (ε 0.5, α 0.1).
        batch_size: images per attack call (default: all at once).
        n_classes: number of classes of the model.

    Returns:
        ``{"images", "steps", "eot_iter", "norm", "batch_size", "device", "seconds",
        "image_steps_per_s", "passes_per_s"}`` (wall clock; CUDA synchronized).
    """
    eps, alpha = NORM_SETTINGS[norm]
    spec = {"name": "pgd", "norm": norm, "eps": eps, "alpha": alpha, "eot_iter": eot_iter}
    batch_size = batch_size or len(images)
    device = next(model.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warm_up = build_attack(model, {**spec, "steps": 1, "eot_iter": 1}, n_classes)
    run_attack(warm_up, images[:batch_size], labels[:batch_size], batch_size, progress=False)
    attack = build_attack(model, {**spec, "steps": steps}, n_classes)
    sync()
    start = time.perf_counter()
    run_attack(attack, images, labels, batch_size, progress=False)
    sync()
    seconds = time.perf_counter() - start
    return {
        "images": len(images),
        "steps": steps,
        "eot_iter": eot_iter,
        "norm": norm,
        "batch_size": batch_size,
        "device": str(device),
        "seconds": seconds,
        "image_steps_per_s": len(images) * steps / seconds,
        "passes_per_s": len(images) * steps * eot_iter / seconds,
    }


class _ZeroHoles(nn.Module):
    """A no-op 'purifier' that zeroes the mask holes (small model: transform + CNN only)."""

    def purify(self, x01: Tensor, mask: Tensor) -> Tensor:
        return x01 * (1 - mask)


class _SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body((x - 0.5) / 0.25)


def build_model(name: str) -> nn.Module:
    """``small`` or ``defense`` (see the module docstring), random weights, eval mode."""
    torch.manual_seed(0)
    if name == "small":
        return PurifiedClassifier(_SmallCNN(), _ZeroHoles(), RandomTransform("rt2")).eval()
    if name == "defense":
        classifier = build_classifier("resnet-fast", 10, width=16)
        generator, _ = build_purifier()
        return PurifiedClassifier(classifier, generator, RandomTransform("rt2")).eval()
    raise ValueError(f"Unknown model {name!r}: use 'small' or 'defense'")


def real_cifar10_test(n: int, data_root: str | None = None) -> tuple[Tensor, Tensor]:
    """The first ``n`` CIFAR-10 test images (float32 [n, 3, 32, 32] in [0, 1]) and labels."""
    from torchvision.datasets import CIFAR10

    root = Path(data_root or os.environ.get("ATOP_DATA_ROOT", REPO.parent / "shared" / "datasets"))
    if not (root / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(f"CIFAR-10 not found under {root}: pass --data-root.")
    dataset = CIFAR10(root=str(root), train=False, download=False)
    images = torch.from_numpy(np.ascontiguousarray(dataset.data[:n])).permute(0, 3, 1, 2)
    return images.float().div(255).contiguous(), torch.tensor(dataset.targets[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,defense")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--eot-iter", type=int, default=4)
    parser.add_argument("--norm", default="Linf", choices=sorted(NORM_SETTINGS))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    images, labels = real_cifar10_test(args.images, args.data_root)
    print(f"device={args.device} threads={torch.get_num_threads()} (real CIFAR-10 test images)")
    for name in args.models.split(","):
        model = build_model(name).to(args.device)
        result = pgd_eot_throughput(
            model,
            images.to(args.device),
            labels.to(args.device),
            args.steps,
            args.eot_iter,
            args.norm,
            args.batch_size,
        )
        print(
            f"{name:8s} PGD-{args.norm} steps={args.steps} eot_iter={args.eot_iter} "
            f"images={result['images']} batch={result['batch_size']}: "
            f"{result['image_steps_per_s']:8.2f} image-steps/s, "
            f"{result['passes_per_s']:8.2f} fwd-bwd passes/s ({result['seconds']:.1f} s)"
        )


if __name__ == "__main__":
    main()

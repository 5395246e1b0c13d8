"""Throughput of one purifier pre-training step (generator + discriminator), images/s.

Compares the native-resolution purifier (default) with the authors' 256-px "upsample"
variant on the same batch of real CIFAR-10 test images, at DeepFillv2's cnum 48 and at the
project's default cnum. One step = RT2 transform, a discriminator update and a generator
update (hinge GAN + L1, paper Eq. 8) with Adam (lr 1e-4, betas (0.5, 0.999)).

Usage::

    python benchmarks/purifier_bench.py [--batch-size 8] [--steps 3] [--upsample-steps 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from atop.models.purifier import (
    DEFAULT_CONFIG,
    build_purifier,
    discriminator_loss,
    generator_loss,
)
from atop.transforms import RandomTransform

REPO = Path(__file__).resolve().parents[1]


def real_cifar10_batch(batch_size: int, data_root: str | os.PathLike | None = None) -> torch.Tensor:
    """The first ``batch_size`` CIFAR-10 test images, float32 ``[B, 3, 32, 32]`` in [0, 1].

    Raises:
        FileNotFoundError: no ``cifar-10-batches-py`` under ``data_root`` (default
            ``$ATOP_DATA_ROOT`` or ``../shared/datasets``).
    """
    from torchvision.datasets import CIFAR10

    root = Path(data_root or os.environ.get("ATOP_DATA_ROOT", REPO.parent / "shared" / "datasets"))
    if not (root / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(f"CIFAR-10 not found under {root}: pass --data-root.")
    data = CIFAR10(root=str(root), train=False, download=False).data[:batch_size]
    return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).float() / 255.0


def purifier_train_step_throughput(
    variant: str,
    batch_size: int,
    steps: int,
    cnum: int = DEFAULT_CONFIG["cnum"],
    images: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Images per second of one purifier train step (D update + G update), after one warm-up.

    Args:
        variant: "native" or "upsample" (256 px, the authors' setting).
        batch_size: images per step (ignored when ``images`` is given).
        steps: timed steps (>= 1).
        cnum: generator width (DeepFillv2: 48).
        images: float ``[B, 3, 32, 32]`` in [0, 1]; default the first CIFAR-10 test images.
        device: where to run.

    Returns:
        Throughput in images/s (wall clock).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    images = (real_cifar10_batch(batch_size) if images is None else images).to(device)
    torch.manual_seed(0)
    generator, discriminator = build_purifier({"variant": variant, "cnum": cnum})
    generator.to(device).train()
    discriminator.to(device).train()
    transform = RandomTransform("rt2")
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.5, 0.999))

    def step() -> None:
        draw = transform(images)
        result = generator(draw.image, draw.masks[0])
        d_opt.zero_grad(set_to_none=True)
        discriminator_loss(discriminator, images, result.purified, draw.masks[0]).backward()
        d_opt.step()
        g_opt.zero_grad(set_to_none=True)
        generator_loss(discriminator, images, result, draw.masks[0]).total.backward()
        g_opt.step()

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, kernel selection)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, native variant")
    parser.add_argument("--upsample-steps", type=int, default=1, help="timed steps, 256 px")
    parser.add_argument("--cnums", default=f"48,{DEFAULT_CONFIG['cnum']}")
    parser.add_argument("--variants", default="native,upsample")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    images = real_cifar10_batch(args.batch_size, args.data_root)
    print(
        f"device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} "
        f"(real CIFAR-10 test images, RT2, D + G step)"
    )
    for cnum in (int(c) for c in args.cnums.split(",")):
        for variant in args.variants.split(","):
            steps = args.steps if variant == "native" else args.upsample_steps
            rate = purifier_train_step_throughput(
                variant, args.batch_size, steps, cnum=cnum, images=images, device=args.device
            )
            print(f"variant={variant:9s} cnum={cnum:3d}: {rate:8.2f} img/s ({steps} timed steps)")


if __name__ == "__main__":
    main()

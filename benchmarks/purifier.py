"""The purifier: its training step's throughput by working side (``purifier``) and purifiers
trained for the same CPU time, then judged (``purifier-quality``)."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from atop.data import random_subset, to_unit
from atop.training import seed_everything
from benchmarks.common import (
    add_common,
    cifar10,
    parser,
    positive_float,
    positive_int,
    profile_parameters,
    purifier_step,
    require_files,
    setup_device,
    sync,
)


def purifier_throughput(
    variant: str, cnum: int, images: Tensor, steps: int, device: torch.device, amp: bool = True
) -> float:
    """Images/s of one purifier pre-training step (D update + g update; ``amp``: bf16
    autocast) on ``images`` (float ``[B, 3, 32, 32]`` in [0, 1] on ``device``), ``steps``
    timed steps after one warm-up."""
    from atop.models.purifier import build_purifier

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    torch.manual_seed(0)
    generator, discriminator = build_purifier({"variant": variant, "cnum": cnum})
    step = purifier_step(generator.to(device).train(), discriminator.to(device).train(), device)
    step.amp = amp
    step(images, images)  # warm-up (allocations, kernel selection)
    sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        step(images, images)
    sync(device)
    return steps * len(images) / (time.perf_counter() - began)


def purifier(argv: list[str]) -> None:
    """Throughput (images/s) of one purifier pre-training step
    (:class:`atop.trainers.purifier.PurifierStep`: RT2, one D step + one g step, Adam lr 1e-4,
    betas (0.5, 0.999)) of the native-resolution purifier and of the authors' 256-px
    "upsample" variant, at DeepFillv2's cnum 48 and at the project's default cnum; bf16
    autocast unless ``--no-amp``."""
    from atop.models.purifier import DEFAULT_CONFIG

    p = parser("purifier", purifier.__doc__)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps, native variant")
    p.add_argument("--upsample-steps", type=positive_int, default=1, help="timed steps, 256 px")
    p.add_argument("--cnums", default=f"48,{DEFAULT_CONFIG['cnum']}")
    p.add_argument("--variants", default="native,upsample")
    p.add_argument("--data-root", default=None, help="default: $ATOP_DATA_ROOT")
    p.add_argument("--no-amp", action="store_true", help="float32 steps")
    add_common(p)
    args = p.parse_args(argv)
    device = setup_device(args)
    images = to_unit(cifar10(args.batch_size, train=False, root=args.data_root)[0]).to(device)
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
        f"(real CIFAR-10 test images, RT2, D + G step, {'fp32' if args.no_amp else 'bf16'})"
    )
    for cnum in (int(c) for c in args.cnums.split(",")):
        for variant in args.variants.split(","):
            steps = args.steps if variant == "native" else args.upsample_steps
            try:
                rate = purifier_throughput(variant, cnum, images, steps, device, not args.no_amp)
            except NotImplementedError as exc:  # an op without a bf16 kernel on this device
                print(f"variant={variant:9s} cnum={cnum:3d}: fails under bf16 ({exc}); --no-amp")
                continue
            print(f"variant={variant:9s} cnum={cnum:3d}: {rate:8.2f} img/s ({steps} timed steps)")


def purifier_quality(argv: list[str]) -> None:
    """Purifiers trained for the same CPU time, then judged.

    Each ``--configs`` entry (``generator:cnum[:variant:upsample_size]``) is pretrained with
    the library's update (:class:`atop.trainers.purifier.PurifierStep`, the base profile's
    ``purifier_pretraining`` loss settings, or ``--lr`` / ``--gan-weight``) on shuffled real
    CIFAR-10 training images for ``--cpu-minutes`` of the process's CPU time (fair on a shared
    machine), then scored on ``--val-images`` held-out test images outside the evaluation
    subset: PSNR of ``g(t(x))`` (and of ``t(x)``) and the clean accuracy of ``f(g(t(x)))``
    with ``--classifier`` (single-draw: mean over ``--draws`` fresh draws).
    """
    from atop.attacks import draw_correct
    from atop.checkpoint import load_safe
    from atop.defense import PurifiedClassifier
    from atop.models import load_classifier
    from atop.models.purifier import build_purifier
    from atop.trainers.purifier import PurifierStep, psnr, purify_with_seed
    from atop.training import Batches
    from atop.transforms import RandomTransform

    p = parser("purifier-quality", purifier_quality.__doc__)
    p.add_argument("--classifier", required=True, help="classifier checkpoint (.pt)")
    p.add_argument("--configs", default="unet:32,deepfillv2:32")
    p.add_argument("--cpu-minutes", type=positive_float, default=4.0)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--noise-resolution", type=int, default=256, help="0 = the working side")
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--gan-weight", type=float, default=None)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--val-images", type=positive_int, default=1000)
    p.add_argument("--draws", type=positive_int, default=3)
    p.add_argument("--no-amp", action="store_true", help="float32 training")
    add_common(p)
    args = p.parse_args(argv)
    require_files(args.classifier, why="--classifier must be a trained classifier checkpoint")
    device = setup_device(args)
    base = profile_parameters("base")["purifier_pretraining"]
    changes = {k: v for k, v in (("lr", args.lr), ("gan_weight", args.gan_weight)) if v}
    params = base.replace(amp=not args.no_amp, **changes)
    train_images, train_labels = cifar10(50_000, train=True)
    test_images, test_labels = cifar10(10_000, train=False)
    eval_subset = random_subset(10_000, 512, 0)  # data_ingestion's subset (512, seed 0)
    held_out = random_subset(10_000, args.val_images, 1, exclude=eval_subset.tolist())
    x_val = to_unit(test_images[held_out]).to(device)
    y_val = test_labels[held_out].to(device)
    f = load_classifier(load_safe(args.classifier), device).requires_grad_(False)
    transform = RandomTransform(
        "rt2", sigma=args.sigma, noise_resolution=args.noise_resolution or None
    )
    print(
        f"{args.cpu_minutes:g} CPU-minutes each, batch {args.batch_size}, lr {params.lr}, "
        f"gan_weight {params.gan_weight}, amp {params.amp}, {torch.get_num_threads()} threads; "
        f"RT2 sigma {args.sigma} at {args.noise_resolution or 'the working side'} px; "
        f"{len(held_out)} held-out test images, {args.draws} draws"
    )
    for entry in args.configs.split(","):
        name, cnum, *rest = entry.split(":")
        config = {"generator": name, "cnum": int(cnum), "attention": False}
        if rest:
            config.update(variant=rest[0], upsample_size=int(rest[1]))
        seed_everything(0)
        g, d = build_purifier(config)
        g, d = g.to(device), d.to(device)
        step = PurifierStep.with_adam(g, d, transform, params, device)
        batches = Batches(
            train_images,
            train_labels,
            args.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
            device=device,
            drop_last=True,
        )
        budget, seen, began, wall = 60 * args.cpu_minutes, 0, time.process_time(), time.time()
        while time.process_time() - began < budget:
            for x, _ in batches:
                g.train(), d.train()
                step(x, x)
                seen += len(x)
                if time.process_time() - began >= budget:
                    break
        seconds = time.time() - wall
        transformed, purified = purify_with_seed(g, transform, x_val, 0, 250)
        defense = PurifiedClassifier(f, g.eval(), transform).eval()
        single_draw = draw_correct(defense, x_val, y_val, args.draws, 250).float().mean()
        print(
            f"  {entry:24s} {sum(p.numel() for p in g.parameters()) / 1e6:5.2f} M params | "
            f"{seen:7d} images in {seconds:5.0f} s wall ({seen / seconds:6.1f} img/s) | "
            f"PSNR {psnr(purified, x_val).mean():5.2f} dB (t(x) {psnr(transformed, x_val).mean():5.2f}) "
            f"| AP clean acc (single draw) {100 * single_draw:5.2f} %"
        )

"""Training throughput: the shared loop ``fit`` against a bare loop (``classifier``) and the
AToP fine-tuning step (``atop``)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from atop.data import to_unit
from atop.training import autocast, fit, seed_everything
from benchmarks.common import (
    CLASS_NAMES,
    N_CLASSES,
    add_common,
    alternate,
    cifar10,
    parser,
    positive_int,
    profile_parameters,
    purifier_step,
    setup_device,
    sync,
    training_batch,
)


def classifier(argv: list[str]) -> None:
    """Throughput (images/s) of :func:`atop.training.fit` against a bare PyTorch loop.

    Both start from the classifier_pretraining stage's setup
    (:func:`atop.trainers.common.prepare_training`, the base parameters at a constant
    learning rate) and run its step (:func:`atop.trainers.classifier.classifier_step`) on
    the same real training images. The bare loop iterates over a pre-converted float tensor;
    ``fit`` adds the uint8 -> float conversion per batch, progress, the loss sync and NaN
    check, the history and an atomic resume checkpoint per epoch; ``fit + augment`` adds the
    random crop + flip. Runs alternate; the median is reported as wall-clock images/s and as
    images per CPU-second of the process (exact with ``--threads 1``).
    """
    from atop.trainers.classifier import classifier_step
    from atop.trainers.common import prepare_training

    p = parser("classifier", classifier.__doc__)
    p.add_argument("--arch", default="resnet-fast")
    p.add_argument("--width", type=positive_int, default=16, help="resnet-fast / preact width")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--images", type=positive_int, default=2048, help="images per epoch")
    p.add_argument("--epochs", type=positive_int, default=2, help="epochs per timed run")
    p.add_argument("--repeats", type=positive_int, default=3)
    add_common(p)
    args = p.parse_args(argv)
    if args.images < args.batch_size:
        p.error(f"--images ({args.images}) must hold at least one batch ({args.batch_size})")
    device = setup_device(args)
    images, labels = cifar10(args.images, train=True)
    data = {"images": images, "labels": labels}
    widths = {"width": args.width} if args.arch in {"resnet-fast", "preact-resnet18"} else {}
    params = profile_parameters("base")["classifier_pretraining"].replace(
        arch=args.arch,
        arch_kwargs=widths,
        epochs=args.epochs,
        batch_size=args.batch_size,
        train_images=None,
        optimizer={"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        schedule={"name": "constant", "warmup_fraction": 0.0, "milestones": [], "gamma": 0.1},
        label_smoothing=0.1,
        seed=0,
        device=args.device,
        amp=True,
        channels_last=True,
        max_batches_per_epoch=None,
        progress=False,
    )

    def make(augment: bool, resume_path: str | None = None):
        """A fresh seeded setup (as the stage), its scheduler and the stage's step."""
        run_params = params.replace(augment=augment, resume_path=resume_path)
        # fit runs without evaluation here: the one monitor image is never scored
        setup = prepare_training(
            data, data, CLASS_NAMES, run_params, monitor_indices=[0], desc="bench", decay_all=True
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(setup.optimizer, lambda step: 1.0)
        train_step = classifier_step(
            setup.classifier, setup.optimizer, device, params.amp, params.label_smoothing
        )
        return setup, scheduler, train_step

    float_images = to_unit(images).to(device).contiguous(memory_format=torch.channels_last)
    device_labels = labels.to(device)

    def bare() -> None:
        setup, scheduler, train_step = make(augment=False)
        setup.classifier.train()
        for _ in range(args.epochs):
            order = torch.randperm(len(labels), generator=setup.batches.generator).to(device)
            for start in range(0, len(labels) - args.batch_size + 1, args.batch_size):
                index = order[start : start + args.batch_size]
                train_step(float_images[index], device_labels[index])
                scheduler.step()
        sync(device)

    def with_fit(augment: bool) -> Callable[[], None]:
        def run() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                setup, scheduler, train_step = make(augment, f"{tmp}/resume.pt")
                fit(
                    modules={"classifier": setup.classifier},
                    optimizers={"sgd": setup.optimizer},
                    schedulers={"lr": scheduler},
                    train_step=train_step,
                    batches=setup.batches,
                    config=setup.loop,
                )
            sync(device)

        return run

    runs = {"bare loop": bare, "fit": with_fit(False), "fit + augment": with_fit(True)}
    n_images = args.epochs * (len(labels) // args.batch_size) * args.batch_size
    bare()  # warm-up (oneDNN / cuDNN kernel selection)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            began, cpu_began = time.perf_counter(), time.process_time()
            run()
            seconds[name].append(time.perf_counter() - began)
            cpu_seconds[name].append(time.process_time() - cpu_began)
    print(
        f"classifier training throughput: {args.arch} "
        f"{widths or ''} batch {args.batch_size}, {n_images} images per run, "
        f"device {device}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    reference = n_images / statistics.median(seconds["bare loop"])
    cpu_reference = n_images / statistics.median(cpu_seconds["bare loop"])
    for name, times in seconds.items():
        rate = n_images / statistics.median(times)
        cpu_rate = n_images / statistics.median(cpu_seconds[name])
        print(
            f"  {name:14s} {rate:8.1f} images/s ({rate / reference:6.1%} of bare) | "
            f"{cpu_rate:8.1f} images per CPU-second ({cpu_rate / cpu_reference:6.1%} of bare)"
            f" | wall: {', '.join(f'{t:.1f}s' for t in times)}"
        )


def atop(argv: list[str]) -> None:
    """AToP fine-tuning throughput (images/s) with FGSM and PGD-10 against f(g(t(.))).

    The base models (resnet-fast width 16 in NHWC, the gated U-Net, RT2; random weights)
    and one full fine-tuning step per batch: craft x', one D step, one g step with
    L_org(x') + 0.1 * CE (paper Eq. 9); images/s and the projected time per epoch. x' is
    crafted in float32 (the GAN update under bf16 autocast); ``--attack-amp`` also times each
    step with the attack under bf16 autocast, alternating with the float32 one (median of
    ``--repeats``, default 3), and prints the ratio. On the trained models, with the
    strength side of that question: ``train-attack-amp``.
    """
    from atop.attacks import build_attack
    from atop.defense import PurifiedClassifier
    from atop.models import build_classifier
    from atop.models.purifier import build_purifier
    from atop.trainers.atop import atop_train_step

    p = parser("atop", atop.__doc__)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--batches", type=positive_int, default=3, help="timed batches per attack")
    p.add_argument("--cnum", type=positive_int, default=32, help="purifier width")
    p.add_argument("--attack-amp", action="store_true", help="also the attack under bf16")
    p.add_argument("--repeats", type=positive_int, help="default: 3 with --attack-amp, else 1")
    add_common(p)
    args = p.parse_args(argv)
    device = setup_device(args)
    seed_everything(0)
    x, y = training_batch(args.batch_size, device)
    f = build_classifier("resnet-fast", N_CLASSES, width=16)
    f = f.to(device, memory_format=torch.channels_last)
    f = f.eval().requires_grad_(False)  # NHWC, as the fine-tuning arms load it
    eps = 8 / 255
    attacks = {
        "fgsm": {"name": "fgsm", "eps": eps},
        "pgd-10": {"name": "pgd", "norm": "Linf", "eps": eps, "alpha": 2 / 255, "steps": 10,
                   "eot_iter": 1},
    }  # fmt: skip
    print(
        f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"threads {torch.get_num_threads()}, batch {args.batch_size}, purifier cnum {args.cnum}"
    )

    def train_step(spec: dict[str, Any], attack_amp: bool) -> Callable[[], Any]:
        g, d = build_purifier({"generator": "unet", "cnum": args.cnum, "attention": False})
        step = purifier_step(g.to(device), d.to(device), device)
        attack = build_attack(PurifiedClassifier(f, g, step.transform), spec, N_CLASSES)

        def craft(images: Tensor, labels: Tensor) -> Tensor:
            with autocast(device, attack_amp):
                return attack(images, labels)

        run = atop_train_step(f, step, craft, lambda_cls=0.1, reconstruction_target="clean")
        return lambda: run(x, y)

    precisions = (False, True) if args.attack_amp else (False,)
    for label, spec in attacks.items():
        runs = {amp: train_step(spec, amp) for amp in precisions}
        for run in runs.values():
            run()  # warm-up
        repeats = args.repeats or (3 if args.attack_amp else 1)
        seconds = alternate(runs, repeats, args.batches, device)
        rates = {amp: args.batches * args.batch_size / seconds[amp] for amp in runs}
        for amp, rate in rates.items():
            print(
                f"  {label:7s} ({'bf16' if amp else 'fp32'} attack) against f(g(t(.))): "
                f"{rate:7.1f} images/s | epoch of 12,800 images (base) {12800 / rate / 60:6.1f} "
                f"min | of 50,000 images {50000 / rate / 60:7.1f} min"
            )
        if args.attack_amp:
            print(f"  {label:7s} bf16 / fp32 attack: {rates[True] / rates[False]:5.2f}x")

"""What every classifier trainer shares: parameters, setup, schedule, loop and checkpoint meta.

Classifier pretraining (the standard recipe for ``f``), PGD adversarial training and RvS all
train a classifier from uint8 images with SGD (momentum, weight decay), a per-batch
learning-rate schedule and random crop + flip, and score held-out images after each epoch
(the ``test_acc`` column). Only their ``train_step`` differs (one module each):

* :class:`ClassifierTrainingParams`: the shared parameter keys;
* :func:`prepare_training`: seed, device, the classifier (normalized by the training
  images' :func:`channel_stats`), its SGD (:func:`classifier_sgd`), the batches, the loop
  settings with the resume fingerprint, the monitor images, and the ``network`` the
  training forward passes run through (the classifier itself, or its data-parallel wrapper
  inside a ``torch.distributed`` group: :mod:`atop.distributed`);
* :func:`training_loop`: :func:`atop.training.fit` with the :func:`lr_factor` schedule and the
  per-epoch ``test_acc``;
* :func:`training_meta` / :func:`training_summary`: the checkpoint's ``meta`` and the stage's
  metrics.

Core module: torch and the project's core modules only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from atop.data import random_subset
from atop.distributed import DistributedParams, data_parallel
from atop.models import CLASSIFIERS, build_classifier
from atop.params import Params, run_only, spec
from atop.training import (
    Batches,
    LoopConfig,
    accuracy,
    fit,
    resolve_device,
    seed_everything,
)

SCHEDULES = ("constant", "cosine", "multistep", "onecycle")
PIXEL_SCALE = "on the [0, 1] pixel scale (8/255 = 0.0314)"


@dataclass(init=False, frozen=True)
class OptimizerParams(Params):
    """The classifier's SGD: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``."""

    lr: float = spec(gt=0, le=10)
    momentum: float = spec(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = spec(ge=0, lt=1)


@dataclass(init=False, frozen=True)
class ScheduleParams(Params):
    """Per-batch learning-rate schedule (:func:`lr_factor`); fractions of all steps."""

    name: str = spec(choices=SCHEDULES)
    warmup_fraction: float = spec(ge=0, lt=1, unit="(a fraction of all steps)")
    milestones: list[float] = spec(ge=0, le=1, unit="(fractions of all steps)")
    gamma: float = spec(gt=0)


@dataclass(init=False, frozen=True)
class ClassifierTrainingParams(Params):
    """Keys shared by every classifier-training stage (``parameters_<stage>.yml``)."""

    arch: str = spec(choices=CLASSIFIERS)
    arch_kwargs: dict[str, Any]
    epochs: int = spec(ge=1)
    batch_size: int = spec(ge=1)
    train_images: int | None = spec(ge=1, unit="(training images; null = all)")
    optimizer: OptimizerParams
    schedule: ScheduleParams
    augment: bool
    seed: int = spec(ge=0)
    device: str = run_only()
    amp: bool
    channels_last: bool | None = run_only()
    eval_batch_size: int = spec(ge=1, weights=False)
    max_batches_per_epoch: int | None = spec(ge=1)
    resume_path: str | None = run_only()
    progress: bool = run_only()
    distributed: DistributedParams


def channel_stats(images_uint8: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 ``[N, 3, H, W]`` images, on the
    ``[0, 1]`` scale, in float64 over chunks (CIFAR-10 train: 0.4914, 0.4822, 0.4465 and
    0.2470, 0.2435, 0.2616). Returns ``(mean, std)``, two lists of 3 floats."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images_uint8), chunk):
        block = images_uint8[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        squares += block.square().sum(dim=(0, 2, 3))
    count = images_uint8.shape[0] * images_uint8.shape[2] * images_uint8.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).sqrt()
    return mean.tolist(), std.tolist()


def lr_factor(schedule: ScheduleParams, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step (from 0), for ``LambdaLR``.

    Every schedule starts with a linear warm-up over ``warmup_fraction`` of the
    ``total_steps``; then ``constant``, ``cosine`` (half cosine to 0), ``multistep`` (times
    ``gamma`` at each of the ``milestones``) or ``onecycle`` (linear down to 0 from the peak
    at the end of the warm-up, D. Page's schedule).

    Raises:
        ValueError: a warm-up that does not leave a step.
    """
    name = schedule.name
    warmup = int(schedule.warmup_fraction * total_steps)
    if not 0 <= warmup < max(total_steps, 1):
        raise ValueError(f"warmup_fraction must be in [0, 1), got {schedule}.")
    milestones = [int(f * total_steps) for f in schedule.milestones]

    def decay(progress: float, step: int) -> float:
        if name == "constant":
            return 1.0
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "multistep":
            return schedule.gamma ** sum(step >= m for m in milestones)
        return 1.0 - progress  # onecycle

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay((step - warmup) / max(total_steps - warmup, 1), step)

    return factor


def classifier_sgd(
    model: nn.Module, optimizer: OptimizerParams, decay_all: bool = False
) -> torch.optim.SGD:
    """The classifier's SGD with momentum and weight decay.

    ``decay_all=True``: weight decay on every parameter (one group: the standard recipe of
    classifier pretraining). ``False``: on conv/linear weights only (``ndim > 1``; group 0
    decayed, group 1 not), as the TensorFlow code of Madry et al. and of RvS.
    """
    decay = optimizer.weight_decay
    parameters = list(model.parameters())
    if decay_all:
        groups = [{"params": parameters, "weight_decay": decay}]
    else:
        groups = [
            {"params": [p for p in parameters if p.ndim > 1], "weight_decay": decay},
            {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(
        groups, lr=optimizer.lr, momentum=optimizer.momentum, nesterov=optimizer.nesterov
    )


@dataclass
class TrainingSetup:
    """What a classifier trainer needs before its own ``train_step``.

    Attributes:
        device: where the classifier and the batches live.
        channels_last: NHWC batches and classifier.
        classifier: the freshly initialized classifier (on ``device``).
        config: its :func:`atop.models.build_classifier` kwargs (``num_classes``, the
            ``arch_kwargs``, the training images' ``mean``/``std``) for the checkpoint.
        optimizer: its SGD (:func:`classifier_sgd`).
        batches: the shuffled, augmented training batches (last incomplete one dropped).
        loop: epochs, resume file and fingerprint, caps, progress.
        monitor_images: uint8 ``[M, 3, H, W]`` test images scored after each epoch.
        monitor_labels: int64 ``[M]``.
        network: what the training forward passes run through: ``classifier`` itself in one
            process, its :func:`atop.distributed.data_parallel` wrapper (gradients averaged
            over the ranks, batch norm over the global batch) in data-parallel training.
            Attacks and evaluation use ``classifier``.
    """

    device: torch.device
    channels_last: bool
    classifier: nn.Module
    config: dict[str, Any]
    optimizer: torch.optim.SGD
    batches: Batches
    loop: LoopConfig
    monitor_images: torch.Tensor
    monitor_labels: torch.Tensor
    network: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.network is None:
            self.network = self.classifier


def prepare_training(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    params: ClassifierTrainingParams,
    *,
    monitor_indices: Sequence[int] | torch.Tensor,
    desc: str,
    decay_all: bool = False,
) -> TrainingSetup:
    """Seed, pick the device, build the classifier, its SGD and the training batches.

    Args:
        train_set, test_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        class_names: the C class names (``num_classes = C``).
        params: the stage's parameters; ``train_images`` draws a fixed random subset of the
            training images with ``seed``; ``channels_last: null`` = on CUDA only.
        monitor_indices: indices into ``test_set`` scored after each epoch (``test_acc``).
        desc: progress-bar and log label.
        decay_all: weight decay on every parameter (see :func:`classifier_sgd`).

    Raises:
        ValueError: labels outside ``[0, C)`` or no monitor image.
        RuntimeError: the device is not available.
    """
    num_classes = len(class_names)
    for name, split in (("train_set", train_set), ("test_set", test_set)):
        labels = split["labels"]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"{name} labels span [{labels.min()}, {labels.max()}] but there are "
                f"{num_classes} class names: rerun data_ingestion."
            )
    monitor = torch.as_tensor(monitor_indices, dtype=torch.int64)
    if monitor.numel() == 0:
        raise ValueError("No test image to score after each epoch: rerun data_ingestion.")
    device = resolve_device(params.device)
    channels_last = device.type == "cuda" if params.channels_last is None else params.channels_last
    generator = seed_everything(params.seed)
    n_train = len(train_set["labels"])
    keep = random_subset(n_train, params.train_images, params.seed, sort=False)
    images, labels = train_set["images"], train_set["labels"]
    if len(keep) < n_train:
        images, labels = images[keep], labels[keep]

    mean, std = channel_stats(images)
    config = {"num_classes": num_classes, **params.arch_kwargs, "mean": mean, "std": std}
    classifier = build_classifier(params.arch, **config).to(device)
    if channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    network = data_parallel(classifier)  # classifier itself in one process
    batches = Batches(
        images,
        labels,
        params.batch_size,
        shuffle=True,
        generator=generator,
        augment=params.augment,
        device=device,
        drop_last=True,
        channels_last=channels_last,
    )
    loop = LoopConfig(
        epochs=params.epochs,
        desc=desc,
        resume_path=params.resume_path,
        max_batches_per_epoch=params.max_batches_per_epoch,
        fingerprint={
            **params.fingerprint(),
            "n_train": len(labels),
            "n_test": len(test_set["labels"]),
        },
        progress=params.progress,
    )
    return TrainingSetup(
        device=device,
        channels_last=channels_last,
        classifier=classifier,
        config=config,
        optimizer=classifier_sgd(classifier, params.optimizer, decay_all),
        batches=batches,
        loop=loop,
        monitor_images=test_set["images"][monitor],
        monitor_labels=test_set["labels"][monitor],
        network=network,
    )


def training_loop(
    setup: TrainingSetup,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    train_step: Callable[[torch.Tensor, torch.Tensor], dict[str, float | torch.Tensor]],
    params: ClassifierTrainingParams,
) -> list[dict[str, float]]:
    """:func:`atop.training.fit` with the per-batch ``params.schedule`` (driving the FIRST
    optimizer, the classifier's) and a per-epoch clean ``test_acc`` (in ``[0, 1]``) on the
    monitor images. ``modules`` lists every module to checkpoint (the classifier first).

    Raises:
        atop.training.NonFiniteLossError: a term diverged.
    """
    total_steps = setup.loop.epochs * setup.loop.steps_per_epoch(setup.batches)
    first = next(iter(optimizers.values()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(first, lr_factor(params.schedule, total_steps))

    def evaluate(epoch: int) -> dict[str, float]:
        acc = accuracy(
            setup.classifier,
            setup.monitor_images,
            setup.monitor_labels,
            params.eval_batch_size,
            setup.device,
            setup.channels_last,
        )
        return {"test_acc": acc}

    return fit(
        modules=modules,
        optimizers=optimizers,
        schedulers={"lr": scheduler},
        train_step=train_step,
        batches=setup.batches,
        config=setup.loop,
        evaluate=evaluate,
    )


def training_meta(
    setup: TrainingSetup, history: list[dict[str, float]], class_names: list[str]
) -> dict[str, Any]:
    """The checkpoint's ``meta``: ``class_names``, ``epochs``, ``device``, ``n_train`` (images
    trained on) and ``last_epoch_test_acc``. No timing: a retrain with the same settings
    writes the same bytes (the history CSV holds the seconds), so DVC sees no change."""
    return {
        "class_names": list(class_names),
        "epochs": setup.loop.epochs,
        "device": str(setup.device),
        "n_train": len(setup.batches.labels),
        "last_epoch_test_acc": history[-1]["test_acc"],
    }


def training_summary(
    checkpoint: dict[str, Any], train_seconds: float | None, n_test: int
) -> dict[str, Any]:
    """``{"train_seconds", "epochs", "arch", "device", "n_train", "n_test"}`` of a classifier
    checkpoint whose ``meta`` came from :func:`training_meta`, for a stage's metrics
    (``train_seconds``: the sum of the history's epochs, :func:`atop.training.training_seconds`)."""
    meta = checkpoint["meta"]
    return {
        "train_seconds": train_seconds,
        "epochs": meta["epochs"],
        "arch": checkpoint["arch"],
        "device": meta["device"],
        "n_train": meta["n_train"],
        "n_test": n_test,
    }

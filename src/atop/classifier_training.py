"""The setup shared by every stage that trains a classifier from scratch.

Classifier pretraining (the standard recipe for ``f``), PGD adversarial training and RvS
all train a classifier from uint8 images with SGD (momentum, weight decay), a per-batch
learning-rate schedule and random crop + flip, and score a fixed set of test images after
each epoch (the ``test_acc`` column). What differs is the ``train_step`` of each method,
which stays in its stage. This module builds the rest from the stage's parameters:

* :func:`prepare_training`: seed, device, the classifier (normalized by the training
  images' :func:`channel_stats`), its SGD (:func:`classifier_sgd`), the training
  :class:`atop.training.Batches`, the :class:`atop.training.LoopConfig` with the resume
  fingerprint, and the monitor images;
* :func:`training_loop`: :func:`atop.training.fit` with the :func:`lr_factor` schedule and
  the per-epoch ``test_acc``;
* :func:`training_meta`: the checkpoint's ``meta``, and :func:`training_summary` its
  training facts for the stage's metrics.

Core module: torch, :mod:`atop.models` and :mod:`atop.training` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from atop.models import build_classifier
from atop.training import Batches, LoopConfig, accuracy, fit, resolve_device, seed_everything

#: Parameters that do not change the trained weights (left out of the resume fingerprint).
NOT_IN_FINGERPRINT = {"device", "resume_path", "progress", "eval_batch_size", "robust_eval"}


def channel_stats(images_uint8: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the [0, 1] scale.

    Computed in float64 over chunks (no full float copy of the split).

    Args:
        images_uint8: uint8 ``[N, 3, H, W]``.
        chunk: images per chunk.

    Returns:
        ``(mean, std)``: two lists of 3 floats (CIFAR-10 train: 0.4914, 0.4822, 0.4465 and
        0.2470, 0.2435, 0.2616).
    """
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


def lr_factor(schedule: dict[str, Any], total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Args:
        schedule: ``{"name": ..., "warmup_fraction": float, ...}`` with name
            ``"constant"``; ``"cosine"`` (half cosine to 0); ``"multistep"`` (times
            ``gamma`` at each of ``milestones``, fractions of training, e.g. [0.5, 0.75]);
            ``"onecycle"`` (linear up to the peak at ``warmup_fraction`` then linear down to
            0, D. Page's schedule). Every schedule starts with a linear warm-up over
            ``warmup_fraction`` of the steps (0 = none).
        total_steps: optimizer steps of the whole run (epochs x steps per epoch).

    Returns:
        ``step -> factor`` with ``step`` counted from 0.

    Raises:
        ValueError: unknown schedule name or a fraction outside [0, 1).
    """
    name = schedule["name"]
    if name not in {"constant", "cosine", "multistep", "onecycle"}:
        raise ValueError(f"Unknown schedule '{name}': use constant, cosine, multistep or onecycle.")
    warmup = int(schedule.get("warmup_fraction", 0.0) * total_steps)
    if not 0 <= warmup < max(total_steps, 1):
        raise ValueError(f"warmup_fraction must be in [0, 1), got {schedule}.")
    milestones = [int(f * total_steps) for f in schedule.get("milestones", [])]
    gamma = schedule.get("gamma", 0.1)

    def decay(progress: float, step: int) -> float:
        if name == "constant":
            return 1.0
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "multistep":
            return gamma ** sum(step >= m for m in milestones)
        return 1.0 - progress  # onecycle

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay((step - warmup) / max(total_steps - warmup, 1), step)

    return factor


def random_subset(n: int, size: int | None, seed: int) -> torch.Tensor | None:
    """A fixed random subset of ``size`` distinct indices of ``range(n)``, drawn with ``seed``.

    Args:
        n: number of items.
        size: subset size (``>= 1``); ``None`` or ``>= n`` means every item.
        seed: seed of the draw (a private generator: the global RNG is untouched).

    Returns:
        int64 ``[size]`` indices in draw order (sort them for a stable scoring order), or
        ``None`` when every item is kept.

    Raises:
        ValueError: ``size < 1``.
    """
    if size is None or size >= n:
        return None
    if size < 1:
        raise ValueError(f"A subset must be a positive number of images or null, got {size}.")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def eval_subset(n: int, size: int | None, seed: int) -> torch.Tensor:
    """The sorted indices of :func:`random_subset` (``torch.arange(n)`` when it keeps all):
    the classifier-pretraining test images scored after each epoch (int64 ``[size]``).

    Raises:
        ValueError: ``size < 1``.
    """
    subset = random_subset(n, size, seed)
    return torch.arange(n) if subset is None else subset.sort().values


def classifier_sgd(
    model: nn.Module, optimizer: dict[str, Any], decay_all: bool = False
) -> torch.optim.SGD:
    """The classifier's SGD with momentum and weight decay.

    Args:
        model: the classifier.
        optimizer: ``{"lr", "momentum", "nesterov", "weight_decay"}``.
        decay_all: ``True``: weight decay on every parameter (plain ``torch.optim.SGD``
            ``weight_decay``, one parameter group: the standard recipe of classifier
            pretraining). ``False``: on the conv/linear weights only (parameters with
            ``ndim > 1``; not on batch-norm parameters and biases: group 0 decayed, group 1
            not), as the TensorFlow code of Madry et al. and of RvS (their ``DW``
            variables).

    Returns:
        The optimizer.
    """
    decay = optimizer["weight_decay"]
    parameters = list(model.parameters())
    if decay_all:
        groups = [{"params": parameters, "weight_decay": decay}]
    else:
        groups = [
            {"params": [p for p in parameters if p.ndim > 1], "weight_decay": decay},
            {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(
        groups, lr=optimizer["lr"], momentum=optimizer["momentum"], nesterov=optimizer["nesterov"]
    )


@dataclass
class TrainingSetup:
    """What every classifier trainer needs before its own ``train_step``.

    Attributes:
        device: where the classifier and the batches live.
        channels_last: NHWC batches and classifier.
        classifier: the freshly initialized classifier (in ``device``).
        config: its :func:`atop.models.build_classifier` kwargs (``num_classes``, the
            ``arch_kwargs``, the training images' ``mean``/``std``) for the checkpoint.
        optimizer: its SGD (:func:`classifier_sgd`).
        batches: the shuffled, augmented training batches (last incomplete one dropped).
        loop: epochs, resume file and fingerprint, caps, progress.
        monitor_images: uint8 ``[M, 3, H, W]`` test images scored after each epoch.
        monitor_labels: int64 ``[M]``.
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


def prepare_training(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    params: dict[str, Any],
    *,
    monitor_indices: Sequence[int] | torch.Tensor,
    desc: str,
    decay_all: bool = False,
) -> TrainingSetup:
    """Seed, pick the device, build the classifier, its SGD and the training batches.

    Args:
        train_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        test_set: same layout.
        class_names: the C class names (``num_classes = C``).
        params: the stage's parameters: ``arch``, ``arch_kwargs`` (optional), ``optimizer``
            (see :func:`classifier_sgd`), ``batch_size``, ``augment``, ``seed``, ``device``,
            ``epochs``, and optionally ``train_subset`` (a fixed random subset of the
            training images, drawn with ``seed``; ``None`` = all), ``channels_last``
            (default: on CUDA only), ``resume_path``, ``max_batches_per_epoch``,
            ``progress``. Every parameter but :data:`NOT_IN_FINGERPRINT` goes into the
            resume fingerprint, with the number of training and test images.
        monitor_indices: indices into ``test_set`` of the images scored after each epoch
            (the ``test_acc`` column): the shared ``eval_indices`` for the baselines, a
            random :func:`eval_subset` for classifier pretraining.
        desc: progress-bar and log label.
        decay_all: weight decay on every parameter (see :func:`classifier_sgd`).

    Returns:
        A :class:`TrainingSetup`.

    Raises:
        ValueError: labels outside ``[0, C)``, no monitor image or a bad ``train_subset``.
        RuntimeError: the device is not available (:func:`atop.training.resolve_device`).
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
        raise ValueError(
            "No test image to score after each epoch: rerun data_ingestion with "
            "eval_subset.size > 0 (baselines) or set eval_subset > 0 (classifier pretraining)."
        )
    device = resolve_device(params["device"])
    channels_last = params.get("channels_last", device.type == "cuda")
    generator = seed_everything(params["seed"])
    keep = random_subset(len(train_set["labels"]), params.get("train_subset"), params["seed"])
    images, labels = train_set["images"], train_set["labels"]
    if keep is not None:
        images, labels = images[keep], labels[keep]

    mean, std = channel_stats(images)
    arch_kwargs = params.get("arch_kwargs") or {}
    config = {"num_classes": num_classes, **arch_kwargs, "mean": mean, "std": std}
    classifier = build_classifier(params["arch"], **config).to(device)
    if channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    batches = Batches(
        images,
        labels,
        params["batch_size"],
        shuffle=True,
        generator=generator,
        augment=params["augment"],
        device=device,
        drop_last=True,
        channels_last=channels_last,
    )
    loop = LoopConfig(
        epochs=params["epochs"],
        desc=desc,
        resume_path=params.get("resume_path"),
        max_batches_per_epoch=params.get("max_batches_per_epoch"),
        fingerprint={
            **{k: v for k, v in params.items() if k not in NOT_IN_FINGERPRINT},
            "n_train": len(labels),
            "n_test": len(test_set["labels"]),
        },
        progress=params.get("progress", True),
    )
    return TrainingSetup(
        device=device,
        channels_last=channels_last,
        classifier=classifier,
        config=config,
        optimizer=classifier_sgd(classifier, params["optimizer"], decay_all),
        batches=batches,
        loop=loop,
        monitor_images=test_set["images"][monitor],
        monitor_labels=test_set["labels"][monitor],
    )


def training_loop(
    setup: TrainingSetup,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    train_step: Callable[[torch.Tensor, torch.Tensor], dict[str, float | torch.Tensor]],
    params: dict[str, Any],
) -> list[dict[str, float]]:
    """Run :func:`atop.training.fit` with the per-batch learning-rate schedule
    ``params["schedule"]`` (:func:`lr_factor`) and a per-epoch clean ``test_acc`` of the
    classifier on the monitor images.

    Args:
        setup: from :func:`prepare_training`.
        modules: every module to checkpoint for resuming (the classifier first).
        optimizers: every optimizer; the schedule drives the FIRST one (the classifier's).
        train_step: ``(x, y) -> {"loss", ...}`` on float32 ``[B, 3, H, W]`` in ``[0, 1]``
            and int64 ``[B]`` (it steps the optimizers itself).
        params: the stage's parameters (``schedule``, ``eval_batch_size``, ``amp``).

    Returns:
        The history rows of :func:`atop.training.fit` (``test_acc`` in ``[0, 1]``).

    Raises:
        atop.training.NonFiniteLossError: a term diverged.
        ValueError: a bad schedule.
    """
    total_steps = setup.loop.epochs * setup.loop.steps_per_epoch(setup.batches)
    first = next(iter(optimizers.values()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(first, lr_factor(params["schedule"], total_steps))

    def evaluate(epoch: int) -> dict[str, float]:
        acc = accuracy(
            setup.classifier,
            setup.monitor_images,
            setup.monitor_labels,
            params["eval_batch_size"],
            setup.device,
            params["amp"],
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
    """The checkpoint's ``meta``: ``class_names``, ``epochs``, ``train_seconds`` (training
    wall-clock, evaluation excluded), ``device``, ``n_train`` (images trained on) and
    ``last_epoch_test_acc``."""
    return {
        "class_names": list(class_names),
        "epochs": setup.loop.epochs,
        "train_seconds": float(sum(row["seconds"] for row in history)),
        "device": str(setup.device),
        "n_train": len(setup.batches.labels),
        "last_epoch_test_acc": history[-1]["test_acc"],
    }


def training_summary(checkpoint: dict[str, Any], n_test: int) -> dict[str, Any]:
    """The training facts of a classifier checkpoint, for a stage's metrics.

    Args:
        checkpoint: a :func:`atop.models.classifier_checkpoint` dict whose ``meta`` came
            from :func:`training_meta`.
        n_test: number of test images of the metrics.

    Returns:
        ``{"train_seconds", "epochs", "arch", "device", "n_train", "n_test"}``.

    Raises:
        KeyError: the checkpoint lacks ``arch`` or one of these ``meta`` keys.
    """
    meta = checkpoint["meta"]
    return {
        "train_seconds": meta["train_seconds"],
        "epochs": meta["epochs"],
        "arch": checkpoint["arch"],
        "device": meta["device"],
        "n_train": meta["n_train"],
        "n_test": n_test,
    }

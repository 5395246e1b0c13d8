"""Nodes of the classifier pretraining stage: standard (non-robust) training of ``f``.

The classifier ``f`` of the defense ``f(g(t(x)))`` (paper §3-4) is trained once on clean
images with the standard recipe (SGD with momentum, weight decay, a per-batch learning-rate
schedule, random crop + flip) through the shared loop :func:`atop.training.fit`, then frozen
by the later stages. Plain functions, no Kedro imports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from atop.models import build_classifier, classifier_checkpoint, load_classifier
from atop.training import (
    Batches,
    LoopConfig,
    accuracy,
    autocast,
    fit,
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)

#: History columns written to classifier_history.csv, in order.
HISTORY_COLUMNS = ["epoch", "loss", "train_acc", "test_acc", "lr", "seconds"]

#: Parameters that do not change the trained weights (left out of the resume fingerprint).
_NOT_IN_FINGERPRINT = {"device", "resume_path", "progress", "eval_batch_size"}


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


def train_classifier(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train a classifier from scratch with the standard recipe.

    Args:
        train_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        test_set: same layout; a fixed random subset of ``eval_subset`` images is scored
            after each epoch (``null`` = all).
        class_names: the C class names (``num_classes = C``).
        params: ``params:classifier_pretraining`` (see conf/base/parameters_classifier_pretraining.yml).

    Returns:
        ``(checkpoint, history)``: the checkpoint dict of
        :func:`atop.models.classifier_checkpoint` (config: ``num_classes``, the
        ``arch_kwargs`` and the train-set ``mean``/``std``; meta: ``class_names``,
        ``epochs``, ``train_seconds``, ``device``, ``n_train``, ``last_epoch_test_acc``)
        and a DataFrame with
        :data:`HISTORY_COLUMNS` (loss and train_acc are means over the epoch's batches, on
        augmented images; lr is the last step's; seconds excludes evaluation).

    Raises:
        ValueError: labels outside ``[0, C)`` or bad parameters.
        atop.training.NonFiniteLossError: the loss diverged (lower ``optimizer.lr``).
    """
    num_classes = len(class_names)
    for name, split in (("train_set", train_set), ("test_set", test_set)):
        labels = split["labels"]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"{name} labels span [{labels.min()}, {labels.max()}] but there are "
                f"{num_classes} class names: rerun data_ingestion."
            )
    device = resolve_device(params["device"])
    channels_last = params["channels_last"]
    amp = params["amp"]
    generator = seed_everything(params["seed"])

    mean, std = channel_stats(train_set["images"])
    arch_kwargs = params.get("arch_kwargs") or {}
    config = {"num_classes": num_classes, **arch_kwargs, "mean": mean, "std": std}
    model = build_classifier(params["arch"], **config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    opt = params["optimizer"]
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=opt["lr"],
        momentum=opt["momentum"],
        nesterov=opt["nesterov"],
        weight_decay=opt["weight_decay"],
    )
    batches = Batches(
        train_set["images"],
        train_set["labels"],
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
        desc="classifier",
        resume_path=params.get("resume_path"),
        max_batches_per_epoch=params.get("max_batches_per_epoch"),
        fingerprint={
            **{k: v for k, v in params.items() if k not in _NOT_IN_FINGERPRINT},
            "n_train": len(train_set["labels"]),
            "n_test": len(test_set["labels"]),
        },
        progress=params.get("progress", True),
    )
    total_steps = loop.epochs * loop.steps_per_epoch(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(params["schedule"], total_steps)
    )
    label_smoothing = params["label_smoothing"]

    def train_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}

    subset = _eval_subset(len(test_set["labels"]), params.get("eval_subset"), params["seed"])
    eval_images, eval_labels = test_set["images"][subset], test_set["labels"][subset]

    def evaluate(epoch: int) -> dict[str, float]:
        acc = accuracy(
            model, eval_images, eval_labels, params["eval_batch_size"], device, amp, channels_last
        )
        return {"test_acc": acc}

    history = fit(
        modules={"classifier": model},
        optimizers={"sgd": optimizer},
        schedulers={"lr": scheduler},
        train_step=train_step,
        batches=batches,
        config=loop,
        evaluate=evaluate,
    )
    train_seconds = float(sum(row["seconds"] for row in history))
    meta = {
        "class_names": list(class_names),
        "epochs": loop.epochs,
        "train_seconds": train_seconds,
        "device": str(device),
        "n_train": len(train_set["labels"]),
        "last_epoch_test_acc": history[-1]["test_acc"],
    }
    checkpoint = classifier_checkpoint(model, params["arch"], config, meta)
    return checkpoint, pd.DataFrame(history)[HISTORY_COLUMNS]


def evaluate_classifier(
    classifier: dict[str, Any], test_set: dict[str, torch.Tensor], params: dict[str, Any]
) -> dict[str, Any]:
    """Clean accuracy of the saved classifier on the **full** test set.

    Args:
        classifier: checkpoint dict written by :func:`train_classifier` (reloaded through
            :func:`atop.models.load_classifier`, which checks it).
        test_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        params: ``params:classifier_pretraining`` (device, amp, eval_batch_size).

    Returns:
        ``{"clean_test_acc": float in [0, 1], "train_seconds", "epochs", "arch",
        "device", "n_train", "n_test"}``.

    Raises:
        atop.checkpoint.CheckpointError: the checkpoint is malformed.
    """
    device = resolve_device(params["device"])
    model = load_classifier(classifier, device=device)
    if params["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    acc = accuracy(
        model,
        test_set["images"],
        test_set["labels"],
        params["eval_batch_size"],
        device,
        params["amp"],
        params["channels_last"],
        progress=params.get("progress", True),
    )
    meta = classifier["meta"]
    metrics = {
        "clean_test_acc": acc,
        "train_seconds": meta["train_seconds"],
        "epochs": meta["epochs"],
        "arch": classifier["arch"],
        "device": meta["device"],
        "n_train": meta["n_train"],
        "n_test": len(test_set["labels"]),
    }
    log.info("classifier %s: clean test accuracy %.4f", classifier["arch"], acc)
    return metrics


def _eval_subset(n: int, size: int | None, seed: int) -> torch.Tensor:
    """A fixed random subset of ``size`` indices of ``range(n)`` (all of them if ``None``)."""
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values

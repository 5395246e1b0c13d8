"""Standard (non-robust) training of the classifier ``f`` of the defense ``f(g(t(x)))``.

The classifier is trained once on clean images with the usual recipe (SGD with momentum and
weight decay on every parameter, a per-batch schedule, random crop + flip, label smoothing)
and frozen by the later stages (paper §3-4). Setup and loop: :mod:`atop.trainers.common`.

Core module: torch and the project's core modules only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from atop.models import classifier_checkpoint, load_classifier
from atop.params import spec
from atop.trainers.common import (
    ClassifierTrainingParams,
    prepare_training,
    training_loop,
    training_meta,
    training_summary,
)
from atop.training import accuracy, autocast, resolve_device

log = logging.getLogger(__name__)


@dataclass(init=False, frozen=True)
class ClassifierParams(ClassifierTrainingParams):
    """``classifier_pretraining`` (conf/base/parameters_classifier_pretraining.yml)."""

    KEY = "classifier_pretraining"

    label_smoothing: float = spec(ge=0, lt=1)
    val_images: int | None = spec(
        ge=1, weights=False, unit="(monitor images scored per epoch; null = all)"
    )


def classifier_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp: bool,
    label_smoothing: float,
) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """The standard step: one optimizer step on the label-smoothed cross-entropy.

    Returns:
        ``(x, y) -> {"loss", "train_acc"}`` (0-dim tensors) for float32 ``[B, 3, H, W]``
        images in ``[0, 1]`` and int64 ``[B]`` labels; bf16 autocast per :func:`autocast`.
    """

    def train_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}

    return train_step


def train_classifier(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    monitor_indices: list[int],
    params: ClassifierParams,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Train a classifier from scratch with the standard recipe.

    Args:
        train_set, test_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        class_names: the C class names (``num_classes = C``).
        monitor_indices: held-out test images (outside the evaluation subset); the first
            ``val_images`` of them are scored after each epoch.
        params: ``classifier_pretraining``.

    Returns:
        ``(checkpoint, history)``: :func:`atop.models.classifier_checkpoint` (config:
        ``num_classes``, ``arch_kwargs``, train-set ``mean``/``std``; meta: see
        :func:`atop.trainers.common.training_meta`) and one row per epoch (``epoch``,
        ``loss``, ``train_acc`` on augmented images, ``test_acc``, ``lr``, ``seconds``).

    Raises:
        ValueError: labels outside ``[0, C)``.
        atop.training.NonFiniteLossError: the loss diverged (lower ``optimizer.lr``).
    """
    setup = prepare_training(
        train_set,
        test_set,
        class_names,
        params,
        monitor_indices=monitor_indices[: params.val_images],
        desc="classifier",
        decay_all=True,
    )
    model, optimizer = setup.classifier, setup.optimizer
    step = classifier_step(
        setup.network, optimizer, setup.device, params.amp, params.label_smoothing
    )
    history = training_loop(setup, {"classifier": model}, {"sgd": optimizer}, step, params)
    checkpoint = classifier_checkpoint(
        model, params.arch, setup.config, training_meta(setup, history, class_names)
    )
    return checkpoint, history


def evaluate_classifier(
    classifier: dict[str, Any],
    test_set: dict[str, torch.Tensor],
    params: ClassifierParams,
    train_seconds: float | None = None,
) -> dict[str, Any]:
    """Clean accuracy (in ``[0, 1]``) of a saved classifier on the **full** test set, with its
    training facts: ``{"clean_test_acc", "train_seconds", "epochs", "arch", "device",
    "n_train", "n_test"}``.

    Raises:
        atop.checkpoint.CheckpointError: the checkpoint is malformed.
    """
    device = resolve_device(params.device)
    channels_last = bool(params.channels_last)
    model = load_classifier(classifier, device=device, channels_last=channels_last)
    acc = accuracy(
        model,
        test_set["images"],
        test_set["labels"],
        params.eval_batch_size,
        device,
        channels_last,
        progress=params.progress,
    )
    log.info("classifier %s: clean test accuracy %.4f", classifier["arch"], acc)
    summary = training_summary(classifier, train_seconds, len(test_set["labels"]))
    return {"clean_test_acc": acc, **summary}

"""Nodes of the classifier pretraining stage: standard (non-robust) training of ``f``.

The classifier ``f`` of the defense ``f(g(t(x)))`` (paper §3-4) is trained once on clean
images with the standard recipe (SGD with momentum, weight decay, a per-batch learning-rate
schedule, random crop + flip), set up by :mod:`atop.classifier_training` (shared with the
baselines) and trained through the shared loop :func:`atop.training.fit`, then frozen by the
later stages. Plain functions, no Kedro imports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from atop.classifier_training import (
    eval_subset,
    prepare_training,
    training_loop,
    training_meta,
    training_summary,
)
from atop.models import classifier_checkpoint, load_classifier
from atop.training import accuracy, autocast, resolve_device

log = logging.getLogger(__name__)

#: History columns written to classifier_history.csv, in order.
HISTORY_COLUMNS = ["epoch", "loss", "train_acc", "test_acc", "lr", "seconds"]


def train_classifier(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train a classifier from scratch with the standard recipe.

    The setup is :func:`atop.classifier_training.prepare_training` with weight decay on
    every parameter; the step is :func:`classifier_train_step`.

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
    monitor = eval_subset(len(test_set["labels"]), params.get("eval_subset"), params["seed"])
    setup = prepare_training(
        train_set,
        test_set,
        class_names,
        params,
        monitor_indices=monitor,
        desc="classifier",
        decay_all=True,
    )
    model, optimizer = setup.classifier, setup.optimizer
    train_step = classifier_train_step(
        model, optimizer, setup.device, params["amp"], params["label_smoothing"]
    )
    history = training_loop(setup, {"classifier": model}, {"sgd": optimizer}, train_step, params)
    meta = training_meta(setup, history, class_names)
    checkpoint = classifier_checkpoint(model, params["arch"], setup.config, meta)
    return checkpoint, pd.DataFrame(history)[HISTORY_COLUMNS]


def classifier_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp: bool,
    label_smoothing: float,
) -> Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """The standard training step: one SGD step on the label-smoothed cross-entropy.

    Args:
        model: the classifier (in train mode: :func:`atop.training.fit` sets it).
        optimizer: its optimizer.
        device: where the model runs (bf16 autocast on CUDA when ``amp``).
        amp: mixed precision on CUDA.
        label_smoothing: of :func:`torch.nn.functional.cross_entropy`, in ``[0, 1)``.

    Returns:
        ``(x, y) -> {"loss", "train_acc"}`` (0-dim float tensors) for float32
        ``[B, 3, H, W]`` images in ``[0, 1]`` and int64 ``[B]`` labels.
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
    metrics = {"clean_test_acc": acc, **training_summary(classifier, len(test_set["labels"]))}
    log.info("classifier %s: clean test accuracy %.4f", classifier["arch"], acc)
    return metrics

"""Nodes of the PGD adversarial-training baseline (Madry et al., ICLR 2018).

The classifier is trained from scratch on PGD adversarial examples only (ℓ∞, eps 8/255, step
2/255, 10 steps, random start; :func:`atop.baselines.pgd_at_step`) through the shared loop
:func:`atop.training.fit`, then scored: clean accuracy on the full test set and PGD-20
robust accuracy on the first images of the shared evaluation subset (``eval_indices``).
The full robustness evaluation (AutoAttack, same images as every defense) is the
evaluation stage's job; these metrics are a quick check of the training.

The helpers :func:`prepare_training`, :func:`classifier_sgd`, :func:`training_loop` and
:func:`evaluate_robust_classifier` are shared with the RvS stage
(:mod:`atop.pipelines.rvs.nodes`). Plain functions, no Kedro imports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from atop.attacks import build_attack, robust_correct, run_attack
from atop.baselines import build_pgd_at_attack, pgd_at_step
from atop.models import build_classifier, classifier_checkpoint, load_classifier
from atop.pipelines.classifier_pretraining.nodes import channel_stats, lr_factor
from atop.training import Batches, LoopConfig, accuracy, fit, resolve_device, seed_everything

log = logging.getLogger(__name__)

#: Parameters that do not change the trained weights (left out of the resume fingerprint).
NOT_IN_FINGERPRINT = {"device", "resume_path", "progress", "eval_batch_size", "robust_eval"}


@dataclass
class TrainingSetup:
    """What every baseline trainer needs before its own parts: built from the parameters."""

    device: torch.device
    channels_last: bool
    classifier: nn.Module
    config: dict[str, Any]
    batches: Batches
    loop: LoopConfig
    monitor_images: torch.Tensor
    monitor_labels: torch.Tensor


def prepare_training(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    eval_indices: list[int],
    params: dict[str, Any],
    desc: str,
) -> TrainingSetup:
    """Seed, pick the device, build the classifier and the training batches.

    Args:
        train_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        test_set: same layout.
        class_names: the C class names (``num_classes = C``).
        eval_indices: the shared evaluation subset (indices into ``test_set``); its images
            give the per-epoch ``test_acc`` column.
        params: the stage's parameters (``arch``, ``arch_kwargs``, ``batch_size``,
            ``train_subset``, ``augment``, ``seed``, ``device``, ``epochs``, ...).
        desc: progress-bar label.

    Returns:
        A :class:`TrainingSetup`.

    Raises:
        ValueError: labels outside ``[0, C)``, an empty ``eval_indices`` or a bad
            ``train_subset``.
    """
    num_classes = len(class_names)
    for name, split in (("train_set", train_set), ("test_set", test_set)):
        labels = split["labels"]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"{name} labels span [{labels.min()}, {labels.max()}] but there are "
                f"{num_classes} class names: rerun data_ingestion."
            )
    if not eval_indices:
        raise ValueError("eval_indices is empty: rerun data_ingestion (eval_subset.size > 0).")
    device = resolve_device(params["device"])
    channels_last = device.type == "cuda"
    generator = seed_everything(params["seed"])
    images, labels = _train_subset(train_set, params.get("train_subset"), params["seed"])

    mean, std = channel_stats(images)
    config = {"num_classes": num_classes, **params["arch_kwargs"], "mean": mean, "std": std}
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
        },
        progress=params.get("progress", True),
    )
    index = torch.as_tensor(eval_indices, dtype=torch.int64)
    return TrainingSetup(
        device=device,
        channels_last=channels_last,
        classifier=classifier,
        config=config,
        batches=batches,
        loop=loop,
        monitor_images=test_set["images"][index],
        monitor_labels=test_set["labels"][index],
    )


def _train_subset(
    train_set: dict[str, torch.Tensor], size: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split, or a fixed random subset of ``size`` images (seeded)."""
    n = len(train_set["labels"])
    if size is None or size >= n:
        return train_set["images"], train_set["labels"]
    if size < 1:
        raise ValueError(f"train_subset must be a positive number of images or null, got {size}.")
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return train_set["images"][keep], train_set["labels"][keep]


def classifier_sgd(model: nn.Module, optimizer: dict[str, Any]) -> torch.optim.SGD:
    """SGD with weight decay on the conv/linear weights only (not on batch-norm parameters
    and biases), as the TensorFlow code of Madry et al. and of RvS (their ``DW`` variables).

    Args:
        model: the classifier.
        optimizer: ``{"lr", "momentum", "nesterov", "weight_decay"}``.
    """
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [
            {"params": weights, "weight_decay": optimizer["weight_decay"]},
            {"params": others, "weight_decay": 0.0},
        ],
        lr=optimizer["lr"],
        momentum=optimizer["momentum"],
        nesterov=optimizer["nesterov"],
    )


def training_loop(
    setup: TrainingSetup,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    train_step: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
    schedule: dict[str, Any],
    params: dict[str, Any],
) -> list[dict[str, float]]:
    """Run :func:`atop.training.fit` with a per-batch learning-rate schedule and a per-epoch
    clean ``test_acc`` on the evaluation subset.

    Args:
        setup: from :func:`prepare_training`.
        modules: every module to checkpoint for resuming (the classifier first).
        optimizers: every optimizer; the schedule drives the FIRST one (the classifier's).
        train_step: ``(x, y) -> {"loss", ...}`` (it steps the optimizers itself).
        schedule: ``{"name", "warmup_fraction", "milestones", "gamma"}`` of
            :func:`atop.pipelines.classifier_pretraining.nodes.lr_factor`.
        params: the stage's parameters (``eval_batch_size``, ``amp``).

    Returns:
        The history rows of :func:`atop.training.fit`.
    """
    total_steps = setup.loop.epochs * setup.loop.steps_per_epoch(setup.batches)
    first = next(iter(optimizers.values()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(first, lr_factor(schedule, total_steps))

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
    """The checkpoint's ``meta``: class names, epochs, training time (s), device, n_train."""
    return {
        "class_names": list(class_names),
        "epochs": setup.loop.epochs,
        "train_seconds": float(sum(row["seconds"] for row in history)),
        "device": str(setup.device),
        "n_train": len(setup.batches.labels),
        "last_epoch_test_acc": history[-1]["test_acc"],
    }


def train_pgd_at(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    eval_indices: list[int],
    params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Madry PGD adversarial training of a classifier from scratch.

    Args:
        train_set, test_set, class_names, eval_indices: see :func:`prepare_training`.
        params: ``params:adversarial_training`` (conf/base/parameters_adversarial_training.yml):
            the classifier, SGD and schedule as the classifier stage, plus ``attack``
            (``eps``, ``alpha``, ``steps`` of the training PGD).

    Returns:
        ``(checkpoint, history)``: the :func:`atop.models.classifier_checkpoint` dict (meta:
        class names, epochs, ``train_seconds``, device, n_train, the training attack) and
        the per-epoch DataFrame (``epoch, loss, adv_acc, test_acc, lr, seconds``; loss and
        adv_acc are on the training adversarial examples).

    Raises:
        atop.training.NonFiniteLossError: the loss diverged (lower ``optimizer.lr``).
    """
    setup = prepare_training(train_set, test_set, class_names, eval_indices, params, "pgd-at")
    model = setup.classifier
    optimizer = classifier_sgd(model, params["optimizer"])
    attack = build_pgd_at_attack(model, **params["attack"])

    def train_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return pgd_at_step(model, optimizer, x, y, attack=attack, amp=params["amp"])

    history = training_loop(
        setup, {"classifier": model}, {"sgd": optimizer}, train_step, params["schedule"], params
    )
    meta = {**training_meta(setup, history, class_names), "attack": dict(params["attack"])}
    checkpoint = classifier_checkpoint(model, params["arch"], setup.config, meta)
    return checkpoint, pd.DataFrame(history)


def evaluate_robust_classifier(
    classifier: dict[str, Any],
    test_set: dict[str, torch.Tensor],
    eval_indices: list[int],
    params: dict[str, Any],
) -> dict[str, Any]:
    """Quick scores of a robustly trained classifier: clean accuracy on the full test set,
    clean and PGD-20 accuracy on the first ``robust_eval.images`` of ``eval_indices``.

    The attack is :func:`atop.attacks.build_attack` ``pgd`` (ℓ∞, random start, one EOT
    sample: the classifier is deterministic) in float32, the classifier in eval mode.

    Args:
        classifier: checkpoint dict (reloaded with :func:`atop.models.load_classifier`).
        test_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        eval_indices: the shared evaluation subset.
        params: the stage's parameters (``device``, ``amp``, ``eval_batch_size``,
            ``seed``, ``robust_eval: {images, eps, alpha, steps}``).

    Returns:
        ``{"clean_test_acc", "subset_clean_acc", "pgd_robust_acc", "pgd_steps",
        "robust_images", "eps", "train_seconds", "epochs", "arch", "device", "n_train",
        "n_test"}`` (accuracies in ``[0, 1]``, seconds of training excluding evaluation).

    Raises:
        atop.checkpoint.CheckpointError: the checkpoint is malformed.
    """
    device = resolve_device(params["device"])
    model = load_classifier(classifier, device=device)
    cuda = device.type == "cuda"
    batch = params["eval_batch_size"]
    clean = accuracy(
        model, test_set["images"], test_set["labels"], batch, device, params["amp"], cuda
    )
    spec = params["robust_eval"]
    index = torch.as_tensor(eval_indices[: spec["images"]], dtype=torch.int64)
    images = test_set["images"][index].float().div(255.0).to(device)
    labels = test_set["labels"][index].to(device)
    attack = build_attack(
        model,
        {
            "name": "pgd",
            "norm": "Linf",
            "eps": spec["eps"],
            "alpha": spec["alpha"],
            "steps": spec["steps"],
            "eot_iter": 1,
        },
        n_classes=classifier["config"]["num_classes"],
    )
    torch.manual_seed(params["seed"])
    progress = params.get("progress", True)
    adversarial = run_attack(attack, images, labels, batch, progress=progress)
    subset_clean = robust_correct(model, images, labels, 1, batch, progress=False)
    robust = robust_correct(model, adversarial, labels, 1, batch, progress=False)
    meta = classifier["meta"]
    metrics = {
        "clean_test_acc": clean,
        "subset_clean_acc": subset_clean.float().mean().item(),
        "pgd_robust_acc": robust.float().mean().item(),
        "pgd_steps": spec["steps"],
        "robust_images": len(index),
        "eps": spec["eps"],
        "train_seconds": meta["train_seconds"],
        "epochs": meta["epochs"],
        "arch": classifier["arch"],
        "device": meta["device"],
        "n_train": meta["n_train"],
        "n_test": len(test_set["labels"]),
    }
    log.info(
        "%s: clean %.4f, PGD-%d robust %.4f on %d images, trained in %.0f s",
        classifier["arch"],
        clean,
        spec["steps"],
        metrics["pgd_robust_acc"],
        len(index),
        meta["train_seconds"],
    )
    return metrics

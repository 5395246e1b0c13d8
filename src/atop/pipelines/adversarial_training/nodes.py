"""Nodes of the PGD adversarial-training baseline (Madry et al., ICLR 2018).

The classifier is trained from scratch on PGD adversarial examples only (ℓ∞, eps 8/255, step
2/255, 10 steps, random start; :func:`atop.baselines.pgd_at_step`) through the shared loop
:func:`atop.training.fit`, then scored: clean accuracy on the full test set and PGD-20
robust accuracy on the first images of the shared evaluation subset (``eval_indices``).
The full robustness evaluation (AutoAttack, same images as every defense) is the
evaluation stage's job; these metrics are a quick check of the training.

The setup (classifier, SGD with weight decay on the conv/linear weights only, batches,
schedule, per-epoch ``test_acc``) is :mod:`atop.classifier_training`, shared with
classifier pretraining and RvS; :func:`evaluate_robust_classifier` is shared with the RvS
stage (:mod:`atop.pipelines.rvs.nodes`). Plain functions, no Kedro imports.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch

from atop.attacks import build_attack, robust_correct, run_attack
from atop.baselines import build_pgd_at_attack, pgd_at_step
from atop.classifier_training import (
    prepare_training,
    training_loop,
    training_meta,
    training_summary,
)
from atop.models import classifier_checkpoint, load_classifier
from atop.training import accuracy, resolve_device

log = logging.getLogger(__name__)


def train_pgd_at(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    eval_indices: list[int],
    params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Madry PGD adversarial training of a classifier from scratch.

    Args:
        train_set, test_set, class_names: see
            :func:`atop.classifier_training.prepare_training`.
        eval_indices: the shared evaluation subset (indices into ``test_set``, not empty);
            its images give the per-epoch ``test_acc`` column.
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
    setup = prepare_training(
        train_set, test_set, class_names, params, monitor_indices=eval_indices, desc="pgd-at"
    )
    model, optimizer = setup.classifier, setup.optimizer
    attack = build_pgd_at_attack(model, **params["attack"])

    def train_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return pgd_at_step(model, optimizer, x, y, attack=attack, amp=params["amp"])

    history = training_loop(setup, {"classifier": model}, {"sgd": optimizer}, train_step, params)
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
    metrics = {
        "clean_test_acc": clean,
        "subset_clean_acc": subset_clean.float().mean().item(),
        "pgd_robust_acc": robust.float().mean().item(),
        "pgd_steps": spec["steps"],
        "robust_images": len(index),
        "eps": spec["eps"],
        **training_summary(classifier, len(test_set["labels"])),
    }
    log.info(
        "%s: clean %.4f, PGD-%d robust %.4f on %d images, trained in %.0f s",
        classifier["arch"],
        clean,
        spec["steps"],
        metrics["pgd_robust_acc"],
        len(index),
        metrics["train_seconds"],
    )
    return metrics

"""PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018, Eq. 2.1): the classifier trained from scratch on PGD
adversarial examples only (ℓ∞, eps 8/255, step 2/255, 10 steps, random start).

The attack is the evaluation's PGD (:func:`atop.attacks.build_attack`, one EOT sample: the
classifier is deterministic), run by torchattacks with the model in ``eval()`` mode (the
usual choice, e.g. TRADES); the update runs in ``train()`` mode. Setup and loop:
:mod:`atop.trainers.common` (weight decay on conv/linear weights only, as Madry's code).

Core module: torch, torchattacks and the project's core modules only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchattacks.attack import Attack

from atop.attacks import build_attack
from atop.models import classifier_checkpoint
from atop.params import Params, spec
from atop.trainers.common import (
    PIXEL_SCALE,
    ClassifierTrainingParams,
    prepare_training,
    training_loop,
    training_meta,
)
from atop.trainers.quick_check import RobustEvalParams
from atop.training import autocast


@dataclass(init=False, frozen=True)
class PGDTrainAttackParams(Params):
    """The training attack: ℓ∞ PGD-``steps`` with step ``alpha``, random start."""

    eps: float = spec(gt=0, le=1, unit=PIXEL_SCALE)
    alpha: float = spec(gt=0, le=1, unit=PIXEL_SCALE)
    steps: int = spec(ge=1)


@dataclass(init=False, frozen=True)
class PGDATParams(ClassifierTrainingParams):
    """``adversarial_training`` (conf/base/parameters_adversarial_training.yml)."""

    KEY = "adversarial_training"

    attack: PGDTrainAttackParams
    robust_eval: RobustEvalParams


def pgd_attack(model: nn.Module, attack: PGDTrainAttackParams, n_classes: int) -> Attack:
    """The ℓ∞ PGD of Madry PGD-AT on ``model`` (random start), built after the model is on
    its device (torchattacks reads it from the parameters)."""
    spec_ = {"name": "pgd", "norm": "Linf", "eps": attack.eps, "alpha": attack.alpha}
    return build_attack(model, {**spec_, "steps": attack.steps, "eot_iter": 1}, n_classes)


def pgd_at_step(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    attack: Attack,
    amp: bool = True,
    network: nn.Module | None = None,
) -> dict[str, float]:
    """One Madry PGD-AT step: attack the batch (float32 ``[B, 3, H, W]`` in ``[0, 1]``,
    labels int64 ``[B]``), then one optimizer step on the adversarial examples only.

    The attack runs on ``classifier``; the update's forward pass through ``network`` (its
    data-parallel wrapper, :func:`atop.distributed.data_parallel`; default: ``classifier``).
    The classifier is left in ``train()`` mode. Returns ``{"loss", "adv_acc"}`` (floats, on
    the adversarial batch, before the update).

    Raises:
        ValueError: ``attack`` targets another model than ``classifier``.
    """
    if attack.model is not classifier:
        raise ValueError(
            "The attack targets another model than the classifier being trained: build it "
            "with `pgd_attack(classifier, ...)`."
        )
    with autocast(x.device, enabled=amp):
        x_adv = attack(x, y)
    classifier.train()
    with autocast(x.device, enabled=amp):
        logits = (classifier if network is None else network)(x_adv)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "adv_acc": (logits.argmax(1) == y).float().mean().item()}


def train_pgd_at(
    train_set: dict[str, Tensor],
    test_set: dict[str, Tensor],
    class_names: list[str],
    monitor_indices: list[int],
    params: PGDATParams,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Madry PGD adversarial training of a classifier from scratch.

    Args:
        train_set, test_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        class_names: the classes.
        monitor_indices: held-out test images; the first ``robust_eval.images`` are scored
            after each epoch (``test_acc``).
        params: ``adversarial_training``.

    Returns:
        ``(checkpoint, history)``: :func:`atop.models.classifier_checkpoint` (meta adds the
        training ``attack``) and one row per epoch (``epoch, loss, adv_acc, test_acc, lr,
        seconds``; loss and adv_acc on the training adversarial examples).

    Raises:
        atop.training.NonFiniteLossError: the loss diverged (lower ``optimizer.lr``).
    """
    setup = prepare_training(
        train_set,
        test_set,
        class_names,
        params,
        monitor_indices=monitor_indices[: params.robust_eval.images],
        desc="pgd-at",
    )
    model, optimizer = setup.classifier, setup.optimizer
    attack = pgd_attack(model, params.attack, len(class_names))

    def train_step(x: Tensor, y: Tensor) -> dict[str, float]:
        return pgd_at_step(
            model, optimizer, x, y, attack=attack, amp=params.amp, network=setup.network
        )

    history = training_loop(setup, {"classifier": model}, {"sgd": optimizer}, train_step, params)
    meta = {**training_meta(setup, history, class_names), "attack": params.attack.to_dict()}
    return classifier_checkpoint(model, params.arch, setup.config, meta), history

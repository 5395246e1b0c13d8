"""AToP: adversarial fine-tuning of the purifier (paper Eq. 9, Algorithm 1).

For every batch (x, y) of the training split:

1. craft adversarial examples ``x' = x + delta`` with the configured torchattacks attack
   against the whole defended model ``f(g(t(.)))`` (Eq. 9's inner max; the default) or
   against the classifier ``f`` alone (what the authors' code did; kept for comparison);
2. update only the purifier ``g`` (and its discriminator ``D``) with

       L(theta_g) = L_org(x') + lambda * CE(y, f(g(t(x'))))

   where ``L_org`` is the pretraining loss (:class:`atop.trainers.purifier.PurifierStep`)
   and the CE term is computed on the purified adversarial examples. The classifier ``f`` is
   frozen (eval mode, no gradients to its weights). Adam, lr 1e-4, betas (0.5, 0.999);
   lambda = 0.1.

The random transform is the one the purifier was pretrained with (its checkpoint's
``meta.transform``: one home). A validation split held out from the *training* images
(never the evaluation subset) tracks the defended model's clean and adversarial accuracy
per epoch.

Core module: torch, torchattacks and the project's core modules only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atop.attacks import build_attack, check_spec, robust_correct, run_attack
from atop.data import random_split, take, to_unit
from atop.defense import PurifiedClassifier
from atop.models import load_classifier
from atop.models.purifier import load_purifier, purifier_checkpoint
from atop.params import spec
from atop.trainers.purifier import GANParams, PurifierStep
from atop.training import (
    Batches,
    LoopConfig,
    fit,
    resolve_device,
    seed_everything,
    training_seconds,
)
from atop.transforms import build_transform

log = logging.getLogger(__name__)

ATTACK_TARGETS = ("defense", "classifier")
RECONSTRUCTION_TARGETS = ("clean", "adversarial")


@dataclass(init=False, frozen=True)
class AToPParams(GANParams):
    """``atop_finetuning`` (conf/base/parameters_atop_finetuning.yml)."""

    KEY = "atop_finetuning"

    val_images: int = spec(ge=1, unit="(training images held out for validation)")
    lambda_cls: float = spec(ge=0, unit="(weight of CE(y, f(g(t(x')))))")
    cls_start_epoch: int = spec(ge=1)
    reconstruction_target: str = spec(choices=RECONSTRUCTION_TARGETS)
    attack: dict[str, Any]
    attack_target: str = spec(choices=ATTACK_TARGETS)
    val_attack: dict[str, Any] = spec(weights=False)
    val_draws: int = spec(ge=1, weights=False)

    def check(self) -> None:
        super().check()
        for key in ("attack", "val_attack"):
            try:
                check_spec(getattr(self, key))
            except ValueError as exc:
                self.fail(key, str(exc))


class EpochCounter(nn.Module):
    """Number of finished epochs, as a buffer so the resume checkpoint restores it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("done", torch.zeros((), dtype=torch.int64))


def atop_train_step(
    classifier: nn.Module,
    step: PurifierStep,
    attack: Callable[[Tensor, Tensor], Tensor],
    *,
    lambda_cls: float | Callable[[], float] = 0.1,
    reconstruction_target: str = "clean",
) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
    """One AToP update on a batch (Algorithm 1): craft ``x'``, then update ``g`` and ``D``.

    Args:
        classifier: the frozen ``f`` (eval mode, ``requires_grad`` off).
        step: the purifier's GAN update (:class:`atop.trainers.purifier.PurifierStep`).
        attack: ``(x, y) -> x'`` (a torchattacks attack on ``f(g(t(.)))`` or on ``f``).
        lambda_cls: weight of ``CE(y, f(g(t(x'))))``, or a callable giving the current one
            (0 before ``cls_start_epoch``).
        reconstruction_target: ``"clean"`` (``L_org`` restores ``x``) or ``"adversarial"``
            (restores ``x'``).

    Returns:
        ``train_step(x, y) -> terms`` for :func:`atop.training.fit`; ``x`` float
        ``[B, 3, H, W]`` in [0, 1], ``y`` int64 ``[B]``. Terms: ``loss``, ``l1``, ``gan_g``,
        ``d_loss``, ``ce`` (the unweighted CE on the purified adversarial examples).
    """
    if reconstruction_target not in RECONSTRUCTION_TARGETS:
        raise ValueError(f"reconstruction_target must be one of {RECONSTRUCTION_TARGETS}.")
    weight_of = lambda_cls if callable(lambda_cls) else (lambda: float(lambda_cls))
    clean_target = reconstruction_target == "clean"

    def train_step(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_adv = attack(x, y).detach()  # torchattacks restores the modules' modes afterwards
        weight = weight_of()

        def cls_term(purified: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            ce = F.cross_entropy(classifier(purified), y)
            return weight * ce, {"ce": ce}

        return step(x_adv, x if clean_target else x_adv, cls_term)

    return train_step


def finetune_purifier(
    classifier_ckpt: dict[str, Any],
    purifier_ckpt: dict[str, Any],
    train_set: dict[str, Tensor],
    class_names: list[str],
    params: AToPParams,
) -> tuple[dict[str, Any], list[dict[str, float]], dict[str, Any]]:
    """Fine-tune the pretrained purifier with AToP (Eq. 9) against the frozen classifier.

    Args:
        classifier_ckpt: the pretrained classifier ``f``.
        purifier_ckpt: the pretrained purifier ``g`` + ``D``; its ``meta.transform`` is ``t``.
        train_set: ``{"images": uint8 [N,3,H,W], "labels": int64 [N]}``; ``val_images`` of
            them are held out (seeded), ``train_images`` of the rest trained on.
        class_names: the classes (their number is the attacks' ``n_classes``).
        params: ``atop_finetuning``.

    Returns:
        ``(atop_purifier checkpoint, history rows, metrics)``. The checkpoint has the
        pretrained purifier's layout and transform, so the evaluation loads both alike.

    Raises:
        ValueError: a purifier checkpoint without discriminator or transform, or too few
            training images for ``val_images`` + ``train_images``.
        atop.training.NonFiniteLossError: a loss term became NaN/inf (the last good resume
            checkpoint is kept).
    """
    transform_config = purifier_ckpt.get("meta", {}).get("transform")
    if transform_config is None:
        raise ValueError(
            "The purifier checkpoint has no meta.transform: rerun purifier_pretraining "
            "(it records the random transform the purifier was trained with)."
        )
    device = resolve_device(params.device)
    batch_generator = seed_everything(params.seed)

    classifier = load_classifier(classifier_ckpt, device).requires_grad_(False).eval()
    generator, discriminator = load_purifier(purifier_ckpt, device)
    if discriminator is None:
        raise ValueError("AToP needs the purifier's discriminator: the checkpoint has none.")
    transform = build_transform(transform_config)
    defense = PurifiedClassifier(classifier, generator, transform).to(device)
    attack_model = defense if params.attack_target == "defense" else classifier
    n_classes = len(class_names)
    attack = build_attack(attack_model, params.attack, n_classes)

    n = len(train_set["labels"])
    n_train = n - params.val_images if params.train_images is None else params.train_images
    val_index, train_index = random_split(n, [params.val_images, n_train], params.seed)
    train, val = take(train_set, train_index), take(train_set, val_index)
    batches = Batches(
        train["images"],
        train["labels"],
        params.batch_size,
        shuffle=True,
        generator=batch_generator,
        device=device,
        drop_last=True,
    )
    step = PurifierStep.with_adam(generator, discriminator, transform, params, device)
    counter = EpochCounter().to(device)
    cls_start = params.cls_start_epoch
    train_step = atop_train_step(
        classifier,
        step,
        attack,
        lambda_cls=lambda: params.lambda_cls if int(counter.done) + 1 >= cls_start else 0.0,
        reconstruction_target=params.reconstruction_target,
    )

    val_attack = build_attack(defense, params.val_attack, n_classes)
    draws = params.val_draws

    def evaluate(epoch: int) -> dict[str, float]:
        counter.done.fill_(epoch)
        generator.eval()
        x = to_unit(val["images"]).to(device)
        y = val["labels"].to(device)
        clean = robust_correct(defense, x, y, draws=draws, batch_size=256, progress=False)
        x_adv = run_attack(val_attack, x, y, batch_size=256, progress=False)
        adv = robust_correct(defense, x_adv, y, draws=draws, batch_size=256, progress=False)
        return {
            "val_clean_acc": clean.float().mean().item(),
            "val_adv_acc": adv.float().mean().item(),
        }

    fingerprint = {**params.fingerprint(), "purifier_meta": {"transform": transform_config}}
    history = fit(
        modules={"generator": generator, "discriminator": discriminator, "counter": counter},
        optimizers={"generator": step.opt_generator, "discriminator": step.opt_discriminator},
        train_step=train_step,
        batches=batches,
        config=LoopConfig(
            epochs=params.epochs,
            desc="atop_finetuning",
            resume_path=params.resume_path,
            max_batches_per_epoch=params.max_batches_per_epoch,
            fingerprint=fingerprint,
            progress=params.progress,
        ),
        evaluate=evaluate,
    )
    last = history[-1]
    metrics = {
        "train_seconds": training_seconds(history),
        "epochs": params.epochs,
        "n_train": len(train["labels"]),
        "val_size": len(val["labels"]),
        "device": str(device),
        "attack": dict(params.attack),
        "attack_target": params.attack_target,
        "reconstruction_target": params.reconstruction_target,
        "lambda_cls": params.lambda_cls,
        "transform": dict(transform_config),
        "val_clean_acc": last["val_clean_acc"],
        "val_adv_acc": last["val_adv_acc"],
        "val_attack": dict(params.val_attack),
    }
    meta = {**purifier_ckpt.get("meta", {}), "stage": "atop_finetuning", "atop": metrics}
    checkpoint = purifier_checkpoint(generator, discriminator, meta=meta)
    log.info(
        "AToP fine-tuning done in %.0f s: validation clean %.3f, adversarial %.3f",
        metrics["train_seconds"],
        metrics["val_clean_acc"],
        metrics["val_adv_acc"],
    )
    return checkpoint, history, metrics

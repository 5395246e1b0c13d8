"""AToP: adversarial fine-tuning of the purifier (paper Eq. 9, Algorithm 1), and the
compute-matched arms that isolate its adversarial term.

For every batch (x, y) of the training split:

1. craft adversarial examples ``x' = x + delta`` with the arm's torchattacks attack against
   the whole defended model ``f(g(t(.)))`` (Eq. 9's inner max; the default) or against the
   classifier ``f`` alone (what the authors' code did; kept as an option); an arm without
   an attack uses ``x' = x``;
2. update only the purifier ``g`` (and its discriminator ``D``) with

       L(theta_g) = L_org(x') + lambda * CE(y, f(g(t(x'))))

   where ``L_org`` is the pretraining loss (:class:`atop.trainers.purifier.PurifierStep`)
   and the CE term is computed on the purified examples. The classifier ``f`` is frozen.

Every **arm** (``atop_finetuning.arms``) starts from the same pretrained purifier with the
same optimizer, loss settings, images and budget and differs only in ``lambda_cls`` and
``attack``. The main job's four arms are a 2 x 2 of Eq. 9's two changes to pretraining,
reconstruction from ``t(x')`` and the CE term on ``x'``: ``ap_continued`` (lambda 0, no
attack: just more pretraining), ``ap_classifier_aware`` (lambda > 0 on clean images: the
denoised-smoothing term without an adversary), ``adversarial_reconstruction`` (lambda 0,
FGSM ``x'``: ``g`` learns to restore ``x`` from ``t(x')``, adversarial denoiser training) and
``atop`` (both: Eq. 9 with FGSM against ``f(g(t(.)))``); ``atop_pgd`` (PGD-k) is in the full
comparison. An arm's training attack runs under bf16 autocast with its ``attack_amp`` (set
where a paired strength check against float32 passed: docs/benchmarks.md). ``seed`` draws the data order, the attack's and the
transform's randomness; the training subset is drawn with ``subset_seed``, so the seeds
study changes only the former. Validation runs on held-out test images outside the
evaluation subset (``monitor_indices``), judged single-draw.

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

from atop.attacks import build_attack, check_spec, draw_correct, run_attack
from atop.checkpoint import state_hash
from atop.data import random_subset, take, to_unit
from atop.defense import PurifiedClassifier
from atop.models import load_classifier
from atop.models.purifier import load_purifier, purifier_checkpoint
from atop.params import Params, spec
from atop.trainers.purifier import GANParams, PurifierStep
from atop.training import (
    Batches,
    LoopConfig,
    autocast,
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
class ArmParams(Params):
    """One arm: the weight of the classification term, the adversary (null: none) and
    whether that adversary runs under bf16 autocast (``attack_amp``: only where a paired
    strength check against float32 passed, docs/benchmarks.md)."""

    lambda_cls: float = spec(ge=0, unit="(weight of CE(y, f(g(t(x')))))")
    attack: dict[str, Any] | None
    attack_amp: bool

    def check(self) -> None:
        if self.attack is not None:
            try:
                check_spec(self.attack)
            except ValueError as exc:
                self.fail("attack", str(exc))


@dataclass(init=False, frozen=True)
class AToPParams(GANParams):
    """``atop_finetuning`` (conf/base/parameters_atop_finetuning.yml): the settings every arm
    shares, and the arms (``arms.<name>``: ``lambda_cls``, ``attack``)."""

    KEY = "atop_finetuning"

    val_images: int = spec(ge=1, weights=False, unit="(monitor images for validation)")
    cls_start_epoch: int = spec(ge=1)
    reconstruction_target: str = spec(choices=RECONSTRUCTION_TARGETS)
    attack_target: str = spec(choices=ATTACK_TARGETS)
    val_attack: dict[str, Any] = spec(weights=False)
    val_draws: int = spec(ge=1, weights=False)
    subset_seed: int = spec(ge=0)
    arms: dict[str, ArmParams]

    def check(self) -> None:
        super().check()
        try:
            check_spec(self.val_attack)
        except ValueError as exc:
            self.fail("val_attack", str(exc))
        if not self.arms:
            self.fail("arms", "list at least one arm.")


class EpochCounter(nn.Module):
    """Number of finished epochs, as a buffer so the resume checkpoint restores it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("done", torch.zeros((), dtype=torch.int64))


def atop_train_step(
    classifier: nn.Module,
    step: PurifierStep,
    attack: Callable[[Tensor, Tensor], Tensor] | None,
    *,
    lambda_cls: float | Callable[[], float] = 0.1,
    reconstruction_target: str = "clean",
) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
    """One AToP update on a batch (Algorithm 1): craft ``x'``, then update ``g`` and ``D``.

    Args:
        classifier: the frozen ``f`` (eval mode, ``requires_grad`` off).
        step: the purifier's GAN update (:class:`atop.trainers.purifier.PurifierStep`).
        attack: ``(x, y) -> x'`` (a torchattacks attack on ``f(g(t(.)))`` or on ``f``);
            ``None``: ``x' = x`` (the arms without an adversary).
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
        # torchattacks restores the modules' modes afterwards
        x_adv = x if attack is None else attack(x, y).detach()
        weight = weight_of()

        def cls_term(purified: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            ce = F.cross_entropy(classifier(purified), y)
            return weight * ce, {"ce": ce}

        return step(x_adv, x if clean_target else x_adv, cls_term)

    return train_step


def amp_attack(
    attack: Callable[[Tensor, Tensor], Tensor], device: torch.device, enabled: bool
) -> Callable[[Tensor, Tensor], Tensor]:
    """``attack`` whose forward and backward passes run under bf16 autocast when ``enabled``
    (:func:`atop.training.autocast`; a no-op without bf16 units). Its output stays float32:
    the attack's steps and projection are float32 arithmetic on the input."""
    if not enabled:
        return attack

    def run(x: Tensor, y: Tensor) -> Tensor:
        with autocast(device, True):
            return attack(x, y)

    return run


def finetune_purifier(
    classifier_ckpt: dict[str, Any],
    purifier_ckpt: dict[str, Any],
    train_set: dict[str, Tensor],
    test_set: dict[str, Tensor],
    monitor_indices: list[int],
    class_names: list[str],
    params: AToPParams,
    arm: str,
) -> tuple[dict[str, Any], list[dict[str, float]], dict[str, Any]]:
    """Fine-tune the pretrained purifier as arm ``arm`` against the frozen classifier.

    Args:
        classifier_ckpt: the pretrained classifier ``f``.
        purifier_ckpt: the pretrained purifier ``g`` + ``D``; its ``meta.transform`` is ``t``.
        train_set: ``{"images": uint8 [N,3,H,W], "labels": int64 [N]}``; a fixed random
            subset of ``train_images`` (drawn with ``seed``, the same for every arm).
        test_set: same layout; ``val_images`` of ``monitor_indices`` give the per-epoch
            validation (clean and ``val_attack`` accuracy, single-draw over ``val_draws``).
        monitor_indices: held-out test images outside the evaluation subset.
        class_names: the classes (their number is the attacks' ``n_classes``).
        params: ``atop_finetuning``; ``arm``: a key of ``params.arms``.

    Returns:
        ``(checkpoint, history rows, metrics)``. The checkpoint has the pretrained
        purifier's layout and transform (``meta.atop`` adds the arm's settings).

    Raises:
        ValueError: an unknown arm, a purifier checkpoint without discriminator or transform.
        atop.training.NonFiniteLossError: a loss term became NaN/inf (the last good resume
            checkpoint is kept).
    """
    if arm not in params.arms:
        raise ValueError(f"Unknown arm {arm!r}: atop_finetuning.arms has {sorted(params.arms)}.")
    settings = params.arms[arm]
    transform_config = purifier_ckpt.get("meta", {}).get("transform")
    if transform_config is None:
        raise ValueError(
            "The purifier checkpoint has no meta.transform: rerun purifier_pretraining "
            "(it records the random transform the purifier was trained with)."
        )
    device = resolve_device(params.device)
    batch_generator = seed_everything(params.seed)

    classifier = load_classifier(classifier_ckpt, device, channels_last=True).requires_grad_(False)
    generator, discriminator = load_purifier(purifier_ckpt, device)
    if discriminator is None:
        raise ValueError("AToP needs the purifier's discriminator: the checkpoint has none.")
    transform = build_transform(transform_config)
    defense = PurifiedClassifier(classifier, generator, transform).to(device)
    attack_model = defense if params.attack_target == "defense" else classifier
    n_classes = len(class_names)
    attack = None
    if settings.attack is not None:
        attack = amp_attack(
            build_attack(attack_model, settings.attack, n_classes), device, settings.attack_amp
        )
    keep = random_subset(len(train_set["labels"]), params.train_images, params.subset_seed)
    train = take(train_set, keep)
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
        lambda_cls=lambda: settings.lambda_cls if int(counter.done) + 1 >= cls_start else 0.0,
        reconstruction_target=params.reconstruction_target,
    )

    val = take(test_set, monitor_indices[: params.val_images])
    x_val, y_val = to_unit(val["images"]).to(device), val["labels"].to(device)
    val_attack = build_attack(defense, params.val_attack, n_classes)
    batch, draws = params.batch_size, params.val_draws

    def evaluate(epoch: int) -> dict[str, float]:
        counter.done.fill_(epoch)
        generator.eval()
        clean = draw_correct(defense, x_val, y_val, draws, batch)
        x_adv = run_attack(val_attack, x_val, y_val, batch, progress=False)
        adv = draw_correct(defense, x_adv, y_val, draws, batch)
        return {
            "val_clean_acc": clean.float().mean().item(),
            "val_adv_acc": adv.float().mean().item(),
        }

    fingerprint = {
        **params.fingerprint(),
        "arms": {arm: settings.to_dict()},
        "purifier": state_hash(purifier_ckpt["state_dict"]["generator"]),
        "classifier": state_hash(classifier_ckpt["state_dict"]),
    }
    history = fit(
        modules={"generator": generator, "discriminator": discriminator, "counter": counter},
        optimizers={"generator": step.opt_generator, "discriminator": step.opt_discriminator},
        train_step=train_step,
        batches=batches,
        config=LoopConfig(
            epochs=params.epochs,
            desc=f"finetune {arm}",
            resume_path=params.resume_path and params.resume_path.format(arm=arm),
            max_batches_per_epoch=params.max_batches_per_epoch,
            fingerprint=fingerprint,
            progress=params.progress,
        ),
        evaluate=evaluate,
    )
    last = history[-1]
    metrics = {
        "arm": arm,
        "classifier_hash": state_hash(classifier_ckpt["state_dict"]),
        "lambda_cls": settings.lambda_cls,
        "attack": None if settings.attack is None else dict(settings.attack),
        "attack_target": params.attack_target,
        "attack_amp": settings.attack_amp,
        "seed": params.seed,
        "reconstruction_target": params.reconstruction_target,
        "train_seconds": training_seconds(history),
        "epochs": params.epochs,
        "n_train": len(train["labels"]),
        "val_images": len(val["labels"]),
        "val_draws": draws,
        "device": str(device),
        "transform": dict(transform_config),
        "val_clean_acc": last["val_clean_acc"],
        "val_adv_acc": last["val_adv_acc"],
        "val_attack": dict(params.val_attack),
    }
    timing = {"train_seconds"}  # in the metrics, not the checkpoint: same settings, same bytes
    settings_only = {k: v for k, v in metrics.items() if k not in timing}
    meta = {**purifier_ckpt.get("meta", {}), "stage": "atop_finetuning", "atop": settings_only}
    checkpoint = purifier_checkpoint(generator, discriminator, meta=meta)
    log.info(
        "%s fine-tuning done in %.0f s: validation clean %.3f, adversarial %.3f (single draw)",
        arm,
        metrics["train_seconds"],
        metrics["val_clean_acc"],
        metrics["val_adv_acc"],
    )
    return checkpoint, history, metrics

"""AToP: adversarial fine-tuning of the purifier (paper Eq. 9, Algorithm 1).

For every batch (x, y) of the training split:

1. craft adversarial examples ``x' = x + delta`` with the configured torchattacks attack
   against the whole defended model ``f(g(t(.)))`` (Eq. 9's inner max; the default) or
   against the classifier ``f`` alone (what the authors' code did; kept for comparison);
2. update only the purifier ``g`` (and its discriminator ``D``) with

       L(theta_g) = L_org(x') + lambda * CE(y, f(g(t(x'))))

   where ``L_org`` is the pretraining loss (L1 on the coarse and refined outputs + hinge GAN,
   :class:`atop.purifier_training.PurifierStep`) and the CE term is computed on the purified
   adversarial examples. The classifier ``f`` is frozen (eval mode, no gradients to its
   weights). Adam, lr 1e-4, betas (0.5, 0.999); lambda = 0.1.

The random transform is the one the purifier was pretrained with (stored in the purifier
checkpoint's ``meta.transform``: one home). A small validation split held out from the
*training* images (never the evaluation subset) tracks the defended model's clean and
adversarial accuracy per epoch. Plain functions, no Kedro imports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atop.attacks import build_attack, robust_correct, run_attack
from atop.defense import PurifiedClassifier
from atop.models import load_classifier
from atop.models.purifier import load_purifier, purifier_checkpoint
from atop.purifier_training import PurifierStep
from atop.training import Batches, LoopConfig, fit, resolve_device, seed_everything
from atop.transforms import build_transform

log = logging.getLogger(__name__)

ATTACK_TARGETS = ("defense", "classifier")
RECONSTRUCTION_TARGETS = ("clean", "adversarial")
#: Parameters that do not change the trained weights (left out of the resume fingerprint).
_NOT_IN_FINGERPRINT = {"device", "resume_path", "progress"}


class EpochCounter(nn.Module):
    """Number of finished epochs, as a buffer so the resume checkpoint restores it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("done", torch.zeros((), dtype=torch.int64))


def split_train_validation(
    train_set: dict[str, Tensor], n_train: int | None, val_size: int, seed: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Hold out ``val_size`` training images for validation; take ``n_train`` of the rest.

    Args:
        train_set: ``{"images": uint8 [N,3,H,W], "labels": int64 [N]}``.
        n_train: training images to use (``None`` = all but the validation ones).
        val_size: held-out validation images (> 0).
        seed: seed of the fixed permutation.

    Returns:
        ``(train, validation)`` dicts of the same layout, disjoint.

    Raises:
        ValueError: the split is too small for ``val_size`` + ``n_train``.
    """
    n = len(train_set["labels"])
    n_train = n - val_size if n_train is None else int(n_train)
    if val_size < 1 or n_train < 1 or val_size + n_train > n:
        raise ValueError(
            f"atop_finetuning needs val_size ({val_size}) + n_train ({n_train}) <= {n} "
            "training images, both positive: lower them in parameters_atop_finetuning.yml."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size : val_size + n_train]
    pick = lambda idx: {k: v[idx] for k, v in train_set.items()}  # noqa: E731
    return pick(train_idx), pick(val_idx)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"atop_finetuning.{name}={value!r}: choose one of {choices}.")


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
        step: the purifier's GAN update (:class:`atop.purifier_training.PurifierStep`).
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
    _check_choice("reconstruction_target", reconstruction_target, RECONSTRUCTION_TARGETS)
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
    params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """Fine-tune the pretrained purifier with AToP (Eq. 9) against the frozen classifier.

    Args:
        classifier_ckpt: the pretrained classifier ``f`` (catalog ``classifier``).
        purifier_ckpt: the pretrained purifier ``g`` + ``D`` (catalog ``purifier``); its
            ``meta.transform`` is the random transform ``t``.
        train_set: ``{"images": uint8 [N,3,H,W], "labels": int64 [N]}``.
        class_names: the dataset's classes (their number sets the attack's ``n_classes``).
        params: ``atop_finetuning`` parameters (see ``parameters_atop_finetuning.yml``).

    Returns:
        ``(atop_purifier checkpoint, per-epoch history, metrics)``. The checkpoint has the
        pretrained purifier's layout and transform, so the evaluation loads both alike.

    Raises:
        ValueError: invalid choices, or a purifier checkpoint without discriminator or
            transform.
        atop.training.NonFiniteLossError: a loss term became NaN/inf (the last good resume
            checkpoint is kept).
    """
    _check_choice("attack_target", params["attack_target"], ATTACK_TARGETS)
    transform_config = purifier_ckpt.get("meta", {}).get("transform")
    if transform_config is None:
        raise ValueError(
            "The purifier checkpoint has no meta.transform: rerun purifier_pretraining "
            "(it records the random transform the purifier was trained with)."
        )
    device = resolve_device(params["device"])
    batch_generator = seed_everything(int(params["seed"]))

    classifier = load_classifier(classifier_ckpt, device).requires_grad_(False).eval()
    generator, discriminator = load_purifier(purifier_ckpt, device)
    if discriminator is None:
        raise ValueError("AToP needs the purifier's discriminator: the checkpoint has none.")
    transform = build_transform(transform_config)
    defense = PurifiedClassifier(classifier, generator, transform).to(device)
    attack_model = defense if params["attack_target"] == "defense" else classifier
    n_classes = len(class_names)
    attack = build_attack(attack_model, params["attack"], n_classes)

    train, val = split_train_validation(
        train_set, params.get("n_train"), int(params["val_size"]), int(params["seed"])
    )
    batches = Batches(
        train["images"],
        train["labels"],
        int(params["batch_size"]),
        shuffle=True,
        generator=batch_generator,
        device=device,
        drop_last=True,
    )
    step = PurifierStep.with_adam(generator, discriminator, transform, params, device)
    opt_g, opt_d = step.opt_generator, step.opt_discriminator
    counter = EpochCounter().to(device)
    lambda_cls = float(params["lambda_cls"])
    cls_start = int(params.get("cls_start_epoch") or 1)
    train_step = atop_train_step(
        classifier,
        step,
        attack,
        lambda_cls=lambda: lambda_cls if int(counter.done) + 1 >= cls_start else 0.0,
        reconstruction_target=params["reconstruction_target"],
    )

    val_attack = build_attack(defense, params["val_attack"], n_classes)
    draws = int(params["val_draws"])

    def evaluate(epoch: int) -> dict[str, float]:
        counter.done.fill_(epoch)
        generator.eval()
        x = val["images"].float().div(255.0).to(device)
        y = val["labels"].to(device)
        clean = robust_correct(defense, x, y, draws=draws, batch_size=256, progress=False)
        x_adv = run_attack(val_attack, x, y, batch_size=256, progress=False)
        adv = robust_correct(defense, x_adv, y, draws=draws, batch_size=256, progress=False)
        return {
            "val_clean_acc": clean.float().mean().item(),
            "val_adv_acc": adv.float().mean().item(),
        }

    fingerprint = {k: v for k, v in params.items() if k not in _NOT_IN_FINGERPRINT}
    fingerprint["purifier_meta"] = {"transform": transform_config}
    began = time.perf_counter()
    history = fit(
        modules={"generator": generator, "discriminator": discriminator, "counter": counter},
        optimizers={"generator": opt_g, "discriminator": opt_d},
        train_step=train_step,
        batches=batches,
        config=LoopConfig(
            epochs=int(params["epochs"]),
            desc="atop_finetuning",
            resume_path=params.get("resume_path"),
            max_batches_per_epoch=params.get("max_batches_per_epoch"),
            fingerprint=fingerprint,
            progress=bool(params.get("progress", True)),
        ),
        evaluate=evaluate,
    )
    seconds = time.perf_counter() - began
    last = history[-1]
    metrics = {
        "train_seconds": round(seconds, 2),
        "epochs": int(params["epochs"]),
        "n_train": len(train["labels"]),
        "val_size": len(val["labels"]),
        "device": str(device),
        "attack": dict(params["attack"]),
        "attack_target": params["attack_target"],
        "reconstruction_target": params["reconstruction_target"],
        "lambda_cls": lambda_cls,
        "transform": dict(transform_config),
        "val_clean_acc": last["val_clean_acc"],
        "val_adv_acc": last["val_adv_acc"],
        "val_attack": dict(params["val_attack"]),
    }
    meta = {**purifier_ckpt.get("meta", {}), "stage": "atop_finetuning", "atop": metrics}
    checkpoint = purifier_checkpoint(generator, discriminator, meta=meta)
    log.info(
        "AToP fine-tuning done in %.0f s: validation clean %.3f, adversarial %.3f",
        seconds,
        metrics["val_clean_acc"],
        metrics["val_adv_acc"],
    )
    return checkpoint, pd.DataFrame(history), metrics

"""The GAN purifier's training: pretraining (paper Eq. 8) and the update AToP shares.

The purifier ``g`` of AToP (paper Sec. 3) and its discriminator ``D`` are pre-trained to
restore ``x`` from ``t(x)`` (Eq. 8: hinge GAN term + L1 on the coarse and refined outputs), on
clean training images seen through the random transform ``t`` (RT1 / RT2 / RT3).
AToP fine-tuning (Eq. 9, :mod:`atop.trainers.atop`) updates ``g`` and ``D`` the same way on
adversarial examples and adds ``lambda * CE(y, f(g(t(x'))))``:

    L(theta_g) = L_org(x') + lambda * CE(y, f(g(t(x'))))          (Eq. 9)
    L_org      = hinge GAN term + L1 on the coarse and refined outputs   (Eq. 8)

:class:`PurifierStep` is that one update: draw ``t``, run ``g``, one ``D`` step (hinge loss),
one ``g`` step; the GAN term is computed on the non-detached purified images, so it really
trains ``g`` (the authors' code detached it). :func:`train_purifier` is the pretraining,
:func:`evaluate_purifier` its held-out PSNR and "AP" clean accuracy.

Held-out images: the first ``val_images`` of the monitor subset (test images outside the
shared evaluation subset, ``monitor_indices``), so no evaluated image is used here. The transform's
parameters have one home, the checkpoint's ``meta["transform"]``; AToP fine-tuning and the
evaluation read it from there.

Core module: torch and the project's core modules only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from atop.attacks import draw_correct
from atop.data import random_subset, take, to_unit
from atop.defense import (
    PurifiedClassifier,
    from_working,
    purify_draw,
    to_working,
    working_side,
)
from atop.distributed import DistributedParams, data_parallel
from atop.models import load_classifier
from atop.models.purifier import (
    build_purifier,
    discriminator_loss,
    generator_loss,
    load_purifier,
    purifier_checkpoint,
    purifier_config,
)
from atop.params import Params, run_only, spec
from atop.training import (
    Batches,
    LoopConfig,
    autocast,
    fit,
    resolve_device,
    seed_everything,
    training_seconds,
)
from atop.transforms import RandomTransform, TransformConfig, build_transform

log = logging.getLogger(__name__)

STAGE = "purifier_pretraining"
#: Grey level that shows the holes of t(x) in the samples figure.
HOLE_GREY = 0.5


@dataclass(init=False, frozen=True)
class GANParams(Params):
    """Keys of the purifier's GAN update shared by pretraining and AToP fine-tuning."""

    epochs: int = spec(ge=1)
    batch_size: int = spec(ge=1)
    train_images: int | None = spec(ge=1, unit="(training images; null = all)")
    lr: float = spec(gt=0, le=1)
    betas: list[float] = spec(ge=0, lt=1)
    l1_weight: float = spec(ge=0)
    gan_weight: float = spec(ge=0)
    seed: int = spec(ge=0)
    device: str = run_only()
    amp: bool
    max_batches_per_epoch: int | None = spec(ge=1)
    resume_path: str | None = run_only()
    progress: bool = run_only()
    distributed: DistributedParams

    def check(self) -> None:
        if len(self.betas) != 2:
            self.fail("betas", f"Adam needs two betas, got {self.betas}.")


@dataclass(init=False, frozen=True)
class PurifierParams(GANParams):
    """``purifier_pretraining`` (conf/base/parameters_purifier_pretraining.yml)."""

    KEY = "purifier_pretraining"

    transform: TransformConfig
    purifier: dict[str, Any]
    augment: bool
    val_images: int = spec(ge=1, weights=False, unit="(held-out test images)")
    draws: int = spec(ge=1, weights=False)
    eval_batch_size: int = spec(ge=1, weights=False)
    sample_images: int = spec(ge=1, weights=False)

    def check(self) -> None:
        super().check()
        if "image_size" in self.purifier:
            self.fail("purifier.image_size", "remove it: it is taken from the data.")
        try:
            purifier_config(self.purifier)
        except ValueError as exc:
            self.fail("purifier", str(exc))


class PurifierStep:
    """One discriminator step then one generator step of the GAN purifier.

    Args:
        generator: ``g`` (:class:`atop.models.purifier.InpaintingGenerator`).
        discriminator: ``D`` (:class:`atop.models.purifier.PatchDiscriminator`).
        transform: ``t`` (RT1 / RT2 / RT3), drawn afresh for every batch and image.
        opt_generator, opt_discriminator: their optimizers (paper: Adam, lr 1e-4,
            betas (0.5, 0.999)).
        l1_weight, gan_weight: weights of the L1 and adversarial terms of ``L_org``.
        device: where the modules live (bf16 autocast on CUDA when ``amp``).
        amp: mixed precision on CUDA.

    Inside a ``torch.distributed`` group, ``g`` and ``D`` are run through
    :func:`atop.distributed.data_parallel` wrappers (``self.generator``,
    ``self.discriminator``): both updates average their gradients over the ranks. In one
    process they are the modules themselves.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        transform: RandomTransform,
        opt_generator: torch.optim.Optimizer,
        opt_discriminator: torch.optim.Optimizer,
        *,
        l1_weight: float = 1.0,
        gan_weight: float = 1.0,
        device: torch.device | str = "cpu",
        amp: bool = True,
    ) -> None:
        self.generator = data_parallel(generator)
        self.discriminator = data_parallel(discriminator)
        self.transform = transform
        self.opt_generator = opt_generator
        self.opt_discriminator = opt_discriminator
        self.l1_weight = float(l1_weight)
        self.gan_weight = float(gan_weight)
        self.device = torch.device(device)
        self.amp = amp

    @classmethod
    def with_adam(
        cls,
        generator: nn.Module,
        discriminator: nn.Module,
        transform: RandomTransform,
        params: GANParams,
        device: torch.device | str = "cpu",
    ) -> PurifierStep:
        """The step with the paper's optimizers, Adam for ``g`` and ``D`` (paper: lr 1e-4,
        betas (0.5, 0.999)), from a stage's ``lr``, ``betas``, ``l1_weight``, ``gan_weight``
        and ``amp`` (purifier pretraining and AToP fine-tuning share them)."""
        adam = {"lr": params.lr, "betas": tuple(params.betas)}
        return cls(
            generator,
            discriminator,
            transform,
            torch.optim.Adam(generator.parameters(), **adam),
            torch.optim.Adam(discriminator.parameters(), **adam),
            l1_weight=params.l1_weight,
            gan_weight=params.gan_weight,
            device=device,
            amp=params.amp,
        )

    def __call__(
        self,
        x_in: Tensor,
        target: Tensor,
        extra_loss: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]] | None = None,
    ) -> dict[str, Tensor]:
        """Update ``D`` then ``g`` on one batch.

        Args:
            x_in: float ``[B, 3, H, W]`` in [0, 1]: what ``t`` is applied to (clean ``x``
                in pretraining, ``x'`` in AToP).
            target: float ``[B, 3, H, W]`` in [0, 1]: the image ``g`` must restore (the
                L1 target and the discriminator's "real" images), usually the clean ``x``.
            extra_loss: optional ``purified -> (loss, terms)`` added to ``g``'s loss, where
                ``purified`` is ``g(t(x_in))`` ``[B, 3, H, W]`` in [0, 1] (RT3: the N copies
                combined); AToP passes ``lambda * CE(y, f(purified))``.

        Returns:
            Detached scalar terms: ``loss`` (g's total), ``l1``, ``gan_g``, ``d_loss`` and
            those of ``extra_loss``.

        Raises:
            ValueError: ``x_in`` / ``target`` shapes differ or are not images in [0, 1].
        """
        if x_in.shape != target.shape:
            raise ValueError(
                f"x_in {tuple(x_in.shape)} and target {tuple(target.shape)} must have the same shape."
            )
        work = working_side(self.generator, x_in.shape[-1])
        draw = self.transform(to_working(x_in, work))
        target_work = to_working(target, work)
        n_masks = draw.masks.shape[0]
        targets = target_work.expand(n_masks, *target_work.shape).flatten(0, 1)
        masks = draw.masks.flatten(0, 1)

        with autocast(self.device, self.amp):
            result, purified = purify_draw(self.generator, draw, self.transform.config)
            purified = from_working(purified, x_in.shape[-1])

        # Discriminator: real = target images, fake = purified copies (detached inside).
        self.opt_discriminator.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            d_loss = discriminator_loss(self.discriminator, targets, result.purified, masks)
        d_loss.backward()
        self.opt_discriminator.step()

        # Generator: L_org (+ the extra term), through the updated discriminator.
        self.opt_generator.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            g_loss = generator_loss(
                self.discriminator, targets, result, masks, self.l1_weight, self.gan_weight
            )
            total = g_loss.total
            terms: dict[str, Tensor] = {}
            if extra_loss is not None:
                extra, terms = extra_loss(purified)
                total = total + extra
        total.backward()
        self.opt_generator.step()
        # D's parameters received gradients from the generator's adversarial term; they are
        # cleared (set_to_none) before D's next step and never applied.
        return {
            "loss": total.detach(),
            "l1": g_loss.l1.detach(),
            "gan_g": g_loss.adversarial.detach(),
            "d_loss": d_loss.detach(),
            **{name: value.detach() for name, value in terms.items()},
        }


def image_side(split: dict[str, Tensor], name: str) -> int:
    """The side P of the square images of a split (``{"images": uint8 [N, 3, P, P], ...}``).

    Raises:
        ValueError: the images are not ``[N, 3, P, P]``.
    """
    shape = tuple(split["images"].shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
        raise ValueError(
            f"{name} images must be square RGB [N, 3, P, P] for the purifier, got {shape}: "
            "rerun data_ingestion (it resizes and center-crops to a square side)."
        )
    return shape[2]


def psnr(x: Tensor, reference: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB, for images in [0, 1] (peak 1).

    ``10 log10(1 / mean((x - reference)^2))`` over each image's pixels and channels (an MSE
    of 0 is floored at 1e-10, i.e. 100 dB).

    Args:
        x, reference: float ``[N, C, H, W]`` in [0, 1], same shape.

    Returns:
        float32 ``[N]``.
    """
    mse = (x.float() - reference.float()).square().flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def purify_with_seed(
    generator: nn.Module,
    transform: RandomTransform,
    images: Tensor,
    seed: int,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """``g(t(x))`` with the transform drawn from a fixed seed (comparable across epochs).

    The draws come from a private ``torch.Generator``, so the global random state (the
    training's) is left untouched. ``g`` is put in eval mode and left there.

    Args:
        generator: the purifier ``g`` (``InpaintingGenerator``), on the images' device.
        transform: ``t``.
        images: float ``[N, 3, H, W]`` in [0, 1].
        seed: seed of the draws.
        batch_size: images per forward pass.

    Returns:
        ``(transformed, purified)``, float ``[N, 3, H, W]`` in [0, 1]: ``t(x)`` with the
        holes of its first mask shown grey (:data:`HOLE_GREY`; RT3: the first of its N
        copies), and ``g(t(x))`` (RT3: the N purified copies combined).
    """
    generator.eval()
    rng = torch.Generator(device=images.device).manual_seed(seed)
    side, work = images.shape[-1], working_side(generator, images.shape[-1])
    transformed, purified = [], []
    for start in range(0, len(images), batch_size):
        draw = transform(to_working(images[start : start + batch_size], work), generator=rng)
        _, combined = purify_draw(generator, draw, transform.config)
        hole = draw.masks[0]
        shown = draw.image * (1.0 - hole) + HOLE_GREY * hole
        transformed.append(from_working(shown, side))
        purified.append(from_working(combined.float(), side))
    return torch.cat(transformed), torch.cat(purified)


def train_purifier(
    train_set: dict[str, Tensor],
    test_set: dict[str, Tensor],
    monitor_indices: list[int],
    params: PurifierParams,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Pre-train the purifier ``g`` and its discriminator ``D`` (paper Eq. 8).

    Args:
        train_set: ``{"images": uint8 [N, 3, P, P], "labels": int64 [N]}``; a fixed random
            subset of ``train_images`` images is used (``null`` = all).
        test_set: same layout.
        monitor_indices: held-out test images outside the evaluation subset; the first
            ``val_images`` give the per-epoch ``val_psnr`` and the final metrics.
        params: ``purifier_pretraining``.

    Returns:
        ``(checkpoint, history)``: :func:`atop.models.purifier.purifier_checkpoint` of ``g``
        and ``D`` with ``meta`` = ``{"transform", "stage", "epochs", "n_train",
        "val_psnr" (dB, last epoch), "n_val", "val_indices", "device"}`` (no timing: the same
        settings give the same bytes; the seconds are in the history),
        and one row per epoch (``epoch, loss, l1, gan_g, d_loss, val_psnr, lr, seconds``:
        g's total loss, L1 of coarse + refined, hinge generator term, D's hinge loss, means
        over the epoch; val_psnr in dB; lr the generator's).

    Raises:
        ValueError: non-square images or train/test sizes that differ, or too few images.
        atop.training.NonFiniteLossError: a loss diverged (the last good resume file stays).
    """
    side = image_side(train_set, "train_set")
    if image_side(test_set, "test_set") != side:
        raise ValueError(
            f"train_set images are {side} px but test_set images are "
            f"{test_set['images'].shape[-1]} px: rerun data_ingestion."
        )
    transform = RandomTransform.from_config(params.transform)
    device = resolve_device(params.device)
    batch_generator = seed_everything(params.seed)

    generator, discriminator = build_purifier({**params.purifier, "image_size": side})
    generator.to(device)
    discriminator.to(device)
    step = PurifierStep.with_adam(generator, discriminator, transform, params, device)

    keep = random_subset(len(train_set["labels"]), params.train_images, params.seed)
    train = take(train_set, keep)
    batches = Batches(
        train["images"],
        train["labels"],
        params.batch_size,
        shuffle=True,
        generator=batch_generator,
        augment=params.augment,
        device=device,
        drop_last=True,
    )
    if len(batches) == 0:
        raise ValueError(
            f"purifier_pretraining.batch_size={params.batch_size} exceeds the "
            f"{len(train['labels'])} training images: lower it or raise train_images."
        )
    val_index = torch.as_tensor(monitor_indices[: params.val_images], dtype=torch.int64)
    val_images = to_unit(test_set["images"][val_index].to(device))

    def evaluate(epoch: int) -> dict[str, float]:
        _, purified = purify_with_seed(
            generator, transform, val_images, params.seed, params.eval_batch_size
        )
        return {"val_psnr": psnr(purified, val_images).mean().item()}

    fingerprint = params.fingerprint()
    fingerprint.update(n_train=len(train["labels"]), image_size=side, val=val_index.tolist())
    history = fit(
        modules={"generator": generator, "discriminator": discriminator},
        optimizers={"generator": step.opt_generator, "discriminator": step.opt_discriminator},
        train_step=lambda x, y: step(x, x),
        batches=batches,
        config=LoopConfig(
            epochs=params.epochs,
            desc=STAGE,
            resume_path=params.resume_path,
            max_batches_per_epoch=params.max_batches_per_epoch,
            fingerprint=fingerprint,
            progress=params.progress,
        ),
        evaluate=evaluate,
    )
    meta = {
        "transform": transform.config.to_dict(),
        "stage": STAGE,
        "epochs": params.epochs,
        "n_train": len(train["labels"]),
        "val_psnr": history[-1]["val_psnr"],
        "n_val": len(val_index),
        "val_indices": val_index.tolist(),
        "device": str(device),
    }
    log.info(
        "purifier pretrained in %.0f s on %d images: held-out PSNR %.2f dB",
        training_seconds(history),
        meta["n_train"],
        meta["val_psnr"],
    )
    return purifier_checkpoint(generator, discriminator, meta=meta), history


@dataclass
class PurifierEvaluation:
    """:func:`evaluate_purifier`'s output: ``metrics`` (JSON-able) and the first images of the
    held-out set as float ``[n, 3, H, W]`` in ``[0, 1]``: ``clean``, ``transformed`` (holes
    grey) and ``purified``."""

    metrics: dict[str, Any]
    clean: Tensor
    transformed: Tensor
    purified: Tensor


def evaluate_purifier(
    purifier: dict[str, Any],
    classifier: dict[str, Any],
    test_set: dict[str, Tensor],
    eval_indices: list[int],
    params: PurifierParams,
    train_seconds: float | None = None,
) -> PurifierEvaluation:
    """PSNR and "AP" clean accuracy of the pretrained purifier on its held-out test images.

    The held-out images are the checkpoint's ``meta["val_indices"]`` (checked again to lie
    outside ``eval_indices``); the transform is its ``meta["transform"]``.

    * ``psnr``: mean per-image PSNR (dB) of ``g(t(x))`` vs ``x`` for one seeded draw of ``t``;
      ``psnr_transformed``: the same for ``t(x)`` with grey holes.
    * ``ap_clean_acc``: accuracy of ``f(g(t(x)))`` on clean ``x`` judged with ``draws`` fresh
      draws, single-draw (the mean over draws: :func:`atop.attacks.draw_correct`);
      ``classifier_clean_acc``: ``f`` alone on the same images.

    Raises:
        ValueError: a purifier trained on another image size, a checkpoint without
            ``meta.transform`` / ``meta.val_indices``, held-out images inside
            ``eval_indices``, or a classifier with too few classes.
        atop.checkpoint.CheckpointError: a malformed checkpoint.
    """
    meta = purifier.get("meta", {})
    missing = [key for key in ("transform", "val_indices") if key not in meta]
    if missing:
        raise ValueError(
            f"The purifier checkpoint's meta lacks {missing}: rerun purifier_pretraining."
        )
    side = image_side(test_set, "test_set")
    trained_side = purifier["config"]["image_size"]
    if trained_side != side:
        raise ValueError(
            f"The purifier was trained on {trained_side}x{trained_side} images but test_set "
            f"holds {side}x{side} images: rerun purifier_pretraining on this dataset."
        )
    overlap = sorted(set(meta["val_indices"]) & set(eval_indices))
    if overlap:
        raise ValueError(
            f"{len(overlap)} held-out images of the purifier (e.g. test index {overlap[0]}) are "
            "in the evaluation subset eval_indices, which changed since pretraining: rerun "
            "purifier_pretraining."
        )
    n_classes = classifier.get("config", {}).get("num_classes")
    if n_classes is not None and int(test_set["labels"].max()) >= n_classes:
        raise ValueError(
            f"The classifier has {n_classes} classes but test_set labels reach "
            f"{int(test_set['labels'].max())}: use the classifier of this dataset."
        )
    device = resolve_device(params.device)
    generator, _ = load_purifier(purifier, device)
    f = load_classifier(classifier, device, channels_last=True).requires_grad_(False)
    transform = build_transform(meta["transform"])
    index = torch.as_tensor(meta["val_indices"], dtype=torch.int64)
    images = to_unit(test_set["images"][index].to(device))
    labels = test_set["labels"][index].to(device)
    batch_size, seed, draws = params.eval_batch_size, params.seed, params.draws

    transformed, purified = purify_with_seed(generator, transform, images, seed, batch_size)
    psnr_purified, psnr_transformed = psnr(purified, images), psnr(transformed, images)
    defense = PurifiedClassifier(f, generator, transform).eval()
    torch.manual_seed(seed)
    ap_correct = draw_correct(defense, images, labels, draws, batch_size)
    raw_correct = draw_correct(f, images, labels, 1, batch_size)
    metrics = {
        "psnr": psnr_purified.mean().item(),
        "psnr_transformed": psnr_transformed.mean().item(),
        "ap_clean_acc": ap_correct.float().mean().item(),
        "classifier_clean_acc": raw_correct.float().mean().item(),
        "draws": draws,
        "n_val": len(index),
        "train_seconds": train_seconds,
        "epochs": meta.get("epochs"),
        "n_train": meta.get("n_train"),
        "transform": dict(meta["transform"]),
        "purifier": dict(purifier["config"]),
        "device": str(device),
    }
    log.info(
        "purifier: PSNR %.2f dB (t(x): %.2f dB); clean accuracy %.4f purified (AP, %d draws) "
        "vs %.4f raw, on %d held-out test images",
        metrics["psnr"],
        metrics["psnr_transformed"],
        metrics["ap_clean_acc"],
        draws,
        metrics["classifier_clean_acc"],
        len(index),
    )
    n = min(params.sample_images, len(index))
    return PurifierEvaluation(metrics, images[:n], transformed[:n], purified[:n])

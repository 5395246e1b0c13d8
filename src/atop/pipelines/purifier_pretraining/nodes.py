"""Nodes of the purifier pretraining stage: train ``g`` (and ``D``) to restore ``x`` from ``t(x)``.

The GAN purifier ``g`` of AToP (paper Sec. 3) is pre-trained with paper Eq. 8 -- hinge GAN
loss + L1 on the coarse and refined outputs -- on clean training images seen through the
random transform ``t`` (RT1 / RT2 / RT3). One update = one discriminator step then one
generator step (:class:`atop.purifier_training.PurifierStep`, whose GAN term is not detached
and so really trains ``g``), driven by the shared loop :func:`atop.training.fit` (progress
bar, per-epoch history, resume file). Adam, betas (0.5, 0.999); the paper's lr 1e-4 and
equal L1 / GAN weights are the paper profile's, the CPU base profile raises the lr and lowers
the GAN weight (see conf/base/parameters_purifier_pretraining.yml).

Held-out images: ``n_val`` **test** images drawn with a fixed seed from the test images that
are NOT in the shared evaluation subset (``eval_indices``), so the attack evaluation of every
defense never runs on an image used here. They give the per-epoch PSNR of ``g(t(x))`` and the
final metrics: PSNR and the frozen classifier's accuracy on purified clean images (the "AP"
baseline: purifier without AToP).

The transform's parameters have one home, the checkpoint's ``meta["transform"]``
(``{"kind", "sigma", "missing_rate", "mask_block", "mask_number"}``); AToP fine-tuning and the
evaluation read it from there. Plain functions, no Kedro imports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from atop.attacks import robust_correct
from atop.defense import PurifiedClassifier, purify_draw
from atop.models import load_classifier
from atop.models.purifier import build_purifier, load_purifier, purifier_checkpoint
from atop.purifier_training import PurifierStep
from atop.training import Batches, LoopConfig, fit, resolve_device, seed_everything
from atop.transforms import RandomTransform, build_transform

log = logging.getLogger(__name__)

STAGE = "purifier_pretraining"
#: History columns written to purifier_history.csv, in order.
HISTORY_COLUMNS = ["epoch", "loss", "l1", "gan_g", "d_loss", "val_psnr", "lr", "seconds"]
#: Parameters that change neither the trained weights nor the history (left out of the
#: resume fingerprint).
_NOT_IN_FINGERPRINT = {"device", "resume_path", "progress", "draws", "n_samples"}
#: Grey level that shows the holes of t(x) in the samples figure.
HOLE_GREY = 0.5


# --------------------------------------------------------------------------- helpers


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


def held_out_indices(n_test: int, eval_indices: Sequence[int], n_val: int, seed: int) -> Tensor:
    """``n_val`` test-image indices for validation, never in the shared evaluation subset.

    A fixed random choice (``seed``) among ``range(n_test)`` minus ``eval_indices``, sorted.

    Args:
        n_test: number of test images.
        eval_indices: the evaluation subset (indices into the test split, from data_ingestion).
        n_val: how many held-out images (>= 1).
        seed: seed of the choice.

    Returns:
        int64 ``[n_val]``, sorted, disjoint from ``eval_indices``.

    Raises:
        ValueError: ``n_val < 1``, or fewer than ``n_val`` test images outside ``eval_indices``.
    """
    if isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 1:
        raise ValueError(f"purifier_pretraining.n_val must be an int >= 1, got {n_val!r}.")
    excluded = torch.zeros(n_test, dtype=torch.bool)
    excluded[torch.as_tensor(list(eval_indices), dtype=torch.int64)] = True
    candidates = (~excluded).nonzero().squeeze(1)
    if len(candidates) < n_val:
        raise ValueError(
            f"purifier_pretraining.n_val={n_val} but only {len(candidates)} of the {n_test} test "
            "images lie outside the evaluation subset (eval_indices): lower n_val."
        )
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return candidates[order[:n_val]].sort().values


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


def _subset(split: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    return {"images": split["images"][index], "labels": split["labels"][index]}


def _training_subset(train_set: dict[str, Tensor], n_train: int | None, seed: int) -> dict:
    """A fixed random subset of ``n_train`` training images (all of them if None)."""
    n = len(train_set["labels"])
    if n_train is None:
        return train_set
    if isinstance(n_train, bool) or not isinstance(n_train, int) or not 1 <= n_train <= n:
        raise ValueError(
            f"purifier_pretraining.n_train must be an int in [1, {n}] (the train split's size) "
            f"or null for all, got {n_train!r}."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _subset(train_set, order[:n_train].sort().values)


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
    transformed, purified = [], []
    for start in range(0, len(images), batch_size):
        draw = transform(images[start : start + batch_size], generator=rng)
        _, combined = purify_draw(generator, draw, transform.config)
        hole = draw.masks[0]
        transformed.append(draw.image * (1.0 - hole) + HOLE_GREY * hole)
        purified.append(combined.float())
    return torch.cat(transformed), torch.cat(purified)


def _check_purifier_config(config: dict[str, Any], side: int) -> dict[str, Any]:
    """The purifier config with ``image_size`` from the data (a different one raises)."""
    config = dict(config or {})
    given = config.get("image_size")
    if given is not None and given != side:
        raise ValueError(
            f"purifier_pretraining.purifier.image_size={given} but the dataset's images are "
            f"{side}x{side}: remove image_size from the parameters (it is taken from the data) "
            "or ingest the matching dataset."
        )
    return {**config, "image_size": side}


# --------------------------------------------------------------------------- nodes


def train_purifier(
    train_set: dict[str, Tensor],
    test_set: dict[str, Tensor],
    eval_indices: list[int],
    params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Pre-train the purifier ``g`` and its discriminator ``D`` (paper Eq. 8).

    Args:
        train_set: ``{"images": uint8 [N, 3, P, P], "labels": int64 [N]}``; a fixed random
            subset of ``n_train`` images is used (``null`` = all).
        test_set: same layout; ``n_val`` held-out images (outside ``eval_indices``) give
            the per-epoch ``val_psnr``.
        eval_indices: the shared evaluation subset (indices into ``test_set``), excluded
            from the held-out images.
        params: ``params:purifier_pretraining`` (see conf/base/parameters_purifier_pretraining.yml).

    Returns:
        ``(checkpoint, history)``: the :func:`atop.models.purifier.purifier_checkpoint`
        dict of ``g`` and ``D`` with ``meta`` = ``{"transform": {kind, sigma, missing_rate,
        mask_block, mask_number}, "stage", "epochs", "n_train", "train_seconds",
        "val_psnr" (dB, last epoch), "n_val", "val_indices", "device"}``, and a DataFrame
        with :data:`HISTORY_COLUMNS` (loss = g's total loss, l1 = L1 of coarse + refined,
        gan_g = hinge generator term, d_loss = discriminator hinge loss, all means over the
        epoch's batches; val_psnr in dB; lr = the generator's; seconds of training).

    Raises:
        ValueError: non-square images, train/test sizes that differ, an ``image_size``
            parameter that differs from the data, bad transform / purifier parameters, or
            ``n_train`` / ``n_val`` out of range.
        atop.training.NonFiniteLossError: a loss diverged (the last good resume file stays).
    """
    side = image_side(train_set, "train_set")
    if image_side(test_set, "test_set") != side:
        raise ValueError(
            f"train_set images are {side} px but test_set images are "
            f"{test_set['images'].shape[-1]} px: rerun data_ingestion."
        )
    transform = build_transform(params["transform"])
    purifier_config = _check_purifier_config(params["purifier"], side)
    device = resolve_device(params["device"])
    seed = int(params["seed"])
    batch_generator = seed_everything(seed)

    generator, discriminator = build_purifier(purifier_config)
    generator.to(device)
    discriminator.to(device)
    step = PurifierStep.with_adam(generator, discriminator, transform, params, device)
    opt_g, opt_d = step.opt_generator, step.opt_discriminator

    train = _training_subset(train_set, params.get("n_train"), seed)
    batches = Batches(
        train["images"],
        train["labels"],
        int(params["batch_size"]),
        shuffle=True,
        generator=batch_generator,
        augment=bool(params.get("augment", False)),
        device=device,
        drop_last=True,
    )
    if len(batches) == 0:
        raise ValueError(
            f"purifier_pretraining.batch_size={params['batch_size']} exceeds the "
            f"{len(train['labels'])} training images: lower it or raise n_train."
        )
    val_index = held_out_indices(len(test_set["labels"]), eval_indices, params["n_val"], seed)
    val_images = test_set["images"][val_index].to(device).float().div(255.0)
    eval_batch = int(params.get("eval_batch_size", 256))

    def evaluate(epoch: int) -> dict[str, float]:
        _, purified = purify_with_seed(generator, transform, val_images, seed, eval_batch)
        return {"val_psnr": psnr(purified, val_images).mean().item()}

    fingerprint = {k: v for k, v in params.items() if k not in _NOT_IN_FINGERPRINT}
    fingerprint.update(n_train=len(train["labels"]), image_size=side, val=val_index.tolist())
    history = fit(
        modules={"generator": generator, "discriminator": discriminator},
        optimizers={"generator": opt_g, "discriminator": opt_d},
        train_step=lambda x, y: step(x, x),
        batches=batches,
        config=LoopConfig(
            epochs=int(params["epochs"]),
            desc=STAGE,
            resume_path=params.get("resume_path"),
            max_batches_per_epoch=params.get("max_batches_per_epoch"),
            fingerprint=fingerprint,
            progress=bool(params.get("progress", True)),
        ),
        evaluate=evaluate,
    )
    meta = {
        "transform": transform.config.to_dict(),
        "stage": STAGE,
        "epochs": int(params["epochs"]),
        "n_train": len(train["labels"]),
        "train_seconds": float(sum(row["seconds"] for row in history)),
        "val_psnr": history[-1]["val_psnr"],
        "n_val": len(val_index),
        "val_indices": val_index.tolist(),
        "device": str(device),
    }
    log.info(
        "purifier pretrained in %.0f s on %d images: held-out PSNR %.2f dB",
        meta["train_seconds"],
        meta["n_train"],
        meta["val_psnr"],
    )
    checkpoint = purifier_checkpoint(generator, discriminator, meta=meta)
    return checkpoint, pd.DataFrame(history)[HISTORY_COLUMNS]


def evaluate_purifier(
    purifier: dict[str, Any],
    classifier: dict[str, Any],
    test_set: dict[str, Tensor],
    eval_indices: list[int],
    params: dict[str, Any],
) -> tuple[dict[str, Any], Figure]:
    """PSNR and "AP" clean accuracy of the pretrained purifier on its held-out test images.

    The held-out images are the checkpoint's ``meta["val_indices"]``, checked again to lie
    outside the evaluation subset. The transform is the checkpoint's ``meta["transform"]``.

    * ``psnr``: mean per-image PSNR (dB) of ``g(t(x))`` vs ``x`` for one draw of ``t`` with a
      fixed seed; ``psnr_transformed``: the same for ``t(x)`` itself with grey holes (what
      purification starts from).
    * ``ap_clean_acc``: accuracy of the frozen classifier on ``f(g(t(x)))`` for clean ``x``,
      judged with ``draws`` fresh draws by strict majority vote
      (:func:`atop.attacks.robust_correct` on :class:`atop.defense.PurifiedClassifier`);
      ``classifier_clean_acc``: the classifier alone on the same raw images.

    Args:
        purifier: the checkpoint written by :func:`train_purifier`.
        classifier: the frozen classifier checkpoint (catalog ``classifier``).
        test_set: ``{"images": uint8 [N, 3, P, P], "labels": int64 [N]}``.
        eval_indices: the shared evaluation subset (indices into ``test_set``).
        params: ``params:purifier_pretraining`` (device, seed, draws, eval_batch_size,
            n_samples).

    Returns:
        ``(metrics, figure)``: the metrics dict (also train_seconds, epochs, n_train,
        n_val, draws, transform, purifier config, device) and a matplotlib figure with
        ``n_samples`` columns of clean, transformed (holes grey) and purified images.

    Raises:
        ValueError: the purifier was trained on images of another size than ``test_set``'s,
            its checkpoint lacks ``meta.transform`` / ``meta.val_indices``, its held-out
            images overlap ``eval_indices`` (the subset changed since pretraining), or the
            classifier has fewer classes than the labels need.
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
    device = resolve_device(params["device"])
    generator, _ = load_purifier(purifier, device)
    f = load_classifier(classifier, device).requires_grad_(False)
    transform = build_transform(meta["transform"])
    index = torch.as_tensor(meta["val_indices"], dtype=torch.int64)
    images = test_set["images"][index].to(device).float().div(255.0)
    labels = test_set["labels"][index].to(device)
    batch_size = int(params.get("eval_batch_size", 256))
    seed = int(params["seed"])
    draws = int(params["draws"])

    transformed, purified = purify_with_seed(generator, transform, images, seed, batch_size)
    psnr_purified, psnr_transformed = psnr(purified, images), psnr(transformed, images)
    defense = PurifiedClassifier(f, generator, transform).eval()
    torch.manual_seed(seed)
    ap_correct = robust_correct(defense, images, labels, draws, batch_size, progress=False)
    raw_correct = robust_correct(f, images, labels, 1, batch_size, progress=False)
    metrics = {
        "psnr": psnr_purified.mean().item(),
        "psnr_transformed": psnr_transformed.mean().item(),
        "ap_clean_acc": ap_correct.float().mean().item(),
        "classifier_clean_acc": raw_correct.float().mean().item(),
        "draws": draws,
        "n_val": len(index),
        "train_seconds": meta.get("train_seconds"),
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
    n_samples = min(int(params.get("n_samples", 8)), len(index))
    figure = samples_figure(
        images[:n_samples],
        transformed[:n_samples],
        purified[:n_samples],
        title=f"{transform.config.kind.upper()} {_describe(meta['transform'])}: "
        f"mean PSNR {metrics['psnr']:.2f} dB on {len(index)} held-out test images",
    )
    return metrics, figure


def samples_figure(clean: Tensor, transformed: Tensor, purified: Tensor, title: str) -> Figure:
    """Clean, transformed and purified images side by side (one column per image).

    Args:
        clean, transformed, purified: float ``[n, 3, H, W]`` in [0, 1] (any device), n >= 1.
        title: the figure's title.

    Returns:
        A headless matplotlib figure (no pyplot state; rendered with Agg on save), 3 rows x
        n columns, each purified image titled with its PSNR.
    """
    n = len(clean)
    figure = Figure(figsize=(1.6 * n + 0.8, 5.6), layout="constrained")
    axes = figure.subplots(3, n, squeeze=False)
    rows = (("clean x", clean), ("t(x), holes grey", transformed), ("g(t(x))", purified))
    scores = psnr(purified, clean).tolist()
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 2:
                ax.set_title(f"{scores[c]:.1f} dB", fontsize=9)
        axes[r][0].set_ylabel(label, fontsize=10)
    figure.suptitle(title, fontsize=10)
    return figure


def _describe(transform: dict[str, Any]) -> str:
    parts = [f"sigma={transform['sigma']}", f"r={transform['missing_rate']}"]
    if transform["kind"] == "rt3":
        parts.append(f"N={transform['mask_number']}")
    if transform["kind"] == "rt1":
        parts = parts[1:]
    return ", ".join(parts)

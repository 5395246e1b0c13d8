"""Robustness-via-Synthesis (Baytaş & Deb, Neurocomputing 2023, arXiv 2108.09713, §3).

A classifier is trained from scratch together with a noise-to-perturbation generator
(:class:`atop.models.rvs.RvSGenerator`). Per batch, one generator step maximizes the entropic
OT distance between the classifier's penultimate features of the clean and the synthesized
batches (it never sees labels), then one classifier step minimizes
``CE(f(x_adv), smoothed y) + ot_weight * OT`` on freshly synthesized samples (as the authors'
code, which runs the two updates as separate graph evaluations). The OT term is
:func:`atop.ot.entropic_ot` (POT), passed in as ``ot_fn``. Setup and loop:
:mod:`atop.trainers.common`. Label smoothing inflates PGD accuracy (method.md §2): judge RvS
with the evaluation stage's AutoAttack.

Classifiers must return ``(logits, features)`` from ``classifier(x, return_features=True)``
(one forward pass), as the models of :mod:`atop.models.classifiers` do.

Core module: torch, POT and the project's core modules only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from atop.distributed import data_parallel
from atop.models import classifier_checkpoint
from atop.models.rvs import RvSGenerator, sample_adversarial
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

#: ``ot_fn(features_clean [n, d], features_adv [n, d]) -> 0-dim tensor``.
OTFunction = Callable[[Tensor, Tensor], Tensor]
#: ``arch`` of the generator checkpoint (``{"arch", "config", "state_dict", "meta"}``).
GENERATOR_ARCH = "rvs-generator"


@dataclass(init=False, frozen=True)
class RvSGeneratorParams(Params):
    """The RvS generator and its SGD (constant lr, no weight decay)."""

    eps: float = spec(gt=0, le=1, unit=PIXEL_SCALE)
    z_dim: int = spec(ge=1)
    lr: float = spec(gt=0, le=10)
    momentum: float = spec(ge=0, lt=1)


@dataclass(init=False, frozen=True)
class OTParams(Params):
    """Entropic OT between clean and synthesized penultimate features (POT)."""

    weight: float = spec(ge=0)
    reg: float = spec(gt=0)
    num_iter: int = spec(ge=1)


@dataclass(init=False, frozen=True)
class RvSParams(ClassifierTrainingParams):
    """``rvs`` (conf/base/parameters_rvs.yml)."""

    KEY = "rvs"

    generator: RvSGeneratorParams
    label_smoothing: float = spec(ge=0, lt=1, unit="(mass moved off the true class)")
    ot: OTParams
    robust_eval: RobustEvalParams


def features_of(classifier: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits [B, K], penultimate features [B, d])`` of ``classifier`` in one forward pass.

    Raises:
        TypeError: the classifier's ``forward`` has no ``return_features`` argument.
    """
    module = classifier.module if isinstance(classifier, DistributedDataParallel) else classifier
    if "return_features" not in inspect.signature(module.forward).parameters:
        raise TypeError(
            f"{type(classifier).__name__} cannot return penultimate features: RvS needs a "
            "classifier whose forward accepts `return_features=True` and returns (logits, "
            "features); build it with atop.models.build_classifier."
        )
    logits, features = classifier(x, return_features=True)
    return logits, features.flatten(1)


def rvs_generator_loss(
    classifier: nn.Module,
    generator: RvSGenerator,
    x: Tensor,
    *,
    ot_fn: OTFunction,
    rng: torch.Generator | None = None,
    amp: bool = True,
) -> Tensor:
    """The RvS OT term the generator maximizes: ``OT(phi(x), phi(x_adv))`` (RvS §3.2).

    ``phi`` = the classifier's penultimate features, ``x_adv`` = :func:`sample_adversarial`
    (noise and uniform start drawn from ``rng``). Gradients flow to the generator through
    the classifier; the clean features carry no gradient.

    Args:
        classifier: features extractor (mode left as the caller set it).
        generator: the RvS generator.
        x: clean images float32 ``[B, 3, H, W]`` in ``[0, 1]``.
        ot_fn: the OT term, e.g. :func:`atop.ot.entropic_ot`.
        rng: random-number generator on ``x``'s device (``None``: global RNG).
        amp: forward passes under :func:`atop.training.autocast`.

    Returns:
        0-dim float tensor, the OT term (>= 0).
    """
    with autocast(x.device, enabled=amp):
        with torch.no_grad():
            _, feat_clean = features_of(classifier, x)
        x_adv = sample_adversarial(generator, x, rng)
        _, feat_adv = features_of(classifier, x_adv)
    return ot_fn(feat_clean, feat_adv)


def rvs_classifier_loss(
    classifier: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    *,
    ot_fn: OTFunction,
    label_smoothing: float = 0.5,
    ot_weight: float = 1.0,
    amp: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """The RvS classifier loss ``CE(f(x_adv), smoothed y) + ot_weight * OT(phi(x), phi(x_adv))``.

    Label smoothing follows the authors' code: the true class keeps ``1 - label_smoothing``
    and each of the other ``K - 1`` classes gets ``label_smoothing / (K - 1)`` (0.5 and
    0.0556 for CIFAR-10). This is PyTorch's ``label_smoothing = s * K / (K - 1)``.

    Args:
        classifier: the model being trained.
        x: clean images float32 ``[B, 3, H, W]`` in ``[0, 1]``.
        x_adv: synthesized samples, same shape, in ``[0, 1]`` (no gradient needed).
        y: labels int64 ``[B]``.
        ot_fn: the OT term, e.g. :func:`atop.ot.entropic_ot`.
        label_smoothing: probability mass moved off the true class, in ``[0, (K-1)/K]``
            (RvS: 0.5).
        ot_weight: weight of the OT term (RvS: 1.0).
        amp: forward passes under :func:`atop.training.autocast`.

    Returns:
        ``(loss, terms)``: the 0-dim loss with its graph, and floats ``loss``, ``ce``, ``ot``,
        ``adv_acc`` (accuracy on ``x_adv``).

    Raises:
        ValueError: ``label_smoothing`` outside ``[0, (K-1)/K]`` or fewer than 2 classes.
    """
    with autocast(x.device, enabled=amp):
        _, feat_clean = features_of(classifier, x)
        logits_adv, feat_adv = features_of(classifier, x_adv)
    num_classes = logits_adv.shape[1]
    if num_classes < 2 or not 0 <= label_smoothing <= (num_classes - 1) / num_classes:
        raise ValueError(
            f"label_smoothing must be in [0, (K-1)/K] (the true class keeps the largest "
            f"share) with K >= 2 classes, got {label_smoothing} and K = {num_classes}."
        )
    torch_smoothing = label_smoothing * num_classes / (num_classes - 1)
    ce = F.cross_entropy(logits_adv.float(), y, label_smoothing=torch_smoothing)
    ot_term = ot_fn(feat_clean, feat_adv)
    loss = ce + ot_weight * ot_term
    terms = {
        "loss": loss.item(),
        "ce": ce.item(),
        "ot": ot_term.item(),
        "adv_acc": (logits_adv.argmax(1) == y).float().mean().item(),
    }
    return loss, terms


def rvs_generator_step(
    classifier: nn.Module,
    generator: RvSGenerator,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    ot_fn: OTFunction,
    rng: torch.Generator | None = None,
    amp: bool = True,
) -> float:
    """One RvS generator update: ascend :func:`rvs_generator_loss` (generator loss ``-OT``).

    Only the generator's parameters receive gradients (``backward(inputs=...)``), so the
    classifier's ``.grad`` fields are left untouched. The generator never sees labels. In
    data-parallel training ``generator`` is its :func:`atop.distributed.data_parallel`
    wrapper (the backward pass averages its gradients over the ranks) and ``classifier`` the
    bare module (no gradient of its own to average).

    Args:
        classifier, generator, x, ot_fn, rng, amp: see :func:`rvs_generator_loss`.
        optimizer: the generator's optimizer (RvS: SGD momentum 0.9, lr 0.01).

    Returns:
        The OT term before the update (float).
    """
    ot_term = rvs_generator_loss(classifier, generator, x, ot_fn=ot_fn, rng=rng, amp=amp)
    params = [p for p in generator.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    (-ot_term).backward(inputs=params)
    optimizer.step()
    return ot_term.item()


def rvs_classifier_step(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    *,
    ot_fn: OTFunction,
    label_smoothing: float = 0.5,
    ot_weight: float = 1.0,
    amp: bool = True,
) -> dict[str, float]:
    """One RvS classifier update: descend :func:`rvs_classifier_loss` on given samples.

    Args:
        classifier, x, x_adv, y, ot_fn, label_smoothing, ot_weight, amp: see
            :func:`rvs_classifier_loss`.
        optimizer: the classifier's optimizer (RvS: SGD momentum 0.9, weight decay 2e-4).

    Returns:
        The terms of :func:`rvs_classifier_loss` before the update (floats).
    """
    loss, terms = rvs_classifier_loss(
        classifier,
        x,
        x_adv,
        y,
        ot_fn=ot_fn,
        label_smoothing=label_smoothing,
        ot_weight=ot_weight,
        amp=amp,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def rvs_step(
    classifier: nn.Module,
    generator: RvSGenerator,
    opt_classifier: torch.optim.Optimizer,
    opt_generator: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    ot_fn: OTFunction,
    label_smoothing: float = 0.5,
    ot_weight: float = 1.0,
    rng: torch.Generator | None = None,
    amp: bool = True,
    network: nn.Module | None = None,
) -> dict[str, float]:
    """One RvS training step on a batch: one generator step, then one classifier step
    (Baytaş & Deb 2023, Algorithm 1; authors' code).

    1. :func:`rvs_generator_step`: the generator ascends the OT term.
    2. Fresh noise, ``x_adv`` from the updated generator (no gradient), then
       :func:`rvs_classifier_step`.

    Both networks stay in the mode the caller set (:func:`atop.training.fit` puts them in
    ``train()``: batch norm then normalizes the clean and the synthesized batch with their
    own statistics, as the authors' two forward passes do).

    Args:
        classifier: the model being trained; ``classifier(x, return_features=True)`` ->
            ``(logits, features)``.
        generator: the RvS generator (its ``eps`` is the radius).
        opt_classifier: classifier optimizer (SGD momentum 0.9, weight decay 2e-4).
        opt_generator: generator optimizer (SGD momentum 0.9, lr 0.01, no weight decay).
        x: clean images float32 ``[B, 3, H, W]`` in ``[0, 1]``.
        y: labels int64 ``[B]``.
        ot_fn: the OT term, e.g. :func:`atop.ot.entropic_ot`.
        label_smoothing: see :func:`rvs_classifier_loss` (0.5).
        ot_weight: weight of the OT term in the classifier loss (1.0).
        rng: random-number generator on ``x``'s device (``None``: global RNG).
        amp: forward passes under :func:`atop.training.autocast`.
        network: what the classifier step's forward passes run through (its data-parallel
            wrapper, :func:`atop.distributed.data_parallel`; default ``classifier``). In a
            data-parallel run the OT term couples the features of each rank's share of the
            batch (the global batch, learning rate and cross-entropy are those of one
            process).

    Returns:
        Floats: ``loss`` (classifier loss), ``ce``, ``ot`` (classifier step), ``adv_acc``
        (accuracy on the synthesized batch), ``generator_ot`` (the OT of the generator step,
        before its update).
    """
    generator_ot = rvs_generator_step(
        classifier, generator, opt_generator, x, ot_fn=ot_fn, rng=rng, amp=amp
    )
    with torch.no_grad(), autocast(x.device, enabled=amp):
        x_adv = sample_adversarial(generator, x, rng)
    terms = rvs_classifier_step(
        classifier if network is None else network,
        opt_classifier,
        x,
        x_adv,
        y,
        ot_fn=ot_fn,
        label_smoothing=label_smoothing,
        ot_weight=ot_weight,
        amp=amp,
    )
    return {**terms, "generator_ot": generator_ot}


def train_rvs(
    train_set: dict[str, Tensor],
    test_set: dict[str, Tensor],
    class_names: list[str],
    monitor_indices: list[int],
    params: RvSParams,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, float]]]:
    """RvS training of a classifier and its perturbation generator from scratch.

    Args:
        train_set, test_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        class_names: the classes.
        monitor_indices: held-out test images; the first ``robust_eval.images`` are scored
            after each epoch (``test_acc``).
        params: ``rvs``.

    Returns:
        ``(classifier_checkpoint, generator_checkpoint, history)``: the classifier as
        :func:`atop.models.classifier_checkpoint` (meta adds the RvS settings); the generator
        as ``{"arch": "rvs-generator", "config", "state_dict", "meta"}``; one row per epoch
        (``epoch, loss, ce, ot, adv_acc, generator_ot, test_acc, lr, seconds``).

    Raises:
        ValueError: the images' side is not a multiple of 4.
        atop.training.NonFiniteLossError: a term diverged (lower ``optimizer.lr``).
    """
    from atop.ot import entropic_ot  # POT: only when RvS trains

    setup = prepare_training(
        train_set,
        test_set,
        class_names,
        params,
        monitor_indices=monitor_indices[: params.robust_eval.images],
        desc="rvs",
    )
    model, opt_classifier = setup.classifier, setup.optimizer
    gen = params.generator
    generator = RvSGenerator(
        eps=gen.eps,
        z_dim=gen.z_dim,
        image_size=train_set["images"].shape[-1],
        channels=train_set["images"].shape[1],
    ).to(setup.device)
    opt_generator = torch.optim.SGD(generator.parameters(), lr=gen.lr, momentum=gen.momentum)
    ot_fn = functools.partial(entropic_ot, reg=params.ot.reg, num_iter=params.ot.num_iter)
    generator_network = data_parallel(generator)  # generator itself in one process

    def train_step(x: Tensor, y: Tensor) -> dict[str, float]:
        return rvs_step(
            model,
            generator_network,
            opt_classifier,
            opt_generator,
            x,
            y,
            ot_fn=ot_fn,
            label_smoothing=params.label_smoothing,
            ot_weight=params.ot.weight,
            amp=params.amp,
            network=setup.network,
        )

    history = training_loop(
        setup,
        {"classifier": model, "generator": generator},
        {"classifier": opt_classifier, "generator": opt_generator},
        train_step,
        params,
    )
    meta = {
        **training_meta(setup, history, class_names),
        "generator": gen.to_dict(),
        "label_smoothing": params.label_smoothing,
        "ot": params.ot.to_dict(),
    }
    classifier = classifier_checkpoint(model, params.arch, setup.config, meta)
    generator_checkpoint = {
        "arch": GENERATOR_ARCH,
        "config": generator.config(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()},
        "meta": meta,
    }
    return classifier, generator_checkpoint, history

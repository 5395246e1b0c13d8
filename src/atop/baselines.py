"""Per-batch training steps of the robust-training baselines: PGD-AT and RvS.

* **PGD adversarial training** (Madry et al., "Towards Deep Learning Models Resistant to
  Adversarial Attacks", ICLR 2018, Eq. 2.1): each batch is replaced by PGD adversarial
  examples (ℓ∞, eps 8/255, step 2/255, 10 steps, random start) and the classifier is trained
  on them only. The attack is torchattacks' :class:`torchattacks.PGD`.
* **Robustness-via-Synthesis** (Baytaş & Deb, Neurocomputing 2023, arXiv 2108.09713, §3):
  the perturbations come from a noise-to-perturbation generator
  (:class:`atop.models.rvs.RvSGenerator`). Per batch, one generator step maximizes the
  entropic OT distance between the classifier's penultimate features of the clean and the
  synthesized batches (it never sees labels), then one classifier step minimizes
  ``CE(f(x_adv), smoothed y) + ot_weight * OT`` on freshly synthesized samples (as the
  authors' code, which runs the two updates as separate graph evaluations).

The functions here are the ``train_step`` bodies that :func:`atop.training.fit` calls; each
does ``zero_grad``/``backward``/``step`` itself and returns its scalar terms as floats. Forward
passes run under :func:`atop.training.autocast` (bf16 on CUDA, nothing on CPU) when
``amp=True``; losses are computed in float32.

Classifiers must take float32 images in ``[0, 1]`` and, for RvS, return
``(logits, features)`` from ``classifier(x, return_features=True)`` (one forward pass), as
the models of :mod:`atop.models.classifiers` do.

Core module: imports only torch, torchattacks and the standard library. The OT term
(:func:`atop.ot.entropic_ot`, which needs POT) is passed in as ``ot_fn``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from atop.models.rvs import RvSGenerator, sample_adversarial
from atop.training import autocast

#: ``ot_fn(features_clean [n, d], features_adv [n, d]) -> 0-dim tensor``.
OTFunction = Callable[[Tensor, Tensor], Tensor]


def build_pgd_at_attack(
    model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10
) -> torchattacks.PGD:
    """The PGD attack of Madry PGD-AT: ℓ∞, uniform random start in the eps-ball.

    Build it once, after the model is on its device (torchattacks reads the device from the
    model's parameters at construction). torchattacks puts the model in ``eval()`` mode while
    it attacks (batch-norm uses its running statistics, dropout is off; its default
    ``set_model_training_mode(False)``, the usual choice, e.g. TRADES) and puts it back in
    ``train()`` mode afterwards if it was training.

    Args:
        model: the classifier being trained (float32 ``[B, 3, H, W]`` in ``[0, 1]`` -> logits).
        eps: ℓ∞ radius on the ``[0, 1]`` scale (Madry et al.: 8/255).
        alpha: step size (2/255).
        steps: PGD iterations (10).

    Returns:
        A :class:`torchattacks.PGD` attack bound to ``model``.

    Raises:
        ValueError: ``eps`` or ``alpha`` not in ``(0, 1]``, or ``steps < 1``.
    """
    if not (0 < eps <= 1 and 0 < alpha <= 1):
        raise ValueError(f"eps and alpha must be in (0, 1] (pixel scale), got {eps}, {alpha}.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)


def pgd_at_step(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    attack: torchattacks.attack.Attack,
    amp: bool = True,
) -> dict[str, float]:
    """One Madry PGD-AT step: attack the batch, then one optimizer step on the adversarial
    examples only (Madry et al. 2018, Eq. 2.1).

    The attack runs with the classifier in ``eval()`` mode (torchattacks' default); the update
    runs in ``train()`` mode, which this function sets explicitly, so the classifier is left
    in ``train()`` mode whatever its mode before.

    Args:
        classifier: the model being trained; must be ``attack``'s model.
        optimizer: the classifier's optimizer (weight decay lives there).
        x: clean images float32 ``[B, 3, H, W]`` in ``[0, 1]``.
        y: labels int64 ``[B]``.
        attack: built by :func:`build_pgd_at_attack` for ``classifier``.
        amp: run the attack and forward pass under :func:`atop.training.autocast`.

    Returns:
        ``{"loss": CE on the adversarial batch, "adv_acc": training accuracy on it}``
        (floats, before the update).

    Raises:
        ValueError: ``attack`` targets another model.
    """
    if attack.model is not classifier:
        raise ValueError(
            "The attack targets another model than the classifier being trained: build it "
            "with `build_pgd_at_attack(classifier, ...)`."
        )
    with autocast(x.device, enabled=amp):
        x_adv = attack(x, y)
    classifier.train()
    with autocast(x.device, enabled=amp):
        logits = classifier(x_adv)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "adv_acc": _accuracy(logits, y)}


def features_of(classifier: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits [B, K], penultimate features [B, d])`` of ``classifier`` in one forward pass.

    Raises:
        TypeError: the classifier's ``forward`` has no ``return_features`` argument.
    """
    if "return_features" not in inspect.signature(classifier.forward).parameters:
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
        "adv_acc": _accuracy(logits_adv, y),
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

    Only the generator's parameters receive gradients (``torch.autograd.grad``), so the
    classifier's ``.grad`` fields are left untouched. The generator never sees labels.

    Args:
        classifier, generator, x, ot_fn, rng, amp: see :func:`rvs_generator_loss`.
        optimizer: the generator's optimizer (RvS: SGD momentum 0.9, lr 0.01).

    Returns:
        The OT term before the update (float).
    """
    ot_term = rvs_generator_loss(classifier, generator, x, ot_fn=ot_fn, rng=rng, amp=amp)
    params = [p for p in generator.parameters() if p.requires_grad]
    grads = torch.autograd.grad(-ot_term, params)
    optimizer.zero_grad(set_to_none=True)
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
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
        classifier,
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


def _accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of ``logits.argmax(1) == y``."""
    return (logits.argmax(1) == y).float().mean().item()

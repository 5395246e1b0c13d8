"""Attacks on a whole defended model, and honest robust accuracy for stochastic defenses.

A thin layer over torchattacks (method.md §4, "Evaluating stochastic defenses honestly"):

* :func:`build_attack` turns one parameter entry (a dict from ``parameters_evaluation.yml``)
  into a torchattacks ``Attack``: FGSM, PGD ℓ∞ / ℓ2 with exact gradients and EOT, BPDA+EOT,
  C&W ℓ2 and AutoAttack ``standard`` / ``rand`` with the number of steps set explicitly.
* :func:`run_attack` runs an attack batch by batch with a progress bar.
* :func:`draw_correct` judges a (possibly stochastic) model with fresh draws of its
  randomness, per image and per draw (the N-evaluation; the rules built on it are in
  :mod:`atop.evaluation.protocol`).

Every model here maps float32 images in ``[0, 1]``, NCHW, to logits ``[N, n_classes]``; any
``nn.Module`` does (e.g. :class:`atop.defense.PurifiedClassifier`, ``f(g(t(x)))``).

Facts about torchattacks 3.5.1 this module relies on (checked in its source):

* ``Attack.__call__`` switches the model to ``eval()`` for the attack and back to ``train()``
  afterwards if it was training (``set_model_training_mode`` changes this; we keep the
  default). A stochastic defense must therefore stay random in eval mode.
* The attack's device is the device of the model's first parameter; inputs are moved there
  and the adversarial images come back on it. Random starts and buffers use the default
  dtype, so inputs must be float32. FAB calls ``.view()`` on input gradients and fails on
  channels-last (non-contiguous) images: :func:`run_attack` makes every batch contiguous.
* ``EOTPGD`` (ℓ∞) sums the loss gradients of ``eot_iter`` forward/backward passes per step
  (the sign step makes sum and mean equal). ``PGDL2`` has no EOT: :class:`EOTPGDL2` adds it.
  Both of ours (:class:`PackedEOTPGD`, :class:`EOTPGDL2`) can pack the draws of a batch
  smaller than ``eot_batch`` into one pass (:class:`PackedEOT`); a full batch runs as before.
* ``AutoAttack`` takes no ``steps`` argument: its sub-attacks default to 10 iterations, not
  the reference 100, so :func:`build_attack` sets them. Its ``standard`` version (APGD-CE,
  APGD-T with ``n_classes - 1`` targets, FAB-T and Square, one restart each) is used for
  deterministic defenses.
* ``MultiAttack`` (inside AutoAttack) decides "attack succeeded" from ONE forward pass and
  then stops attacking that image; for a random defense a lucky draw flatters it. We replace
  it by :class:`RejudgedMultiAttack`, which judges with several fresh draws.
* torchattacks' ``APGD`` never attacks an image that one initial draw got wrong, and with
  EOT it keeps the loss of its LAST pass: its step-size schedule and its returned iterate
  follow one draw. AutoAttack-``rand`` here (APGD-CE + APGD-DLR with EOT, both norms) is
  therefore :class:`EOTAPGD`, which attacks every image and follows the EOT-mean loss, in a
  :class:`RejudgedMultiAttack`. The final verdict is always :func:`draw_correct` with fresh
  draws, in float32.

Core module: imports only torch, torchattacks, tqdm and the standard library.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn
from torchattacks.attack import Attack

from atop.progress import progress as progress_bar

log = logging.getLogger(__name__)

NORMS = ("Linf", "L2")
AUTOATTACK_VERSIONS = ("standard", "rand")

#: Parameter keys of each attack name: (required keys, optional keys with their defaults).
ATTACK_KEYS: dict[str, tuple[frozenset[str], dict[str, Any]]] = {
    "fgsm": (frozenset({"eps"}), {"norm": "Linf"}),
    "pgd": (frozenset({"norm", "eps", "alpha", "steps", "eot_iter"}), {"random_start": True}),
    "bpda": (frozenset({"norm", "eps", "alpha", "steps", "eot_iter"}), {"random_start": True}),
    "cw": (frozenset({"c", "kappa", "steps", "lr"}), {}),
    "autoattack": (
        frozenset({"version", "norm", "eps", "steps", "seed"}),
        {"eot_iter": 20, "n_queries": 5000, "draws": 10},
    ),
}


class PackedEOT:
    """EOT draws of a small batch packed into one forward pass (a mixin for EOT attacks).

    A batch of ``n`` images with ``n < eot_batch`` wastes most of a forward pass on the
    per-call overhead (on the 2-core CPU a one-image pass of ``f(g(t(x)))`` costs 13x the
    per-image time of a 64-image one). With ``eot_batch`` set, each pass holds ``c =
    min(eot_iter, eot_batch // n)`` copies of the batch, so ``c`` independent draws of the
    defense's randomness (per image: the transform draws per row) run at once, and their
    input gradients are summed, as the sequential passes'. Same estimator, another stream of
    random numbers; with ``c = 1`` (``eot_batch`` unset or ``n > eot_batch / 2``) the passes
    are exactly the sequential ones. The model must be row-independent in ``eval()`` (no
    batch statistics), as every defense here is.
    """

    eot_iter: int
    eot_batch: int | None = None
    snapshots: tuple[int, ...] = ()

    def keep_snapshots(self, snapshots, steps: int) -> None:
        """Keep the iterates after the step counts ``snapshots`` (each in ``1 .. steps - 1``)
        of every call in :attr:`iterates`: with a fixed step size PGD-k is the first k steps
        of PGD-K from the same start, so one run reads off a whole steps sweep.

        Raises:
            ValueError: a snapshot outside ``1 .. steps - 1``.
        """
        self.snapshots = tuple(sorted({int(k) for k in snapshots}))
        if any(not 1 <= k < steps for k in self.snapshots):
            raise ValueError(
                f"snapshots {list(snapshots)} must lie in 1 .. steps - 1 = {steps - 1}"
            )
        self._iterates: dict[int, Tensor] = {}

    @property
    def iterates(self) -> dict[int, Tensor]:
        """The last call's iterates at the ``snapshots`` step counts (float32, like its output)."""
        return getattr(self, "_iterates", {})

    def _snapshot(self, step: int, adv_images: Tensor) -> None:
        if step == 1:
            self._iterates = {}
        if step in self.snapshots:
            self._iterates[step] = adv_images

    def copies(self, n: int) -> int:
        """Draws per forward pass for a batch of ``n`` images (``>= 1``)."""
        if self.eot_batch is None:
            return 1
        return max(1, min(self.eot_iter, self.eot_batch // max(n, 1)))

    def eot_loss_gradient(
        self,
        images: Tensor,
        labels: Tensor,
        loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The EOT means over ``eot_iter`` draws of the per-image loss and of its input
        gradient (Athalye et al. 2018): float32 ``[N]`` and a float32 tensor like ``images``.

        ``loss(logits, labels) -> [N]`` per-image losses (default: cross-entropy); logits
        are cast to float32 first, so a bf16 forward pass keeps a float32 loss.
        """
        loss = loss or _cross_entropy
        images = images.clone().detach().requires_grad_(True)
        grad = torch.zeros_like(images)
        total = torch.zeros(len(images), device=images.device)
        copies, left, n = self.copies(len(images)), self.eot_iter, len(images)
        while left:
            c = min(copies, left)
            batch = images if c == 1 else images.repeat(c, 1, 1, 1)
            targets = labels if c == 1 else labels.repeat(c)
            per_row = loss(self.get_logits(batch).float(), targets)
            grad += torch.autograd.grad(per_row.sum(), images)[0]
            total += per_row.detach().view(c, n).sum(dim=0)
            left -= c
        return total / self.eot_iter, grad / self.eot_iter


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The Difference of Logits Ratio loss of Croce & Hein (2020, Eq. 5), per image:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` (``pi``: logits sorted
    descending). float ``[N, K]`` logits (K >= 3), int64 ``[N]`` labels -> float ``[N]``."""
    ranked, _ = logits.sort(dim=1, descending=True)
    true = logits.gather(1, labels[:, None])[:, 0]
    top_is_true = (ranked[:, 0] == true).float()
    other = ranked[:, 0] * (1 - top_is_true) + ranked[:, 1] * top_is_true
    return -(true - other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


class PackedEOTPGD(PackedEOT, torchattacks.EOTPGD):
    """torchattacks' ``EOTPGD`` (ℓ∞, untargeted) whose draws :class:`PackedEOT` packs.

    ``eot_batch``: images per forward pass the draws may fill (``None``: torchattacks'
    sequential passes). A batch that gets one copy per pass runs ``EOTPGD.forward`` itself;
    otherwise the same steps (uniform random start in the ε-box, ``x + alpha · sign(g)``,
    projection, clip to ``[0, 1]``) follow the packed gradient. ``snapshots``: step counts
    ``k < steps`` whose iterate each call keeps in ``iterates[k]`` (always the loop above):
    with a fixed ``alpha`` it is PGD-k's output from the same start, so one run of the
    largest count reads off a whole steps sweep. Other arguments as ``EOTPGD``.

    Raises:
        ValueError: a snapshot outside ``1 .. steps - 1``.
    """

    def __init__(
        self, model, eps, alpha, steps, eot_iter, random_start=True, eot_batch=None, snapshots=()
    ):
        super().__init__(model, eps, alpha, steps, eot_iter, random_start)
        self.eot_batch = eot_batch
        self.supported_mode = ["default"]
        self.keep_snapshots(snapshots, steps)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Return adversarial images, float32 ``[N, C, H, W]`` in ``[0, 1]``."""
        if self.copies(len(images)) == 1 and not self.snapshots:
            return super().forward(images, labels)
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv_images = images.clone()
        if self.random_start:
            start = torch.empty_like(images).uniform_(-self.eps, self.eps)
            adv_images = torch.clamp(images + start, 0, 1)
        for step in range(1, self.steps + 1):
            _, grad = self.eot_loss_gradient(adv_images, labels)
            adv_images = adv_images + self.alpha * grad.sign()
            delta = torch.clamp(adv_images - images, -self.eps, self.eps)
            adv_images = torch.clamp(images + delta, 0, 1).detach()
            self._snapshot(step, adv_images)
        return adv_images


class EOTPGDL2(PackedEOT, torchattacks.PGDL2):
    """PGD ℓ2 with Expectation over Transformation: the step follows the mean loss gradient.

    At every step the cross-entropy loss is back-propagated through ``eot_iter`` independent
    forward passes of the (random) model and the input gradients are averaged,
    ``g = mean_k ∇x CE(model_k(x), y)`` (Athalye et al. 2018, EOT). The gradients of the
    loss are averaged, not the logits. The step is ``alpha · g / ‖g‖₂`` per image, then the
    perturbation is projected onto the ℓ2 ball of radius ``eps`` and the image clipped to
    ``[0, 1]``. With ``eot_iter=1`` it is torchattacks' ``PGDL2``.

    Args:
        model: maps float32 ``[N, C, H, W]`` images in ``[0, 1]`` to logits ``[N, K]``.
        eps: ℓ2 radius over (C, H, W) on the ``[0, 1]`` scale (paper: 0.5).
        alpha: ℓ2 length of each step.
        steps: number of steps.
        eot_iter: forward/backward passes averaged per step (method.md §4: 20).
        random_start: start from a random point of the ℓ2 ball, as ``PGDL2``.
        eot_batch: images per pass the draws may fill (:class:`PackedEOT`; ``None``: one
            draw per pass).
        snapshots: step counts whose iterates each call keeps (:meth:`PackedEOT.keep_snapshots`).

    Raises:
        ValueError: ``eot_iter`` is not a positive integer, or a bad snapshot.
    """

    def __init__(
        self,
        model,
        eps=0.5,
        alpha=0.1,
        steps=10,
        eot_iter=20,
        random_start=True,
        eot_batch=None,
        snapshots=(),
    ):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
        self.attack = "EOTPGDL2"
        if not isinstance(eot_iter, int) or eot_iter < 1:
            raise ValueError(f"eot_iter must be a positive integer, got {eot_iter!r}")
        self.eot_iter = eot_iter
        self.eot_batch = eot_batch
        self.supported_mode = ["default"]
        self.keep_snapshots(snapshots, steps)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Return adversarial images, float32 ``[N, C, H, W]`` in ``[0, 1]``."""
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv_images = images.clone()
        if self.random_start:
            direction = torch.randn_like(images)
            radius = torch.rand(len(images), 1, 1, 1, device=images.device) * self.eps
            adv_images = images + direction / _l2(direction) * radius
            adv_images = adv_images.clamp(0, 1)
        for step in range(1, self.steps + 1):
            grad = self.eot_gradient(adv_images, labels)
            adv_images = adv_images + self.alpha * grad / (_l2(grad) + self.eps_for_division)
            adv_images = project_l2(images, adv_images, self.eps).detach()
            self._snapshot(step, adv_images)
        return adv_images

    def eot_gradient(self, images: Tensor, labels: Tensor) -> Tensor:
        """Mean over ``eot_iter`` draws of ∇x CE(model(x), y) (summed over the batch).

        Returns:
            float32 tensor shaped like ``images``.
        """
        return self.eot_loss_gradient(images, labels)[1]


def _l2(x: Tensor) -> Tensor:
    """Per-image ℓ2 norm of ``[N, ...]``, shaped ``[N, 1, 1, 1]``."""
    return x.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1)


def project_l2(images: Tensor, adv_images: Tensor, eps: float) -> Tensor:
    """``adv_images`` with its perturbation scaled into the ℓ2 ball of radius ``eps`` around
    ``images`` (per image), then clipped to ``[0, 1]`` (as torchattacks' ``PGDL2``)."""
    delta = adv_images - images
    delta = delta * torch.clamp(eps / (_l2(delta) + 1e-12), max=1.0)
    return torch.clamp(images + delta, 0, 1)


def project_linf(images: Tensor, adv_images: Tensor, eps: float) -> Tensor:
    """``adv_images`` clipped into the ℓ∞ box of radius ``eps`` around ``images``, then to
    ``[0, 1]``."""
    return torch.clamp(images + torch.clamp(adv_images - images, -eps, eps), 0, 1)


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step size (Croce & Hein 2020, Sec. 3.1):
    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``,
    ``w_j = ceil(p_j * steps)``, below ``steps``."""
    points, previous, current = [0], 0.0, 0.22
    while math.ceil(current * steps) < steps:
        mark = math.ceil(current * steps)
        if mark > points[-1]:
            points.append(mark)
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return points


class EOTAPGD(PackedEOT, Attack):
    """APGD (Croce & Hein 2020, Algorithm 1) on a random defense, fair to its randomness.

    Every image is attacked (no initial one-draw check), and both the step-size schedule
    and the returned iterate follow the **EOT mean** of the per-image loss over ``eot_iter``
    fresh draws, never one draw's loss: torchattacks' APGD keeps the loss of its last EOT
    pass only, which favours an iterate that one lucky draw scored high. Per image: step
    size ``2 eps``; the first step ``x1 = P(x0 + eta s(g))``, then momentum ``alpha = 0.75``
    between the projected gradient step and the previous iterate; at the checkpoints of
    :func:`apgd_checkpoints` the step size halves (and the iterate restarts from the best
    one) when fewer than ``rho = 0.75`` of the steps since the last checkpoint raised the
    loss, or when neither the step size nor the best loss changed. ``s(g)`` is ``sign(g)``
    (ℓ∞) or ``g / ‖g‖₂`` (ℓ2); ``P`` projects onto the ε-ball and ``[0, 1]``.

    Args:
        model: float32 ``[N, C, H, W]`` in ``[0, 1]`` -> logits ``[N, K]``.
        norm: ``"Linf"`` or ``"L2"``; eps: the ball's radius on the ``[0, 1]`` scale.
        steps: iterations (reference AutoAttack: 100); eot_iter: draws per iteration.
        loss: ``"ce"`` or ``"dlr"`` (:func:`dlr_loss`, needs K >= 3).
        eot_batch: images per pass the draws may fill (:class:`PackedEOT`).

    Returns (when called): the iterate with the highest EOT-mean loss, float32 in ``[0, 1]``.
    """

    RHO = 0.75
    MOMENTUM = 0.75

    def __init__(self, model, norm, eps, steps, eot_iter=1, loss="ce", eot_batch=None):
        super().__init__(f"EOTAPGD-{loss}", model)
        if norm not in NORMS or loss not in ("ce", "dlr"):
            raise ValueError(f"EOTAPGD needs norm in {NORMS} and loss 'ce' or 'dlr'.")
        _check_positive_int("steps", steps)
        _check_positive_int("eot_iter", eot_iter)
        self.norm, self.eps, self.steps, self.eot_iter = norm, eps, steps, eot_iter
        self.loss = _cross_entropy if loss == "ce" else dlr_loss
        self.eot_batch = eot_batch
        self.supported_mode = ["default"]

    def _direction(self, grad: Tensor) -> Tensor:
        return grad.sign() if self.norm == "Linf" else grad / (_l2(grad) + 1e-12)

    def _project(self, images: Tensor, adv: Tensor) -> Tensor:
        project = project_linf if self.norm == "Linf" else project_l2
        return project(images, adv, self.eps)

    def _start(self, images: Tensor) -> Tensor:
        if self.norm == "Linf":
            noise = torch.empty_like(images).uniform_(-1, 1)
            noise = noise / noise.flatten(1).abs().amax(dim=1).view(-1, 1, 1, 1)
        else:
            noise = torch.randn_like(images)
            noise = noise / (_l2(noise) + 1e-12)
        return torch.clamp(images + self.eps * noise, 0, 1)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Return float32 ``[N, C, H, W]`` adversarial images in ``[0, 1]``."""
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        shape = (-1, 1, 1, 1)
        x = self._start(images)
        loss, grad = self.eot_loss_gradient(x, labels, self.loss)
        best_x, best_loss, best_grad = x.clone(), loss.clone(), grad.clone()
        eta = torch.full((len(images),), 2.0 * self.eps, device=images.device)
        previous = x.clone()
        marks = apgd_checkpoints(self.steps)
        raised = torch.zeros(len(images), device=images.device)
        last_eta, last_best = eta.clone(), best_loss.clone()
        last_mark = 0
        for k in range(self.steps):
            step = self._project(images, x + eta.view(shape) * self._direction(grad))
            if k > 0:
                a = self.MOMENTUM
                step = self._project(images, x + a * (step - x) + (1 - a) * (x - previous))
            previous, x = x, step.detach()
            new_loss, grad = self.eot_loss_gradient(x, labels, self.loss)
            raised += (new_loss > loss).float()
            better = new_loss > best_loss
            best_x[better], best_grad[better] = x[better], grad[better]
            best_loss = torch.where(better, new_loss, best_loss)
            loss = new_loss
            if k + 1 in marks[1:]:
                span = k + 1 - last_mark
                stalled = (raised < self.RHO * span) | (
                    (eta == last_eta) & (best_loss == last_best)
                )
                last_eta, last_best = eta.clone(), best_loss.clone()
                eta = torch.where(stalled, eta / 2, eta)
                x[stalled], grad[stalled] = best_x[stalled], best_grad[stalled]
                loss = torch.where(stalled, best_loss, loss)
                raised.zero_()
                last_mark = k + 1
        return best_x.detach()


def _require_bpda(model: nn.Module) -> None:
    if not hasattr(model, "bpda"):
        raise ValueError(
            f"{type(model).__name__} has no `bpda` option, so BPDA cannot be applied: attack a "
            "model that has one (e.g. atop.defense.PurifiedClassifier) or use the 'pgd' attack."
        )


@contextlib.contextmanager
def bpda_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch the model's ``bpda`` option on inside the block and restore it afterwards.

    With ``bpda = True`` a defense such as :class:`atop.defense.PurifiedClassifier`
    replaces the purifier's backward pass by the identity (BPDA, Athalye et al. 2018); the
    forward pass is unchanged. method.md §4: BPDA is an extra attack, never a replacement
    for exact gradients.

    Raises:
        ValueError: the model has no ``bpda`` attribute.
    """
    _require_bpda(model)
    previous = model.bpda
    model.bpda = True
    try:
        yield model
    finally:
        model.bpda = previous


class BPDA(Attack):
    """Run ``attack`` with the model's ``bpda`` switch on (see :func:`bpda_mode`).

    Args:
        attack: a torchattacks attack on a model with a ``bpda`` attribute (e.g. EOT-PGD,
            giving BPDA+EOT).

    Raises:
        ValueError: the attacked model has no ``bpda`` attribute.
    """

    def __init__(self, attack: Attack):
        super().__init__("BPDA", attack.model)
        _require_bpda(attack.model)
        self.inner = attack

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Return the inner attack's adversarial images, computed with BPDA gradients."""
        with bpda_mode(self.model):
            return self.inner(images, labels)


class RejudgedMultiAttack(torchattacks.MultiAttack):
    """torchattacks' ``MultiAttack``, with success judged by fresh draws.

    The attacks run in turn on the images not yet broken. An image counts as broken only
    when none of ``draws`` fresh forward passes is right (not one pass, which a lucky draw
    of a random defense passes or fails by chance). For every image the returned example is
    the one, over the attacks run on it, with the fewest right passes (the first attack's on
    a tie), so nothing an attack found is thrown away.

    Args:
        attacks: two or more attacks on the same model.
        draws: forward passes per judgement (1 for a deterministic model).
        judge: the model that judges (float32); default: the attacked one (give the
            original when the attacks run on :func:`atop.training.autocast_copy`).

    Raises:
        ValueError: fewer than two attacks, attacks on different models, or ``draws < 1``.
    """

    def __init__(self, attacks: list[Attack], draws: int, judge: nn.Module | None = None):
        super().__init__(attacks)
        self.attack = "RejudgedMultiAttack"
        _check_positive_int("draws", draws)
        self.draws = draws
        self.judge = judge

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Return float32 ``[N, C, H, W]`` adversarial images in ``[0, 1]``."""
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        final_images = images.clone()
        best_votes = torch.full((len(images),), self.draws + 1, device=images.device)
        remaining = torch.arange(len(images), device=images.device)
        for attack in self.attacks:
            adv_images = attack(images[remaining], labels[remaining])
            verdicts = draw_correct(
                self.judge or self.model, adv_images, labels[remaining], self.draws, len(adv_images)
            )
            true_votes = verdicts.sum(dim=1).to(images.device)
            better = true_votes < best_votes[remaining]
            final_images[remaining[better]] = adv_images[better]
            best_votes[remaining[better]] = true_votes[better]
            remaining = remaining[best_votes[remaining] > 0]
            if len(remaining) == 0:
                break
        return final_images


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_spec(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Validate an attack entry; return its lower-case name and the params with defaults."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(
            f"An attack entry must be a mapping with a 'name' (one of {sorted(ATTACK_KEYS)}), "
            f"got {spec!r}"
        )
    name = str(spec["name"]).lower()
    if name not in ATTACK_KEYS:
        raise ValueError(
            f"Unknown attack name {spec['name']!r}; valid names: {sorted(ATTACK_KEYS)}"
        )
    required, optional = ATTACK_KEYS[name]
    given = set(spec) - {"name"}
    missing = required - given
    unknown = given - required - set(optional)
    if missing or unknown:
        raise ValueError(
            f"Attack {name!r}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
            f"required: {sorted(required)}, optional (default): {optional}"
        )
    params = {**optional, **{key: spec[key] for key in given}}
    if "norm" in params and params["norm"] not in NORMS:
        raise ValueError(f"Attack {name!r}: norm must be one of {NORMS}, got {params['norm']!r}")
    for key in ("eps", "alpha", "c", "lr"):
        if key in params:
            _check_positive(f"{name}.{key}", params[key])
    if params.get("norm", "Linf") == "Linf":
        for key in ("eps", "alpha"):
            if key in params and params[key] > 1:
                raise ValueError(
                    f"{name}.{key}={params[key]!r}: an l-inf budget is on the [0, 1] pixel scale "
                    f"(8/255 = 0.0314), so it must be <= 1; write ${{frac:{params[key]:g}/255}} "
                    "for a value on the 0-255 scale."
                )
    if "kappa" in params:
        _check_positive(f"{name}.kappa", params["kappa"], allow_zero=True)
    for key in ("steps", "eot_iter", "n_queries", "draws"):
        if key in params:
            _check_positive_int(f"{name}.{key}", params[key])
    return name, params


def build_attack(
    model: nn.Module,
    spec: Mapping[str, Any],
    n_classes: int,
    eot_batch: int | None = None,
    snapshots: tuple[int, ...] = (),
    judge: nn.Module | None = None,
) -> Attack:
    """Build a torchattacks attack on the WHOLE ``model`` from one parameter entry.

    Gradients are exact (autograd through every layer of the model, e.g. the transform and
    the purifier of ``f(g(t(x)))``) except for ``bpda``. Entries (``name`` plus the keys
    below; all ε on the ``[0, 1]`` pixel scale; method.md §4):

    ==============  ===========================================  ==========================
    name            required keys                                optional (default)
    ==============  ===========================================  ==========================
    ``fgsm``        eps                                          norm ("Linf" only)
    ``pgd``         norm ("Linf"|"L2"), eps, alpha, steps,       random_start (True)
                    eot_iter (EOT samples per step)
    ``bpda``        as ``pgd``; run with the model's ``bpda``    random_start (True)
                    switch on (BPDA+EOT)
    ``cw``          c, kappa, steps, lr (C&W ℓ2, no ε bound)     --
    ``autoattack``  version ("standard"|"rand"), norm, eps,      eot_iter (20, rand only),
                    steps (reference 100), seed                  n_queries (5000, Square),
                                                                 draws (10, success judge)
    ==============  ===========================================  ==========================

    ``pgd``/``bpda`` use :class:`PackedEOTPGD` (torchattacks ``EOTPGD``, ℓ∞) or
    :class:`EOTPGDL2` (ℓ2); EOT averages loss gradients over ``eot_iter`` draws, packed
    into passes of up to ``eot_batch`` images for a smaller batch (:class:`PackedEOT`).
    ``autoattack`` ``standard`` uses torchattacks ``AutoAttack`` with ``n_classes``, ``steps``
    on every APGD / APGD-T / FAB sub-attack and ``n_queries`` on Square; ``rand`` is
    :class:`EOTAPGD` with the CE then the DLR loss (``steps``, ``eot_iter``). Both run in a
    :class:`RejudgedMultiAttack` that judges success with ``draws`` fresh passes.

    Args:
        model: maps float32 ``[N, C, H, W]`` in ``[0, 1]`` to logits ``[N, n_classes]``.
        spec: the parameter entry, e.g. ``{"name": "pgd", "norm": "Linf", "eps": 8/255,
            "alpha": 2/255, "steps": 20, "eot_iter": 20, "random_start": True}``.
        n_classes: number of classes of the dataset (10 for CIFAR-10, 100 for CIFAR-100).
        eot_batch: images per forward pass the EOT draws of ``pgd``/``bpda`` may fill (the
            evaluation's batch size); ``None``: one draw per pass.
        snapshots: step counts ``1 .. steps - 1`` after which a ``pgd`` keeps its iterate
            (:attr:`PackedEOT.iterates`); other attacks take none.
        judge: the float32 model AutoAttack's success checks use (default ``model``).

    Returns:
        An attack; call it (or :func:`run_attack`) with ``(images, labels)``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), missing or unknown
            keys, a bad value, ``bpda`` on a model without a ``bpda`` option, or
            ``snapshots`` for another attack than ``pgd`` or outside ``1 .. steps - 1``.
    """
    name, p = check_spec(spec)
    _check_positive_int("n_classes", n_classes)
    if snapshots and name != "pgd":
        raise ValueError(f"snapshots are kept by the 'pgd' attack only, not by {name!r}")
    if name == "fgsm":
        if p["norm"] != "Linf":
            raise ValueError("Attack 'fgsm' is an ℓ∞ attack: use norm 'Linf' (or 'pgd' for L2)")
        return torchattacks.FGSM(model, eps=p["eps"])
    if name in ("pgd", "bpda"):
        args = (model, p["eps"], p["alpha"], p["steps"], p["eot_iter"], p["random_start"])
        pgd = PackedEOTPGD if p["norm"] == "Linf" else EOTPGDL2
        attack = pgd(*args, eot_batch, snapshots)
        return BPDA(attack) if name == "bpda" else attack
    if name == "cw":
        return torchattacks.CW(model, c=p["c"], kappa=p["kappa"], steps=p["steps"], lr=p["lr"])
    return _build_autoattack(model, p, n_classes, eot_batch, judge)


def _build_autoattack(
    model: nn.Module,
    p: dict[str, Any],
    n_classes: int,
    eot_batch: int | None,
    judge: nn.Module | None,
) -> Attack:
    if p["version"] not in AUTOATTACK_VERSIONS:
        raise ValueError(
            f"AutoAttack version must be one of {AUTOATTACK_VERSIONS}, got {p['version']!r}"
        )
    if not isinstance(p["seed"], int) or isinstance(p["seed"], bool):
        raise ValueError(f"autoattack.seed must be an integer, got {p['seed']!r}")
    if p["version"] == "rand":  # APGD-CE, APGD-DLR with EOT, fair to random defenses
        args = (model, p["norm"], p["eps"], p["steps"], p["eot_iter"])
        attacks = [EOTAPGD(*args, loss, eot_batch) for loss in ("ce", "dlr")]
        return RejudgedMultiAttack(attacks, draws=p["draws"], judge=judge)
    model = FloatLogits(model)
    attack = torchattacks.AutoAttack(
        model,
        norm=p["norm"],
        eps=p["eps"],
        version=p["version"],
        n_classes=n_classes,
        seed=p["seed"],
    )
    sub_attacks = attack._autoattack.attacks
    for sub in sub_attacks:
        if isinstance(sub, torchattacks.Square):
            sub.n_queries = p["n_queries"]
        else:  # APGD, APGDT, FAB
            sub.steps = p["steps"]
    attack._autoattack = RejudgedMultiAttack(sub_attacks, draws=p["draws"], judge=judge)
    return attack


class FloatLogits(nn.Module):
    """``model`` with its logits cast to float32 (the identity on float32 logits).

    Under bf16 autocast torchattacks' APGD-T (its NumPy bookkeeping) and Square (an
    ``index_put`` into a float32 buffer) fail on bf16 logits; float32 logits keep every
    loss and buffer of AutoAttack-standard in float32 while the model's layers run in bf16.
    Inputs and outputs as ``model``: float32 ``[N, C, H, W]`` in ``[0, 1]`` -> logits
    ``[N, n_classes]``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def training(self) -> bool:
        """The wrapped model's mode: torchattacks restores the mode it reads here after an
        attack, so a wrapper with a mode of its own would leave an eval model in train mode."""
        return self._modules["model"].training if "model" in self._modules else True

    @training.setter
    def training(self, mode: bool) -> None:  # nn.Module.train() sets the children's mode
        pass

    def forward(self, x: Tensor) -> Tensor:
        """Float32 logits ``[N, n_classes]`` of ``model(x)``."""
        return self.model(x).float()


def _check_batch(images: Tensor, labels: Tensor | None, batch_size: int) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(
            f"images must be a 4-D tensor [N, C, H, W], got {getattr(images, 'shape', images)!r}"
        )
    if images.dtype != torch.float32:
        raise ValueError(
            f"images must be float32 in [0, 1], got {images.dtype}; convert uint8 images "
            "with images.float() / 255"
        )
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"images must lie in [0, 1], got [{images.min().item()}, {images.max().item()}]; "
            "models normalize inside"
        )
    if labels is not None and (labels.dtype != torch.int64 or labels.shape != images.shape[:1]):
        raise ValueError(
            f"labels must be int64 of shape [{len(images)}], got {labels.dtype} {tuple(labels.shape)}"
        )
    _check_positive_int("batch_size", batch_size)


def run_attack(
    attack: Attack,
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    progress: bool = True,
) -> Tensor:
    """Run ``attack`` batch by batch (with a tqdm progress bar).

    Args:
        attack: from :func:`build_attack` (or any torchattacks attack).
        images: float32 ``[N, C, H, W]`` in ``[0, 1]`` (any device; batches go to the
            attack's device).
        labels: int64 ``[N]`` true classes.
        batch_size: images per attack call.
        progress: show the progress bar.

    Returns:
        Adversarial images, float32 ``[N, C, H, W]`` in ``[0, 1]``, on ``images.device``,
        detached.

    Raises:
        ValueError: images not float32 4-D in ``[0, 1]``, labels not int64 ``[N]``, or a
            non-positive batch size.
    """
    _check_batch(images, labels, batch_size)
    device = attack.device if attack.device is not None else images.device
    log.info("Running %r on %d images (batch %d) on %s", attack, len(images), batch_size, device)
    outputs = []
    for start in progress_bar(
        range(0, len(images), batch_size),
        progress,
        desc=f"{attack.attack} attack",
        unit="batch",
        leave=False,
    ):
        # contiguous: torchattacks' FAB calls .view() on input gradients, which fails for
        # channels-last images (e.g. from a permuted uint8 array)
        x = images[start : start + batch_size].to(device).contiguous()
        y = labels[start : start + batch_size].to(device)
        outputs.append(attack(x, y).detach().to(images.device))
    if not outputs:
        return images.clone()
    return torch.cat(outputs)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else fallback


@torch.no_grad()
def draw_correct(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    draws: int,
    batch_size: int,
    progress: bool = False,
) -> Tensor:
    """Per-image, per-draw correctness: ``draws`` fresh forward passes of a (random) model.

    The N-evaluation of DiffHammer (method.md §5.2): each pass is a fresh draw of the model's
    randomness (nothing reseeded), in eval mode and float32. ``.float().mean()`` is the
    single-draw accuracy (what one query sees, the paper's convention);
    ``.all(dim=1).float().mean()`` the worst-of-N accuracy (an attacker who can resubmit).

    Args:
        model: float32 ``[N, C, H, W]`` in ``[0, 1]`` -> logits ``[N, K]``.
        images: float32 ``[N, C, H, W]`` in ``[0, 1]``; labels: int64 ``[N]``.
        draws: passes per image (1 for a deterministic model).
        batch_size: images per pass.
        progress: a tqdm bar.

    Returns:
        bool ``[N, draws]`` on the CPU.

    Raises:
        ValueError: bad images or labels, non-positive ``draws`` / ``batch_size``.
    """
    _check_batch(images, labels, batch_size)
    _check_positive_int("draws", draws)
    device = _model_device(model, images.device)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in progress_bar(
            range(0, len(images), batch_size),
            progress,
            desc=f"judging ({draws} draws)",
            unit="batch",
            leave=False,
        ):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            with torch.autocast(device.type, enabled=False):  # judging is float32
                hits = [model(x).argmax(dim=1) == y for _ in range(draws)]
            rows.append(torch.stack(hits, dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows) if rows else torch.zeros(0, draws, dtype=torch.bool)

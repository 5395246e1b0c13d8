"""The defended model ``x -> f(g(t(x)))`` of AToP (paper Sec. 3, Eq. 9).

:class:`PurifiedClassifier` chains a random transform ``t`` (:mod:`atop.transforms`), a purifier
``g`` (:mod:`atop.models.purifier`, or anything with ``purify(x01, mask, keep_known) -> x01``) and a
classifier ``f`` (any module taking float ``[B, 3, H, W]`` images in ``[0, 1]``).

Guarantees (each tested in ``tests/test_defense.py``):

* ``t`` is applied to **every image of every call**, with fresh noise and masks, in train AND
  eval mode (attack libraries call ``model.eval()``; the authors' evaluation skipped the
  transform for most batches).
* Exact gradients flow through ``t`` and ``g`` (the default): the model is a plain
  differentiable function of its input for a fixed draw.
* ``bpda=True`` replaces the backward pass of ``g`` by the identity (BPDA, Athalye et al.
  2018) for the BPDA attack (switched by :func:`atop.attacks.bpda_mode`); the forward pass is
  unchanged (bit-identical for the same draw).
* ``t`` is drawn at the purifier's working side (:func:`to_working`): for the authors'
  "upsample" variant after upsampling (method.md §5.1), and ``g``'s output is brought back
  to the image side (:func:`from_working`) before ``f``.
* ``n_draws = K > 1`` averages the logits of K independent draws (prediction with less
  variance); :meth:`PurifiedClassifier.predict` does it without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atop.models.purifier import InpaintResult
from atop.transforms import RandomTransform, TransformConfig, TransformDraw


def combine_purified(draw: TransformDraw, purified: torch.Tensor) -> torch.Tensor:
    """Combine the N purified copies of one transform draw into one image (RT3; paper Sec. 3).

    Every pixel takes the inpainted value from the copy whose mask holes it; pixels holed by
    no mask (only when ``N * missing_rate < 1``) keep the transformed image ``draw.image``.
    With the paper's r = 0.25, N = 4 the masks partition the image, so every pixel is
    inpainted exactly once. For N = 1 (RT1 / RT2) the result is ``purified[0]`` itself.

    Args:
        draw: the transform draw; ``draw.masks`` ``[N, B, 1, H, W]`` pairwise disjoint, 1 = hole.
        purified: ``[N, B, C, H, W]`` in [0, 1]: ``g`` applied to ``draw.image`` with each mask.

    Returns:
        ``[B, C, H, W]`` in [0, 1].
    """
    if purified.shape[0] == 1:
        return purified[0]
    masks = draw.masks
    return (masks * purified).sum(dim=0) + (1.0 - masks.sum(dim=0)) * draw.image


def to_working(x: torch.Tensor, side: int) -> torch.Tensor:
    """Images ``[B, C, P, P]`` resized to the purifier's working side (bilinear; identity when
    ``side == P``): where the authors upsample CIFAR before the transform (method.md §5.1)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=side, mode="bilinear", align_corners=False)


def from_working(x: torch.Tensor, side: int) -> torch.Tensor:
    """Images at the working side brought back to side ``side`` (bilinear, antialiased;
    identity when equal). Differentiable."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=side, mode="bilinear", align_corners=False, antialias=True)


def working_side(purifier: nn.Module, default: int) -> int:
    """The side the purifier's networks run at (its ``image_size``; ``default`` without one)."""
    return int(getattr(purifier, "image_size", default))


def keeps_known_pixels(config: TransformConfig) -> bool:
    """Whether the purifier keeps the transformed image's known pixels (paper Sec. 3, Eq. 8).

    Mask-only transforms (RT1) leave the known pixels clean: ``g`` fills the holes and keeps
    the rest exactly. With Gaussian noise (RT2, RT3) every pixel is corrupted, so the
    purified image is the generator's whole output (Eq. 8 asks ``g(t(x))`` to restore ``x``
    everywhere); otherwise the classifier would see the sigma = 0.25 noise untouched.
    """
    return not config.uses_noise


def _stack_copies(draw: TransformDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """The N masked copies of a draw as one batch: images, masks ``[N * B, ...]`` (copy-major)."""
    n_masks = draw.masks.shape[0]
    copies = draw.image.expand(n_masks, *draw.image.shape).flatten(0, 1)
    return copies, draw.masks.flatten(0, 1)


def purify_draw(
    generator: nn.Module, draw: TransformDraw, config: TransformConfig
) -> tuple[InpaintResult, torch.Tensor]:
    """Run the purifier on every masked copy of a transform draw and combine them (training).

    The purifier-training step needs the generator's coarse / refined outputs for the L1 term
    of paper Eq. 8 as well as the combined image for AToP's classification term (Eq. 9); this
    gives both. :meth:`PurifiedClassifier.purify` does the same with ``purify`` only.

    Args:
        generator: a module whose ``forward(x01, mask)`` returns an
            :class:`atop.models.purifier.InpaintResult` (e.g. ``InpaintingGenerator``).
        draw: a :class:`atop.transforms.TransformDraw` (``image`` ``[B, 3, H, W]``, ``masks``
            ``[N, B, 1, H, W]``, 1 = hole).
        config: the transform's config: the draw must have ``config.n_masks`` masks, and
            :func:`keeps_known_pixels` decides how the copies are purified.

    Returns:
        ``(result, combined)``: ``result`` for the ``N * B`` copies (copy-major: copy ``n`` of
        image ``b`` at index ``n * B + b``; the masks in the same order are
        ``draw.masks.flatten(0, 1)``), all ``[N * B, 3, H, W]`` in [0, 1]; ``combined``
        ``[B, 3, H, W]`` in [0, 1] (:func:`combine_purified`). Differentiable.

    Raises:
        ValueError: the draw's number of masks differs from ``config.n_masks``.
    """
    n_masks, batch = draw.masks.shape[:2]
    if n_masks != config.n_masks:
        raise ValueError(
            f"The draw has {n_masks} masks but the {config.kind} transform makes "
            f"{config.n_masks}: draw it with that transform."
        )
    result = generator(*_stack_copies(draw), keep_known=keeps_known_pixels(config))
    return result, combine_purified(draw, result.purified.unflatten(0, (n_masks, batch)))


class PurifiedClassifier(nn.Module):
    """``logits = f(g(t(x)))``: AToP's defended model (paper Sec. 3, Eq. 9).

    Args:
        classifier: ``f``, a module mapping float ``[B, 3, H, W]`` in [0, 1] to logits
            ``[B, n_classes]``. Its ``requires_grad`` flags are never changed here (freezing it
            is the trainer's job); it is kept in eval mode (see :meth:`train`).
        purifier: ``g``, a module with ``purify(x01, mask, keep_known) -> x01`` (float ``[B, 3, H, W]`` in
            [0, 1], mask ``[B, 1, H, W]`` 1 = hole), e.g. an
            :class:`atop.models.purifier.InpaintingGenerator`.
        transform: ``t``, a :class:`atop.transforms.RandomTransform` (RT1 / RT2 / RT3).
        n_draws: K, number of independent draws whose logits :meth:`forward` averages
            (default 1: one stochastic draw per call, what attacks should see).
        bpda: start in BPDA mode (identity backward through ``g``).
        generator: optional ``torch.Generator`` for the transform's draws (reproducibility).

    Raises:
        TypeError: ``purifier`` has no ``purify`` method or ``transform`` is not a
            RandomTransform.
        ValueError: ``n_draws < 1``.
    """

    def __init__(
        self,
        classifier: nn.Module,
        purifier: nn.Module,
        transform: RandomTransform,
        *,
        n_draws: int = 1,
        bpda: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not callable(getattr(purifier, "purify", None)):
            raise TypeError(
                f"purifier must have a purify(x01, mask, keep_known) method (e.g. "
                f"atop.models.purifier.InpaintingGenerator), got {type(purifier).__name__}."
            )
        if not isinstance(transform, RandomTransform):
            raise TypeError(
                f"transform must be an atop.transforms.RandomTransform, got "
                f"{type(transform).__name__}."
            )
        self.classifier = classifier
        self.purifier = purifier
        self.transform = transform
        self.n_draws = _check_draws(n_draws)
        self.bpda = bool(bpda)
        self.generator = generator
        self.classifier.eval()

    def train(self, mode: bool = True) -> PurifiedClassifier:
        """Set the purifier's mode; the classifier ``f`` stays in eval mode.

        ``f`` is frozen in AToP (Eq. 9), so its batch-norm statistics must not drift while
        ``g`` is trained. The transform is stochastic in both modes.
        """
        super().train(mode)
        self.classifier.eval()
        return self

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """``g(t(x))``: one fresh draw of the transform, purified (RT3: combined).

        Args:
            x: float ``[B, 3, H, W]`` in [0, 1].

        Returns:
            float ``[B, 3, H, W]`` in [0, 1]. Exact gradients w.r.t. ``x``, or in BPDA mode
            the identity in place of ``g``'s Jacobian.

        Raises:
            ValueError: ``x`` is not a float ``[B, 3, H, W]`` tensor in [0, 1].
        """
        _check_images(x)
        work = working_side(self.purifier, x.shape[-1])
        draw = self.transform(to_working(x, work), generator=self.generator)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.bpda):
            purified = self.purifier.purify(
                *_stack_copies(draw), keep_known=keeps_known_pixels(self.transform.config)
            )
        combined = combine_purified(draw, purified.unflatten(0, draw.masks.shape[:2]))
        if self.bpda:
            # Forward value: exactly `combined` (v - v == 0); backward: identity to draw.image.
            combined = combined.detach() + (draw.image - draw.image.detach())
        return from_working(combined, x.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``f(g(t(x)))``, averaged over ``n_draws`` fresh draws.

        Args:
            x: float ``[B, 3, H, W]`` in [0, 1].

        Returns:
            float logits ``[B, n_classes]``.

        Raises:
            ValueError: ``x`` is not a float ``[B, 3, H, W]`` tensor in [0, 1].
        """
        return self._average_logits(x, self.n_draws)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, draws: int | None = None) -> torch.Tensor:
        """Logits averaged over ``draws`` (default ``n_draws``) fresh draws, without gradients.

        Args:
            x: float ``[B, 3, H, W]`` in [0, 1].
            draws: K >= 1.

        Returns:
            float logits ``[B, n_classes]``; take ``argmax(1)`` for labels.
        """
        return self._average_logits(x, self.n_draws if draws is None else _check_draws(draws))

    def _average_logits(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        logits = self.classifier(self.purify(x))
        for _ in range(draws - 1):
            logits = logits + self.classifier(self.purify(x))
        return logits / draws if draws > 1 else logits

    def extra_repr(self) -> str:
        return f"n_draws={self.n_draws}, bpda={self.bpda}"


def _check_draws(draws: int) -> int:
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"The number of draws must be an int >= 1, got {draws!r}.")
    return draws


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(
            f"PurifiedClassifier expects float images [B, 3, H, W] in [0, 1], got {x.dtype} of "
            f"shape {tuple(x.shape)}."
        )
    low, high = torch.aminmax(x.detach())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"PurifiedClassifier expects images in [0, 1], got values in [{low.item():.3g}, "
            f"{high.item():.3g}]. Pass unnormalized images; the classifier normalizes inside."
        )

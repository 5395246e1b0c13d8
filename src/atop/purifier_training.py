"""One GAN update of the purifier: the step shared by purifier pretraining and AToP.

Purifier pretraining (paper Eq. 8) and AToP fine-tuning (paper Eq. 9, Algorithm 1) update
the purifier ``g`` and its discriminator ``D`` the same way; AToP only feeds adversarial
examples ``x' = x + delta`` and adds ``lambda * CE(y, f(g(t(x'))))`` to ``g``'s loss:

    L(theta_g) = L_org(x') + lambda * CE(y, f(g(t(x'))))          (Eq. 9)
    L_org      = hinge GAN term + L1 on the coarse and refined outputs   (Eq. 8)

:class:`PurifierStep` does one such update on a batch: draw ``t``, run ``g``, one ``D`` step
(hinge loss), then one ``g`` step. The GAN term is computed on the non-detached purified
images, so it really trains ``g`` (the authors' code detached it).

Core module: torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from atop.defense import purify_draw
from atop.models.purifier import discriminator_loss, generator_loss
from atop.training import autocast
from atop.transforms import RandomTransform


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
        self.generator = generator
        self.discriminator = discriminator
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
        params: Mapping[str, Any],
        device: torch.device | str = "cpu",
    ) -> PurifierStep:
        """The step with the paper's optimizers: Adam for ``g`` and ``D`` (paper: lr 1e-4,
        betas (0.5, 0.999)), from a stage's parameters ``lr``, ``betas``, ``l1_weight``,
        ``gan_weight`` and ``amp`` (purifier pretraining and AToP fine-tuning share them)."""
        adam = {"lr": float(params["lr"]), "betas": tuple(float(b) for b in params["betas"])}
        return cls(
            generator,
            discriminator,
            transform,
            torch.optim.Adam(generator.parameters(), **adam),
            torch.optim.Adam(discriminator.parameters(), **adam),
            l1_weight=float(params["l1_weight"]),
            gan_weight=float(params["gan_weight"]),
            device=device,
            amp=bool(params["amp"]),
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
        draw = self.transform(x_in)
        n_masks = draw.masks.shape[0]
        targets = target.expand(n_masks, *target.shape).flatten(0, 1)
        masks = draw.masks.flatten(0, 1)

        with autocast(self.device, self.amp):
            result, purified = purify_draw(self.generator, draw, self.transform.config)

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

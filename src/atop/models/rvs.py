"""The Robustness-via-Synthesis (RvS) perturbation generator and sample synthesis.

Baytaş & Deb, "Robustness-via-Synthesis: Robust training with generative adversarial
perturbations", Neurocomputing 2023 (arXiv 2108.09713), §3: the perturbations of robust
training are synthesized from random noise by a generator network (not conditioned on the
image), instead of by gradient steps on the classifier.

Architecture (as in the authors' TensorFlow code; ``H`` = image side, 32 for CIFAR/SVHN)::

    z ~ N(0, I_640) -> FC 640 -> 64 * (H/4)^2 -> reshape [64, H/4, H/4]
      -> ConvT 4x4 stride 2 -> [32, H/2, H/2], BN, LeakyReLU 0.2
      -> ConvT 4x4 stride 2 -> [16, H, H],     BN, LeakyReLU 0.2
      -> Conv 4x4 stride 1 'same' (pad 1 before, 2 after, as TensorFlow) -> [3, H, H]
      -> * pixel_scale -> clip to [-eps, eps]          (no tanh)

The authors work on the 0..255 pixel scale and clip the raw output to ``[-8, 8]``; our images
are in ``[0, 1]``, so the raw output is multiplied by ``pixel_scale = 1/255`` first. This keeps
the original's dynamics: a freshly initialized generator outputs a few pixel levels, mostly
inside the clip (a clip that saturated everywhere would pass no gradient to the generator).

Core module: imports only torch and the standard library.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: Size of the noise vector z (the authors' value).
Z_DIM = 640


class RvSGenerator(nn.Module):
    """Noise-to-perturbation generator of RvS (Baytaş & Deb 2023, §3.1; authors' code).

    Args:
        eps: ℓ∞ bound of the perturbation on the ``[0, 1]`` pixel scale (default 8/255);
            the output is clipped to ``[-eps, eps]``.
        z_dim: size of the Gaussian noise vector (default 640).
        image_size: side ``H`` of the square images (default 32); a positive multiple of 4.
        channels: image channels (default 3).
        pixel_scale: factor applied to the raw network output before the clip (default
            1/255: the raw output is in 0..255 pixel units, as in the authors' code).

    Raises:
        ValueError: ``eps`` not in ``(0, 1]``, ``z_dim``/``channels`` not positive, or
            ``image_size`` not a positive multiple of 4.

    Shape:
        ``forward(z)``: z float32 ``[B, z_dim]`` -> delta float32 ``[B, channels, H, H]``
        with values in ``[-eps, eps]``.
    """

    def __init__(
        self,
        eps: float = 8 / 255,
        z_dim: int = Z_DIM,
        image_size: int = 32,
        channels: int = 3,
        pixel_scale: float = 1 / 255,
    ) -> None:
        super().__init__()
        if not 0 < eps <= 1:
            raise ValueError(f"eps must be in (0, 1] (the [0, 1] pixel scale), got {eps}.")
        if z_dim <= 0 or channels <= 0:
            raise ValueError(f"z_dim and channels must be positive, got {z_dim}, {channels}.")
        if image_size <= 0 or image_size % 4:
            raise ValueError(
                f"RvSGenerator upsamples twice by 2, so image_size must be a positive multiple "
                f"of 4 (32 for CIFAR-10/100 and SVHN), got {image_size}."
            )
        self.eps = float(eps)
        self.z_dim = int(z_dim)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.pixel_scale = float(pixel_scale)
        self._base = image_size // 4
        self.fc = nn.Linear(z_dim, 64 * self._base * self._base)
        self.body = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.LeakyReLU(0.2),
            # TensorFlow 'SAME' for an even kernel pads (k-1)//2 before and the rest after.
            nn.ZeroPad2d((1, 2, 1, 2)),
            nn.Conv2d(16, channels, 4, stride=1, padding=0, bias=False),
        )
        self._init_like_authors()

    def _init_like_authors(self) -> None:
        """Initialize as the authors' TF code: He-normal convolutions (std sqrt(2/n), n =
        k*k*output channels for convs, k*k*input channels for transposed convs, which is
        PyTorch's ``fan_out`` for both), unit-scaling uniform FC weights, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                bound = math.sqrt(3.0 / module.in_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, z: Tensor) -> Tensor:
        """Map noise ``z`` float ``[B, z_dim]`` to a perturbation ``[B, C, H, H]`` in ``[-eps, eps]``.

        Raises:
            ValueError: ``z`` is not ``[B, z_dim]``.
        """
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(
                f"RvSGenerator expects noise of shape [B, {self.z_dim}], got {tuple(z.shape)}: "
                "draw it with `generator.sample_noise(batch_size)`."
            )
        h = self.fc(z).view(-1, 64, self._base, self._base)
        raw = self.body(h)
        return (raw * self.pixel_scale).clamp(-self.eps, self.eps)

    def sample_noise(self, batch_size: int, rng: torch.Generator | None = None) -> Tensor:
        """Draw ``z ~ N(0, I)`` float32 ``[batch_size, z_dim]`` on the generator's device.

        Args:
            batch_size: number of noise vectors.
            rng: random-number generator on the same device (``None``: torch's global RNG).
        """
        device = self.fc.weight.device
        return torch.randn(batch_size, self.z_dim, generator=rng, device=device)

    def config(self) -> dict[str, float | int]:
        """Constructor arguments (primitives) to rebuild this generator from a checkpoint."""
        return {
            "eps": self.eps,
            "z_dim": self.z_dim,
            "image_size": self.image_size,
            "channels": self.channels,
            "pixel_scale": self.pixel_scale,
        }


def synthesize(x: Tensor, delta: Tensor, eps: float, rng: torch.Generator | None = None) -> Tensor:
    """RvS synthesized adversarial samples from clean images and generated perturbations.

    ``x_r = clip(x + U(-eps, eps), 0, 1)``; ``x_adv = clip(clip(x_r + delta, x - eps, x + eps), 0, 1)``
    (Baytaş & Deb 2023, §3.1; authors' code). Differentiable in ``delta`` (the generator
    learns through it).

    Args:
        x: clean images float ``[B, C, H, W]`` in ``[0, 1]``.
        delta: perturbations, same shape as ``x``, in ``[-eps, eps]`` (from :class:`RvSGenerator`).
        eps: ℓ∞ radius on the ``[0, 1]`` scale.
        rng: random-number generator for the uniform noise, on ``x``'s device (``None``:
            torch's global RNG).

    Returns:
        ``x_adv``, same shape and dtype as ``x``, in ``[0, 1]`` and within ``eps`` of ``x``.

    Raises:
        ValueError: shapes differ or ``eps`` is not positive.
    """
    if delta.shape != x.shape:
        raise ValueError(
            f"delta {tuple(delta.shape)} must have the shape of x {tuple(x.shape)}: build the "
            "generator with the images' size and draw one noise vector per image."
        )
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}.")
    noise = torch.rand(x.shape, generator=rng, device=x.device, dtype=x.dtype)
    x_r = (x + (2 * noise - 1) * eps).clamp(0, 1)
    return torch.clamp(x_r + delta, x - eps, x + eps).clamp(0, 1)


def sample_adversarial(
    generator: RvSGenerator, x: Tensor, rng: torch.Generator | None = None
) -> Tensor:
    """Synthesize one adversarial sample per image of ``x`` with ``generator``.

    Draws ``z`` (one per image), then the uniform noise of :func:`synthesize`, both from
    ``rng`` in that order, so equal seeds give equal samples.

    Args:
        generator: the RvS generator (its ``eps`` is the radius).
        x: clean images float ``[B, C, H, W]`` in ``[0, 1]``.
        rng: random-number generator on ``x``'s device (``None``: torch's global RNG).

    Returns:
        ``x_adv`` float ``[B, C, H, W]`` in ``[0, 1]``, within ``generator.eps`` of ``x``,
        differentiable with respect to the generator's parameters.
    """
    delta = generator(generator.sample_noise(x.shape[0], rng))
    return synthesize(x, delta.to(x.dtype), generator.eps, rng)

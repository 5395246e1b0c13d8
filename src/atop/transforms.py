"""Random transforms RT1 / RT2 / RT3 applied before the purifier (AToP paper, Sec. 3).

The defense is ``logits = f(g(t(x)))``; this module implements ``t``'s randomness:

* **RT1**: a random block mask (no noise).
* **RT2**: Gaussian noise, then a random block mask. The paper's headline defense.
* **RT3**: Gaussian noise, then ``mask_number`` (N) pairwise disjoint random block masks. Each
  masked copy is inpainted by the purifier and the copies are combined into one image; the
  combination needs the purifier, so it lives in :class:`atop.defense.PurifiedClassifier`.

Conventions (shared by the purifier and the defended model):

* Images are float ``[B, C, H, W]`` in ``[0, 1]``.
* A **mask** is float ``[B, 1, H, W]`` with values in ``{0, 1}``: **1 = missing (a hole the
  purifier fills), 0 = known (kept)**. Masks are made of square blocks of side ``mask_block``
  (default ``P / 8``, P = image side: 4 px at 32x32) on the regular block grid, and every image
  gets exactly ``round(missing_rate * n_blocks)`` hole blocks, so the masked fraction equals
  ``missing_rate`` exactly whenever ``missing_rate * n_blocks`` is an integer (true for the
  paper's r = 0.25 on an 8x8 grid).
* **Noise** is added in ``[0, 1]`` space, ``x + sigma * N(0, I)``, and the result is **clamped to
  [0, 1] immediately** (before masking), so the purifier always receives a valid image. The
  clamp is part of ``t``: exact gradients go through it (zero where a pixel was clamped).
* Randomness is fresh for every image and every call (the authors' code shared one mask per
  batch). Pass a ``torch.Generator`` to make draws reproducible; the draws are made on the
  generator's device and moved to the images' device.

Paper defaults: ``sigma = 0.25``, ``mask_block = P / 8``, ``missing_rate = 0.25``,
``mask_number = 4`` (with r = 0.25, the four RT3 masks partition the image).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import nn

KINDS = ("rt1", "rt2", "rt3")
NOISE_ROUTES = ("box", "upsample")


@dataclass(frozen=True)
class TransformConfig:
    """Parameters of a random transform (paper Sec. 3; defaults are the paper's).

    Attributes:
        kind: ``"rt1"`` (mask), ``"rt2"`` (noise + mask) or ``"rt3"`` (noise + N disjoint masks).
        sigma: std of the Gaussian noise on the ``[0, 1]`` scale (RT2, RT3); must be >= 0.
        missing_rate: fraction r of the blocks masked in each mask, strictly in (0, 1).
        mask_block: side of a square mask block in pixels; ``None`` means ``P // 8`` for an
            image of side P (``min(H, W)`` for non-square images). The image sides must be
            divisible by it.
        mask_number: N, the number of disjoint masks of RT3 (ignored by RT1 / RT2); needs
            ``mask_number * missing_rate <= 1``.
        noise_resolution: the side (px) at which ``sigma`` is the per-pixel std; ``None`` =
            the side of the images the transform is drawn on. The authors add sigma = 0.25
            at 256 px (method.md §5.1, §6.1).
        noise_route: how noise given at ``noise_resolution`` reaches images of side ``S``
            (used when ``noise_resolution > S``). ``"box"``: i.i.d. noise of std ``sigma * S
            / noise_resolution`` at ``S`` px, clamped there: exactly the box average of
            i.i.d. noise at ``noise_resolution`` px (0.03125 at 32 px), the mildest reading.
            ``"upsample"``: the authors' pipeline (:func:`upsampled_noise`): bilinear
            upsampling to ``noise_resolution``, ``+ sigma N(0, I)`` there, clamp to
            ``[0, 1]``, area-downsampling back to ``S``: the same DC noise, but 1.75x stronger
            at the axis Nyquist and about 3x at the diagonal Nyquist relative to the (blurred)
            image, and a value-dependent clipping bias (method.md §6.1).

    Raises:
        ValueError: a parameter is out of range (the message names it and the valid range).
    """

    kind: str = "rt2"
    sigma: float = 0.25
    missing_rate: float = 0.25
    mask_block: int | None = None
    mask_number: int = 4
    noise_resolution: int | None = None
    noise_route: str = "box"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown transform kind {self.kind!r}: use one of {KINDS}.")
        if not 0.0 <= float(self.sigma) <= 1.0:
            raise ValueError(
                f"sigma must be in [0, 1] (std of the noise on the [0, 1] pixel scale), got "
                f"{self.sigma}; a value on the 0-255 scale is sigma / 255."
            )
        _check_missing_rate(self.missing_rate)
        if self.mask_block is not None:
            _check_positive_int("mask_block", self.mask_block)
        _check_positive_int("mask_number", self.mask_number)
        if self.noise_resolution is not None:
            _check_positive_int("noise_resolution", self.noise_resolution)
        if self.noise_route not in NOISE_ROUTES:
            raise ValueError(
                f"noise_route must be one of {NOISE_ROUTES} (how noise given at "
                f"noise_resolution reaches the working side), got {self.noise_route!r}."
            )
        if self.kind == "rt3" and self.mask_number * self.missing_rate > 1.0 + 1e-9:
            raise ValueError(
                f"RT3 needs mask_number * missing_rate <= 1 for disjoint masks, got "
                f"{self.mask_number} * {self.missing_rate}. Lower one of them."
            )

    @property
    def uses_noise(self) -> bool:
        """Whether Gaussian noise is added (RT2, RT3)."""
        return self.kind in ("rt2", "rt3")

    def sigma_at(self, side: int) -> float:
        """The noise's per-pixel std on images of side ``side`` px under the ``box`` route
        (see ``noise_resolution``); the ``upsample`` route's DC component has the same std."""
        if self.noise_resolution is None:
            return float(self.sigma)
        return float(self.sigma) * side / self.noise_resolution

    def upsamples(self, side: int) -> bool:
        """Whether images of side ``side`` get the noise through :func:`upsampled_noise`."""
        return (
            self.noise_route == "upsample"
            and self.noise_resolution is not None
            and self.noise_resolution > side
        )

    @property
    def n_masks(self) -> int:
        """How many masks (purified copies) one draw has: N for RT3, else 1."""
        return self.mask_number if self.kind == "rt3" else 1

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> TransformConfig:
        """Build from a dict (e.g. a Kedro parameters block).

        Raises:
            ValueError: unknown keys (named in the message) or out-of-range values.
        """
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(
                f"Unknown transform parameter(s) {unknown}; allowed: {sorted(allowed)}."
            )
        return cls(**dict(config))

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a plain dict (primitives only)."""
        return asdict(self)


class TransformDraw(NamedTuple):
    """One draw of a random transform.

    Attributes:
        image: float ``[B, C, H, W]`` in ``[0, 1]``: the input after noise and clamping (the
            input itself for RT1). Holes are NOT blanked here: the purifier does that.
        masks: float ``[N, B, 1, H, W]`` in ``{0, 1}`` (1 = hole); N = 1 for RT1 / RT2,
            N = ``mask_number`` for RT3 (pairwise disjoint).
    """

    image: torch.Tensor
    masks: torch.Tensor


def _check_missing_rate(missing_rate: float) -> None:
    if not 0.0 < float(missing_rate) < 1.0:
        raise ValueError(
            f"missing_rate must be strictly between 0 and 1 (fraction of blocks masked), "
            f"got {missing_rate}."
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def default_mask_block(height: int, width: int) -> int:
    """The paper's block side ``P / 8`` for an image of sides ``height x width`` (P = min side).

    Raises:
        ValueError: the image is smaller than 8 px.
    """
    side = min(height, width)
    if side < 8:
        raise ValueError(
            f"Images must be at least 8x8 px for P/8 mask blocks, got {height}x{width}."
        )
    return side // 8


def _resolve_mask_block(height: int, width: int, mask_block: int | None) -> int:
    block = default_mask_block(height, width) if mask_block is None else mask_block
    _check_positive_int("mask_block", block)
    if height % block or width % block:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by mask_block={block}: choose a "
            f"mask_block that divides both sides (the paper uses P/8)."
        )
    return block


def _draw(
    kind: str,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """``torch.rand`` / ``torch.randn`` on the generator's device, then moved to ``device``."""
    sampler = torch.rand if kind == "uniform" else torch.randn
    if generator is None:
        return sampler(shape, device=device)
    sample = sampler(shape, generator=generator, device=generator.device)
    return sample if device is None else sample.to(device)


def sample_disjoint_block_masks(
    batch: int,
    size: tuple[int, int],
    mask_number: int,
    missing_rate: float = 0.25,
    mask_block: int | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample ``mask_number`` pairwise disjoint block masks per image (RT3; paper Sec. 3).

    Every image gets its own random permutation of the block grid; mask ``n`` holes the
    blocks at positions ``[n k, (n + 1) k)`` of it, with ``k = round(missing_rate * n_blocks)``.
    So each mask holes exactly ``k`` blocks, the masks never overlap, and when
    ``mask_number * k == n_blocks`` (paper: r = 0.25, N = 4) they partition the image.

    Args:
        batch: B, number of images.
        size: ``(H, W)`` of the images in pixels.
        mask_number: N, masks per image (>= 1).
        missing_rate: fraction of blocks masked in each mask, in (0, 1).
        mask_block: block side in pixels; ``None`` = P // 8. Must divide H and W.
        generator: optional ``torch.Generator`` for reproducible draws.
        device: device of the returned masks (default: the generator's, else CPU).

    Returns:
        float32 ``[N, B, 1, H, W]`` in ``{0, 1}``, 1 = hole (missing), 0 = known.

    Raises:
        ValueError: bad missing_rate / mask_block / mask_number, an image side not divisible
            by mask_block, ``round(missing_rate * n_blocks) == 0`` (image too small for that
            rate), or ``mask_number * k > n_blocks`` (masks cannot be disjoint).
    """
    height, width = size
    _check_missing_rate(missing_rate)
    _check_positive_int("mask_number", mask_number)
    block = _resolve_mask_block(height, width, mask_block)
    grid_h, grid_w = height // block, width // block
    n_blocks = grid_h * grid_w
    per_mask = round(missing_rate * n_blocks)
    if per_mask == 0:
        raise ValueError(
            f"missing_rate={missing_rate} masks 0 of the {n_blocks} blocks of a {height}x{width} "
            f"image with mask_block={block}: raise missing_rate or lower mask_block."
        )
    if mask_number * per_mask > n_blocks:
        raise ValueError(
            f"{mask_number} disjoint masks of {per_mask} blocks do not fit in {n_blocks} blocks: "
            f"need mask_number * missing_rate <= 1."
        )
    if device is None and generator is not None:
        device = generator.device
    order = _draw("uniform", (batch, n_blocks), generator, device).argsort(dim=1)
    chosen = order[:, : mask_number * per_mask].reshape(batch, mask_number, per_mask)
    grid = torch.zeros(batch, mask_number, n_blocks, device=order.device)
    grid.scatter_(2, chosen, 1.0)
    grid = grid.transpose(0, 1).reshape(mask_number, batch, 1, grid_h, grid_w)
    return grid.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)


def sample_block_masks(
    batch: int,
    size: tuple[int, int],
    missing_rate: float = 0.25,
    mask_block: int | None = None,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample one random block mask per image (RT1 / RT2; paper Sec. 3).

    Exactly ``round(missing_rate * n_blocks)`` blocks of side ``mask_block`` are holes in each
    image, chosen independently per image (and per call).

    Args:
        batch: B, number of images.
        size: ``(H, W)`` in pixels.
        missing_rate: fraction of blocks masked, in (0, 1). Paper: 0.25.
        mask_block: block side in pixels; ``None`` = P // 8 (4 px at 32x32).
        generator: optional ``torch.Generator`` for reproducible draws.
        device: device of the returned mask.

    Returns:
        float32 ``[B, 1, H, W]`` in ``{0, 1}``, 1 = hole (missing), 0 = known.

    Raises:
        ValueError: as :func:`sample_disjoint_block_masks`.
    """
    masks = sample_disjoint_block_masks(
        batch, size, 1, missing_rate, mask_block, generator=generator, device=device
    )
    return masks[0]


def add_gaussian_noise(
    x: torch.Tensor,
    sigma: float,
    *,
    generator: torch.Generator | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """``x + sigma * N(0, I)``, fresh noise per pixel and call, clamped to [0, 1] by default.

    Args:
        x: float ``[B, C, H, W]`` in ``[0, 1]``.
        sigma: noise std on the ``[0, 1]`` scale (paper: 0.25).
        generator: optional ``torch.Generator`` for reproducible draws.
        clamp: clamp the result to ``[0, 1]`` (the transforms always do; ``False`` exposes the
            raw noise, e.g. for tests).

    Returns:
        A tensor like ``x``; differentiable w.r.t. ``x`` (identity, zero where clamped).
    """
    noisy = x + sigma * _draw("normal", tuple(x.shape), generator, x.device).to(x.dtype)
    return noisy.clamp(0.0, 1.0) if clamp else noisy


def upsampled_noise(
    x: torch.Tensor,
    sigma: float,
    resolution: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The authors' noise route at the working resolution (method.md §6.1): upsample ``x``
    bilinearly (``align_corners=False``, as ``transforms.Resize`` on tensors) so that its
    shorter side is ``resolution``, add ``sigma * N(0, I)`` i.i.d. per upsampled pixel, clamp
    to ``[0, 1]``, and area-downsample back to ``x``'s size.

    Every operator is differentiable, so attacks get exact gradients (zero where a pixel was
    clamped). Seen at ``x``'s side ``S`` the noise has std ``sigma * S / resolution`` at DC
    (as the ``box`` route), the image is low-passed by the up/down pair, and the clamp adds
    ``E[clamp(u + n, 0, 1)] - u`` (+0.100 at u = 0 for sigma 0.25). The masks are drawn at
    ``S`` px on the block grid: a block mask of side ``P/8`` at ``resolution`` px is the same
    mask after area-downsampling, so masking before or after the round trip is the same.

    Args:
        x: float ``[B, C, H, W]`` in ``[0, 1]``.
        sigma: std at ``resolution`` px on the ``[0, 1]`` scale.
        resolution: the upsampled shorter side (authors: 256).
        generator: optional ``torch.Generator``.

    Returns:
        A tensor like ``x``, in ``[0, 1]``.
    """
    height, width = x.shape[-2:]
    scale = resolution / min(height, width)
    size = (round(height * scale), round(width * scale))
    up = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    noise = _draw("normal", tuple(up.shape), generator, x.device).to(x.dtype)
    noisy = (up + sigma * noise).clamp(0.0, 1.0)
    return nn.functional.interpolate(noisy, size=(height, width), mode="area")


class RandomTransform(nn.Module):
    """The random transform ``t`` of AToP (paper Sec. 3): RT1, RT2 or RT3.

    Stochastic on every call, in train AND eval mode (it never reads ``self.training``: attack
    libraries switch models to eval). It has no parameters.

    Args:
        kind, sigma, missing_rate, mask_block, mask_number, noise_resolution, noise_route:
            see :class:`TransformConfig` (defaults: the paper's RT2, sigma at the drawn side).

    Raises:
        ValueError: bad parameters (see :class:`TransformConfig`).

    Example:
        >>> t = RandomTransform("rt2")
        >>> draw = t(images)  # draw.image [B,3,H,W], draw.masks [1,B,1,H,W]
    """

    def __init__(
        self,
        kind: str = "rt2",
        sigma: float = 0.25,
        missing_rate: float = 0.25,
        mask_block: int | None = None,
        mask_number: int = 4,
        noise_resolution: int | None = None,
        noise_route: str = "box",
    ) -> None:
        super().__init__()
        self.config = TransformConfig(
            kind, sigma, missing_rate, mask_block, mask_number, noise_resolution, noise_route
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | TransformConfig) -> RandomTransform:
        """Build from a :class:`TransformConfig` or a dict of its fields (unknown keys raise)."""
        if not isinstance(config, TransformConfig):
            config = TransformConfig.from_mapping(config)
        return cls(**config.to_dict())

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> TransformDraw:
        """Draw noise and masks for a batch.

        Args:
            x: float ``[B, C, H, W]`` in ``[0, 1]``.
            generator: optional ``torch.Generator`` for reproducible draws.

        Returns:
            :class:`TransformDraw` ``(image, masks)``: ``image`` = ``clamp(x + sigma * eps, 0, 1)``
            for RT2/RT3 (``x`` itself for RT1), ``masks`` float ``[N, B, 1, H, W]`` (1 = hole).

        Raises:
            ValueError: ``x`` is not a 4-D floating tensor, or its size does not fit the masks.
        """
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(
                f"RandomTransform expects float images [B, C, H, W] in [0, 1], got "
                f"{x.dtype} of shape {tuple(x.shape)}."
            )
        cfg = self.config
        side = min(x.shape[-2:])
        if not cfg.uses_noise:
            image = x
        elif cfg.upsamples(side):
            image = upsampled_noise(x, cfg.sigma, cfg.noise_resolution, generator=generator)
        else:
            image = add_gaussian_noise(x, cfg.sigma_at(side), generator=generator)
        masks = sample_disjoint_block_masks(
            x.shape[0],
            (x.shape[-2], x.shape[-1]),
            cfg.n_masks,
            cfg.missing_rate,
            cfg.mask_block,
            generator=generator,
            device=x.device,
        ).to(x.dtype)
        return TransformDraw(image, masks)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())


def build_transform(config: Mapping[str, Any]) -> RandomTransform:
    """Build a :class:`RandomTransform` from a parameters dict (keys of :class:`TransformConfig`).

    Raises:
        ValueError: unknown keys or out-of-range values, with the valid choices.
    """
    return RandomTransform.from_config(config)

"""The GAN purifier ``g`` of AToP, its discriminator, losses, config and checkpoints.

AToP (Lin et al., ICLR 2024, Sec. 3 and 4) purifies ``t(x)`` with a GAN inpainting generator
(DeepFillv2: Yu et al., "Free-Form Image Inpainting with Gated Convolution", ICCV 2019).
Two generators share the interface ``forward(x01, mask, keep_known) -> InpaintResult``:

* ``"unet"`` (default, :class:`atop.models.gated_unet.GatedUNetGenerator`): DeepFillv2's
  ingredients (gated convolutions, coarse-to-fine, optional contextual attention) on U-Nets
  with skip connections at every resolution and a residual output;
* ``"deepfillv2"`` (:class:`InpaintingGenerator`): gated convolutions; a *coarse*
  encoder-decoder with dilated convolutions; a *refinement* stage with two branches --
  dilated convolutions and *contextual attention* -- merged by a decoder; ``tanh`` outputs.
  Input: the masked image in ``[-1, 1]``, a ones channel and the mask channel.

* **Discriminator** (:class:`PatchDiscriminator`): SN-PatchGAN, spectral-norm 5x5 stride-2
  convolutions with LeakyReLU(0.2); input image + mask channel; a map of patch logits.
* **Pre-training loss** (paper Eq. 8, hinge form as in DeepFillv2): :func:`generator_loss`
  (L1 on the coarse and refined outputs + adversarial term, NOT detached) and
  :func:`discriminator_loss`.

**Value ranges.** Every public function and ``forward`` take and return images in
``[0, 1]``; the conversion to and from the networks' ``[-1, 1]`` happens only in
:func:`_to_pm1` / :func:`_to_01` here. Masks are float ``[B, 1, H, W]`` in ``{0, 1}`` with
**1 = hole** (see :mod:`atop.transforms`).

**Working resolution** (config key ``variant``): the networks run at a working side ``S``
(``"native"``: the image side; ``"upsample"``: ``upsample_size``, the authors' 256) and take
inputs of that side; the defense and the training step convert the images to it, draw the
random transform there and convert back (:func:`atop.defense.to_working`), so the noise and
the mask blocks live at the working resolution as in the authors' code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from atop.checkpoint import CheckpointError, check_values

ARCH = "gan-purifier"
#: Checkpoint ``arch`` values that :func:`load_purifier` accepts (older files: "deepfillv2").
ARCHES = (ARCH, "deepfillv2")
GENERATORS = ("unet", "deepfillv2")
VARIANTS = ("native", "upsample")
DEFAULT_CONFIG: dict[str, Any] = {
    "generator": "deepfillv2",
    "variant": "native",
    "image_size": 32,
    "cnum": 32,
    "disc_cnum": 64,
    "upsample_size": 256,
    "attention": True,
}
_DILATIONS = (2, 4, 8, 16)  # DeepFillv2's sequence, capped by the feature-map side


# --------------------------------------------------------------------------- value ranges


def _to_pm1(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (the only place images enter the networks' range)."""
    return x01 * 2.0 - 1.0


def _to_01(x_pm1: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (the only place network outputs leave it)."""
    return (x_pm1 + 1.0) * 0.5


def _check_image_and_mask(x01: torch.Tensor, mask: torch.Tensor) -> None:
    if x01.dim() != 4 or x01.shape[1] != 3 or not x01.is_floating_point():
        raise ValueError(
            f"Expected float images [B, 3, H, W] in [0, 1], got {x01.dtype} {tuple(x01.shape)}."
        )
    expected = (x01.shape[0], 1, x01.shape[2], x01.shape[3])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"Expected a mask of shape {expected} (1 = hole) for images {tuple(x01.shape)}, got "
            f"{tuple(mask.shape)}. Use atop.transforms.sample_block_masks."
        )


# --------------------------------------------------------------------------- building blocks


class GatedConv2d(nn.Module):
    """Gated convolution (DeepFillv2): ``ELU(conv_f(x)) * sigmoid(conv_g(x))``, 'same' padding.

    Initialisation (ours, for fast early training): He-normal feature weights (gain sqrt 2),
    unit-gain gate weights, gate biases 2 (gates start mostly open, sigmoid(2) = 0.88), zero
    feature biases; the activations then keep their scale through the ~20-layer stages
    (PyTorch's default init shrinks them ~10x, which stalls the first epochs).

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_channels, 2 * out_channels, kernel_size, stride, padding, dilation=dilation
        )
        fan_in = in_channels * kernel_size * kernel_size
        with torch.no_grad():
            feature_w, gate_w = self.conv.weight.chunk(2, dim=0)
            feature_b, gate_b = self.conv.bias.chunk(2, dim=0)
            feature_w.normal_(0.0, math.sqrt(2.0 / fan_in))
            gate_w.normal_(0.0, math.sqrt(1.0 / fan_in))
            feature_b.zero_()
            gate_b.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature, gate = self.conv(x).chunk(2, dim=1)
        return F.elu(feature) * torch.sigmoid(gate)


class GatedUpConv2d(nn.Module):
    """x2 nearest upsampling then a 3x3 gated convolution (DeepFillv2's ``gen_deconv``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = GatedConv2d(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ContextualAttention(nn.Module):
    """Contextual attention (DeepFillv2 Sec. 3.3), batched with unfold/fold.

    On a matching grid (the features average-pooled by ``rate``), the 3x3 patch around every
    cell is compared by cosine similarity with the 3x3 patch around every *background* cell
    (a cell whose pixels hold no hole); a softmax over the background cells (scaled by
    ``softmax_scale``) weights the background features, which are pasted back at full
    resolution (``rate x rate`` blocks). So every output position is a convex combination of
    background features only; with no background at all the output is zero. (DeepFillv2 pastes
    overlapping ``2 rate`` patches and "fuses" scores; both are left out here.)

    Args:
        rate: downsampling factor of the matching grid (1 or 2).
        softmax_scale: inverse temperature of the softmax (DeepFillv2: 10).

    Shapes: ``features`` ``[B, C, h, w]`` (h, w divisible by rate), ``mask`` ``[B, 1, H, W]``
    (1 = hole) with ``H, W`` multiples of ``h / rate, w / rate`` -> ``[B, C, h, w]``.
    """

    def __init__(self, rate: int = 1, softmax_scale: float = 10.0) -> None:
        super().__init__()
        if rate not in (1, 2):
            raise ValueError(f"ContextualAttention rate must be 1 or 2, got {rate}.")
        self.rate = rate
        self.softmax_scale = softmax_scale

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        small = features if self.rate == 1 else F.avg_pool2d(features, self.rate)
        patches = F.normalize(F.unfold(small, 3, padding=1), dim=1, eps=1e-4)  # [B, C*9, L]
        scores = patches.transpose(1, 2) @ patches  # [B, L_query, L_background] cosines
        background = (F.adaptive_max_pool2d(mask, small.shape[-2:]) == 0).flatten(1)  # [B, L]
        scores = (scores * self.softmax_scale).masked_fill(~background[:, None, :], -1e4)
        weights = torch.softmax(scores, dim=-1) * background[:, None, :].to(scores.dtype)
        blocks = dict(kernel_size=self.rate, stride=self.rate)
        values = F.unfold(features, **blocks)  # [B, C*rate*rate, L] background features
        return F.fold(values @ weights.transpose(1, 2), features.shape[-2:], **blocks)


def _encoder(in_channels: int, width: int) -> list[nn.Module]:
    """5x5 conv, then two stride-2 stages: [B, in, H, W] -> [B, 4 width, H/4, W/4]."""
    return [
        GatedConv2d(in_channels, width, 5),
        GatedConv2d(width, 2 * width, 3, stride=2),
        GatedConv2d(2 * width, 2 * width),
        GatedConv2d(2 * width, 4 * width, 3, stride=2),
        GatedConv2d(4 * width, 4 * width),
        GatedConv2d(4 * width, 4 * width),
    ]


def _dilated(width: int, dilations: tuple[int, ...]) -> list[nn.Module]:
    return [GatedConv2d(4 * width, 4 * width, 3, dilation=d) for d in dilations]


def _decoder(in_channels: int, width: int) -> list[nn.Module]:
    """[B, in, H/4, W/4] -> [B, 3, H, W] in [-1, 1] (tanh)."""
    return [
        GatedConv2d(in_channels, 4 * width),
        GatedConv2d(4 * width, 4 * width),
        GatedUpConv2d(4 * width, 2 * width),
        GatedConv2d(2 * width, 2 * width),
        GatedUpConv2d(2 * width, width),
        GatedConv2d(width, width // 2),
        nn.Conv2d(width // 2, 3, 3, padding=1),
        nn.Tanh(),
    ]


# --------------------------------------------------------------------------- networks


class InpaintResult(NamedTuple):
    """Outputs of :class:`InpaintingGenerator`, all float ``[B, 3, H, W]`` in ``[0, 1]``.

    Attributes:
        coarse: raw output of the coarse stage (whole image).
        refined: raw output of the refinement stage (whole image).
        purified: the input's known pixels kept exactly, holes filled with ``refined``:
            ``x * (1 - mask) + refined * mask``.
    """

    coarse: torch.Tensor
    refined: torch.Tensor
    purified: torch.Tensor


class InpaintingGenerator(nn.Module):
    """DeepFillv2-style two-stage gated-conv inpainting generator (the purifier ``g``).

    Build it with :func:`build_purifier`, which sizes the dilations and attention for the
    working side; images and masks must then have side ``image_size``.

    Args:
        cnum: base width as DeepFillv2 counts it (a multiple of 4; the authors' model: 48):
            each gated convolution outputs ``cnum * (1, 2, 4)`` channels, half of them
            features and half gates, so the feature maps have ``cnum / 2 * (1, 2, 4)``
            channels (``cnum / 4`` before the output layer).
        dilations: dilation rates of the dilated blocks (each smaller than the feature side).
        attention_rate: matching-grid downsampling of the contextual attention (1 or 2).
        image_size: side of the images it takes (pixels): the working side.
    """

    def __init__(
        self,
        cnum: int = 32,
        dilations: tuple[int, ...] = (2, 4),
        attention_rate: int = 1,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if cnum < 4 or cnum % 4:
            raise ValueError(f"cnum must be a multiple of 4, got {cnum}.")
        width = cnum // 2  # DeepFillv2's cnum counts features + gates: half are features
        self.image_size = image_size
        if image_size % (4 * attention_rate):
            raise ValueError(
                f"The working side {image_size} must be divisible by "
                f"{4 * attention_rate} (two stride-2 stages x attention rate {attention_rate})."
            )
        self.coarse = nn.Sequential(
            *_encoder(5, width), *_dilated(width, dilations), *_decoder(4 * width, width)
        )
        self.refine_conv = nn.Sequential(*_encoder(5, width), *_dilated(width, dilations))
        self.refine_attention_in = nn.Sequential(*_encoder(5, width))
        self.attention = ContextualAttention(attention_rate)
        self.refine_attention_out = nn.Sequential(
            GatedConv2d(4 * width, 4 * width), GatedConv2d(4 * width, 4 * width)
        )
        self.refine_decoder = nn.Sequential(*_decoder(8 * width, width))

    def _inpaint(
        self, x_pm1: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stages in [-1, 1]: returns raw (coarse, refined) [B, 3, H, W]."""
        ones = torch.ones_like(mask)
        x_known = x_pm1 * (1.0 - mask)
        coarse = self.coarse(torch.cat([x_known, ones, mask], dim=1))
        stage2_in = torch.cat([x_known + coarse * mask, ones, mask], dim=1)
        hallucinated = self.refine_conv(stage2_in)
        attended = self.refine_attention_out(
            self.attention(self.refine_attention_in(stage2_in), mask)
        )
        refined = self.refine_decoder(torch.cat([hallucinated, attended], dim=1))
        return coarse, refined

    def forward(
        self, x01: torch.Tensor, mask: torch.Tensor, keep_known: bool = True
    ) -> InpaintResult:
        """Inpaint the holes of ``x01``.

        Args:
            x01: float ``[B, 3, H, W]`` in ``[0, 1]`` with ``H == W == image_size``; values
                under the holes are ignored.
            mask: float ``[B, 1, H, W]`` in ``{0, 1}``, 1 = hole.
            keep_known: ``purified`` keeps the known pixels of ``x01`` and takes ``refined``
                in the holes (mask-only transform, RT1). ``False``: ``purified`` is
                ``refined`` everywhere -- for noisy inputs (RT2 / RT3) the known pixels carry
                the noise, and Eq. 8's L1 term asks ``g(t(x))`` to restore ``x`` on the whole
                image.

        Returns:
            :class:`InpaintResult` (coarse, refined, purified), ``[B, 3, H, W]`` in ``[0, 1]``,
            differentiable w.r.t. ``x01`` and the parameters.

        Raises:
            ValueError: wrong shapes, or an image side other than ``image_size``.
        """
        _check_image_and_mask(x01, mask)
        size = tuple(x01.shape[-2:])
        if size != (self.image_size, self.image_size):
            raise ValueError(
                f"This purifier was built for {self.image_size}x{self.image_size} images, got "
                f"{size[0]}x{size[1]}. Build one with image_size={size[0]}."
            )
        coarse, refined = self._inpaint(_to_pm1(x01), mask)
        coarse, refined = _to_01(coarse), _to_01(refined)
        purified = x01 * (1.0 - mask) + refined * mask if keep_known else refined
        return InpaintResult(coarse, refined, purified)

    def purify(
        self, x01: torch.Tensor, mask: torch.Tensor, keep_known: bool = True
    ) -> torch.Tensor:
        """``g``: fill the holes of ``x01`` (and keep its known pixels unless told otherwise).

        Args:
            x01: float ``[B, 3, H, W]`` in ``[0, 1]``.
            mask: float ``[B, 1, H, W]`` in ``{0, 1}``, 1 = hole.
            keep_known: see :meth:`forward`.

        Returns:
            float ``[B, 3, H, W]`` in ``[0, 1]`` (``InpaintResult.purified``).
        """
        return self(x01, mask, keep_known).purified


class PatchDiscriminator(nn.Module):
    """SN-PatchGAN discriminator (DeepFillv2 Sec. 3.4).

    ``n_layers`` spectral-norm 5x5 stride-2 convolutions (channels ``disc_cnum * (1, 2, 4, 4,
    ...)``) with LeakyReLU(0.2) between them; the last convolution's outputs are the patch
    logits (no activation).

    Args:
        cnum: channels of the first layer (DeepFillv2: 64).
        n_layers: number of stride-2 layers (3 at 32 px, 6 at 256 px: 4x4 output patches).
        image_size: side of the images it takes (the working side).

    Shapes: ``x01`` ``[B, 3, S, S]`` in [0, 1], ``mask`` ``[B, 1, S, S]`` ->
    logits ``[B, C, S / 2**n_layers, S / 2**n_layers]`` (any real value).
    """

    def __init__(self, cnum: int = 64, n_layers: int = 3, image_size: int = 32) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
        self.image_size = image_size
        channels = [4] + [cnum * min(2**i, 4) for i in range(n_layers)]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            if i:
                layers.append(nn.LeakyReLU(0.2))
            layers.append(spectral_norm(nn.Conv2d(channels[i], channels[i + 1], 5, 2, 2)))
        self.layers = nn.Sequential(*layers)

    def forward(self, x01: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch logits for images ``x01`` (``[B, 3, H, W]`` in [0, 1]) with their ``mask``.

        Raises:
            ValueError: wrong shapes.
        """
        _check_image_and_mask(x01, mask)
        return self.layers(torch.cat([_to_pm1(x01), mask], dim=1))


# --------------------------------------------------------------------------- losses (Eq. 8)


class GeneratorLoss(NamedTuple):
    """Terms of the generator's pre-training loss (scalars; ``total`` is differentiable).

    Attributes:
        total: ``l1_weight * l1 + gan_weight * adversarial``.
        l1: ``mean|x - coarse| + mean|x - refined|``.
        adversarial: hinge generator term ``-mean D(purified, mask)``.
    """

    total: torch.Tensor
    l1: torch.Tensor
    adversarial: torch.Tensor


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: ``mean relu(1 - D(x)) + mean relu(1 + D(g(t(x))))``.

    The hinge form of the ``E[D(x)] - E[D(g(t(x)))]`` term of paper Eq. 8 (as DeepFillv2).
    """
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the generator: ``-mean D(g(t(x)))`` (paper Eq. 8, hinge form)."""
    return -fake_logits.mean()


def discriminator_loss(
    discriminator: nn.Module, real01: torch.Tensor, fake01: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The discriminator's loss on one batch (paper Eq. 8, hinge form).

    Real and fake images go through ``discriminator`` in one concatenated batch; ``fake01`` is
    detached (this loss trains only D).

    Args:
        discriminator: a :class:`PatchDiscriminator`.
        real01: clean images ``[B, 3, H, W]`` in [0, 1].
        fake01: purified images ``[B, 3, H, W]`` in [0, 1] (``InpaintResult.purified``).
        mask: ``[B, 1, H, W]``, 1 = hole, the mask used to make ``fake01``.

    Returns:
        Scalar loss.
    """
    logits = discriminator(torch.cat([real01, fake01.detach()]), torch.cat([mask, mask]))
    real_logits, fake_logits = logits.chunk(2)
    return discriminator_hinge_loss(real_logits, fake_logits)


def generator_loss(
    discriminator: nn.Module,
    target01: torch.Tensor,
    result: InpaintResult,
    mask: torch.Tensor,
    l1_weight: float = 1.0,
    gan_weight: float = 1.0,
) -> GeneratorLoss:
    """The generator's pre-training loss (paper Eq. 8; DeepFillv2): L1 + hinge GAN term.

    The adversarial term is computed on ``result.purified`` WITHOUT detaching it, so it
    trains ``g`` (the authors' code detached it). Its gradients also reach the
    discriminator's parameters: zero them (or step only ``g``'s optimizer) before D's update.

    Args:
        discriminator: a :class:`PatchDiscriminator`.
        target01: clean images ``x``, ``[B, 3, H, W]`` in [0, 1].
        result: the generator's output on ``t(x)``.
        mask: ``[B, 1, H, W]``, 1 = hole.
        l1_weight, gan_weight: weights of the two terms (DeepFillv2: 1 and 1).

    Returns:
        :class:`GeneratorLoss` (total, l1, adversarial).
    """
    l1 = F.l1_loss(result.coarse, target01) + F.l1_loss(result.refined, target01)
    adversarial = generator_hinge_loss(discriminator(result.purified, mask))
    return GeneratorLoss(l1_weight * l1 + gan_weight * adversarial, l1, adversarial)


# --------------------------------------------------------------------------- config, build, checkpoint


def purifier_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate a purifier config and fill in defaults.

    Keys (defaults in ``DEFAULT_CONFIG``): ``generator`` ("unet" | "deepfillv2"), ``variant``
    ("native" | "upsample": the working side), ``image_size`` (the data's side, px), ``cnum``
    (generator width as DeepFillv2 counts it, features + gates, a multiple of 4),
    ``disc_cnum`` (discriminator width), ``upsample_size`` (working side of the "upsample"
    variant, px; the authors' 256), ``attention`` (contextual attention in the unet's
    refinement stage; DeepFillv2 always has it).

    Returns:
        A new dict with every key.

    Raises:
        ValueError: unknown keys or invalid values (the message gives the valid ones).
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(
            f"Unknown purifier config key(s) {unknown}; allowed: {sorted(DEFAULT_CONFIG)}."
        )
    full = {**DEFAULT_CONFIG, **config}
    if full["variant"] not in VARIANTS:
        raise ValueError(f"Unknown purifier variant {full['variant']!r}: use one of {VARIANTS}.")
    if full["generator"] not in GENERATORS:
        raise ValueError(
            f"Unknown purifier generator {full['generator']!r}: use one of {GENERATORS}."
        )
    if not isinstance(full["attention"], bool):
        raise ValueError(
            f"Purifier config 'attention' must be true or false, got {full['attention']!r}."
        )
    for key in ("image_size", "cnum", "disc_cnum", "upsample_size"):
        value = full[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"Purifier config {key!r} must be an int >= 2, got {value!r}.")
    if full["cnum"] % 4:
        raise ValueError(f"Purifier config 'cnum' must be a multiple of 4, got {full['cnum']}.")
    if full["image_size"] % 8:
        raise ValueError(
            f"Purifier config 'image_size' must be a multiple of 8, got {full['image_size']}."
        )
    if full["variant"] == "upsample" and full["upsample_size"] % 8:
        raise ValueError(
            f"Purifier config 'upsample_size' must be a multiple of 8, got {full['upsample_size']}."
        )
    return full


def working_side(config: Mapping[str, Any]) -> int:
    """The side ``S`` the networks of a (full) purifier config run at, in px."""
    return config["image_size"] if config["variant"] == "native" else config["upsample_size"]


def build_purifier(config: Mapping[str, Any] | None = None) -> tuple[nn.Module, PatchDiscriminator]:
    """Build the purifier ``g`` and its discriminator from a config (see :func:`purifier_config`).

    Both run at the working side ``S`` (:func:`working_side`). ``"unet"``: width
    ``cnum / 2``. ``"deepfillv2"``: features at ``S / 4``; dilations = those of (2, 4, 8, 16)
    smaller than ``S / 4``; attention matching at rate 2 when ``S / 4 >= 32`` else 1.
    Discriminator: ``clamp(floor(log2 S) - 2, 1, 6)`` stride-2 layers.

    Returns:
        ``(generator, discriminator)`` freshly initialised, in train mode, on CPU; the
        generator has a ``config`` attribute (the full config dict) and ``image_size = S``.

    Raises:
        ValueError: invalid config.
    """
    from atop.models.gated_unet import GatedUNetGenerator

    cfg = purifier_config(config)
    work = working_side(cfg)
    side = work // 4
    if cfg["generator"] == "unet":
        generator: nn.Module = GatedUNetGenerator(
            width=cfg["cnum"] // 2, attention=cfg["attention"], image_size=work
        )
    else:
        generator = InpaintingGenerator(
            cnum=cfg["cnum"],
            dilations=tuple(d for d in _DILATIONS if d < side),
            attention_rate=2 if side >= 32 else 1,
            image_size=work,
        )
    discriminator = PatchDiscriminator(
        cnum=cfg["disc_cnum"], n_layers=max(1, min(6, int(math.log2(work)) - 2)), image_size=work
    )
    generator.config = cfg
    return generator, discriminator


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def purifier_checkpoint(
    generator: nn.Module,
    discriminator: PatchDiscriminator | None,
    config: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Package the purifier as the project's checkpoint dict (docs/architecture.md).

    Layout: ``{"arch": "gan-purifier", "config": {...}, "state_dict": {"generator": {...},
    "discriminator": {...}}, "meta": {...}}`` -- tensors (CPU copies) and primitives only,
    loadable with ``torch.load(weights_only=True)``; ``"discriminator"`` is left out when
    ``discriminator`` is None.

    Args:
        generator, discriminator: modules from :func:`build_purifier` (any device).
        config: the config they were built from; ``None`` = ``generator.config``.
        meta: free-form primitives (epochs, metrics, ...).

    Raises:
        ValueError: no config is known, or ``config`` does not match ``generator.config``.
    """
    own = getattr(generator, "config", None)
    if config is None and own is None:
        raise ValueError("Pass the config the generator was built with (use build_purifier).")
    cfg = purifier_config(config if config is not None else own)
    if own is not None and cfg != own:
        raise ValueError(f"config {cfg} does not match the generator's config {own}.")
    states = {"generator": _cpu_state(generator)}
    if discriminator is not None:
        states["discriminator"] = _cpu_state(discriminator)
    return {"arch": ARCH, "config": cfg, "state_dict": states, "meta": dict(meta or {})}


def load_purifier(
    checkpoint: Mapping[str, Any], device: torch.device | str = "cpu"
) -> tuple[nn.Module, PatchDiscriminator | None]:
    """Rebuild ``(generator, discriminator)`` from a :func:`purifier_checkpoint` dict.

    Args:
        checkpoint: the dict (e.g. the catalog's ``purifier``, read with weights_only=True).
        device: where to put the modules.

    Returns:
        ``(generator, discriminator)`` in eval mode on ``device``; the discriminator is None
        when the checkpoint has none.

    Raises:
        CheckpointError: not a purifier checkpoint (missing keys, another ``arch``), an
            invalid config, or weights that do not fit the architecture.
    """
    missing = [key for key in ("arch", "config", "state_dict") if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"Not a purifier checkpoint: keys {missing} are missing. Create it with "
            f"atop.models.purifier.purifier_checkpoint."
        )
    if checkpoint["arch"] not in ARCHES:
        raise CheckpointError(
            f"Checkpoint holds a {checkpoint['arch']!r} model, not a purifier ({ARCH!r}): point "
            f"the catalog at the purifier checkpoint."
        )
    states = checkpoint["state_dict"]
    if not isinstance(states, Mapping) or "generator" not in states:
        raise CheckpointError("Purifier checkpoint has no 'generator' weights in 'state_dict'.")
    check_values(dict(states), dict(checkpoint["config"]), "purifier")
    try:
        generator, discriminator = build_purifier(checkpoint["config"])
    except ValueError as exc:
        raise CheckpointError(f"Cannot rebuild the purifier: {exc}") from exc
    for name, module in (("generator", generator), ("discriminator", discriminator)):
        if name in states:
            try:
                module.load_state_dict(states[name])
            except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
                raise CheckpointError(
                    f"The checkpoint's {name} weights do not fit the architecture of its "
                    f"config {checkpoint['config']}: {exc}"
                ) from exc
    generator.to(device).eval()
    if "discriminator" not in states:
        return generator, None
    return generator, discriminator.to(device).eval()

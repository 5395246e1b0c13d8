"""Random transforms RT1 / RT2 / RT3 (paper Sec. 3) on real CIFAR-10 images."""

from __future__ import annotations

import pytest
import torch

from atop.transforms import (
    RandomTransform,
    TransformConfig,
    add_gaussian_noise,
    build_transform,
    sample_block_masks,
    sample_disjoint_block_masks,
)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_block_structured(mask: torch.Tensor, block: int) -> None:
    """Every block x block cell of the grid is entirely hole or entirely known."""
    pooled_max = torch.nn.functional.max_pool2d(mask, block)
    pooled_min = -torch.nn.functional.max_pool2d(-mask, block)
    assert torch.equal(pooled_max, pooled_min)


@pytest.mark.parametrize("missing_rate", [0.25, 0.125, 0.5])
def test_masked_fraction_is_exact_per_image(missing_rate):
    masks = sample_block_masks(256, (32, 32), missing_rate, generator=_seeded(0))
    assert masks.shape == (256, 1, 32, 32) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.mean(dim=(1, 2, 3)), torch.full((256,), missing_rate))
    _assert_block_structured(masks, 4)


@pytest.mark.parametrize("kind", ["rt1", "rt2"])
def test_transform_masks_every_image_of_real_batch(kind, cifar10_test_batch):
    images, _ = cifar10_test_batch
    draw = RandomTransform(kind).eval()(images)
    assert draw.masks.shape == (1, 256, 1, 32, 32)
    assert torch.equal(draw.masks.mean(dim=(0, 2, 3, 4)), torch.full((256,), 0.25))
    _assert_block_structured(draw.masks[0], 32 // 8)


def test_masks_differ_between_images_and_calls():
    first = sample_block_masks(256, (32, 32)).flatten(1)
    second = sample_block_masks(256, (32, 32)).flatten(1)
    assert torch.unique(first, dim=0).shape[0] == 256  # every image has its own mask
    assert not torch.equal(first, second)  # fresh masks on every call
    assert (first != second).any(dim=1).float().mean() > 0.99


def test_every_block_is_masked_equally_often():
    masks = sample_block_masks(2048, (32, 32), generator=_seeded(1))
    frequency = torch.nn.functional.avg_pool2d(masks, 4).mean(dim=0).flatten()
    assert frequency.shape == (64,)
    assert (frequency - 0.25).abs().max() < 0.05  # binomial std 0.0096: > 5 sigma margin


def test_noise_has_std_sigma_on_real_images(cifar10_test_batch):
    images, _ = cifar10_test_batch
    noise = add_gaussian_noise(images, 0.25, generator=_seeded(2), clamp=False) - images
    assert abs(noise.std().item() - 0.25) < 0.002  # 786k samples: std error 2e-4
    assert abs(noise.mean().item()) < 0.002
    per_image = noise.flatten(1).std(dim=1)
    assert (per_image - 0.25).abs().max() < 0.02  # every image gets the same noise level
    clamped = add_gaussian_noise(images, 0.25)
    assert clamped.min() >= 0.0 and clamped.max() <= 1.0
    assert (clamped == 0.0).any() and (clamped == 1.0).any()


def _away_from_clamp(images: torch.Tensor) -> torch.Tensor:
    """Real images squeezed into [0.3, 0.7]: noise of std <= 0.07 is (almost) never clamped."""
    return 0.3 + 0.4 * images


def test_sigma_at_scales_with_the_side_relative_to_noise_resolution():
    authors = TransformConfig("rt2", sigma=0.25, noise_resolution=256)
    assert authors.sigma_at(256) == 0.25
    assert authors.sigma_at(32) == pytest.approx(0.03125)  # 8x less at 32 px
    assert authors.sigma_at(64) == pytest.approx(0.0625)
    at_drawn_side = TransformConfig("rt2", sigma=0.25)
    assert at_drawn_side.sigma_at(32) == at_drawn_side.sigma_at(256) == 0.25
    assert TransformConfig("rt1", noise_resolution=256).uses_noise is False


@pytest.mark.parametrize(
    ("side", "sigma", "noise_resolution", "expected"),
    [
        (32, 0.25, 256, 0.03125),  # the authors' noise seen at CIFAR's side
        (64, 0.25, 256, 0.0625),
        (32, 0.1, 64, 0.05),
        (32, 0.05, None, 0.05),  # None: sigma at the drawn side
    ],
)
def test_noise_std_at_the_drawn_side_on_real_images(
    side, sigma, noise_resolution, expected, cifar10_test_batch
):
    """The per-pixel std of t's noise on images of side S is sigma * S / noise_resolution
    (sigma itself without noise_resolution), measured on real images away from the clamp."""
    images = _away_from_clamp(cifar10_test_batch[0][:64])
    if side != 32:
        images = torch.nn.functional.interpolate(images, size=side, mode="bilinear")
    transform = RandomTransform("rt2", sigma=sigma, noise_resolution=noise_resolution)
    assert transform.config.sigma_at(side) == pytest.approx(expected)
    noise = transform(images, generator=_seeded(11)).image - images
    assert (noise.abs() < 0.3 - 1e-6).float().mean() > 0.9999  # (almost) nothing clamped
    n = noise.numel()  # >= 196k samples: std error of the std ~0.16 %
    assert noise.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(noise.mean().item()) < 5 * expected / n**0.5
    # i.i.d. per pixel at the drawn side: neighbouring pixels are uncorrelated
    assert abs(_neighbour_correlation(noise)) < 0.02


def _neighbour_correlation(noise: torch.Tensor) -> float:
    """Correlation of horizontally and vertically neighbouring pixels of ``noise``."""
    centred = noise - noise.mean()
    horizontal = (centred[..., :, 1:] * centred[..., :, :-1]).mean()
    vertical = (centred[..., 1:, :] * centred[..., :-1, :]).mean()
    return ((horizontal + vertical) / (2 * centred.square().mean())).item()


def test_rt2_is_noise_clamped_then_masked(cifar10_test_batch):
    images, _ = cifar10_test_batch
    draw = RandomTransform("rt2", sigma=0.25)(images, generator=_seeded(3))
    expected = add_gaussian_noise(images, 0.25, generator=_seeded(3))  # noise drawn first
    assert torch.equal(draw.image, expected)
    assert draw.image.min() >= 0.0 and draw.image.max() <= 1.0


def test_rt1_adds_no_noise(cifar10_test_batch):
    images, _ = cifar10_test_batch
    draw = RandomTransform("rt1")(images)
    assert torch.equal(draw.image, images)


def test_rt3_masks_are_disjoint_and_partition_the_image(cifar10_test_batch):
    images, _ = cifar10_test_batch
    draw = RandomTransform("rt3", missing_rate=0.25, mask_number=4)(images)
    assert draw.masks.shape == (4, 256, 1, 32, 32)
    assert torch.equal(draw.masks.mean(dim=(2, 3, 4)), torch.full((4, 256), 0.25))
    assert torch.equal(draw.masks.sum(dim=0), torch.ones(256, 1, 32, 32))  # each pixel once
    for mask in draw.masks:
        _assert_block_structured(mask, 4)


def test_rt3_masks_disjoint_when_not_covering():
    masks = sample_disjoint_block_masks(128, (32, 32), 2, 0.25, generator=_seeded(4))
    coverage = masks.sum(dim=0)
    assert coverage.max() == 1.0  # never overlap
    assert torch.equal(coverage.mean(dim=(1, 2, 3)), torch.full((128,), 0.5))


def test_custom_mask_block():
    masks = sample_block_masks(16, (32, 32), 0.25, mask_block=8, generator=_seeded(5))
    _assert_block_structured(masks, 8)
    assert torch.equal(masks.mean(dim=(1, 2, 3)), torch.full((16,), 0.25))


def test_generator_makes_draws_reproducible(cifar10_test_batch):
    images, _ = cifar10_test_batch
    transform = RandomTransform("rt3")
    first = transform(images, generator=_seeded(6))
    again = transform(images, generator=_seeded(6))
    other = transform(images, generator=_seeded(7))
    assert torch.equal(first.image, again.image) and torch.equal(first.masks, again.masks)
    assert not torch.equal(first.masks, other.masks)
    assert not torch.equal(first.image, other.image)


def test_transform_is_stochastic_in_eval_mode(cifar10_test_batch):
    images, _ = cifar10_test_batch
    transform = RandomTransform("rt2").eval()
    first, second = transform(images[:8]), transform(images[:8])
    assert not torch.equal(first.image, second.image)
    assert not torch.equal(first.masks, second.masks)


def test_transform_is_differentiable(cifar10_test_batch):
    images, _ = cifar10_test_batch
    x = images[:4].clone().requires_grad_(True)
    draw = RandomTransform("rt2")(x)
    draw.image.sum().backward()
    inside = (draw.image > 0) & (draw.image < 1)
    assert torch.equal(x.grad, inside.float())  # identity except where clamped


def test_build_transform_from_parameters():
    transform = build_transform({"kind": "rt3", "sigma": 0.1, "mask_number": 2})
    assert transform.config == TransformConfig("rt3", 0.1, 0.25, None, 2)
    assert transform.config.noise_resolution is None  # default: sigma at the drawn side
    assert transform.config.to_dict() == {
        "kind": "rt3",
        "sigma": 0.1,
        "missing_rate": 0.25,
        "mask_block": None,
        "mask_number": 2,
        "noise_resolution": None,
        "noise_route": "box",
    }
    authors = build_transform({"kind": "rt2", "sigma": 0.25, "noise_resolution": 256})
    assert authors.config == RandomTransform("rt2", 0.25, noise_resolution=256).config
    assert transform.config.n_masks == 2 and transform.config.uses_noise
    assert RandomTransform("rt2").config.n_masks == 1
    assert not RandomTransform("rt1").config.uses_noise


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"missing_rate": 0.0}, "missing_rate"),
        ({"missing_rate": 1.0}, "missing_rate"),
        ({"missing_rate": -0.1}, "missing_rate"),
        ({"missing_rate": 1.5}, "missing_rate"),
        ({"kind": "rt4"}, "kind"),
        ({"sigma": -0.1}, "sigma"),
        ({"mask_block": 0}, "mask_block"),
        ({"mask_block": 2.5}, "mask_block"),
        ({"mask_number": 0}, "mask_number"),
        ({"noise_resolution": 0}, "noise_resolution"),
        ({"noise_resolution": 25.6}, "noise_resolution"),
        ({"noise_resolution": True}, "noise_resolution"),
        ({"kind": "rt3", "missing_rate": 0.3, "mask_number": 4}, "mask_number \\* missing_rate"),
    ],
)
def test_bad_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomTransform(**kwargs)


def test_unknown_parameter_raises():
    with pytest.raises(ValueError, match="Unknown transform parameter.*'sigmaa'"):
        build_transform({"sigmaa": 0.25})


def test_image_size_not_divisible_by_block_raises():
    with pytest.raises(ValueError, match="not divisible by mask_block=5"):
        RandomTransform("rt1", mask_block=5)(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="32x30 is not divisible by mask_block=3"):
        sample_block_masks(2, (32, 30))


def test_too_small_rate_and_bad_images_raise():
    with pytest.raises(ValueError, match="masks 0 of the 4 blocks"):
        sample_block_masks(2, (8, 8), 0.1, mask_block=4)
    with pytest.raises(ValueError, match="do not fit"):
        sample_disjoint_block_masks(2, (32, 32), 3, 0.4)
    with pytest.raises(ValueError, match="float images"):
        RandomTransform()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="float images"):
        RandomTransform()(torch.rand(3, 32, 32))


# --- the authors' noise route at the working resolution (method.md §6.1) ---------------------


def _expected_clamp(x: float, sigma: float) -> float:
    """E[clamp(x + n, 0, 1)] for n ~ N(0, sigma^2) (a closed form)."""
    from scipy import stats

    a, b = -x / sigma, (1 - x) / sigma
    cdf, pdf = stats.norm.cdf, stats.norm.pdf
    return x * (cdf(b) - cdf(a)) + sigma * (pdf(a) - pdf(b)) + (1 - cdf(b))


def test_the_upsample_route_adds_white_noise_of_the_box_std_at_every_frequency():
    """Bilinear up to 256, i.i.d. N(0, sigma^2), area down to 32: without clipping (a
    mid-gray image, small sigma) the 32-px noise is the mean of 64 i.i.d. values, white with
    variance sigma^2 / 64 at DC, the axis Nyquist and the diagonal Nyquist alike."""
    from atop.transforms import upsampled_noise

    generator = torch.Generator().manual_seed(0)
    sigma = 0.08  # |n| > 0.5 has probability 4e-10: no clipping
    x = torch.full((400, 1, 32, 32), 0.5)
    noise = upsampled_noise(x, sigma, 256, generator=generator) - 0.5
    power = torch.fft.fft2(noise[:, 0]).abs().pow(2).mean(dim=0) / (32 * 32)  # per frequency
    expected = sigma**2 / 64
    for u, v in ((0, 0), (0, 16), (16, 0), (16, 16), (5, 9)):
        assert power[u, v].item() == pytest.approx(expected, rel=0.2), (u, v)
    assert noise.std().item() == pytest.approx(sigma / 8, rel=0.02)


def test_the_upsample_route_low_passes_the_image_so_its_noise_is_relatively_stronger():
    """The up/down pair is the filter [1/8, 3/4, 1/8] per axis (0.75 + 0.25 cos w): against
    the image, the same white noise is 2x stronger at the axis Nyquist and 4x at the diagonal
    Nyquist than in the box route (which keeps the image). method.md §6.1 quotes 1.75x / 3x
    for a least-squares recovery of the image from the 256-px one instead of this area
    downsampling."""
    from atop.transforms import upsampled_noise

    i = torch.arange(32)
    axis = (-1.0) ** i[None, :].expand(32, 32)
    diagonal = (-1.0) ** (i[:, None] + i[None, :])
    for pattern, gain in ((axis, 0.5), (diagonal, 0.25), (torch.ones(32, 32), 1.0)):
        image = 0.5 + 0.1 * pattern[None, None]
        out = upsampled_noise(image, 0.0, 256) - 0.5  # sigma 0: the signal path alone
        inner = (slice(None), slice(None), slice(4, 28), slice(4, 28))  # away from the border
        assert torch.allclose(out[inner], gain * 0.1 * pattern[None, None][inner], atol=1e-5)


@pytest.mark.parametrize("value", [0.0, 0.1, 0.5, 0.9])
def test_the_upsample_route_clamps_at_256_px_with_the_formula_s_bias(value):
    """sigma 0.25 clamped at 256 px biases a pixel by E[clamp(x + n, 0, 1)] - x: +0.100 at
    x = 0, +0.058 at 0.1, -0.057 at 0.9 (method.md §6.1), about 2-3 eps at 8/255."""
    from atop.transforms import upsampled_noise

    generator = torch.Generator().manual_seed(1)
    x = torch.full((64, 3, 32, 32), value)
    bias = (upsampled_noise(x, 0.25, 256, generator=generator) - value).mean().item()
    assert bias == pytest.approx(_expected_clamp(value, 0.25) - value, abs=2e-3)
    known = {0.0: 0.0997, 0.1: 0.058, 0.5: 0.0, 0.9: -0.057}
    assert _expected_clamp(value, 0.25) - value == pytest.approx(known[value], abs=1e-3)


def test_the_upsample_route_has_exact_gradients_and_is_chosen_by_the_config(cifar10_test_batch):
    cifar_images = cifar10_test_batch[0]
    from atop.transforms import upsampled_noise

    x = cifar_images[:4].clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(2)
    out = upsampled_noise(x, 0.25, 256, generator=generator)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    (grad,) = torch.autograd.grad(out.sum(), x)
    # d/dx of the area mean of the clamped bilinear image: the unclamped share of each
    # pixel's up/down weight (exactly 1 where nothing clamps)
    assert torch.isfinite(grad).all() and 0 <= grad.min() and grad.max() <= 1 + 1e-5
    assert (grad > 0.5).float().mean() > 0.5
    route = RandomTransform("rt2", sigma=0.25, noise_resolution=256, noise_route="upsample")
    box = RandomTransform("rt2", sigma=0.25, noise_resolution=256)
    torch.manual_seed(3)
    routed = route(cifar_images[:4])
    torch.manual_seed(3)
    expected = upsampled_noise(cifar_images[:4], 0.25, 256)
    assert torch.equal(routed.image, expected) and routed.masks.shape == (1, 4, 1, 32, 32)
    assert box.config.noise_route == "box" and not box.config.upsamples(32)
    assert route.config.upsamples(32) and not route.config.upsamples(256)
    with pytest.raises(ValueError, match="noise_route must be one of"):
        RandomTransform("rt2", noise_route="bicubic")

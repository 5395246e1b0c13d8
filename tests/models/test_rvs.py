"""Tests of the RvS generator and sample synthesis (atop.models.rvs) on real CIFAR-10 images."""

from __future__ import annotations

import pytest
import torch

from atop.models.rvs import RvSGenerator, sample_adversarial, synthesize

EPS = 8 / 255


@pytest.fixture(scope="module")
def images(cifar10_test_batch) -> torch.Tensor:
    """32 real CIFAR-10 test images, float32 [32, 3, 32, 32] in [0, 1]."""
    return cifar10_test_batch[0][:32]


def test_generator_architecture_and_output_range():
    torch.manual_seed(0)
    generator = RvSGenerator(eps=EPS)
    assert generator.fc.in_features == 640 and generator.fc.out_features == 4096
    z = generator.sample_noise(16)
    assert z.shape == (16, 640)
    delta = generator(z)
    assert delta.shape == (16, 3, 32, 32) and delta.dtype == torch.float32
    assert delta.abs().max() <= EPS
    # at initialization most values lie inside the clip (gradients reach the generator)
    inside = (delta.abs() < EPS).float().mean()
    assert inside > 0.5
    assert delta.std() > 0


def test_same_padding_keeps_size_and_other_sizes_work():
    assert RvSGenerator(image_size=64)(torch.randn(2, 640)).shape == (2, 3, 64, 64)
    assert RvSGenerator(z_dim=8, channels=1)(torch.randn(2, 8)).shape == (2, 1, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"image_size": 30}, "multiple of 4"), ({"eps": 0.0}, "eps"), ({"eps": 8.0}, "eps")],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RvSGenerator(**kwargs)


def test_wrong_noise_shape_raises():
    with pytest.raises(ValueError, match="sample_noise"):
        RvSGenerator()(torch.randn(2, 64))


def test_synthesized_samples_stay_in_the_eps_ball_and_in_range(images):
    torch.manual_seed(0)
    # the largest perturbation allowed, in random directions
    delta = EPS * torch.sign(torch.randn_like(images))
    x_adv = synthesize(images, delta, EPS)
    assert x_adv.shape == images.shape
    assert (x_adv - images).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - images).abs().mean() > EPS / 4  # the samples really move


def test_synthesis_is_random_start_plus_delta(images):
    """With delta = 0 the sample is the clipped uniform start; with a seed it is reproducible."""
    x1 = synthesize(images, torch.zeros_like(images), EPS, rng=torch.Generator().manual_seed(3))
    x2 = synthesize(images, torch.zeros_like(images), EPS, rng=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x1, x2)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x1, (images + (2 * noise - 1) * EPS).clamp(0, 1))


def test_synthesize_rejects_mismatched_delta(images):
    with pytest.raises(ValueError, match="shape of x"):
        synthesize(images, torch.zeros(1, 3, 32, 32), EPS)


def test_sample_adversarial_is_differentiable_and_bounded(images):
    torch.manual_seed(0)
    generator = RvSGenerator(eps=EPS)
    x_adv = sample_adversarial(generator, images, rng=torch.Generator().manual_seed(0))
    assert (x_adv - images).abs().max() <= EPS + 1e-6
    assert 0 <= x_adv.min() and x_adv.max() <= 1
    x_adv.sum().backward()
    assert generator.fc.weight.grad.abs().sum() > 0
    again = sample_adversarial(generator, images, rng=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_adv.detach(), again.detach())

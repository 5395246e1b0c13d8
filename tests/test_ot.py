"""Tests of the RvS entropic OT term (atop.ot) against a direct computation."""

from __future__ import annotations

import pytest
import torch

from atop.ot import entropic_ot


def authors_sinkhorn(x: torch.Tensor, y: torch.Tensor, reg: float, num_iter: int) -> torch.Tensor:
    """The RvS authors' log-domain Sinkhorn written out directly (dual potentials u, v;
    u updated first), value <pi, C> with C = squared Euclidean distances."""
    cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    log_mu = torch.full((len(x),), 1.0 / len(x), dtype=x.dtype).log()
    log_nu = torch.full((len(y),), 1.0 / len(y), dtype=x.dtype).log()
    u = torch.zeros(len(x), dtype=x.dtype)
    v = torch.zeros(len(y), dtype=x.dtype)

    def scaled(u, v):
        return (-cost + u[:, None] + v[None, :]) / reg

    for _ in range(num_iter):
        u = reg * (log_mu - torch.logsumexp(scaled(u, v), dim=1)) + u
        v = reg * (log_nu - torch.logsumexp(scaled(u, v), dim=0)) + v
    return (scaled(u, v).exp() * cost).sum()


@pytest.fixture(scope="module")
def pixel_features(cifar10_test_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed 'features' from real images: 32 images average-pooled to 3x4x4 = 48 values, and
    the same images with a fixed +-4/255 perturbation (float64)."""
    images = cifar10_test_batch[0][:32].double()
    pool = torch.nn.functional.avg_pool2d
    sign = torch.sign(torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
    adv = (images + sign.double() * 4 / 255).clamp(0, 1)
    return pool(images, 8).flatten(1), pool(adv, 8).flatten(1)


def test_matches_direct_log_domain_sinkhorn(pixel_features):
    clean, adv = pixel_features
    expected = authors_sinkhorn(clean, adv, reg=0.01, num_iter=100)
    got = entropic_ot(clean, adv, reg=0.01, num_iter=100)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # float32 (the training dtype) agrees to float32 accuracy
    got32 = entropic_ot(clean.float(), adv.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-6)


def test_identical_batches_cost_less_than_shuffled(pixel_features):
    clean, _ = pixel_features
    same = entropic_ot(clean, clean)
    shuffled = entropic_ot(clean, clean.roll(1, 0) + 0.05)
    assert 0 <= same.item() < shuffled.item()


def test_gradient_is_nonzero_and_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    adv = (clean + 0.2 * torch.rand(4, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    # a larger reg on this tiny case keeps the map smooth at finite-difference scale
    (grad,) = torch.autograd.grad(entropic_ot(clean, adv, reg=0.05, num_iter=100), adv)
    assert grad.abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda a, b: entropic_ot(a, b, reg=0.05, num_iter=100),
        (clean.clone().requires_grad_(), adv.detach().clone().requires_grad_()),
        eps=1e-6,
        atol=1e-6,
    )


def test_runs_in_float32_under_autocast(pixel_features):
    clean, adv = (t.float() for t in pixel_features)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = entropic_ot(clean.bfloat16(), adv.bfloat16())
    assert value.dtype == torch.float32


@pytest.mark.parametrize(
    ("clean", "adv", "kwargs", "match"),
    [
        (torch.zeros(4), torch.zeros(4, 2), {}, "2-D"),
        (torch.zeros(4, 3), torch.zeros(4, 2), {}, "Feature sizes"),
        (torch.zeros(0, 2), torch.zeros(4, 2), {}, "at least one row"),
        (torch.zeros(4, 2), torch.zeros(4, 2), {"reg": 0.0}, "reg must be"),
    ],
)
def test_bad_input_raises(clean, adv, kwargs, match):
    with pytest.raises(ValueError, match=match):
        entropic_ot(clean, adv, **kwargs)

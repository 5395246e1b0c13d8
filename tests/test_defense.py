"""The defended model f(g(t(x))) (paper Sec. 3, Eq. 9) on real CIFAR-10 images."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from atop.attacks import bpda_mode
from atop.defense import (
    PurifiedClassifier,
    combine_purified,
    from_working,
    purify_draw,
    to_working,
    working_side,
)
from atop.models.purifier import build_purifier
from atop.transforms import RandomTransform


class TinyClassifier(nn.Module):
    """A small CNN taking [B, 3, 32, 32] in [0, 1] to 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class RecordingPurifier(nn.Module):
    """Wraps a purifier and records every (input, mask) it receives."""

    def __init__(self, purifier: nn.Module) -> None:
        super().__init__()
        self.inner = purifier
        self.image_size = purifier.image_size  # the working side, as the wrapped purifier
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def purify(
        self, x01: torch.Tensor, mask: torch.Tensor, keep_known: bool = True
    ) -> torch.Tensor:
        self.calls.append((x01.detach().clone(), mask.detach().clone()))
        return self.inner.purify(x01, mask, keep_known)


class ConstantFill(nn.Module):
    """A fake purifier filling every hole with ``value`` (to check how RT3 combines copies)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def purify(
        self, x01: torch.Tensor, mask: torch.Tensor, keep_known: bool = True
    ) -> torch.Tensor:
        return x01 * (1 - mask) + self.value * mask


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def purifier() -> nn.Module:
    torch.manual_seed(0)
    generator, _ = build_purifier({"cnum": 8, "disc_cnum": 8})
    return generator.eval()


@pytest.fixture
def classifier() -> nn.Module:
    torch.manual_seed(1)
    return TinyClassifier().eval()


@pytest.fixture(scope="module")
def images(cifar10_test_batch) -> torch.Tensor:
    return cifar10_test_batch[0][:16]


@pytest.mark.parametrize("kind", ["rt1", "rt2", "rt3"])
def test_transform_applied_to_every_image_of_every_batch_in_eval(
    kind, classifier, purifier, cifar10_test_batch
):
    """The authors' evaluation skipped the transform for most batches: ours never does."""
    batches, _ = cifar10_test_batch
    recorder = RecordingPurifier(purifier)
    model = PurifiedClassifier(classifier, recorder, RandomTransform(kind)).eval()
    n_masks = 4 if kind == "rt3" else 1
    with torch.no_grad():
        for batch in batches[:96].split(32):
            assert model(batch).shape == (32, 10)
            x01, mask = recorder.calls[-1]
            assert x01.shape == (n_masks * 32, 3, 32, 32) and mask.shape == (
                n_masks * 32,
                1,
                32,
                32,
            )
            # every copy of every image has exactly 25 % of its pixels as holes
            assert torch.equal(mask.mean(dim=(1, 2, 3)), torch.full((n_masks * 32,), 0.25))
            masks = mask.unflatten(0, (n_masks, 32))
            assert masks.sum(dim=0).max() == 1.0  # RT3 copies are disjoint ...
            if kind == "rt3":
                assert torch.equal(masks.sum(dim=0), torch.ones(32, 1, 32, 32))  # ... and cover
            noise = x01.unflatten(0, (n_masks, 32))[0] - batch
            if kind == "rt1":
                assert torch.equal(noise, torch.zeros_like(noise))
            else:  # every image got fresh Gaussian noise (sigma 0.25, clamped)
                assert (noise.abs().mean(dim=(1, 2, 3)) > 0.1).all()
                assert (x01 >= 0).all() and (x01 <= 1).all()
    assert len(recorder.calls) == 3


def test_two_calls_differ_in_eval_mode(classifier, purifier, images):
    model = PurifiedClassifier(classifier, purifier, RandomTransform("rt2")).eval()
    with torch.no_grad():
        assert not torch.equal(model.purify(images), model.purify(images))
        assert not torch.equal(model(images), model(images))


def test_exact_gradients_reach_the_input_and_differ_from_bpda(classifier, purifier, images):
    model = PurifiedClassifier(classifier, purifier, RandomTransform("rt2")).eval()
    labels = torch.arange(16) % 10

    def input_gradient(bpda: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.clone().requires_grad_(True)
        model.generator = _seeded(3)
        with bpda_mode(model) if bpda else contextlib.nullcontext():
            logits = model(x)
        nn.functional.cross_entropy(logits, labels).backward()
        return logits.detach(), x.grad

    exact_logits, exact = input_gradient(False)
    bpda_logits, bpda = input_gradient(True)
    assert torch.equal(exact_logits, bpda_logits)  # BPDA leaves the forward pass unchanged
    assert exact.abs().sum() > 0 and bpda.abs().sum() > 0
    assert not torch.allclose(exact, bpda)
    assert model.bpda is False  # the context manager restored the mode


def test_exact_gradient_is_zero_on_holes_and_bpda_is_identity(classifier, purifier, images):
    """Exact mode: g never sees hole pixels, so their gradient is 0. BPDA: d g / d x := I."""
    model = PurifiedClassifier(classifier, purifier, RandomTransform("rt1")).eval()
    labels = torch.arange(16) % 10

    model.generator = _seeded(4)
    x = images.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(x), labels).backward()
    mask = model.transform(images, generator=_seeded(4)).masks[0].expand_as(images)
    assert torch.all(x.grad[mask == 1] == 0)
    assert x.grad[mask == 0].abs().sum() > 0

    model.generator = _seeded(4)
    purified = model.purify(images).detach().requires_grad_(True)  # g(t(x)) for this draw
    nn.functional.cross_entropy(classifier(purified), labels).backward()
    model.generator = _seeded(4)
    x = images.clone().requires_grad_(True)
    with bpda_mode(model):
        nn.functional.cross_entropy(model(x), labels).backward()
    assert torch.allclose(x.grad, purified.grad)
    assert x.grad[mask == 1].abs().sum() > 0


def test_bpda_does_not_backpropagate_into_the_purifier(classifier, purifier, images):
    model = PurifiedClassifier(classifier, purifier, RandomTransform("rt3"), bpda=True)
    x = images[:4].clone().requires_grad_(True)
    model(x).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in purifier.parameters())


def test_rt3_gradients_flow_through_every_copy(classifier, purifier, images):
    model = PurifiedClassifier(classifier, purifier, RandomTransform("rt3")).eval()
    x = images[:4].clone().requires_grad_(True)
    model(x).sum().backward()
    # each pixel is a hole in one copy but known in the three others: gradients everywhere
    assert (x.grad.abs().sum(dim=1) > 0).float().mean() > 0.9


def test_rt3_combines_each_pixel_from_the_copy_that_inpainted_it(classifier, images):
    model = PurifiedClassifier(classifier, ConstantFill(0.5), RandomTransform("rt3"))
    assert torch.equal(model.purify(images), torch.full_like(images, 0.5))  # partition
    model = PurifiedClassifier(classifier, ConstantFill(2.0), RandomTransform("rt3", mask_number=2))
    out = model.purify(images)
    assert torch.equal((out == 2.0).float().mean(dim=(1, 2, 3)), torch.full((16,), 0.5))


def test_combine_purified_single_copy_is_identity(images):
    draw = RandomTransform("rt2")(images)
    purified = torch.rand(1, *images.shape)
    assert torch.equal(combine_purified(draw, purified), purified[0])


def test_purify_draw_matches_the_defense_and_trains_g(classifier, purifier, images):
    """The training helper gives the same combined image as the defended model, with grads."""
    transform = RandomTransform("rt3")
    draw = transform(images, generator=_seeded(8))
    result, combined = purify_draw(purifier, draw, transform.config)
    assert result.coarse.shape == result.purified.shape == (4 * 16, 3, 32, 32)
    # RT3 is noisy: each copy's purified image is the generator's whole output, and the
    # combination takes copy n's pixels where mask n has holes (copy-major order).
    assert torch.equal(result.purified, result.refined)
    per_copy = result.refined.unflatten(0, (4, 16))
    assert torch.allclose(combined, (draw.masks * per_copy).sum(dim=0))
    model = PurifiedClassifier(classifier, purifier, transform, generator=_seeded(8))
    with torch.no_grad():
        assert torch.equal(model.purify(images), combined)
    combined.sum().backward()
    assert all(p.grad is not None for p in purifier.parameters())
    with pytest.raises(ValueError, match="has 4 masks but the rt2 transform makes 1"):
        purify_draw(purifier, draw, RandomTransform("rt2").config)


def test_k_draw_averaging(classifier, purifier, images):
    model = PurifiedClassifier(classifier, purifier, RandomTransform("rt2"), generator=_seeded(5))
    with torch.no_grad():
        single = torch.stack([model(images) for _ in range(4)])
    model.generator = _seeded(5)
    assert torch.allclose(model.predict(images, draws=4), single.mean(dim=0), atol=1e-6)
    model.generator, model.n_draws = _seeded(5), 4
    averaged = model(images)
    assert torch.allclose(averaged, single.mean(dim=0), atol=1e-6)
    assert averaged.requires_grad  # forward keeps the graph (EOT-style), predict does not
    assert not model.predict(images).requires_grad


def test_seeded_generator_makes_the_model_reproducible(classifier, purifier, images):
    model = PurifiedClassifier(classifier, purifier, RandomTransform("rt3"))
    model.generator = _seeded(6)
    first = model.predict(images)
    model.generator = _seeded(6)
    assert torch.equal(model.predict(images), first)


def test_classifier_flags_untouched_and_kept_in_eval(purifier, images):
    classifier = TinyClassifier()
    classifier.head.weight.requires_grad_(False)
    flags = [p.requires_grad for p in classifier.parameters()]
    model = PurifiedClassifier(classifier, purifier, RandomTransform("rt2"))
    model.train()
    model(images).sum().backward()
    assert [p.requires_grad for p in classifier.parameters()] == flags
    assert not classifier.training and purifier.training  # f frozen: BN statistics fixed
    assert classifier.features[0].weight.grad is not None  # gradients are not blocked
    model.eval()
    assert not purifier.training


def test_bad_inputs_raise(classifier, purifier, images):
    model = PurifiedClassifier(classifier, purifier, RandomTransform("rt2"))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        model(images * 255)
    with pytest.raises(ValueError, match="float images"):
        model((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="draws"):
        model.predict(images, draws=0)
    with pytest.raises(ValueError, match="draws"):
        PurifiedClassifier(classifier, purifier, RandomTransform("rt2"), n_draws=0)
    with pytest.raises(TypeError, match="purify"):
        PurifiedClassifier(classifier, nn.Identity(), RandomTransform("rt2"))
    with pytest.raises(TypeError, match="RandomTransform"):
        PurifiedClassifier(classifier, purifier, nn.Identity())


def test_noisy_transforms_use_the_whole_generator_output(cifar10_test_batch):
    """RT2: the classifier sees g's output everywhere (no noisy pixel passes through);
    RT1: the known (clean) pixels are kept exactly and only the holes are filled."""

    x = cifar10_test_batch[0][:8]
    generator, _ = build_purifier({"cnum": 8})
    generator.eval()
    seed = 3
    rt2 = RandomTransform("rt2")
    draw = rt2(x, generator=_seeded(seed))
    defended = PurifiedClassifier(nn.Identity(), generator, rt2, generator=_seeded(seed))
    with torch.no_grad():
        purified = defended.purify(x)
        refined = generator(draw.image, draw.masks[0]).refined
    assert torch.allclose(purified, refined, atol=1e-6)
    known = (1 - draw.masks[0]).bool().expand_as(x)
    assert not torch.allclose(purified[known], draw.image[known], atol=1e-3)  # noise removed

    rt1 = RandomTransform("rt1")
    draw = rt1(x, generator=_seeded(seed))
    defended = PurifiedClassifier(nn.Identity(), generator, rt1, generator=_seeded(seed))
    with torch.no_grad():
        purified = defended.purify(x)
    known = (1 - draw.masks[0]).bool().expand_as(x)
    assert torch.equal(purified[known], x[known])


# --------------------------------------------------------------------------- working side


class ShapeRecorder(nn.Module):
    """Identity "classifier" recording the shape of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return x.flatten(1)[:, :10]


def record_inputs(generator: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record the (images, masks) every forward pass of ``generator`` receives."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    generator.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].detach().clone(), args[1].detach().clone()))
    )
    return calls


def neighbour_correlation(noise: torch.Tensor) -> float:
    """Correlation of horizontally and vertically neighbouring pixels of ``noise``."""
    centred = noise - noise.mean()
    horizontal = (centred[..., :, 1:] * centred[..., :, :-1]).mean()
    vertical = (centred[..., 1:, :] * centred[..., :-1, :]).mean()
    return ((horizontal + vertical) / (2 * centred.square().mean())).item()


def away_from_clamp(images: torch.Tensor) -> torch.Tensor:
    """Real images squeezed into [0.3, 0.7]: the noise below is (almost) never clamped."""
    return 0.3 + 0.4 * images


def test_working_side_helpers(images):
    up = to_working(images, 64)
    assert up.shape == (16, 3, 64, 64)
    expected = nn.functional.interpolate(images, size=64, mode="bilinear", align_corners=False)
    assert torch.equal(up, expected)
    assert to_working(images, 32) is images and from_working(images, 32) is images
    down = from_working(up, 32)
    assert down.shape == images.shape
    assert (down - images).abs().mean() < 0.03  # up then down: a mild blur of the original
    grey = torch.full((2, 3, 32, 32), 0.5)
    assert torch.allclose(from_working(to_working(grey, 64), 32), grey, atol=1e-6)
    assert working_side(nn.Identity(), 32) == 32  # no image_size: the images' side
    generator, _ = build_purifier({"generator": "unet", "cnum": 8, "variant": "upsample"})
    assert working_side(generator, 32) == 256


def test_upsample_variant_draws_t_at_the_working_side(cifar10_test_batch):
    """The authors' order for the upsample variant: upsample x, then draw t there, so the
    noise is i.i.d. per working pixel with std sigma_at(64), and the masks are P/8 blocks of
    the working side; f gets g's output back at 32 px."""
    torch.manual_seed(12)
    x = away_from_clamp(cifar10_test_batch[0][:48])
    generator, _ = build_purifier(
        {"generator": "unet", "cnum": 4, "variant": "upsample", "upsample_size": 64}
    )
    generator.eval()
    calls = record_inputs(generator)
    transform = RandomTransform("rt2", sigma=0.25, noise_resolution=256)
    classifier = ShapeRecorder()
    model = PurifiedClassifier(classifier, generator, transform, generator=_seeded(13))
    with torch.no_grad():
        purified = model.purify(x)
        model(x)
    assert purified.shape == x.shape and classifier.shapes == [tuple(x.shape)]
    drawn, masks = calls[0]
    assert drawn.shape == (48, 3, 64, 64) and masks.shape == (48, 1, 64, 64)
    noise = drawn - to_working(x, 64)
    assert transform.config.sigma_at(64) == 0.0625
    assert noise.std().item() == pytest.approx(0.0625, rel=0.02)  # 590k samples
    assert abs(neighbour_correlation(noise)) < 0.02  # drawn at 64 px, not upsampled
    pooled = nn.functional.max_pool2d(masks, 8)  # 8-px blocks: P/8 of the working side
    assert torch.equal(pooled.repeat_interleave(8, -1).repeat_interleave(8, -2), masks)
    assert torch.equal(masks.mean(dim=(1, 2, 3)), torch.full((48,), 0.25))
    # f sees g's output brought back to the image side (antialiased bilinear)
    model.generator = _seeded(13)
    with torch.no_grad():
        again = model.purify(x)
        expected = from_working(generator(drawn, masks, keep_known=False).purified, 32)
    assert torch.allclose(again, expected, atol=1e-6)


def test_native_variant_noise_has_the_authors_std_at_32_px(cifar10_test_batch):
    """noise_resolution 256: sigma 0.25 at 256 px is a per-pixel std of 0.25 * 32 / 256 at
    CIFAR's 32 px, where the native purifier draws t."""
    x = away_from_clamp(cifar10_test_batch[0][:128])
    generator, _ = build_purifier({"generator": "unet", "cnum": 4})
    generator.eval()
    calls = record_inputs(generator)
    transform = RandomTransform("rt2", sigma=0.25, noise_resolution=256)
    model = PurifiedClassifier(ShapeRecorder(), generator, transform, generator=_seeded(14))
    with torch.no_grad():
        model.purify(x)
    drawn, masks = calls[0]
    assert drawn.shape == x.shape and masks.shape == (128, 1, 32, 32)
    noise = drawn - x
    assert (noise.abs() < 0.3).all()  # away from the clamp: the raw noise
    assert noise.std().item() == pytest.approx(0.25 * 32 / 256, rel=0.02)  # 393k samples
    assert abs(neighbour_correlation(noise)) < 0.02


def test_bpda_at_the_working_side_keeps_the_forward_pass(classifier, cifar10_test_batch):
    """BPDA on the upsample variant: same forward value, gradient = d(down o up) / dx."""
    x = cifar10_test_batch[0][:4]
    generator, _ = build_purifier(
        {"generator": "unet", "cnum": 4, "variant": "upsample", "upsample_size": 64}
    )
    model = PurifiedClassifier(classifier, generator.eval(), RandomTransform("rt1"))
    model.generator = _seeded(15)
    exact = model.purify(x)
    model.generator = _seeded(15)
    with bpda_mode(model):
        x_req = x.clone().requires_grad_(True)
        bpda = model.purify(x_req)
    assert torch.equal(exact, bpda.detach())
    bpda.sum().backward()
    reference = x.clone().requires_grad_(True)
    from_working(to_working(reference, 64), 32).sum().backward()
    assert torch.allclose(x_req.grad, reference.grad, atol=1e-5)

"""The DeepFillv2-style purifier, SN-PatchGAN and pre-training losses (paper Sec. 3, Eq. 8)."""

from __future__ import annotations

import pytest
import torch

from atop.checkpoint import CheckpointError, load_safe, save_atomic
from atop.models.purifier import (
    ContextualAttention,
    GatedConv2d,
    InpaintingGenerator,
    build_purifier,
    discriminator_hinge_loss,
    discriminator_loss,
    generator_hinge_loss,
    generator_loss,
    load_purifier,
    purifier_checkpoint,
    purifier_config,
)
from atop.transforms import sample_block_masks

SMALL = {"cnum": 8, "disc_cnum": 8}


@pytest.fixture(scope="module")
def batch(cifar10_test_batch):
    """8 real CIFAR-10 images [8, 3, 32, 32] in [0, 1] and fixed block masks (r = 0.25)."""
    images, _ = cifar10_test_batch
    masks = sample_block_masks(8, (32, 32), generator=torch.Generator().manual_seed(0))
    return images[:8].clone(), masks


@pytest.mark.parametrize("variant", ["native", "upsample"])
def test_shapes_ranges_and_known_pixels(variant, batch):
    torch.manual_seed(0)
    generator, discriminator = build_purifier({**SMALL, "variant": variant})
    images, masks = batch[0][:1], batch[1][:1]
    result = generator(images, masks)
    for output in result:
        assert output.shape == images.shape and output.dtype == torch.float32
        assert output.min() >= 0.0 and output.max() <= 1.0
    known = masks == 0
    assert torch.equal(result.purified.masked_select(known), images.masked_select(known))
    holes = masks.expand_as(images) == 1
    assert torch.equal(result.purified[holes], result.refined[holes])
    assert torch.equal(generator.purify(images, masks), result.purified)
    logits = discriminator(images, masks)
    assert logits.shape == (1, 32, 4, 4)  # 32 px: 3 layers; 256 px: 6 layers -> 4x4 patches


def test_variants_are_sized_for_their_resolution():
    native, native_d = build_purifier({"variant": "native"})
    upsample, upsample_d = build_purifier({**SMALL, "variant": "upsample"})
    dilations = [m.conv.dilation[0] for m in native.coarse if isinstance(m, GatedConv2d)]
    assert [d for d in dilations if d > 1] == [2, 4]  # 8x8 features: dilations < 8
    dilations = [m.conv.dilation[0] for m in upsample.coarse if isinstance(m, GatedConv2d)]
    assert [d for d in dilations if d > 1] == [2, 4, 8, 16]  # DeepFillv2 at 256 px
    assert native.attention.rate == 1 and upsample.attention.rate == 2
    assert native.work_size == 32 and upsample.work_size == 256
    assert len(native_d.layers) == 5 and len(upsample_d.layers) == 11  # 3 / 6 convs
    assert native.config == purifier_config({})


def test_holes_content_is_ignored(batch):
    """The purifier never sees the values under the holes (they are destroyed by t)."""
    torch.manual_seed(1)
    generator, _ = build_purifier(SMALL)
    generator.eval()
    images, masks = batch
    scrambled = torch.where(masks == 1, torch.rand_like(images), images)
    assert torch.equal(generator(images, masks).refined, generator(scrambled, masks).refined)


def test_gradients_reach_input_and_every_parameter(batch):
    torch.manual_seed(2)
    generator, _ = build_purifier(SMALL)
    images, masks = batch
    x = images.clone().requires_grad_(True)
    result = generator(x, masks)
    (result.coarse.sum() + result.purified.sum()).backward()
    assert x.grad.abs().sum() > 0
    assert torch.all(x.grad.masked_select(masks.expand_as(x) == 1) == 0)  # holes ignored
    for name, parameter in generator.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_adversarial_term_alone_trains_the_generator(batch):
    """The GAN term of Eq. 8 is not computed on a detached tensor (an authors' code defect)."""
    torch.manual_seed(3)
    generator, discriminator = build_purifier(SMALL)
    images, masks = batch
    loss = generator_loss(discriminator, images, generator(images, masks), masks)
    loss.adversarial.backward()
    grads = [p.grad for p in generator.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert torch.allclose(loss.total, loss.l1 + loss.adversarial)


def test_discriminator_loss_trains_only_the_discriminator(batch):
    torch.manual_seed(4)
    generator, discriminator = build_purifier(SMALL)
    images, masks = batch
    result = generator(images, masks)
    loss = discriminator_loss(discriminator, images, result.purified, masks)
    loss.backward()
    assert all(p.grad is None for p in generator.parameters())
    for name, parameter in discriminator.named_parameters():
        assert parameter.grad is not None, name
        if name.endswith("weight.original"):  # hinge: the last bias' grad can cancel to 0
            assert parameter.grad.abs().sum() > 0, name


def test_pretraining_steps_reduce_the_l1_loss(batch):
    """20 Adam steps (paper: lr 1e-4, betas (0.5, 0.999); here lr 1e-3) lower Eq. 8's L1."""
    torch.manual_seed(5)
    generator, discriminator = build_purifier(SMALL)
    images, masks = batch
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    l1_history = []
    for _ in range(20):
        result = generator(images, masks)
        d_opt.zero_grad()
        discriminator_loss(discriminator, images, result.purified, masks).backward()
        d_opt.step()
        g_opt.zero_grad()
        loss = generator_loss(discriminator, images, result, masks)
        loss.total.backward()
        g_opt.step()
        l1_history.append(loss.l1.item())
    assert l1_history[-1] < 0.85 * l1_history[0]


def test_hinge_losses():
    ones = torch.ones(2, 1, 4, 4)
    assert discriminator_hinge_loss(2 * ones, -2 * ones) == 0.0  # confident and right
    assert discriminator_hinge_loss(0 * ones, 0 * ones) == 2.0
    assert discriminator_hinge_loss(-ones, ones) == 4.0
    assert generator_hinge_loss(3 * ones) == -3.0


def test_contextual_attention_copies_background():
    """Holes are filled with a convex combination of background patches."""
    torch.manual_seed(6)
    for rate, size in ((1, 8), (2, 16)):
        mask = sample_block_masks(2, (4 * size, 4 * size), 0.25)
        features = torch.full((2, 5, size, size), 0.7)
        hole = torch.nn.functional.adaptive_max_pool2d(mask, size).bool().expand_as(features)
        features[hole] = torch.randn(int(hole.sum()))
        out = ContextualAttention(rate)(features, mask)
        assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-5)
        no_background = ContextualAttention(rate)(features, torch.ones_like(mask))
        assert torch.equal(no_background, torch.zeros_like(no_background))


def test_checkpoint_round_trip(batch, tmp_path):
    torch.manual_seed(7)
    generator, discriminator = build_purifier(SMALL)
    images, masks = batch
    generator(images, masks)
    discriminator(images, masks)  # a power iteration updates the spectral-norm vectors
    generator.eval()
    discriminator.eval()
    ckpt = purifier_checkpoint(generator, discriminator, meta={"epochs": 3})
    save_atomic(ckpt, tmp_path / "purifier.pt")
    loaded = load_safe(tmp_path / "purifier.pt")  # torch.load(weights_only=True)
    assert loaded["arch"] == "deepfillv2" and loaded["meta"] == {"epochs": 3}
    assert loaded["config"] == purifier_config(SMALL)
    generator2, discriminator2 = load_purifier(loaded)
    assert not generator2.training and not discriminator2.training
    assert torch.equal(generator2(images, masks).purified, generator(images, masks).purified)
    assert torch.equal(discriminator2(images, masks), discriminator(images, masks))
    generator3, none = load_purifier(purifier_checkpoint(generator, None))
    assert none is None and isinstance(generator3, InpaintingGenerator)


def test_checkpoint_is_a_copy():
    generator, discriminator = build_purifier(SMALL)
    ckpt = purifier_checkpoint(generator, discriminator)
    with torch.no_grad():
        for parameter in generator.parameters():
            parameter.add_(1.0)
    first = next(iter(ckpt["state_dict"]["generator"].values()))
    assert not torch.equal(first, next(iter(generator.state_dict().values())))


def test_checkpoint_errors():
    generator, discriminator = build_purifier(SMALL)
    ckpt = purifier_checkpoint(generator, discriminator)
    with pytest.raises(CheckpointError, match="keys \\['state_dict'\\] are missing"):
        load_purifier({"arch": "deepfillv2", "config": {}})
    with pytest.raises(CheckpointError, match="'wrn-28-10' model, not a purifier"):
        load_purifier({**ckpt, "arch": "wrn-28-10"})
    with pytest.raises(CheckpointError, match="generator weights do not fit"):
        load_purifier({**ckpt, "config": {**ckpt["config"], "cnum": 12}})
    with pytest.raises(CheckpointError, match="Cannot rebuild"):
        load_purifier({**ckpt, "config": {"variant": "huge"}})
    with pytest.raises(ValueError, match="does not match"):
        purifier_checkpoint(generator, discriminator, {"cnum": 16})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"variant": "512"}, "Unknown purifier variant"),
        ({"cnum": 10}, "multiple of 4"),
        ({"image_size": 30}, "multiple of 8"),
        ({"cnum": 0}, "int >= 2"),
        ({"resolution": 256}, "Unknown purifier config key.*resolution"),
    ],
)
def test_bad_config_raises(config, message):
    with pytest.raises(ValueError, match=message):
        build_purifier(config)


def test_bad_inputs_raise(batch):
    generator, discriminator = build_purifier(SMALL)
    images, masks = batch
    with pytest.raises(ValueError, match="mask of shape"):
        generator(images, masks[:, :, :16])
    with pytest.raises(ValueError, match="built for 32x32 images, got 64x64"):
        generator(torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="float images"):
        discriminator(images[:, :1], masks)

"""The GAN purifiers (DeepFillv2-style and the gated U-Net), SN-PatchGAN and pre-training
losses (paper Sec. 3, Eq. 8), at the working side of each variant."""

from __future__ import annotations

import pytest
import torch

from atop.checkpoint import CheckpointError, load_safe, save_atomic
from atop.defense import to_working
from atop.models.gated_unet import GatedUNet, GatedUNetGenerator
from atop.models.purifier import (
    ContextualAttention,
    GatedConv2d,
    InpaintingGenerator,
    PatchDiscriminator,
    build_purifier,
    discriminator_hinge_loss,
    discriminator_loss,
    generator_hinge_loss,
    generator_loss,
    load_purifier,
    purifier_checkpoint,
    purifier_config,
    working_side,
)
from atop.transforms import sample_block_masks

SMALL = {"cnum": 8, "disc_cnum": 8}
#: The generators (and the unet's attention switch) every shared property is checked on.
GENERATORS = {
    "deepfillv2": {"generator": "deepfillv2"},
    "unet": {"generator": "unet", "attention": False},
    "unet-attention": {"generator": "unet", "attention": True},
}


def make_generator(kind: str, seed: int, **config):
    """A small generator of ``kind`` (a key of GENERATORS) and its discriminator.

    A fresh gated U-Net stage is the identity (zero output convolution), so its output
    convolutions get small random weights here: every parameter then matters, as after the
    first training steps.
    """
    torch.manual_seed(seed)
    generator, discriminator = build_purifier({**SMALL, **GENERATORS[kind], **config})
    if isinstance(generator, GatedUNetGenerator):
        with torch.no_grad():
            for stage in (generator.coarse, generator.refine):
                stage.out.weight.normal_(0.0, 0.05)
    return generator, discriminator


@pytest.fixture(scope="module")
def batch(cifar10_test_batch):
    """8 real CIFAR-10 images [8, 3, 32, 32] in [0, 1] and fixed block masks (r = 0.25)."""
    images, _ = cifar10_test_batch
    masks = sample_block_masks(8, (32, 32), generator=torch.Generator().manual_seed(0))
    return images[:8].clone(), masks


@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("variant", ["native", "upsample"])
def test_shapes_ranges_and_known_pixels(kind, variant, batch):
    """Both networks run at the working side S (32 px native, 256 px upsample) and take
    images of that side: the caller converts (atop.defense.to_working)."""
    generator, discriminator = make_generator(kind, 0, variant=variant)
    side = working_side(generator.config)
    assert generator.image_size == discriminator.image_size == side
    assert side == (32 if variant == "native" else 256)
    images = to_working(batch[0][:1], side)
    masks = sample_block_masks(1, (side, side), generator=torch.Generator().manual_seed(0))
    result = generator(images, masks)
    for output in result:
        assert output.shape == images.shape and output.dtype == torch.float32
        assert output.min() >= 0.0 and output.max() <= 1.0
    known = masks == 0
    assert torch.equal(result.purified.masked_select(known), images.masked_select(known))
    holes = masks.expand_as(images) == 1
    assert torch.equal(result.purified[holes], result.refined[holes])
    assert torch.equal(generator.purify(images, masks), result.purified)
    assert torch.equal(generator(images, masks, keep_known=False).purified, result.refined)
    logits = discriminator(images, masks)
    assert logits.shape == (1, 32, 4, 4)  # 32 px: 3 layers; 256 px: 6 layers -> 4x4 patches


def test_variants_are_sized_for_their_resolution():
    native, native_d = build_purifier({"variant": "native"})
    upsample, upsample_d = build_purifier({**SMALL, "variant": "upsample"})
    assert isinstance(native, InpaintingGenerator)  # the library default: the paper's
    dilations = [m.conv.dilation[0] for m in native.coarse if isinstance(m, GatedConv2d)]
    assert [d for d in dilations if d > 1] == [2, 4]  # 8x8 features: dilations < 8
    dilations = [m.conv.dilation[0] for m in upsample.coarse if isinstance(m, GatedConv2d)]
    assert [d for d in dilations if d > 1] == [2, 4, 8, 16]  # DeepFillv2 at 256 px
    assert native.attention.rate == 1 and upsample.attention.rate == 2
    assert native.image_size == 32 and upsample.image_size == 256  # the working sides
    assert isinstance(native_d, PatchDiscriminator) and upsample_d.image_size == 256
    assert len(native_d.layers) == 5 and len(upsample_d.layers) == 11  # 3 / 6 convs
    assert native.config == purifier_config({})
    assert native.config["generator"] == "deepfillv2"
    small, _ = build_purifier({**SMALL, "variant": "upsample", "upsample_size": 64})
    assert small.image_size == working_side(small.config) == 64


@pytest.mark.parametrize("attention", [False, True])
def test_unet_is_built_from_the_config(attention):
    generator, discriminator = build_purifier(
        {
            "generator": "unet",
            "cnum": 12,
            "attention": attention,
            "variant": "upsample",
            "upsample_size": 64,
        }
    )
    assert isinstance(generator, GatedUNetGenerator) and generator.image_size == 64
    assert discriminator.image_size == 64 and len(discriminator.layers) == 7  # 4 convs
    for stage in (generator.coarse, generator.refine):
        assert isinstance(stage, GatedUNet)
        first = stage.level1[0].conv
        assert (first.in_channels, first.out_channels) == (5, 2 * 6)  # width cnum/2: 6 features
    assert generator.coarse.attention is None  # attention only in the refinement stage
    assert (generator.refine.attention is not None) == attention
    assert generator.config["attention"] is attention


def test_fresh_gated_unet_is_the_identity_on_its_image(batch):
    """The output convolution starts at zero: a fresh stage returns its input image, so a
    fresh generator returns the known pixels with the holes grey (0 in [-1, 1])."""
    images, masks = batch
    torch.manual_seed(8)
    stage = GatedUNet(5, 4, attention=True)
    image = images * 2 - 1
    x = torch.cat([image, torch.ones_like(masks), masks], dim=1)
    assert torch.equal(stage(x, image, masks), image)
    generator = GatedUNetGenerator(width=4, image_size=32)
    with torch.no_grad():
        result = generator(images, masks, keep_known=False)
    grey_holes = images * (1 - masks) + 0.5 * masks
    for output in result:
        assert torch.allclose(output, grey_holes, atol=1e-6)


def test_gated_unet_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible by 4"):
        GatedUNetGenerator(width=4, image_size=30)
    with pytest.raises(ValueError, match="width >= 1"):
        GatedUNetGenerator(width=0)


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_holes_content_is_ignored(kind, batch):
    """The purifier never sees the values under the holes (they are destroyed by t)."""
    generator, _ = make_generator(kind, 1)
    generator.eval()
    images, masks = batch
    scrambled = torch.where(masks == 1, torch.rand_like(images), images)
    assert torch.equal(generator(images, masks).refined, generator(scrambled, masks).refined)


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_gradients_reach_input_and_every_parameter(kind, batch):
    generator, _ = make_generator(kind, 2)
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


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_checkpoint_round_trip(kind, batch, tmp_path):
    generator, discriminator = make_generator(kind, 7)
    images, masks = batch
    generator(images, masks)
    discriminator(images, masks)  # a power iteration updates the spectral-norm vectors
    generator.eval()
    discriminator.eval()
    ckpt = purifier_checkpoint(generator, discriminator, meta={"epochs": 3})
    save_atomic(ckpt, tmp_path / "purifier.pt")
    loaded = load_safe(tmp_path / "purifier.pt")  # torch.load(weights_only=True)
    assert loaded["arch"] == "gan-purifier" and loaded["meta"] == {"epochs": 3}
    assert loaded["config"] == purifier_config({**SMALL, **GENERATORS[kind]})
    generator2, discriminator2 = load_purifier(loaded)
    assert type(generator2) is type(generator)
    assert not generator2.training and not discriminator2.training
    assert torch.equal(generator2(images, masks).purified, generator(images, masks).purified)
    assert torch.equal(discriminator2(images, masks), discriminator(images, masks))
    generator3, none = load_purifier(purifier_checkpoint(generator, None))
    assert none is None and type(generator3) is type(generator)


def test_older_deepfillv2_checkpoints_still_load(batch):
    """Checkpoints written before the arch became "gan-purifier" said "deepfillv2"."""
    generator, discriminator = make_generator("deepfillv2", 9)
    generator.eval()
    old = {**purifier_checkpoint(generator, discriminator), "arch": "deepfillv2"}
    loaded, _ = load_purifier(old)
    images, masks = batch
    assert torch.equal(loaded(images, masks).purified, generator(images, masks).purified)


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
    with pytest.raises(CheckpointError, match="generator weights do not fit"):
        load_purifier({**ckpt, "config": {**ckpt["config"], "generator": "unet"}})
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
        ({"generator": "pix2pix"}, "Unknown purifier generator"),
        ({"attention": "yes"}, "'attention' must be true or false"),
        ({"variant": "upsample", "upsample_size": 100}, "'upsample_size' must be a multiple of 8"),
    ],
)
def test_bad_config_raises(config, message):
    with pytest.raises(ValueError, match=message):
        build_purifier(config)


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_bad_inputs_raise(kind, batch):
    generator, discriminator = make_generator(kind, 10)
    images, masks = batch
    with pytest.raises(ValueError, match="mask of shape"):
        generator(images, masks[:, :, :16])
    with pytest.raises(ValueError, match="built for 32x32 images, got"):
        generator(torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="float images"):
        discriminator(images[:, :1], masks)
    upsample, _ = build_purifier({**SMALL, **GENERATORS[kind], "variant": "upsample"})
    with pytest.raises(ValueError, match="built for 256x256 images, got"):
        upsample(images, masks)  # no internal resizing: the caller converts to 256 px

"""PurifierStep: one D step then one g step of paper Eq. 8, on real CIFAR-10 images; the
step works at the purifier's working side; the gated U-Net learns to restore real images."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from atop.defense import purify_draw, to_working
from atop.models.gated_unet import GatedUNetGenerator
from atop.models.purifier import build_purifier
from atop.trainers.purifier import PurifierStep, psnr, purify_with_seed
from atop.training import Batches
from atop.transforms import RandomTransform

SMALL = {"cnum": 8, "disc_cnum": 8}


def make_step(seed: int = 0, kind: str = "rt2", lr: float = 1e-4, **weights) -> PurifierStep:
    torch.manual_seed(seed)
    generator, discriminator = build_purifier(SMALL)
    adam = {"lr": lr, "betas": (0.5, 0.999)}
    return PurifierStep(
        generator,
        discriminator,
        RandomTransform(kind),
        torch.optim.Adam(generator.parameters(), **adam),
        torch.optim.Adam(discriminator.parameters(), **adam),
        **weights,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(v, before[k])}


@pytest.fixture(scope="module")
def images(cifar10_test_batch) -> torch.Tensor:
    """8 real CIFAR-10 test images, float32 [8, 3, 32, 32] in [0, 1]."""
    return cifar10_test_batch[0][:8].clone()


def test_discriminator_step_changes_only_d_then_g_step_only_g(images):
    step = make_step()
    g_before, d_before = snapshot(step.generator), snapshot(step.discriminator)
    seen = {}
    d_optimizer_step = step.opt_discriminator.step

    def spy(*args, **kwargs):  # the D update, observed from inside the call
        seen["g_grads"] = [p.grad for p in step.generator.parameters()]
        result = d_optimizer_step(*args, **kwargs)
        seen["g_changed"] = changed(step.generator, g_before)
        seen["d_after"] = snapshot(step.discriminator)
        return result

    step.opt_discriminator.step = spy
    out = step(images, images)

    assert all(grad is None for grad in seen["g_grads"])  # fake images detached for D's loss
    assert seen["g_changed"] == set()  # D's step leaves g alone
    # ... and updates D: every weight (the last bias may get no gradient from the hinge
    # loss while all logits lie in (-1, 1), where its real and fake terms cancel)
    assert {k for k in d_before if "weight" in k} <= changed(step.discriminator, d_before)
    # g's step then updates g and leaves D where its own step put it
    assert changed(step.generator, g_before) == set(g_before)
    assert changed(step.discriminator, seen["d_after"]) == set()
    assert set(out) == {"loss", "l1", "gan_g", "d_loss"}
    assert all(v.dim() == 0 and not v.requires_grad for v in out.values())


def test_gan_term_alone_trains_the_generator(images):
    """gan_weight=1, l1_weight=0: the adversarial term is not detached (authors' defect)."""
    step = make_step(seed=1, l1_weight=0.0, gan_weight=1.0)
    before = snapshot(step.generator)
    out = step(images, images)
    assert out["loss"] == pytest.approx(out["gan_g"].item())
    grads = {k: p.grad for k, p in step.generator.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert changed(step.generator, before) == set(before)


def test_l1_decreases_on_a_fixed_batch(images):
    """The L1 term of Eq. 8 descends (GAN term off: at weight 1 it jolts the first steps)."""
    step = make_step(seed=2, lr=1e-3, l1_weight=1.0, gan_weight=0.0)

    def fixed_draw_l1() -> float:
        step.generator.eval()
        with torch.no_grad():
            draw = step.transform(images, generator=torch.Generator().manual_seed(0))
            result, _ = purify_draw(step.generator, draw, step.transform.config)
            l1 = (result.coarse - images).abs().mean() + (result.refined - images).abs().mean()
        step.generator.train()
        return l1.item()

    start = fixed_draw_l1()
    for _ in range(20):
        step(images, images)
    assert fixed_draw_l1() < 0.8 * start


def test_extra_loss_is_added_to_the_generator_loss(images):
    """AToP's hook: with L_org switched off, only the extra term moves g."""
    step = make_step(seed=3, l1_weight=0.0, gan_weight=0.0)
    before = snapshot(step.generator)
    received = {}

    def extra(purified: torch.Tensor):
        received["purified"] = purified
        term = purified.mean()
        return 2.0 * term, {"extra": term}

    out = step(images, images, extra)
    assert received["purified"].shape == images.shape and received["purified"].requires_grad
    assert set(out) == {"loss", "l1", "gan_g", "d_loss", "extra"}
    assert out["loss"].item() == pytest.approx(2.0 * out["extra"].item())
    assert not out["extra"].requires_grad
    assert changed(step.generator, before) == set(before)


def test_rt3_step_purifies_every_copy(images):
    """RT3: N masked copies per image; the extra term sees the N copies combined."""
    step = make_step(seed=4, kind="rt3")
    seen = []

    def extra(purified: torch.Tensor):
        seen.append(tuple(purified.shape))
        return purified.sum() * 0.0, {}

    out = step(images[:4], images[:4], extra)
    assert seen == [(4, 3, 32, 32)]
    assert all(torch.isfinite(value) for value in out.values())


def test_shape_mismatch_is_refused(images):
    with pytest.raises(ValueError, match="same shape"):
        make_step()(images, images[:4])


def neighbour_correlation(noise: torch.Tensor) -> float:
    """Correlation of horizontally and vertically neighbouring pixels of ``noise``."""
    centred = noise - noise.mean()
    horizontal = (centred[..., :, 1:] * centred[..., :, :-1]).mean()
    vertical = (centred[..., 1:, :] * centred[..., :-1, :]).mean()
    return ((horizontal + vertical) / (2 * centred.square().mean())).item()


def test_step_draws_t_and_restores_at_the_working_side(cifar10_test_batch):
    """Upsample variant (64 px here): the inputs and targets are upsampled, t is drawn on the
    upsampled tensor (i.i.d. noise of std sigma_at(64), 8-px blocks), D judges 64-px images,
    and extra_loss gets the purified image back at the image side."""
    torch.manual_seed(20)
    x = 0.3 + 0.4 * cifar10_test_batch[0][:32]  # real images away from the [0, 1] clamp
    generator, discriminator = build_purifier(
        {"generator": "unet", "cnum": 4, "disc_cnum": 8, "variant": "upsample", "upsample_size": 64}
    )
    seen: dict[str, list] = {"g": [], "d": []}
    generator.register_forward_pre_hook(lambda m, args: seen["g"].append(args))
    discriminator.register_forward_pre_hook(lambda m, args: seen["d"].append(args))
    transform = RandomTransform("rt2", sigma=0.25, noise_resolution=256)
    adam = {"lr": 1e-4, "betas": (0.5, 0.999)}
    step = PurifierStep(
        generator,
        discriminator,
        transform,
        torch.optim.Adam(generator.parameters(), **adam),
        torch.optim.Adam(discriminator.parameters(), **adam),
        amp=False,
    )
    received = {}

    def extra(purified: torch.Tensor):
        received["shape"] = tuple(purified.shape)
        return purified.mean() * 0.0, {}

    step(x, x, extra)
    drawn, masks = seen["g"][0]
    assert drawn.shape == (32, 3, 64, 64) and masks.shape == (32, 1, 64, 64)
    noise = drawn.detach() - to_working(x, 64)
    assert noise.std().item() == pytest.approx(transform.config.sigma_at(64), rel=0.02)
    assert abs(neighbour_correlation(noise)) < 0.02  # drawn at 64 px, not upsampled from 32
    pooled = torch.nn.functional.max_pool2d(masks, 8)
    assert torch.equal(pooled.repeat_interleave(8, -1).repeat_interleave(8, -2), masks)
    # D's real images (the first half of its batch) are the targets at the working side
    judged, judged_masks = seen["d"][0]
    assert judged.shape == (64, 3, 64, 64)
    assert torch.equal(judged[:32], to_working(x, 64)) and torch.equal(judged_masks[:32], masks)
    assert received["shape"] == (32, 3, 32, 32)


def _train_images(data_root, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` real CIFAR-10 training images (data_batch_1), uint8, and labels."""
    with open(data_root / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")  # the official CIFAR-10 python format
    images = torch.from_numpy(np.asarray(batch["data"][:n], dtype=np.uint8))
    return images.reshape(n, 3, 32, 32).contiguous(), torch.tensor(batch["labels"][:n])


def test_gated_unet_learns_to_restore_held_out_real_images(data_root, cifar10_test_batch):
    """A short pretraining of the gated U-Net (width 4, 150 steps of 16 real CIFAR-10
    training images, RT2 with the authors' noise: sigma 0.25 at 256 px, 0.03125 at 32 px)
    makes g(t(x)) closer to x than t(x) itself (its holes grey, what a fresh U-Net
    returns) on 128 held-out real test images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest on a shared CPU
    try:
        torch.manual_seed(21)
        generator, discriminator = build_purifier(
            {"generator": "unet", "cnum": 8, "disc_cnum": 8, "attention": False}
        )
        assert isinstance(generator, GatedUNetGenerator)
        transform = RandomTransform("rt2", sigma=0.25, noise_resolution=256)
        held_out = cifar10_test_batch[0][:128]
        transformed, fresh = purify_with_seed(generator, transform, held_out, 0, 128)
        psnr_t = psnr(transformed, held_out).mean().item()
        assert psnr(fresh, held_out).mean().item() == pytest.approx(psnr_t, abs=1e-3)

        adam = {"lr": 3e-3, "betas": (0.5, 0.999)}
        step = PurifierStep(
            generator,
            discriminator,
            transform,
            torch.optim.Adam(generator.parameters(), **adam),
            torch.optim.Adam(discriminator.parameters(), **adam),
            l1_weight=1.0,
            gan_weight=0.1,
            amp=False,
        )
        images, labels = _train_images(data_root, 2400)
        batches = Batches(
            images, labels, 16, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        generator.train()
        for _, (x, _) in zip(range(150), batches, strict=False):
            terms = step(x, x)
        assert all(torch.isfinite(v) for v in terms.values())
        _, purified = purify_with_seed(generator, transform, held_out, 0, 128)
        psnr_g = psnr(purified, held_out).mean().item()
    finally:
        torch.set_num_threads(threads)
    assert psnr_g > psnr_t + 2.0, (psnr_g, psnr_t)  # measured: ~18.1 dB -> ~22 dB

"""Tests of atop.attacks on real CIFAR-10: attack factory, EOT, BPDA, fresh-draw judging
(the N-evaluation), the fair AutoAttack (every image attacked, success re-judged)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn
from torchattacks.attack import Attack

import atop.attacks as attacks_module
from atop.attacks import (
    BPDA,
    EOTAPGD,
    EOTPGDL2,
    FloatLogits,
    PackedEOTPGD,
    RejudgedMultiAttack,
    apgd_checkpoints,
    bpda_mode,
    build_attack,
    dlr_loss,
    draw_correct,
    run_attack,
)
from atop.evaluation.protocol import per_image, worst_case

N_CLASSES = 10

#: One small, fast entry per attack kind (the evaluation profiles use larger numbers).
SMALL_SPECS = {
    "fgsm": {"name": "fgsm", "eps": 8 / 255},
    "pgd_linf_eot": {
        "name": "pgd", "norm": "Linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 3,
        "eot_iter": 2, "random_start": True,
    },
    "pgd_l2_eot": {
        "name": "pgd", "norm": "L2", "eps": 0.5, "alpha": 0.1, "steps": 3, "eot_iter": 2,
        "random_start": True,
    },
    "bpda_eot": {
        "name": "bpda", "norm": "Linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 3,
        "eot_iter": 2,
    },
    "cw": {"name": "cw", "c": 1.0, "kappa": 0.0, "steps": 5, "lr": 0.01},
    "autoattack_standard": {
        "name": "autoattack", "version": "standard", "norm": "Linf", "eps": 8 / 255,
        "steps": 2, "seed": 0, "n_queries": 10, "draws": 3,
    },
    "autoattack_rand_l2": {
        "name": "autoattack", "version": "rand", "norm": "L2", "eps": 0.5, "steps": 2,
        "seed": 0, "eot_iter": 2, "draws": 3,
    },
}  # fmt: skip

#: ε each attack must respect, in its norm (None: C&W ℓ2 is unbounded).
SPEC_BOUNDS = {
    key: (spec.get("norm", "L2" if spec["name"] == "cw" else "Linf"), spec.get("eps"))
    for key, spec in SMALL_SPECS.items()
}


class SmallCNN(nn.Module):
    """A tiny CIFAR classifier: float32 [N, 3, 32, 32] in [0, 1] -> logits [N, 10].

    A 5x5 convolution with 32 channels, ReLU, 8x8 average pooling and a linear head.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.AvgPool2d(8), nn.Flatten()
        )
        self.head = nn.Linear(32 * 4 * 4, N_CLASSES)

    def forward(self, x):
        return self.head(self.features((x - 0.5) / 0.25))


class NoisyMaskBlurDefense(nn.Module):
    """A small stand-in for ``f(g(t(x)))``, random on every call (also in eval mode).

    t: Gaussian noise (sigma) then a random block mask per image (missing_rate of the
    mask_block x mask_block blocks zeroed); g: 3x3 mean blur, whose backward becomes the
    identity when ``bpda`` is on; f: the classifier. Records the ``bpda`` value of each call.
    """

    def __init__(self, classifier, sigma=0.03, missing_rate=0.1, mask_block=4):
        super().__init__()
        self.classifier = classifier
        self.sigma, self.missing_rate, self.mask_block = sigma, missing_rate, mask_block
        self.bpda = False
        self.bpda_seen: list[bool] = []

    def forward(self, x):
        self.bpda_seen.append(self.bpda)
        n, _, h, w = x.shape
        noisy = x + self.sigma * torch.randn_like(x)
        blocks = (h // self.mask_block, w // self.mask_block)
        keep = (torch.rand(n, 1, *blocks, device=x.device) >= self.missing_rate).to(x.dtype)
        masked = noisy * F.interpolate(keep, scale_factor=self.mask_block, mode="nearest")
        purified = F.avg_pool2d(masked, 3, stride=1, padding=1, count_include_pad=False)
        if self.bpda:
            purified = masked + (purified - masked).detach()
        return self.classifier(purified.clamp(0, 1))


class CallCounter(nn.Module):
    """Counts forward calls of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


class AlternatingModel(nn.Module):
    """Deterministic 'random' model: even calls give f's logits, odd calls predict class+1."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x):
        logits = self.model(x)
        self.calls += 1
        return logits if self.calls % 2 == 1 else logits.roll(1, dims=1)


@functools.lru_cache(maxsize=1)
def trained_small_cnn(data_root: str) -> SmallCNN:
    """SmallCNN fitted on 5000 real CIFAR-10 training images in a few CPU seconds.

    The convolution keeps its (seeded) random initialization; the head is the closed-form
    ridge regression of one-hot labels on the standardized conv features (random-features
    training: no optimizer loop). Reaches ~45-50 % test accuracy.
    """
    from torchvision.datasets import CIFAR10

    train = CIFAR10(root=data_root, train=True, download=False)
    images = torch.from_numpy(np.ascontiguousarray(train.data[:5000])).permute(0, 3, 1, 2)
    images = images.float().contiguous() / 255
    targets = F.one_hot(torch.tensor(train.targets[:5000]), N_CLASSES).float()
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():
        features = model.features((images - 0.5) / 0.25)
        mean, std = features.mean(0), features.std(0) + 1e-6
        design = torch.cat([(features - mean) / std, torch.ones(len(features), 1)], dim=1)
        ridge = len(features) / 10 * torch.eye(design.shape[1])
        solution = torch.linalg.solve(design.T @ design + ridge, design.T @ targets)
        weight = solution[:-1] / std[:, None]  # fold the standardization into the head
        model.head.weight.copy_(weight.T)
        model.head.bias.copy_(solution[-1] - mean @ weight)
    model.eval().requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def classifier(data_root):
    return trained_small_cnn(str(data_root))


@pytest.fixture()
def defense(classifier):
    return NoisyMaskBlurDefense(classifier).eval()


@pytest.fixture(scope="module")
def batch(cifar10_test_batch):
    images, labels = cifar10_test_batch
    # contiguous: the fixture's images are channels-last strided (a permuted array), which
    # torchattacks' PGDL2/FAB cannot .view(); run_attack makes its batches contiguous itself
    return images[:8].contiguous(), labels[:8]


def _norms(clean, adv):
    delta = (adv - clean).flatten(1)
    return delta.abs().amax(dim=1), delta.norm(p=2, dim=1)


def test_classifier_learned_something(classifier, cifar10_test_batch):
    images, labels = cifar10_test_batch
    accuracy = draw_correct(classifier, images, labels, draws=1, batch_size=128).float().mean()
    assert accuracy > 0.35  # chance is 0.1


@pytest.mark.parametrize("key", sorted(SMALL_SPECS))
def test_every_attack_runs_and_respects_eps(key, defense, batch):
    images, labels = batch
    torch.manual_seed(1)
    attack = build_attack(defense, SMALL_SPECS[key], N_CLASSES)
    adv = run_attack(attack, images, labels, batch_size=4, progress=False)
    assert adv.shape == images.shape and adv.dtype == torch.float32
    assert adv.min() >= 0 and adv.max() <= 1
    linf, l2 = _norms(images, adv)
    norm, eps = SPEC_BOUNDS[key]
    if eps is not None:
        assert (linf if norm == "Linf" else l2).max() <= eps + 1e-5
    assert (linf > 0).any(), "the attack changed no image"


def test_pgd_lowers_accuracy_of_undefended_classifier(classifier, cifar10_test_batch):
    images, labels = cifar10_test_batch[0][:32], cifar10_test_batch[1][:32]
    spec = {
        "name": "pgd",
        "norm": "Linf",
        "eps": 8 / 255,
        "alpha": 2 / 255,
        "steps": 10,
        "eot_iter": 1,
    }
    adv = run_attack(build_attack(classifier, spec, N_CLASSES), images, labels, 32, progress=False)
    clean = draw_correct(classifier, images, labels, draws=1, batch_size=32).float().mean()
    robust = draw_correct(classifier, adv, labels, draws=1, batch_size=32).float().mean()
    assert clean > 0.3
    assert robust < clean
    assert robust <= 0.1  # ten PGD steps at 8/255 break nearly every image of a standard model


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_eot_pgd_calls_the_model_eot_iter_times_per_step(norm, defense, batch):
    images, labels = batch
    counter = CallCounter(defense)
    eps, alpha = (8 / 255, 2 / 255) if norm == "Linf" else (0.5, 0.1)
    spec = {"name": "pgd", "norm": norm, "eps": eps, "alpha": alpha, "steps": 3, "eot_iter": 4}
    build_attack(counter, spec, N_CLASSES)(images, labels)
    assert counter.calls == 3 * 4


def test_eot_l2_averages_loss_gradients_not_logits(defense, batch):
    """One EOT step equals the manual mean of 3 loss gradients under the same random draws."""
    images, labels = batch[0][:4], batch[1][:4]
    eps, alpha, eot_iter = 0.5, 0.3, 3
    attack = EOTPGDL2(defense, eps=eps, alpha=alpha, steps=1, eot_iter=eot_iter, random_start=False)
    torch.manual_seed(123)
    adv = attack(images, labels)

    def step(grad):
        moved = images + alpha * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = moved - images
        factor = torch.clamp(eps / delta.flatten(1).norm(dim=1), max=1.0).view(-1, 1, 1, 1)
        return (images + delta * factor).clamp(0, 1)

    x = images.clone().requires_grad_(True)
    torch.manual_seed(123)
    grads = [
        torch.autograd.grad(F.cross_entropy(defense(x), labels, reduction="sum"), x)[0]
        for _ in range(eot_iter)
    ]
    assert torch.allclose(adv, step(torch.stack(grads).mean(0)), atol=1e-5)

    torch.manual_seed(123)
    mean_logits = torch.stack([defense(x) for _ in range(eot_iter)]).mean(0)
    logit_grad = torch.autograd.grad(F.cross_entropy(mean_logits, labels, reduction="sum"), x)[0]
    assert not torch.allclose(adv, step(logit_grad), atol=1e-5)


def test_eot_l2_equals_torchattacks_pgdl2_on_a_deterministic_model(classifier, batch):
    images, labels = batch
    ours = EOTPGDL2(classifier, eps=0.5, alpha=0.1, steps=4, eot_iter=3, random_start=False)
    reference = torchattacks.PGDL2(classifier, eps=0.5, alpha=0.1, steps=4, random_start=False)
    assert torch.allclose(ours(images, labels), reference(images, labels), atol=1e-5)


class BatchSizes(nn.Module):
    """Records the batch size of every forward call of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.model(x)


def test_packed_eot_pgd_on_a_full_batch_is_torchattacks_eotpgd(defense, batch):
    """A batch that fills eot_batch gets one draw per pass: torchattacks' own EOTPGD."""
    images, labels = batch
    outputs = []
    for attack in (
        PackedEOTPGD(defense, 8 / 255, 2 / 255, 3, 4, eot_batch=len(images)),
        torchattacks.EOTPGD(defense, 8 / 255, 2 / 255, 3, 4),
    ):
        torch.manual_seed(5)
        outputs.append(attack(images, labels))
    assert torch.equal(*outputs)


def test_pgd_snapshots_are_the_shorter_runs_from_the_same_start(classifier, batch):
    """With a fixed step size, PGD-k's output is PGD-K's iterate after k steps (same seed)."""
    images, labels = batch
    long = PackedEOTPGD(classifier, 8 / 255, 2 / 255, 5, 1, snapshots=(2, 4))
    torch.manual_seed(3)
    final = long(images, labels)
    assert sorted(long.iterates) == [2, 4]
    for k in (2, 4):
        torch.manual_seed(3)
        alone = torchattacks.EOTPGD(classifier, 8 / 255, 2 / 255, k, 1)(images, labels)
        assert torch.allclose(long.iterates[k], alone, atol=1e-6)
    torch.manual_seed(3)
    assert torch.allclose(
        final, torchattacks.EOTPGD(classifier, 8 / 255, 2 / 255, 5, 1)(images, labels), atol=1e-6
    )
    assert not torch.equal(long.iterates[2], final)
    with pytest.raises(ValueError, match=r"snapshots \[5\] must lie in 1 .. steps - 1 = 4"):
        PackedEOTPGD(classifier, 8 / 255, 2 / 255, 5, 1, snapshots=(5,))
    spec = dict(SMALL_SPECS["pgd_linf_eot"], steps=5)
    assert build_attack(classifier, spec, N_CLASSES, snapshots=(2, 4)).snapshots == (2, 4)
    with pytest.raises(ValueError, match=r"snapshots \[5\] must lie in"):
        build_attack(classifier, spec, N_CLASSES, snapshots=(5,))
    with pytest.raises(ValueError, match="'pgd' attack only, not by 'fgsm'"):
        build_attack(classifier, SMALL_SPECS["fgsm"], N_CLASSES, snapshots=(1,))
    # l2 keeps its iterates the same way
    l2 = EOTPGDL2(classifier, eps=0.5, alpha=0.1, steps=4, eot_iter=1, snapshots=(2,))
    torch.manual_seed(4)
    l2(images, labels)
    torch.manual_seed(4)
    alone = EOTPGDL2(classifier, eps=0.5, alpha=0.1, steps=2, eot_iter=1)(images, labels)
    assert torch.allclose(l2.iterates[2], alone, atol=1e-6)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_packed_eot_fills_each_pass_with_copies_of_a_small_batch(norm, defense, batch):
    images, labels = batch[0][:2], batch[1][:2]
    sizes = BatchSizes(defense)
    eps, alpha = (8 / 255, 2 / 255) if norm == "Linf" else (0.5, 0.1)
    spec = {"name": "pgd", "norm": norm, "eps": eps, "alpha": alpha, "steps": 2, "eot_iter": 8}
    adv = build_attack(sizes, spec, N_CLASSES, eot_batch=6)(images, labels)
    assert sizes.sizes == [6, 6, 4] * 2  # 3 + 3 + 2 draws of 2 images, per step
    linf, l2 = _norms(images, adv)
    assert (linf if norm == "Linf" else l2).max() <= eps + 1e-5 and (linf > 0).all()


def test_packed_eot_averages_one_gradient_and_one_loss_per_draw(classifier, defense, batch):
    """Each copy's gradient lands on its own image: on a deterministic model the packed mean
    is one draw's gradient and loss; on the random defense the copies' draws differ."""
    images, labels = batch[0][:2], batch[1][:2]
    packed = EOTPGDL2(classifier, eot_iter=4, eot_batch=8)
    single = EOTPGDL2(classifier, eot_iter=1)
    loss, grad = packed.eot_loss_gradient(images, labels)
    one_loss, one_grad = single.eot_loss_gradient(images, labels)
    assert torch.allclose(grad, one_grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(loss, one_loss, rtol=1e-5) and loss.shape == (2,)
    noisy = EOTPGDL2(defense, eot_iter=4, eot_batch=8)
    torch.manual_seed(0)
    loss, first = noisy.eot_loss_gradient(images, labels)
    x = images.repeat(4, 1, 1, 1).requires_grad_(True)
    torch.manual_seed(0)
    per_row = F.cross_entropy(defense(x), labels.repeat(4), reduction="none")
    per_copy = torch.autograd.grad(per_row.sum(), x)[0].view(4, *images.shape)
    assert torch.allclose(first, per_copy.mean(0), atol=1e-6)
    assert torch.allclose(loss, per_row.detach().view(4, 2).mean(0), atol=1e-5)
    assert not torch.allclose(per_copy[0], per_copy[1], atol=1e-4)  # independent draws


def test_bpda_mode_toggles_and_restores(defense, classifier):
    assert defense.bpda is False
    with bpda_mode(defense):
        assert defense.bpda is True
    assert defense.bpda is False
    with pytest.raises(RuntimeError), bpda_mode(defense):
        raise RuntimeError("boom")
    assert defense.bpda is False
    with pytest.raises(ValueError, match="no `bpda` option"), bpda_mode(classifier):
        pass
    with pytest.raises(ValueError, match="no `bpda` option"):
        build_attack(classifier, SMALL_SPECS["bpda_eot"], N_CLASSES)


def test_bpda_attack_runs_with_bpda_on_and_restores_it(defense, batch):
    images, labels = batch
    attack = build_attack(defense, SMALL_SPECS["bpda_eot"], N_CLASSES)
    assert isinstance(attack, BPDA) and isinstance(attack.inner, torchattacks.EOTPGD)
    attack(images, labels)
    assert defense.bpda_seen == [True] * (3 * 2)
    assert defense.bpda is False


def test_bpda_gradient_differs_from_exact_gradient(defense, batch):
    images, labels = batch
    x = images.clone().requires_grad_(True)
    torch.manual_seed(5)
    exact = torch.autograd.grad(F.cross_entropy(defense(x), labels), x)[0]
    torch.manual_seed(5)
    with bpda_mode(defense):
        identity = torch.autograd.grad(F.cross_entropy(defense(x), labels), x)[0]
    assert not torch.allclose(exact, identity)


def test_draw_correct_calls_the_model_draws_times_per_batch(defense, batch):
    images, labels = batch
    counter = CallCounter(defense)
    verdicts = draw_correct(counter, images, labels, draws=5, batch_size=4)
    assert counter.calls == 5 * 2
    assert verdicts.dtype == torch.bool and verdicts.shape == (8, 5)
    assert verdicts.device.type == "cpu"
    assert draw_correct(defense, images[:0], labels[:0], 3, 4).shape == (0, 3)


def test_draw_correct_keeps_every_draw_in_its_own_column(classifier, cifar10_test_batch):
    images, labels = cifar10_test_batch[0][:64], cifar10_test_batch[1][:64]
    single = classifier(images).argmax(dim=1) == labels
    assert torch.equal(
        draw_correct(classifier, images, labels, 3, 64), single[:, None].repeat(1, 3)
    )
    # fresh passes, in order: f's class, then the next class, then f's class again
    verdicts = draw_correct(AlternatingModel(classifier), images, labels, 3, 64)
    shifted = classifier(images).argmax(dim=1).add(1).remainder(N_CLASSES) == labels
    assert torch.equal(verdicts[:, 0], single) and torch.equal(verdicts[:, 2], single)
    assert torch.equal(verdicts[:, 1], shifted)
    # the two rules built on the same verdicts (atop.evaluation.protocol.per_image)
    assert torch.equal(per_image(verdicts, "single"), verdicts.float().mean(dim=1))
    assert torch.equal(per_image(verdicts, "worst_of_n"), single & shifted)


def test_n_evaluation_of_a_stochastic_and_a_deterministic_model(classifier, cifar10_test_batch):
    """draw_correct judges with fresh draws: a random model's draws differ, single-draw
    accuracy is their mean, worst-of-N never exceeds it; a deterministic model's draws agree."""
    images, labels = cifar10_test_batch[0][:64], cifar10_test_batch[1][:64]
    random_model = NoisyMaskBlurDefense(classifier, sigma=0.1, missing_rate=0.3).eval()
    torch.manual_seed(0)
    verdicts = draw_correct(random_model, images, labels, draws=8, batch_size=32)
    assert verdicts.shape == (64, 8) and verdicts.dtype == torch.bool
    mixed = verdicts.any(dim=1) & ~verdicts.all(dim=1)
    assert mixed.any(), "fresh draws of a random model should disagree on some image"
    assert any(not torch.equal(verdicts[:, 0], verdicts[:, d]) for d in range(1, 8))
    single = verdicts.float().mean().item()
    assert single == pytest.approx(per_image(verdicts, "single").mean().item())
    worst = per_image(verdicts, "worst_of_n").float().mean().item()
    assert worst == verdicts.all(dim=1).float().mean().item()
    assert worst < single  # strictly: some image is right on some draws only
    assert 0 < single < 1
    fixed = draw_correct(classifier, images, labels, draws=8, batch_size=32)
    assert (fixed == fixed[:, :1]).all()  # deterministic: every draw the same
    assert torch.equal(fixed[:, 0], classifier(images).argmax(dim=1) == labels)
    assert per_image(fixed, "worst_of_n").float().mean() == per_image(fixed, "single").mean()


def test_draw_correct_restores_training_mode(defense, batch):
    defense.train()
    draw_correct(defense, *batch, draws=2, batch_size=8)
    assert defense.training


@pytest.mark.parametrize(
    ("version", "n_classes", "norm", "subs"),
    [
        ("standard", 10, "Linf", ["APGD", "APGDT", "FAB", "Square"]),
        ("standard", 10, "L2", ["APGD", "APGDT", "FAB", "Square"]),
        ("rand", 100, "Linf", ["EOTAPGD", "EOTAPGD"]),  # stochastic: fair APGD, both norms
        ("rand", 10, "L2", ["EOTAPGD", "EOTAPGD"]),
    ],
)
def test_autoattack_sub_attacks_use_the_spec(version, n_classes, norm, subs, defense):
    eps = 8 / 255 if norm == "Linf" else 0.5
    spec = {
        "name": "autoattack", "version": version, "norm": norm, "eps": eps,
        "steps": 100, "seed": 3, "n_queries": 777, "eot_iter": 7, "draws": 4,
    }  # fmt: skip
    attack = build_attack(defense, spec, n_classes, eot_batch=64)
    multi = attack if version == "rand" else attack._autoattack
    assert isinstance(multi, RejudgedMultiAttack) and multi.draws == 4
    assert [type(sub).__name__ for sub in multi.attacks] == subs
    for sub in multi.attacks:
        assert sub.eps == eps and sub.norm == norm
        if isinstance(sub, torchattacks.Square):
            assert sub.n_queries == 777
        else:
            assert sub.steps == 100
        if isinstance(sub, (torchattacks.APGDT, torchattacks.FAB)):
            assert sub.n_target_classes == n_classes - 1
        if version == "rand":
            assert sub.eot_iter == 7 and sub.eot_batch == 64
    if version == "rand":
        assert [apgd.loss for apgd in multi.attacks] == [attacks_module._cross_entropy, dlr_loss]
    else:  # the sub-attacks are registered, so mode switches reach them
        assert set(attack._attacks.values()) >= {multi, *multi.attacks}


def test_autoattack_standard_runs_under_bf16_autocast_and_is_unchanged_in_fp32(classifier, batch):
    """torchattacks' APGD-T and Square fail on bf16 logits; FloatLogits hands them float32
    logits, and is the identity in float32 (the same output as the bare model's attack)."""
    images, labels = batch
    spec = SMALL_SPECS["autoattack_standard"]
    attack = build_attack(classifier, spec, N_CLASSES)
    assert isinstance(attack.model, FloatLogits) and attack.model.model is classifier
    torch.manual_seed(0)
    fp32 = run_attack(attack, images, labels, batch_size=8, progress=False)
    bare = torchattacks.AutoAttack(
        classifier, norm="Linf", eps=spec["eps"], version="standard", n_classes=N_CLASSES, seed=0
    )
    for sub in bare._autoattack.attacks:
        setattr(sub, "n_queries" if isinstance(sub, torchattacks.Square) else "steps",
                spec["n_queries"] if isinstance(sub, torchattacks.Square) else spec["steps"])  # fmt: skip
    bare._autoattack = RejudgedMultiAttack(bare._autoattack.attacks, draws=spec["draws"])
    torch.manual_seed(0)
    assert torch.equal(fp32, run_attack(bare, images, labels, batch_size=8, progress=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        bf16 = run_attack(attack, images, labels, batch_size=8, progress=False)
    assert bf16.dtype == torch.float32 and (bf16 - images).abs().max() <= spec["eps"] + 1e-6
    # the wrapper has no mode of its own: the attack leaves the model in the mode it found
    assert not classifier.training and not attack.model.training
    wrapper = FloatLogits(classifier)
    assert wrapper.train().training and classifier.training
    assert not wrapper.eval().training and not classifier.training


def test_rejudged_multiattack_keeps_each_images_worst_example(classifier, batch):
    images, labels = batch
    weak = torchattacks.FGSM(classifier, eps=1 / 255)
    strong = torchattacks.PGD(classifier, eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)
    adv = RejudgedMultiAttack([weak, strong], draws=3)(images, labels)
    per_attack = [
        draw_correct(classifier, weak(images, labels), labels, 1, 8),
        draw_correct(classifier, strong(images, labels), labels, 1, 8),
    ]
    assert torch.equal(
        draw_correct(classifier, adv, labels, 1, 8)[:, 0], worst_case(per_attack, "worst_of_n")
    )


#: Draws per judgement of the scripted model below.
SCRIPT_DRAWS = 4


class ScriptedDraws(nn.Module):
    """A "random" model whose fresh draws are scripted by the image: an image whose pixel
    (0, 0, 0) is ``k / SCRIPT_DRAWS`` is classified right (as pixel (1, 0, 0) * 10) by the
    first ``k`` of every ``SCRIPT_DRAWS`` consecutive calls, wrong by the others."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # a device for torchattacks
        self.calls = 0

    def forward(self, x):
        draw = self.calls % SCRIPT_DRAWS
        self.calls += 1
        right = (x[:, 0, 0, 0] * SCRIPT_DRAWS).round().long()
        label = (x[:, 1, 0, 0] * 10).round().long()
        predicted = torch.where(draw < right, label, (label + 1) % N_CLASSES)
        return F.one_hot(predicted, N_CLASSES).float() + 0 * self.weight


class ScriptedAttack(Attack):
    """Sets, per image (its id: pixel (2, 0, 0) * 100), how many draws get it right, and
    writes its own ``tag`` into pixel (0, 1, 1); records the ids it was given."""

    def __init__(self, model, tag: int, right_draws: dict[int, int]):
        super().__init__(f"Scripted{tag}", model)
        self.tag, self.right_draws, self.seen = tag, right_draws, []

    def forward(self, images, labels):
        ids = (images[:, 2, 0, 0] * 100).round().long().tolist()
        self.seen.append(ids)
        out = images.clone()
        out[:, 0, 0, 0] = torch.tensor([self.right_draws[i] for i in ids]) / SCRIPT_DRAWS
        out[:, 0, 1, 1] = self.tag / 10
        return out


def _scripted_images(labels: list[int]) -> torch.Tensor:
    images = torch.full((len(labels), 3, 4, 4), 0.5)
    images[:, 0, 0, 0] = 1.0  # clean: every draw right
    images[:, 1, 0, 0] = torch.tensor(labels) / 10
    images[:, 2, 0, 0] = torch.arange(len(labels)) / 100
    return images


def test_rejudged_multiattack_keeps_the_example_with_the_fewest_right_draws():
    model = ScriptedDraws()
    labels = torch.tensor([3, 1, 4, 1, 5])
    images = _scripted_images(labels.tolist())
    # right draws (of 4) per image id after each attack
    a = ScriptedAttack(model, 1, {0: 0, 1: 3, 2: 2, 3: 4, 4: 1})
    b = ScriptedAttack(model, 2, {1: 1, 2: 2, 3: 4, 4: 3})
    c = ScriptedAttack(model, 3, {1: 0, 2: 1, 3: 4, 4: 2})
    assert draw_correct(model, images, labels, SCRIPT_DRAWS, 5).all()  # the script works
    adv = RejudgedMultiAttack([a, b, c], draws=SCRIPT_DRAWS)(images, labels)
    # image 0 (no draw right after a) is not attacked again; every other image is, even
    # those that draws already get wrong (not stopped by one lucky or unlucky draw)
    assert a.seen == [[0, 1, 2, 3, 4]] and b.seen == c.seen == [[1, 2, 3, 4]]
    # per image: the example with the fewest right draws, the earlier one on a tie
    assert (adv[:, 0, 1, 1] * 10).round().long().tolist() == [1, 3, 3, 1, 1]
    right = draw_correct(model, adv, labels, SCRIPT_DRAWS, 5).sum(dim=1)
    assert right.tolist() == [0, 0, 1, 4, 1]
    # once every image is broken, the remaining attacks do not run
    first = ScriptedAttack(model, 1, dict.fromkeys(range(5), 0))
    second = ScriptedAttack(model, 2, dict.fromkeys(range(5), 0))
    RejudgedMultiAttack([first, second], draws=SCRIPT_DRAWS)(images, labels)
    assert len(first.seen) == 1 and second.seen == []
    with pytest.raises(ValueError, match="draws"):
        RejudgedMultiAttack([first, second], draws=0)


class FirstPassRecorder(nn.Module):
    """Records the predictions of every forward pass of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.predictions: list[torch.Tensor] = []

    def forward(self, x):
        logits = self.model(x)
        self.predictions.append(logits.detach().argmax(dim=1))
        return logits


def test_autoattack_rand_attacks_the_images_one_draw_got_wrong(classifier, cifar10_test_batch):
    """torchattacks' APGD judges the clean images with ONE draw and never attacks those it
    got wrong (returned clean); EOTAPGD, which AutoAttack-rand uses, attacks every image and
    returns an example within ε for each."""
    images, labels = cifar10_test_batch[0][:16].contiguous(), cifar10_test_batch[1][:16]
    eps = 8 / 255
    recorder = FirstPassRecorder(NoisyMaskBlurDefense(classifier).eval())
    spec = {
        "name": "autoattack", "version": "rand", "norm": "Linf", "eps": eps, "steps": 2,
        "seed": 0, "eot_iter": 2, "draws": 3,
    }  # fmt: skip
    attack = build_attack(recorder, spec, N_CLASSES)
    apgd_ce = attack.attacks[0]
    assert type(apgd_ce) is EOTAPGD

    # the case: torchattacks' APGD on the same model leaves the single-draw misses clean
    plain = torchattacks.APGD(recorder, norm="Linf", eps=eps, steps=2, eot_iter=2, seed=0)
    torch.manual_seed(0)
    adv = plain(images, labels)
    missed = recorder.predictions[0] != labels  # its first pass: the clean images, one draw
    assert missed.any() and (~missed).any()
    assert torch.equal(adv[missed], images[missed])

    torch.manual_seed(0)
    adv = apgd_ce(images, labels)
    moved = (adv - images).flatten(1).abs().amax(dim=1)
    assert (moved[missed] > 0).all() and (moved > 0).all()  # every image attacked
    assert moved.max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1

    # the whole AutoAttack-rand: every output is a perturbed example within eps
    torch.manual_seed(0)
    adv = run_attack(attack, images, labels, batch_size=16, progress=False)
    moved = (adv - images).flatten(1).abs().amax(dim=1)
    assert (moved > 0).all() and moved.max() <= eps + 1e-6


class _RecordingAPGD(EOTAPGD):
    """EOTAPGD keeping every iterate and the EOT-mean loss it judged it by."""

    def eot_loss_gradient(self, images, labels, loss=None):
        mean, grad = super().eot_loss_gradient(images, labels, loss)
        self.seen.append((images.detach().clone(), mean.clone()))
        return mean, grad


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_eot_apgd_returns_the_iterate_with_the_highest_eot_mean_loss(norm, defense, batch):
    """The returned example is, per image, the iterate whose loss averaged over the
    ``eot_iter`` draws was highest (never one draw's loss), within ε for every image."""
    images, labels = batch[0][:6], batch[1][:6]
    eps = 8 / 255 if norm == "Linf" else 0.5
    attack = _RecordingAPGD(defense, norm, eps, steps=6, eot_iter=4, loss="ce", eot_batch=24)
    attack.seen = []
    torch.manual_seed(0)
    adv = attack(images, labels)
    assert len(attack.seen) == 7  # the start and six steps, each one EOT-mean evaluation
    losses = torch.stack([loss for _, loss in attack.seen])  # [7, N]
    best = losses.argmax(dim=0)
    expected = torch.stack([attack.seen[int(k)][0][i] for i, k in enumerate(best)])
    assert torch.equal(adv, expected)
    linf, l2 = _norms(images, adv)
    assert (linf if norm == "Linf" else l2).max() <= eps + 1e-5 and (linf > 0).all()
    # DLR needs three classes; it is zero-margin invariant: a shift of every logit keeps it
    logits = torch.randn(5, 10)
    targets = torch.randint(0, 10, (5,))
    assert torch.allclose(dlr_loss(logits, targets), dlr_loss(logits + 3.0, targets))


def test_apgd_checkpoints_follow_the_paper():
    """Croce & Hein 2020, Sec. 3.1: p_0 = 0, p_1 = 0.22, shrinking gaps, at least 0.06."""
    assert apgd_checkpoints(100) == [0, 22, 41, 58, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10)[:3] == [0, 3, 5]


def test_eot_apgd_is_as_strong_as_torchattacks_apgd_on_a_deterministic_model(classifier, batch):
    """On a deterministic model (one draw is the EOT mean) the two APGDs are the same
    algorithm: their robust accuracies agree within a few images."""
    images, labels = batch
    eps = 8 / 255
    torch.manual_seed(0)
    ours = EOTAPGD(classifier, "Linf", eps, steps=10)(images, labels)
    theirs = torchattacks.APGD(classifier, norm="Linf", eps=eps, steps=10, seed=0)(images, labels)
    with torch.no_grad():
        acc_ours = (classifier(ours).argmax(1) == labels).float().mean().item()
        acc_theirs = (classifier(theirs).argmax(1) == labels).float().mean().item()
    assert acc_ours <= acc_theirs + 2 / len(labels)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "deepfool"}, r"valid names: \['autoattack', 'bpda', 'cw', 'fgsm', 'pgd'\]"),
        ({"eps": 0.1}, "must be a mapping with a 'name'"),
        ({"name": "pgd", "norm": "Linf", "eps": 0.03, "step": 10}, r"missing keys \['alpha'"),
        ({"name": "fgsm", "eps": 0.03, "alpha": 0.01}, r"unknown keys \['alpha'\]"),
        ({"name": "pgd", "norm": "L1", "eps": 1, "alpha": 1, "steps": 1, "eot_iter": 1}, "norm"),
        ({"name": "pgd", "norm": "L2", "eps": -1, "alpha": 1, "steps": 1, "eot_iter": 1}, "eps"),
        ({"name": "pgd", "norm": "L2", "eps": 1, "alpha": 1, "steps": 1.5, "eot_iter": 1}, "steps"),
        ({"name": "fgsm", "eps": 0.5, "norm": "L2"}, "Linf"),
        (
            {
                "name": "autoattack",
                "version": "plus",
                "norm": "Linf",
                "eps": 0.03,
                "steps": 1,
                "seed": 0,
            },
            "version",
        ),
        (
            {
                "name": "autoattack",
                "version": "rand",
                "norm": "Linf",
                "eps": 0.03,
                "steps": 1,
                "seed": None,
            },
            "seed",
        ),
    ],
)
def test_bad_specs_raise_clear_errors(spec, match, classifier):
    with pytest.raises(ValueError, match=match):
        build_attack(classifier, spec, N_CLASSES)


def test_bad_inputs_raise_clear_errors(classifier, batch):
    images, labels = batch
    attack = build_attack(classifier, SMALL_SPECS["fgsm"], N_CLASSES)
    with pytest.raises(ValueError, match="float32"):
        run_attack(attack, (images * 255).to(torch.uint8), labels, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run_attack(attack, images * 2, labels, 8)
    with pytest.raises(ValueError, match="labels must be int64"):
        draw_correct(classifier, images, labels[:3], 2, 8)
    with pytest.raises(ValueError, match="draws"):
        draw_correct(classifier, images, labels, 0, 8)
    with pytest.raises(ValueError, match="batch_size"):
        draw_correct(classifier, images, labels, 2, 0)
    with pytest.raises(ValueError, match="n_classes"):
        build_attack(classifier, SMALL_SPECS["fgsm"], 0)


def test_works_on_the_project_defense(classifier, batch):
    """BPDA+EOT and fresh-draw judging on atop.defense.PurifiedClassifier (RT2 + purifier)."""
    from atop.defense import PurifiedClassifier
    from atop.models.purifier import build_purifier
    from atop.transforms import RandomTransform

    images, labels = batch[0][:2], batch[1][:2]
    torch.manual_seed(0)
    generator, _ = build_purifier({"cnum": 8})
    defense = PurifiedClassifier(classifier, generator.eval(), RandomTransform("rt2")).eval()
    spec = {**SMALL_SPECS["bpda_eot"], "steps": 1, "eot_iter": 2}
    adv = run_attack(build_attack(defense, spec, N_CLASSES), images, labels, 2, progress=False)
    assert defense.bpda is False
    assert (adv - images).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    counter = CallCounter(defense)
    verdicts = draw_correct(counter, adv, labels, draws=3, batch_size=2)
    assert verdicts.shape == (2, 3) and counter.calls == 3

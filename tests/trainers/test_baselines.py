"""Tests of the PGD-AT and RvS training steps (atop.trainers.pgd_at, atop.trainers.rvs) on
real CIFAR-10 images."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from atop.models.classifiers import build_classifier
from atop.models.rvs import RvSGenerator, sample_adversarial
from atop.ot import entropic_ot
from atop.params import ParameterError
from atop.trainers.pgd_at import PGDTrainAttackParams, pgd_at_step, pgd_attack
from atop.trainers.rvs import (
    features_of,
    rvs_classifier_loss,
    rvs_classifier_step,
    rvs_generator_loss,
    rvs_generator_step,
    rvs_step,
)

EPS = 8 / 255
N_IMAGES = 16


@pytest.fixture(scope="module")
def batch(cifar10_test_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """16 real CIFAR-10 test images float32 [16, 3, 32, 32] in [0, 1] and int64 labels."""
    images, labels = cifar10_test_batch
    return images[:N_IMAGES], labels[:N_IMAGES]


def tiny_classifier(seed: int = 0):
    """The project's fast ResNet at width 8 (a few seconds per test), train mode."""
    torch.manual_seed(seed)
    return build_classifier("resnet-fast", num_classes=10, width=8).train()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def attack_params(eps: float = EPS, alpha: float = 2 / 255, steps: int = 10):
    """The training attack block (Madry et al.: eps 8/255, step 2/255, 10 steps)."""
    return PGDTrainAttackParams(eps=eps, alpha=alpha, steps=steps)


def madry_pgd(model, **kwargs):
    """:func:`pgd_attack` on ``model`` for the 10 CIFAR-10 classes."""
    return pgd_attack(model, attack_params(**kwargs), n_classes=10)


# ----------------------------------------------------------------------------- PGD-AT


def test_pgd_attack_stays_in_the_eps_ball_and_raises_the_loss(batch):
    x, y = batch
    model = tiny_classifier()
    attack = madry_pgd(model, eps=EPS, alpha=2 / 255, steps=10)
    torch.manual_seed(0)
    x_adv = attack(x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_pgd_attack_is_torchattacks_pgd_with_a_random_start(batch):
    """The training attack is the evaluation's ``pgd`` with one EOT sample: the same
    adversarial examples as ``torchattacks.PGD`` (random start) from the same seed."""
    x, y = batch
    model = tiny_classifier().eval()
    torch.manual_seed(5)
    ours = madry_pgd(model, steps=3)(x, y)
    torch.manual_seed(5)
    reference = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=3, random_start=True)(x, y)
    assert torch.equal(ours, reference)


def test_pgd_at_lowers_the_adversarial_loss_on_a_fixed_batch(batch):
    x, y = batch
    model = tiny_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    attack = madry_pgd(model, steps=3)  # fewer PGD steps keep the test fast
    torch.manual_seed(0)
    losses = [pgd_at_step(model, optimizer, x, y, attack=attack)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0]


def test_pgd_at_leaves_the_model_in_train_mode(batch):
    x, y = batch
    model = tiny_classifier().eval()  # whatever mode the caller left
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = pgd_at_step(model, optimizer, x, y, attack=madry_pgd(model, steps=2))
    assert set(out) == {"loss", "adv_acc"} and all(isinstance(v, float) for v in out.values())
    assert all(module.training for module in model.modules())


def test_pgd_at_rejects_an_attack_on_another_model(batch):
    x, y = batch
    model = tiny_classifier()
    other = madry_pgd(tiny_classifier(1), steps=1)
    with pytest.raises(ValueError, match="pgd_attack"):
        pgd_at_step(model, torch.optim.SGD(model.parameters(), lr=0.01), x, y, attack=other)


@pytest.mark.parametrize(("kwargs", "match"), [({"eps": 8.0}, "eps"), ({"steps": 0}, "steps")])
def test_bad_pgd_settings_raise(kwargs, match):
    # refused when the attack block is built, before any attack on a model
    with pytest.raises(ParameterError, match=match):
        attack_params(**kwargs)


# -------------------------------------------------------------------------------- RvS


def test_generator_step_raises_the_ot_term_with_the_classifier_fixed(batch):
    x, _ = batch
    classifier = tiny_classifier()
    torch.manual_seed(0)
    generator = RvSGenerator(eps=EPS).train()
    optimizer = torch.optim.SGD(generator.parameters(), lr=0.01, momentum=0.9)
    frozen = copy.deepcopy(classifier.state_dict())

    def ot_now() -> float:  # same noise (seed 1) every time
        with torch.no_grad():
            return rvs_generator_loss(
                classifier, generator, x, ot_fn=entropic_ot, rng=seeded(1)
            ).item()

    before = ot_now()
    returned = rvs_generator_step(
        classifier, generator, optimizer, x, ot_fn=entropic_ot, rng=seeded(1)
    )
    after = ot_now()
    assert returned == pytest.approx(before, rel=1e-5)
    assert after > before
    # the classifier did not move and got no gradient
    for name, value in classifier.state_dict().items():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(value, frozen[name])
    assert all(p.grad is None for p in classifier.parameters())


def test_classifier_step_lowers_its_loss_on_the_same_samples(batch):
    x, y = batch
    classifier = tiny_classifier()
    torch.manual_seed(0)
    generator = RvSGenerator(eps=EPS)
    with torch.no_grad():
        x_adv = sample_adversarial(generator, x, rng=seeded(2))
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.01, momentum=0.9)
    generator_before = copy.deepcopy(generator.state_dict())
    kwargs = {"ot_fn": entropic_ot, "label_smoothing": 0.5, "ot_weight": 1.0}

    with torch.no_grad():
        before, _ = rvs_classifier_loss(classifier, x, x_adv, y, **kwargs)
    terms = rvs_classifier_step(classifier, optimizer, x, x_adv, y, **kwargs)
    with torch.no_grad():
        after, _ = rvs_classifier_loss(classifier, x, x_adv, y, **kwargs)
    assert terms["loss"] == pytest.approx(before.item(), rel=1e-5)
    assert terms["loss"] == pytest.approx(terms["ce"] + terms["ot"], rel=1e-5)
    assert after < before
    for name, value in generator.state_dict().items():
        torch.testing.assert_close(value, generator_before[name])


def test_label_smoothing_follows_the_authors_formula(batch):
    """True class keeps 1 - s, each other class gets s / (K - 1) (s = 0.5, K = 10); in float32
    (amp off: on a CPU with bf16 units autocast would round the logits)."""
    x, y = batch
    classifier = tiny_classifier()
    with torch.no_grad():
        _, terms = rvs_classifier_loss(
            classifier, x, x, y, ot_fn=entropic_ot, label_smoothing=0.5, ot_weight=0.0, amp=False
        )
        logits, _ = features_of(classifier, x)
    target = torch.full((len(y), 10), 0.5 / 9)
    target[torch.arange(len(y)), y] = 0.5
    expected = -(target * logits.log_softmax(1)).sum(1).mean()
    assert terms["ce"] == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        rvs_classifier_loss(classifier, x, x, y, ot_fn=entropic_ot, label_smoothing=0.95)


def test_rvs_step_trains_both_networks_and_reports_its_terms(batch):
    x, y = batch
    classifier = tiny_classifier()
    torch.manual_seed(0)
    generator = RvSGenerator(eps=EPS)
    opt_c = torch.optim.SGD(classifier.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.01, momentum=0.9)
    c0 = classifier.head.weight.detach().clone()
    g0 = generator.fc.weight.detach().clone()
    out = rvs_step(classifier, generator, opt_c, opt_g, x, y, ot_fn=entropic_ot, rng=seeded(0))
    assert set(out) == {"loss", "ce", "ot", "adv_acc", "generator_ot"}
    assert all(isinstance(v, float) and v == v for v in out.values())
    assert out["ot"] >= 0 and out["generator_ot"] >= 0
    assert not torch.equal(classifier.head.weight, c0)
    assert not torch.equal(generator.fc.weight, g0)


def test_features_of_rejects_a_classifier_without_features(batch):
    with pytest.raises(TypeError, match="return_features"):
        features_of(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10)), batch[0])

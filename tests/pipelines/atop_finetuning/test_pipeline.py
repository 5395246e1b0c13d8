"""AToP fine-tuning (paper Eq. 9, Algorithm 1) on real CIFAR-10 images."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from atop.attacks import build_attack
from atop.datasets import TorchDataset
from atop.defense import PurifiedClassifier
from atop.models import build_classifier, classifier_checkpoint
from atop.models.purifier import build_purifier, load_purifier, purifier_checkpoint
from atop.pipelines.atop_finetuning import create_pipeline
from atop.trainers.atop import AToPParams, atop_train_step
from atop.trainers.purifier import PurifierStep
from atop.training import Batches, LoopConfig, fit
from atop.transforms import RandomTransform
from tests.conftest import KeptMemoryDataset, stage_params

EPS = 8 / 255
TRANSFORM = {
    "kind": "rt2",
    "sigma": 0.25,
    "missing_rate": 0.25,
    "mask_block": None,
    "mask_number": 4,
}


@pytest.fixture(scope="module")
def classifier(cifar10_test_batch):
    """A small classifier trained for a few seconds on real images (right on some of them)."""
    torch.manual_seed(0)
    images, labels = cifar10_test_batch
    model = build_classifier("resnet-fast", 10, width=8)
    uint8 = (images * 255).round().to(torch.uint8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    batches = Batches(uint8, labels, 64, shuffle=True, generator=torch.Generator().manual_seed(0))
    fit(
        modules={"f": model},
        optimizers={"sgd": optimizer},
        train_step=step,
        batches=batches,
        config=LoopConfig(epochs=3, progress=False),
    )
    model.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False)


def make_step(generator, discriminator, transform, lr=1e-4, l1_weight=1.0, gan_weight=1.0):
    adam = {"lr": lr, "betas": (0.5, 0.999)}
    return PurifierStep(
        generator,
        discriminator,
        transform,
        torch.optim.Adam(generator.parameters(), **adam),
        torch.optim.Adam(discriminator.parameters(), **adam),
        l1_weight=l1_weight,
        gan_weight=gan_weight,
    )


def ce_on_purified(classifier, generator, transform, x_adv, y, seed=7) -> float:
    """CE of f(g(t(x'))) for the transform draw made from global seed ``seed``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return F.cross_entropy(
            PurifiedClassifier(classifier, generator, transform)(x_adv), y
        ).item()


def test_one_step_lowers_ce_and_only_the_purifier_changes(classifier, cifar10_test_batch):
    torch.manual_seed(0)
    x, y = cifar10_test_batch[0][:32], cifar10_test_batch[1][:32]
    generator, discriminator = build_purifier({"cnum": 8})
    transform = RandomTransform(**TRANSFORM)
    defense = PurifiedClassifier(classifier, generator, transform)
    attack = build_attack(defense, {"name": "fgsm", "eps": EPS}, 10)
    x_adv = attack(x, y).detach()
    fixed_attack = lambda images, labels: x_adv  # noqa: E731  (the same x' before and after)

    # Only the CE term (lambda = 1, L_org off): the first Adam step is a small sign-descent
    # step (|delta theta| ~ lr), which lowers the loss to first order.
    step = make_step(generator, discriminator, transform, lr=1e-4, l1_weight=0.0, gan_weight=0.0)
    train_step = atop_train_step(classifier, step, fixed_attack, lambda_cls=1.0)
    f_before = copy.deepcopy(classifier.state_dict())
    g_before = copy.deepcopy(generator.state_dict())
    ce_before = ce_on_purified(classifier, generator, transform, x_adv, y)
    torch.manual_seed(7)  # the step draws t exactly as ce_on_purified does
    terms = train_step(x, y)
    ce_after = ce_on_purified(classifier, generator, transform, x_adv, y)

    assert ce_after < ce_before
    assert set(terms) >= {"loss", "l1", "gan_g", "d_loss", "ce"}
    assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in f_before.items())
    changed = [k for k, v in generator.state_dict().items() if not torch.equal(v, g_before[k])]
    assert len(changed) > 0.5 * len(g_before)
    assert all(p.grad is None for p in classifier.parameters())


def test_paper_loss_step_runs_and_updates_g(classifier, cifar10_test_batch):
    """Eq. 9 with the paper's weights: L_org(x') + 0.1 * CE; every term is reported."""
    torch.manual_seed(1)
    x, y = cifar10_test_batch[0][:16], cifar10_test_batch[1][:16]
    generator, discriminator = build_purifier({"cnum": 8})
    transform = RandomTransform(**TRANSFORM)
    attack = build_attack(
        PurifiedClassifier(classifier, generator, transform), {"name": "fgsm", "eps": EPS}, 10
    )
    d_before = copy.deepcopy(discriminator.state_dict())
    terms = atop_train_step(
        classifier, make_step(generator, discriminator, transform), attack, lambda_cls=0.1
    )(x, y)
    assert torch.isclose(terms["loss"], terms["l1"] + terms["gan_g"] + 0.1 * terms["ce"], atol=1e-5)
    assert any(not torch.equal(v, discriminator.state_dict()[k]) for k, v in d_before.items())


def test_attack_target_changes_the_gradients(classifier, cifar10_test_batch):
    """Target 'classifier' = FGSM on f alone (the authors' code); 'defense' goes through g and t."""
    torch.manual_seed(2)
    x, y = cifar10_test_batch[0][:16], cifar10_test_batch[1][:16]
    generator, _ = build_purifier({"cnum": 8})
    defense = PurifiedClassifier(classifier, generator, RandomTransform(**TRANSFORM))
    on_f = build_attack(classifier, {"name": "fgsm", "eps": EPS}, 10)(x, y)
    on_defense = build_attack(defense, {"name": "fgsm", "eps": EPS}, 10)(x, y)

    x_req = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(classifier(x_req), y), x_req)[0]
    manual = (x + EPS * grad.sign()).clamp(0, 1)
    assert torch.allclose(on_f, manual, atol=1e-6)
    assert (on_defense != on_f).float().mean() > 0.2


def base_params(**changes) -> AToPParams:
    """The smoke profile's typed parameters (deep-merged over base) on the CPU, with ``changes``."""
    return stage_params("atop_finetuning", device="cpu", **changes)


def run_stage(params, classifier_ckpt, purifier_ckpt, train_set):
    catalog = DataCatalog()
    catalog["classifier"] = MemoryDataset(classifier_ckpt)
    catalog["purifier"] = MemoryDataset(purifier_ckpt)
    catalog["train_set"] = MemoryDataset(train_set)
    catalog["class_names"] = MemoryDataset([str(i) for i in range(10)])
    catalog["params:atop_finetuning"] = MemoryDataset(params)
    for name in ("atop_purifier", "atop_history", "atop_metrics"):
        catalog[name] = KeptMemoryDataset()
    SequentialRunner().run(create_pipeline(), catalog)
    return [catalog[n].load() for n in ("atop_purifier", "atop_history", "atop_metrics")]


@pytest.fixture(scope="module")
def stage_inputs(classifier, cifar10_test_batch):
    images, labels = cifar10_test_batch
    train_set = {"images": (images * 255).round().to(torch.uint8), "labels": labels}
    generator, discriminator = build_purifier({"cnum": 8})
    purifier_ckpt = purifier_checkpoint(generator, discriminator, meta={"transform": TRANSFORM})
    return (
        classifier_checkpoint(classifier, "resnet-fast", {"num_classes": 10, "width": 8}),
        purifier_ckpt,
        train_set,
    )


def test_stage_smoke_profile(stage_inputs, tmp_path):
    classifier_ckpt, purifier_ckpt, train_set = stage_inputs
    params = base_params(resume_path=str(tmp_path / "resume.pt"))
    checkpoint, history, metrics = run_stage(params, classifier_ckpt, purifier_ckpt, train_set)

    TorchDataset(str(tmp_path / "atop.pt")).save(checkpoint)
    generator, discriminator = load_purifier(TorchDataset(str(tmp_path / "atop.pt")).load())
    assert discriminator is not None
    assert checkpoint["meta"]["transform"] == TRANSFORM
    assert checkpoint["meta"]["atop"]["attack_target"] == "defense"
    before, _ = load_purifier(purifier_ckpt)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(before.state_dict().values(), generator.state_dict().values(), strict=True)
    )
    assert isinstance(history, pd.DataFrame)
    assert {"epoch", "loss", "l1", "gan_g", "d_loss", "ce", "val_clean_acc", "val_adv_acc"} <= set(
        history.columns
    )
    assert 0.0 <= metrics["val_adv_acc"] <= 1.0 and metrics["n_train"] == 64
    assert not (tmp_path / "resume.pt").exists()  # removed after success


def test_stage_resumes_after_interruption(stage_inputs, tmp_path, monkeypatch):
    import atop.trainers.atop as trainer  # the training loop is looked up there

    classifier_ckpt, purifier_ckpt, train_set = stage_inputs
    params = base_params(epochs=2, resume_path=str(tmp_path / "resume.pt"))
    real_fit = trainer.fit
    steps = {"n": 0}

    def fit_counting_steps(interrupt: bool):
        def wrapped(**kwargs):
            evaluated = []
            evaluate, step = kwargs["evaluate"], kwargs["train_step"]

            def evaluate_and_record(epoch):
                evaluated.append(epoch)
                return evaluate(epoch)

            def counted_step(x, y):
                if interrupt and evaluated:  # first batch of epoch 2
                    raise RuntimeError("simulated interruption")
                steps["n"] += 1
                return step(x, y)

            return real_fit(
                **{**kwargs, "evaluate": evaluate_and_record, "train_step": counted_step}
            )

        return wrapped

    monkeypatch.setattr(trainer, "fit", fit_counting_steps(interrupt=True))
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_stage(params, classifier_ckpt, purifier_ckpt, train_set)
    assert (tmp_path / "resume.pt").exists() and steps["n"] == 2

    monkeypatch.setattr(trainer, "fit", fit_counting_steps(interrupt=False))
    _, history, _ = run_stage(params, classifier_ckpt, purifier_ckpt, train_set)
    assert history["epoch"].tolist() == [1, 2]
    assert steps["n"] == 4  # the resumed run trained epoch 2 only (2 batches)
    assert not (tmp_path / "resume.pt").exists()


def test_missing_transform_in_purifier_checkpoint(stage_inputs):
    classifier_ckpt, purifier_ckpt, train_set = stage_inputs
    broken = {**purifier_ckpt, "meta": {}}
    with pytest.raises(Exception, match="meta.transform"):
        run_stage(base_params(), classifier_ckpt, broken, train_set)

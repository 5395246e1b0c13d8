"""AToP fine-tuning (paper Eq. 9, Algorithm 1) and its compute-matched arms on real CIFAR-10."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

import atop.trainers.atop as trainer
from atop.attacks import build_attack
from atop.datasets import TorchDataset
from atop.defense import PurifiedClassifier
from atop.models import build_classifier, classifier_checkpoint
from atop.models.purifier import build_purifier, load_purifier, purifier_checkpoint
from atop.pipelines.atop_finetuning import create_pipeline
from atop.pipelines.atop_finetuning.nodes import MAIN_ARMS, finetune_node
from atop.pipelines.atop_finetuning.pipeline import arm_nodes, create_pgd_pipeline
from atop.trainers.atop import ArmParams, AToPParams, atop_train_step, finetune_purifier
from atop.trainers.purifier import PurifierStep
from atop.training import Batches, LoopConfig, fit
from atop.transforms import RandomTransform
from tests.conftest import PROJECT_ROOT, KeptMemoryDataset, stage_params

EPS = 8 / 255
#: The base profile's transform: the authors' noise, sigma 0.25 at 256 px.
TRANSFORM = {
    "kind": "rt2",
    "sigma": 0.25,
    "missing_rate": 0.25,
    "mask_block": None,
    "mask_number": 4,
    "noise_resolution": 256,
}
ALL_ARMS = (*MAIN_ARMS, "atop_pgd")
#: The monitor subset of these tests: 40 of the 256 test images (the first 32 validate).
MONITOR = list(range(0, 240, 6))


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


def test_arm_without_attack_trains_on_the_clean_images(cifar10_test_batch):
    """attack=None (the control arms): x' = x, the step restores x from t(x)."""
    x, y = cifar10_test_batch[0][:8], cifar10_test_batch[1][:8]
    calls = []

    def step(x_in, target, extra):
        calls.append((x_in, target))
        return {"loss": extra(x_in)[0]}

    classifier = lambda images: torch.zeros(len(images), 10)  # noqa: E731
    train_step = atop_train_step(classifier, step, None, lambda_cls=0.5)
    terms = train_step(x, y)
    assert calls[0][0] is x and calls[0][1] is x
    assert terms["loss"].item() == pytest.approx(0.5 * torch.log(torch.tensor(10.0)).item())


def base_params(**changes) -> AToPParams:
    """The smoke profile's typed parameters (deep-merged over base) on the CPU, with ``changes``."""
    return stage_params("atop_finetuning", device="cpu", **changes)


def outputs(arm: str) -> tuple[str, str, str]:
    """The outputs of arm ``arm``'s node, in the order Kedro saves them: the checkpoint last
    (a failed save of the history or metrics leaves the previous checkpoint)."""
    return f"finetuning_history_{arm}", f"finetuning_metrics_{arm}", f"purifier_{arm}"


def run_stage(params, classifier_ckpt, purifier_ckpt, splits, arms=("atop",), pipeline=None):
    """Run the nodes of ``arms`` (or ``pipeline``, whose arms they are) on an in-memory
    catalog; returns {arm: [history, metrics, checkpoint]} (:func:`outputs`' order)."""
    train_set, test_set = splits
    catalog = DataCatalog()
    catalog["classifier"] = MemoryDataset(classifier_ckpt)
    catalog["purifier"] = MemoryDataset(purifier_ckpt)
    catalog["train_set"] = MemoryDataset(train_set)
    catalog["test_set"] = MemoryDataset(test_set)
    catalog["monitor_indices"] = MemoryDataset(MONITOR)
    catalog["class_names"] = MemoryDataset([str(i) for i in range(10)])
    catalog["params:atop_finetuning"] = MemoryDataset(params)
    for arm in arms:
        for name in outputs(arm):
            catalog[name] = KeptMemoryDataset()
    SequentialRunner().run(pipeline or Pipeline(arm_nodes(arms)), catalog)
    return {arm: [catalog[name].load() for name in outputs(arm)] for arm in arms}


@pytest.fixture(scope="module")
def splits(data_root, cifar10_test_batch):
    """256 real training images (data_batch_1) and the 256 real test images, as uint8."""
    with open(data_root / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")  # the official CIFAR-10 python format
    images = torch.from_numpy(np.asarray(batch["data"][:256], dtype=np.uint8))
    train = {
        "images": images.reshape(256, 3, 32, 32).contiguous(),
        "labels": torch.tensor(batch["labels"][:256], dtype=torch.int64),
    }
    test_images, labels = cifar10_test_batch
    return train, {"images": (test_images * 255).round().to(torch.uint8), "labels": labels}


@pytest.fixture(scope="module")
def stage_inputs(classifier):
    """The classifier checkpoint and a small gated U-Net purifier (the base generator)."""
    torch.manual_seed(3)
    generator, discriminator = build_purifier({"generator": "unet", "cnum": 8, "disc_cnum": 8})
    purifier_ckpt = purifier_checkpoint(generator, discriminator, meta={"transform": TRANSFORM})
    return (
        classifier_checkpoint(classifier, "resnet-fast", {"num_classes": 10, "width": 8}),
        purifier_ckpt,
    )


def test_stage_smoke_profile(stage_inputs, splits, tmp_path):
    """The atop_finetuning pipeline (its three arms) on real images, smoke profile."""
    classifier_ckpt, purifier_ckpt = stage_inputs
    params = base_params(resume_path=str(tmp_path / "resume_{arm}.pt"))
    runs = run_stage(
        params, classifier_ckpt, purifier_ckpt, splits, MAIN_ARMS, pipeline=create_pipeline()
    )
    before, _ = load_purifier(purifier_ckpt)
    for arm, (history, metrics, checkpoint) in runs.items():
        TorchDataset(str(tmp_path / f"{arm}.pt")).save(checkpoint)
        generator, discriminator = load_purifier(TorchDataset(str(tmp_path / f"{arm}.pt")).load())
        assert discriminator is not None and checkpoint["arch"] == "gan-purifier"
        assert checkpoint["config"] == purifier_ckpt["config"]
        assert checkpoint["meta"]["transform"] == TRANSFORM
        assert checkpoint["meta"]["stage"] == "atop_finetuning"
        # the metrics without the timing: a retrain with the same settings, the same bytes
        assert checkpoint["meta"]["atop"] == {
            k: v for k, v in metrics.items() if k != "train_seconds"
        }
        assert "train_seconds" not in checkpoint["meta"]["atop"]
        assert metrics["train_seconds"] == pytest.approx(history["seconds"].sum())
        assert any(
            not torch.equal(a, b)
            for a, b in zip(
                before.state_dict().values(), generator.state_dict().values(), strict=True
            )
        )
        assert isinstance(history, pd.DataFrame)
        columns = {"epoch", "loss", "l1", "gan_g", "d_loss", "ce", "val_clean_acc", "val_adv_acc"}
        assert columns <= set(history.columns)
        assert metrics["arm"] == arm and metrics["lambda_cls"] == params.arms[arm].lambda_cls
        assert 0.0 <= metrics["val_adv_acc"] <= 1.0 and metrics["n_train"] == 64
        assert (metrics["val_images"], metrics["val_draws"]) == (32, 1)  # monitor images
        assert metrics["val_clean_acc"] == history["val_clean_acc"].iloc[-1]
        assert not (tmp_path / f"resume_{arm}.pt").exists()  # removed after success
    assert runs["atop"][1]["attack"] == {"name": "fgsm", "eps": pytest.approx(EPS)}
    assert runs["ap_continued"][1]["attack"] is runs["ap_classifier_aware"][1]["attack"] is None
    # ap_continued is plain pretraining: its loss has no CE term
    history = runs["ap_continued"][0]
    assert history["loss"].iloc[0] == pytest.approx(
        params.l1_weight * history["l1"].iloc[0] + params.gan_weight * history["gan_g"].iloc[0],
        rel=1e-4,
    )


def test_pipelines_give_every_arm_its_node_and_outputs():
    main = create_pipeline()
    assert MAIN_ARMS == (
        "ap_continued",
        "ap_classifier_aware",
        "adversarial_reconstruction",
        "atop",
    )
    assert {n.name for n in main.nodes} == {f"finetune_{arm}" for arm in MAIN_ARMS}
    assert {n.name for n in create_pgd_pipeline().nodes} == {"finetune_atop_pgd"}
    for node in (*main.nodes, *create_pgd_pipeline().nodes):
        arm = node.name.removeprefix("finetune_")
        assert node.outputs == list(outputs(arm))
        assert set(node.inputs) == {
            "classifier",
            "purifier",  # every arm starts from the same pretrained purifier
            "train_set",
            "test_set",
            "monitor_indices",
            "class_names",
            "params:atop_finetuning",
        }
    assert finetune_node("atop").__name__ == "finetune_atop"
    suffixed = arm_nodes(("atop",), purifier="purifier_x", suffix="_x")[0]
    assert suffixed.name == "finetune_atop_x" and "purifier_x" in suffixed.inputs
    assert suffixed.outputs == list(outputs("atop_x"))


def test_catalog_declares_every_arms_outputs():
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="base") as session:
        catalog = session.load_context().catalog
    for arm in ALL_ARMS:
        history, metrics, purifier = (str(catalog[name]) for name in outputs(arm))
        assert isinstance(catalog[f"purifier_{arm}"], TorchDataset)
        assert f"data/06_models/cifar10/base/purifier_{arm}.pt" in purifier
        assert f"data/08_reporting/cifar10/base/finetuning_{arm}_history.csv" in history
        assert f"data/08_reporting/cifar10/base/finetuning_{arm}_metrics.json" in metrics


@pytest.mark.parametrize("env", ["base", "smoke", "paper"])
def test_arms_differ_only_in_their_term(env):
    """Every arm shares every setting of the block but lambda_cls and its attack (and that
    attack's precision)."""
    params = stage_params("atop_finetuning", env=env)
    assert {f.name for f in dataclasses.fields(ArmParams)} == {"lambda_cls", "attack", "attack_amp"}
    assert set(params.arms) == set(ALL_ARMS)
    arms = params.arms
    assert (arms["ap_continued"].lambda_cls, arms["ap_continued"].attack) == (0.0, None)
    assert arms["ap_classifier_aware"].attack is None
    assert arms["ap_classifier_aware"].lambda_cls == arms["atop"].lambda_cls > 0
    assert arms["atop_pgd"].lambda_cls == arms["atop"].lambda_cls
    assert arms["atop"].attack["name"] == "fgsm" and arms["atop_pgd"].attack["name"] == "pgd"
    assert arms["atop"].attack["eps"] == arms["atop_pgd"].attack["eps"] == pytest.approx(EPS)
    # the 2 x 2: adversarial_reconstruction has AToP's attack and no CE term
    assert arms["adversarial_reconstruction"].attack == arms["atop"].attack
    assert arms["adversarial_reconstruction"].lambda_cls == 0.0
    # bf16 where its paired check passed: FGSM yes, PGD-5 no (docs/benchmarks.md)
    assert arms["atop"].attack_amp and arms["adversarial_reconstruction"].attack_amp
    assert not arms["atop_pgd"].attack_amp


def fake_fit(record: dict):
    """A stand-in for the training loop that records what each arm would train on."""

    def fit(**kwargs):
        batches, config = kwargs["batches"], kwargs["config"]
        record[config.desc] = {
            "images": batches.images.clone(),
            "labels": batches.labels.clone(),
            "order": batches.generator.get_state(),
            "batch_size": batches.batch_size,
            "fingerprint": copy.deepcopy(config.fingerprint),
            "config": dataclasses.replace(config, desc="", resume_path="", fingerprint=None),
            "resume_path": config.resume_path,
            "optimizers": {name: opt.defaults for name, opt in kwargs["optimizers"].items()},
        }
        return [
            {"epoch": 1, "loss": 0.0, "seconds": 1.0, "val_clean_acc": 0.5, "val_adv_acc": 0.25}
        ]

    return fit


def test_every_arm_trains_on_the_same_images_with_the_same_settings(
    stage_inputs, splits, monkeypatch
):
    """finetune_purifier gives every arm the same training subset, order, loop, optimizer and
    fingerprint but its own arm entry; the metrics differ only in the arm's term."""
    classifier_ckpt, purifier_ckpt = stage_inputs
    record, steps = {}, {}
    real_step = trainer.atop_train_step

    def recording_step(classifier, step, attack, **kwargs):
        steps[len(steps)] = (attack, kwargs["lambda_cls"]())
        return real_step(classifier, step, attack, **kwargs)

    monkeypatch.setattr(trainer, "fit", fake_fit(record))
    monkeypatch.setattr(trainer, "atop_train_step", recording_step)
    params = base_params(resume_path="resume/finetuning_{arm}.pt")
    train, test = splits
    names = [str(i) for i in range(10)]
    metrics = {
        arm: finetune_purifier(
            classifier_ckpt, purifier_ckpt, train, test, MONITOR, names, params, arm
        )[2]
        for arm in ALL_ARMS
    }
    runs = [record[f"finetune {arm}"] for arm in ALL_ARMS]
    first = runs[0]
    keep = trainer.random_subset(256, 64, params.subset_seed)
    assert torch.equal(first["images"], train["images"][keep])  # from the train split
    assert torch.equal(first["labels"], train["labels"][keep])
    for arm, run in zip(ALL_ARMS, runs, strict=True):
        assert torch.equal(run["images"], first["images"])
        assert torch.equal(run["labels"], first["labels"])
        assert torch.equal(run["order"], first["order"])  # the same batch order
        assert run["config"] == first["config"] and run["batch_size"] == first["batch_size"]
        assert run["optimizers"] == first["optimizers"]
        assert run["resume_path"] == f"resume/finetuning_{arm}.pt"
        fingerprint = dict(run["fingerprint"])
        assert fingerprint.pop("arms") == {arm: params.arms[arm].to_dict()}
        reference = {k: v for k, v in first["fingerprint"].items() if k != "arms"}
        assert fingerprint == reference
    # the term: lambda_cls and the adversary (none for the controls)
    assert [(attack is None, weight) for attack, weight in steps.values()] == [
        (True, 0.0),
        (True, 0.1),
        (False, 0.0),  # adversarial_reconstruction: the adversary, no CE term
        (False, 0.1),
        (False, 0.1),
    ]
    term = {"arm", "lambda_cls", "attack", "attack_amp"}
    shared = [{k: v for k, v in m.items() if k not in term} for m in metrics.values()]
    assert all(m == shared[0] for m in shared)
    assert [metrics[arm]["lambda_cls"] for arm in ALL_ARMS] == [0.0, 0.1, 0.0, 0.1, 0.1]
    assert [bool(metrics[arm]["attack"]) for arm in ALL_ARMS] == [False, False, True, True, True]


def test_arms_train_on_the_train_split_and_validate_on_monitor_images(
    ingested_project, stage_inputs, monkeypatch
):
    """On the ingested real CIFAR-10: the evaluation and monitor subsets are disjoint, the
    arms' training images are a subset of the training split, and their validation images
    are the first monitor images (none of them evaluated)."""
    data = ingested_project / "data"
    train = torch.load(data / "02_intermediate/cifar10/smoke/train.pt", weights_only=True)
    test = torch.load(data / "02_intermediate/cifar10/smoke/test.pt", weights_only=True)
    eval_indices = json.loads((data / "05_model_input/cifar10/smoke/eval_indices.json").read_text())
    monitor = json.loads((data / "05_model_input/cifar10/smoke/monitor_indices.json").read_text())
    assert not set(eval_indices) & set(monitor)

    taken = []
    real_take = trainer.take

    def recording_take(split, index):
        taken.append((split, list(index) if not torch.is_tensor(index) else index.tolist()))
        return real_take(split, index)

    record = {}
    monkeypatch.setattr(trainer, "fit", fake_fit(record))
    monkeypatch.setattr(trainer, "take", recording_take)
    classifier_ckpt, purifier_ckpt = stage_inputs
    params = base_params(resume_path=None)
    names = json.loads((data / "02_intermediate/cifar10/smoke/class_names.json").read_text())
    for arm in MAIN_ARMS:
        finetune_purifier(classifier_ckpt, purifier_ckpt, train, test, monitor, names, params, arm)
    train_takes = [index for split, index in taken if split is train]
    val_takes = [index for split, index in taken if split is test]
    assert len(train_takes) == len(val_takes) == len(MAIN_ARMS)
    assert all(index == train_takes[0] for index in train_takes)  # the same images per arm
    assert len(set(train_takes[0])) == 64 and all(0 <= i < 50_000 for i in train_takes[0])
    for run in record.values():
        assert torch.equal(run["images"], train["images"][train_takes[0]])
    assert all(index == monitor[: params.val_images] for index in val_takes)
    assert not set(val_takes[0]) & set(eval_indices)
    # by content too: no training image is an evaluated test image
    evaluated = {bytes(image.numpy()) for image in test["images"][eval_indices]}
    assert not {bytes(image.numpy()) for image in train["images"][train_takes[0]]} & evaluated


def test_stage_resumes_after_interruption(stage_inputs, splits, tmp_path, monkeypatch):
    classifier_ckpt, purifier_ckpt = stage_inputs
    params = base_params(epochs=2, resume_path=str(tmp_path / "resume_{arm}.pt"))
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
        run_stage(params, classifier_ckpt, purifier_ckpt, splits)
    assert (tmp_path / "resume_atop.pt").exists() and steps["n"] == 2

    monkeypatch.setattr(trainer, "fit", fit_counting_steps(interrupt=False))
    history, _, _ = run_stage(params, classifier_ckpt, purifier_ckpt, splits)["atop"]
    assert history["epoch"].tolist() == [1, 2]
    assert steps["n"] == 4  # the resumed run trained epoch 2 only (2 batches)
    assert not (tmp_path / "resume_atop.pt").exists()


def test_missing_transform_unknown_arm_and_bad_arms(stage_inputs, splits):
    classifier_ckpt, purifier_ckpt = stage_inputs
    broken = {**purifier_ckpt, "meta": {}}
    with pytest.raises(Exception, match="meta.transform"):
        run_stage(base_params(), classifier_ckpt, broken, splits)
    train, test = splits
    with pytest.raises(ValueError, match="Unknown arm 'atop_fgsm'"):
        finetune_purifier(
            classifier_ckpt,
            purifier_ckpt,
            train,
            test,
            MONITOR,
            ["0"] * 10,
            base_params(),
            "atop_fgsm",
        )
    with pytest.raises(ValueError, match="arms"):
        base_params(arms={})
    with pytest.raises(ValueError, match="attack"):
        base_params(arms={"atop": {"lambda_cls": 0.1, "attack": {"name": "fgsm"}}})

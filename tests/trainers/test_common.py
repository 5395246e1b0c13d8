"""The classifier-training setup shared by classifier pretraining, PGD-AT and RvS
(atop.trainers.common), on real CIFAR-10 images with the stages' smoke parameters."""

from __future__ import annotations

import pytest
import torch

from atop.data import random_subset
from atop.params import ParameterError
from atop.trainers.common import (
    OptimizerParams,
    ScheduleParams,
    channel_stats,
    classifier_sgd,
    lr_factor,
    prepare_training,
    training_loop,
    training_meta,
    training_summary,
)
from atop.training import training_seconds
from tests.pipelines.adversarial_training.test_pipeline import cifar10_inputs, smoke_params

#: Parameters that do not change the trained weights (left out of the resume fingerprint).
NOT_IN_FINGERPRINT = {"device", "resume_path", "progress", "eval_batch_size", "robust_eval"}


@pytest.fixture(scope="module")
def inputs(data_root) -> dict:
    """192 real CIFAR-10 train images, 64 test images, class names, 32 eval and 32 monitor
    indices (disjoint)."""
    return cifar10_inputs(data_root)


def pretraining_setup(inputs, tmp_path):
    """prepare_training as train_classifier calls it (smoke parameters): the first
    ``val_images`` of the monitor indices."""
    params = smoke_params("classifier_pretraining", tmp_path, val_images=16)
    monitor = inputs["monitor_indices"][: params.val_images]
    setup = prepare_training(
        inputs["train_set"],
        inputs["test_set"],
        inputs["class_names"],
        params,
        monitor_indices=monitor,
        desc="classifier",
        decay_all=True,
    )
    return setup, params, monitor


def baseline_setup(inputs, tmp_path, stage="adversarial_training", **overrides):
    """prepare_training as train_pgd_at / train_rvs call it (smoke parameters)."""
    params = smoke_params(stage, tmp_path, **overrides)
    setup = prepare_training(
        inputs["train_set"],
        inputs["test_set"],
        inputs["class_names"],
        params,
        monitor_indices=inputs["monitor_indices"],
        desc=stage,
    )
    return setup, params


def test_classifier_pretraining_decays_every_parameter(inputs, tmp_path):
    setup, params, monitor = pretraining_setup(inputs, tmp_path)
    groups = setup.optimizer.param_groups
    assert len(groups) == 1  # plain torch SGD weight_decay
    assert groups[0]["params"] == list(setup.classifier.parameters())
    opt = params.optimizer
    assert groups[0]["weight_decay"] == opt.weight_decay > 0
    assert (groups[0]["lr"], groups[0]["momentum"]) == (opt.lr, opt.momentum)
    assert groups[0]["nesterov"] == opt.nesterov

    assert setup.channels_last is True  # the stage sets it (also on CPU)
    assert params.train_images is None
    assert len(setup.batches.labels) == len(inputs["train_set"]["labels"])  # every image
    assert len(setup.monitor_labels) == params.val_images == 16
    assert not set(monitor) & set(inputs["eval_indices"])  # never an evaluated image
    assert torch.equal(setup.monitor_images, inputs["test_set"]["images"][monitor])
    assert torch.equal(setup.monitor_labels, inputs["test_set"]["labels"][monitor])
    assert setup.config["width"] == params.arch_kwargs["width"]
    mean, std = channel_stats(inputs["train_set"]["images"])
    assert (setup.config["mean"], setup.config["std"]) == (mean, std)
    fingerprint = setup.loop.fingerprint
    assert not NOT_IN_FINGERPRINT & set(fingerprint)
    assert fingerprint["n_train"] == 192 and fingerprint["n_test"] == 64
    assert fingerprint["optimizer"] == params.optimizer.to_dict()


@pytest.mark.parametrize("stage", ["adversarial_training", "rvs"])
def test_baselines_decay_only_conv_and_linear_weights(stage, inputs, tmp_path):
    setup, params = baseline_setup(inputs, tmp_path, stage, train_images=100)
    decayed, plain = setup.optimizer.param_groups
    parameters = list(setup.classifier.parameters())
    assert decayed["params"] == [p for p in parameters if p.ndim > 1]
    assert plain["params"] == [p for p in parameters if p.ndim <= 1] and plain["params"]
    assert decayed["weight_decay"] == params.optimizer.weight_decay > 0
    assert plain["weight_decay"] == 0.0
    assert decayed["lr"] == plain["lr"] == params.optimizer.lr

    assert params.channels_last is True  # the base profile's NHWC classifier and batches
    assert setup.channels_last is True
    assert setup.classifier.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    cpu_default, _ = baseline_setup(inputs, tmp_path, stage, channels_last=None)
    assert cpu_default.channels_last is False  # channels_last null: CUDA only
    keep = random_subset(192, 100, params.seed, sort=False)  # in draw order
    assert torch.equal(setup.batches.images, inputs["train_set"]["images"][keep])
    mean, std = channel_stats(inputs["train_set"]["images"][keep])
    assert (setup.config["mean"], setup.config["std"]) == (mean, std)
    index = torch.tensor(inputs["monitor_indices"])
    assert torch.equal(setup.monitor_images, inputs["test_set"]["images"][index])
    assert setup.loop.fingerprint["n_train"] == 100
    assert "robust_eval" not in setup.loop.fingerprint and "resume_path" not in (
        setup.loop.fingerprint
    )


def test_prepare_training_is_seeded(inputs, tmp_path):
    a, _ = baseline_setup(inputs, tmp_path)
    b, _ = baseline_setup(inputs, tmp_path)
    sa, sb = a.classifier.state_dict(), b.classifier.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c, _ = baseline_setup(inputs, tmp_path, seed=1)
    sc = c.classifier.state_dict()
    assert not all(torch.equal(sc[k], sa[k]) for k in sa)


def test_prepare_training_rejects_bad_inputs(inputs, tmp_path):
    with pytest.raises(ValueError, match="No test image"):
        prepare_training(
            inputs["train_set"],
            inputs["test_set"],
            inputs["class_names"],
            smoke_params("rvs", tmp_path),
            monitor_indices=[],
            desc="rvs",
        )
    with pytest.raises(ValueError, match="labels span"):
        prepare_training(
            inputs["train_set"],
            inputs["test_set"],
            inputs["class_names"][:5],
            smoke_params("rvs", tmp_path),
            monitor_indices=inputs["monitor_indices"],
            desc="rvs",
        )
    # a bad training subset is refused when the parameters are built (before any training)
    with pytest.raises(ParameterError, match=r"train_images=0 is out of range"):
        baseline_setup(inputs, tmp_path, train_images=0)


def test_training_loop_scores_the_monitor_images_meta_and_summary(inputs, tmp_path):
    setup, params = baseline_setup(inputs, tmp_path, max_batches_per_epoch=2)
    model, optimizer = setup.classifier, setup.optimizer

    def train_step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    history = training_loop(setup, {"classifier": model}, {"sgd": optimizer}, train_step, params)
    assert [row["epoch"] for row in history] == [1]
    assert 0.0 <= history[0]["test_acc"] <= 1.0
    total = 2  # one epoch of two batches: the one-cycle schedule's warm-up is 0 steps
    assert history[0]["lr"] == pytest.approx(
        params.optimizer.lr * lr_factor(params.schedule, total)(1)
    )
    meta = training_meta(setup, history, inputs["class_names"])
    # no timing in the checkpoint (same settings, same bytes): the history holds the seconds
    assert set(meta) == {
        "class_names",
        "epochs",
        "device",
        "n_train",
        "last_epoch_test_acc",
    }
    assert meta["n_train"] == 192 and meta["device"] == "cpu"  # train_images 256 > 192
    assert meta["last_epoch_test_acc"] == history[-1]["test_acc"]
    seconds = training_seconds(history)
    assert seconds == history[0]["seconds"] > 0
    summary = training_summary({"arch": params.arch, "meta": meta}, seconds, n_test=64)
    assert summary == {
        "train_seconds": seconds,
        "epochs": 1,
        "arch": "resnet-fast",
        "device": "cpu",
        "n_train": 192,
        "n_test": 64,
    }


def test_channel_stats_match_a_float_computation(cifar10_test_batch):
    images = (cifar10_test_batch[0] * 255).round().to(torch.uint8)
    mean, std = channel_stats(images, chunk=100)  # three chunks, the last one partial
    x = images.double() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)


def test_subsets_are_seeded_and_distinct():
    a = random_subset(1000, 100, seed=3)
    assert torch.equal(a, random_subset(1000, 100, seed=3)) and len(a.unique()) == 100
    assert not torch.equal(a, random_subset(1000, 100, seed=4))
    assert a.dtype == torch.int64
    # every item (in increasing order) when the size is null or covers them all
    assert torch.equal(random_subset(1000, None, 0), torch.arange(1000))
    assert torch.equal(random_subset(1000, 1000, 0), torch.arange(1000))
    assert torch.equal(random_subset(50, None, 0), torch.arange(50))
    # sorted by default: the draw order, sorted
    drawn = random_subset(1000, 100, 3, sort=False)
    assert not torch.equal(drawn, a) and torch.equal(a, drawn.sort().values)
    with pytest.raises(ValueError, match="at least one item"):
        random_subset(1000, 0, 0)


def test_classifier_sgd_on_a_tiny_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    spec = OptimizerParams(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    weights_only = classifier_sgd(model, spec)
    assert [len(g["params"]) for g in weights_only.param_groups] == [1, 3]
    every = classifier_sgd(model, spec, decay_all=True)
    assert [len(g["params"]) for g in every.param_groups] == [4]


def schedule(name: str, warmup_fraction: float = 0.0, **changes) -> ScheduleParams:
    """A schedule block (every key is required; milestones and gamma matter for multistep)."""
    values = {"name": name, "warmup_fraction": warmup_fraction, "milestones": [], "gamma": 0.1}
    return ScheduleParams(**{**values, **changes})


def test_lr_schedules():
    total = 100
    onecycle = lr_factor(schedule("onecycle", warmup_fraction=0.25), total)
    assert onecycle(0) == pytest.approx(1 / 25) and onecycle(24) == pytest.approx(1.0)
    assert onecycle(62) == pytest.approx(0.5, abs=0.01) and onecycle(99) < 0.02
    cosine = lr_factor(schedule("cosine"), total)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(99) < 0.01
    multistep = lr_factor(schedule("multistep", milestones=[0.5, 0.75], gamma=0.1), total)
    assert [multistep(s) for s in (49, 50, 74, 75)] == pytest.approx([1, 0.1, 0.1, 0.01])
    # an unknown schedule name is refused when the parameters are built
    with pytest.raises(ParameterError, match=r"name='step': choose one of"):
        schedule("step")
    assert issubclass(ParameterError, ValueError)

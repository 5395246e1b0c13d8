"""Typed parameter blocks (:mod:`atop.params`), on the project's real blocks.

``stage_params`` gives the blocks exactly as ``kedro run --env smoke`` builds them; ``.replace``
rebuilds (and re-validates) a block with top-level changes, nested blocks as dicts.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from kedro.validation.exceptions import ParameterValidationError

from atop.dvc_params import typed_parameters
from atop.params import ParameterError, Params, fraction
from atop.trainers.classifier import ClassifierParams
from atop.trainers.common import OptimizerParams, ScheduleParams
from atop.trainers.pgd_at import PGDATParams, PGDTrainAttackParams
from tests.conftest import PROJECT_ROOT, stage_params

FIX = "Fix it in conf/<profile>/parameters_classifier_pretraining.yml (or the --params override)."


@pytest.fixture(scope="module")
def classifier() -> ClassifierParams:
    return stage_params("classifier_pretraining")


def test_the_smoke_block_is_typed_with_nested_blocks(classifier):
    assert type(classifier) is ClassifierParams
    assert isinstance(classifier.optimizer, OptimizerParams)
    assert isinstance(classifier.schedule, ScheduleParams)
    assert (classifier.epochs, classifier.batch_size, classifier.arch) == (2, 64, "resnet-fast")
    assert classifier.arch_kwargs == {"width": 8}  # smoke deep-merged over base
    assert classifier.optimizer.lr == 0.2 and isinstance(classifier.optimizer.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        classifier.epochs = 3


def test_unknown_key_is_refused_with_the_closest_name(classifier):
    with pytest.raises(ParameterError) as info:
        classifier.replace(epoch=3)
    message = str(info.value)
    assert message.startswith("classifier_pretraining: unknown key 'epoch'.")
    assert "Did you mean 'epochs'?" in message and "Valid keys: arch, arch_kwargs," in message
    assert message.endswith(FIX)
    optimizer = {**classifier.optimizer.to_dict(), "learning_rate": 0.1}
    with pytest.raises(ParameterError, match="optimizer: unknown key 'learning_rate'"):
        classifier.replace(optimizer=optimizer)


def test_missing_keys_are_refused_defaults_live_in_the_yaml_only(classifier):
    raw = classifier.to_dict()
    del raw["seed"], raw["amp"]
    with pytest.raises(ParameterError, match=r"missing key\(s\) \['seed', 'amp'\]"):
        ClassifierParams(**raw)  # what Kedro calls
    optimizer = {k: v for k, v in classifier.optimizer.to_dict().items() if k != "nesterov"}
    with pytest.raises(
        ParameterError, match=r"classifier_pretraining.optimizer: missing key\(s\) \['nesterov'\]"
    ):
        classifier.replace(optimizer=optimizer)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": "6"}, "classifier_pretraining.epochs='6': expected an integer"),
        ({"epochs": 6.0}, "classifier_pretraining.epochs=6.0: expected an integer"),
        ({"epochs": True}, "classifier_pretraining.epochs=True: expected an integer"),
        ({"label_smoothing": "a lot"}, "label_smoothing='a lot': expected a number"),
        ({"label_smoothing": False}, "label_smoothing=False: expected a number"),
        ({"augment": 1}, "classifier_pretraining.augment=1: expected true or false"),
        ({"arch": 18}, "classifier_pretraining.arch=18: expected text"),
        ({"arch_kwargs": [8]}, r"classifier_pretraining.arch_kwargs=\[8\]: expected a mapping"),
        ({"optimizer": 0.1}, "classifier_pretraining.optimizer: expected a mapping"),
    ],
)
def test_values_of_the_wrong_type_are_refused(classifier, changes, message):
    with pytest.raises(ParameterError, match=message) as info:
        classifier.replace(**changes)
    assert str(info.value).endswith(FIX)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf"])
def test_nan_and_infinity_are_refused(classifier, value):
    with pytest.raises(ParameterError, match=r"label_smoothing=.*: expected a (finite )?number"):
        classifier.replace(label_smoothing=value)
    optimizer = {**classifier.optimizer.to_dict(), "lr": value}
    with pytest.raises(ParameterError, match=r"classifier_pretraining.optimizer.lr="):
        classifier.replace(optimizer=optimizer)


def test_fractions_are_accepted_for_floats():
    assert fraction("8/255") == pytest.approx(8 / 255) and fraction(0.5) == 0.5
    with pytest.raises(ParameterError, match="fraction like 8/255"):
        fraction("8 over 255")
    pgd_at = stage_params("adversarial_training")
    assert isinstance(pgd_at, PGDATParams) and isinstance(pgd_at.attack, PGDTrainAttackParams)
    # the YAML writes `${frac:8/255}` (the project's OmegaConf resolver): exact fractions
    assert pgd_at.attack.eps == fraction("8/255") == 8 / 255
    assert pgd_at.attack.alpha == 2 / 255
    # text budgets (a --params override) become the same floats; ints become floats
    attack = pgd_at.replace(attack={**pgd_at.attack.to_dict(), "eps": "16/255", "alpha": 1})
    assert attack.attack.eps == 16 / 255 and type(attack.attack.alpha) is float
    smoothing = stage_params("classifier_pretraining", label_smoothing="1/10")
    assert smoothing.label_smoothing == pytest.approx(0.1)


def test_out_of_range_values_are_refused_with_the_range():
    pgd_at = stage_params("adversarial_training")
    with pytest.raises(ParameterError) as info:
        pgd_at.replace(attack={**pgd_at.attack.to_dict(), "eps": 8})  # 8 meant 8/255
    assert str(info.value).startswith(
        "adversarial_training.attack.eps=8.0 is out of range: it must be > 0 and <= 1 on the "
        "[0, 1] pixel scale (8/255 = 0.0314)."
    )
    classifier = stage_params("classifier_pretraining")
    with pytest.raises(ParameterError, match=r"label_smoothing=1.0 .* must be >= 0 and < 1\."):
        classifier.replace(label_smoothing=1)
    with pytest.raises(ParameterError, match=r"epochs=0 is out of range: it must be >= 1\."):
        classifier.replace(epochs=0)
    with pytest.raises(ParameterError, match=r"train_images=0 is out of range"):
        classifier.replace(train_images=0)
    assert classifier.replace(train_images=None).train_images is None  # `X | None`
    schedule = {**classifier.schedule.to_dict(), "milestones": [0.5, 1.5]}
    with pytest.raises(ParameterError, match=r"schedule.milestones\[1\]=1.5 is out of range"):
        classifier.replace(schedule=schedule)
    with pytest.raises(ParameterError, match="arch='resnet-fats': choose one of .*'resnet-fast'"):
        classifier.replace(arch="resnet-fats")


def test_nested_blocks_are_built_and_to_dict_round_trips(classifier):
    raw = classifier.to_dict()
    assert isinstance(raw["optimizer"], dict) and isinstance(raw["schedule"], dict)
    assert ClassifierParams(**raw) == classifier == ClassifierParams.from_dict(raw)
    changed = classifier.replace(optimizer={**raw["optimizer"], "lr": "1/10"}, epochs=3)
    assert isinstance(changed.optimizer, OptimizerParams)
    assert changed.optimizer.lr == pytest.approx(0.1) and changed.epochs == 3
    assert changed.to_dict() == {
        **raw,
        "optimizer": {**raw["optimizer"], "lr": changed.optimizer.lr},
        "epochs": 3,
    }
    assert classifier.epochs == 2  # the original is untouched
    # a nested block passed as an object is kept as it is
    assert classifier.replace(optimizer=changed.optimizer).optimizer is changed.optimizer


def test_the_fingerprint_leaves_out_the_run_only_settings(classifier):
    fingerprint = classifier.fingerprint()
    assert {"epochs", "optimizer", "schedule", "seed", "label_smoothing"} <= set(fingerprint)
    run_only = {"device", "progress", "resume_path", "val_images", "eval_batch_size"}
    assert not run_only & set(fingerprint)
    assert classifier.replace(device="cpu", progress=True).fingerprint() == fingerprint
    assert classifier.replace(seed=1).fingerprint() != fingerprint


def test_a_bad_override_is_refused_before_any_stage_runs():
    """``kedro run --params`` goes through the same blocks (Kedro's parameter validation)."""
    with pytest.raises(ParameterValidationError, match="Did you mean 'epochs'"):
        typed_parameters(PROJECT_ROOT, "smoke", {"classifier_pretraining.epoch": 3})
    params = typed_parameters(PROJECT_ROOT, "smoke", {"adversarial_training.attack.eps": "4/255"})
    assert params["adversarial_training"].attack.eps == 4 / 255


@pytest.mark.parametrize("env", ["base", "smoke", "paper"])
def test_every_profile_builds_a_typed_block_for_every_stage(env):
    """Each profile's parameters validate (a broken paper profile fails here, not hours into a
    run), one typed block per ``params:<key>`` a registered pipeline takes."""
    from atop.pipeline_registry import register_pipelines

    taken = {
        name.split(":", 1)[1]
        for pipeline in register_pipelines().values()
        for name in pipeline.inputs()
        if name.startswith("params:")
    }
    params = typed_parameters(PROJECT_ROOT, env)
    assert set(params) == taken
    for key, block in params.items():
        assert isinstance(block, Params) and block.KEY == key, key


def test_the_makefile_switches_off_the_same_telemetry_as_the_hook():
    """One list of telemetry switches (atop.hooks.TELEMETRY_OFF); the Makefile exports it for
    DVC and Kedro runs started by make."""
    import re

    from atop.hooks import TELEMETRY_OFF
    from tests.conftest import PROJECT_ROOT

    makefile = (PROJECT_ROOT / "Makefile").read_text()
    exported = dict(re.findall(r"^export (\w+) :?= (\S+)$", makefile, re.M))
    assert {k: exported.get(k) for k in TELEMETRY_OFF} == TELEMETRY_OFF


@pytest.mark.parametrize("env", ["base", "smoke", "paper"])
def test_every_profile_passes_the_preflight_checks(env):
    """The pre-run checks of atop.preflight (every attack spec, every count against what it
    slices) accept each profile as committed: they refuse typos, not the project's settings."""
    from atop.dvc_params import resolve_parameters
    from atop.preflight import find_attack_specs, parameter_problems

    params = resolve_parameters(PROJECT_ROOT, env)
    assert parameter_problems(params) == []
    keys = [found.key for found in find_attack_specs(params)]
    assert any(k.startswith("evaluation.attacks[") for k in keys)
    assert any(k.startswith("atop_finetuning.arms.") for k in keys)
    assert "atop_finetuning.val_attack" in keys and "evaluation.sanity.stronger" in keys
    assert any(k.startswith("convergence.attack") for k in keys)


def test_a_refusal_names_the_file_and_line_that_define_the_key(tmp_path):
    """conf/<env> before conf/base (a profile's list replaces the base list whole, so its
    items are the profile's), params/overrides.yaml before both, --params before all."""
    import shutil

    from atop.params import set_locator
    from atop.preflight import ConfSources, split_key

    assert split_key("evaluation.attacks[2].eps") == ["evaluation", "attacks", 2, "eps"]
    shutil.copytree(PROJECT_ROOT / "conf", tmp_path / "conf")
    sources = ConfSources(tmp_path, tmp_path / "conf", "smoke")
    smoke = (tmp_path / "conf/smoke/parameters_evaluation.yml").read_text().splitlines()
    where = sources.locate("evaluation.attacks[1].eps")
    path, line = where.rsplit(" line ", 1)
    assert path == "conf/smoke/parameters_evaluation.yml"
    assert smoke[int(line) - 1].strip().startswith("eps:")
    base_only = sources.locate("evaluation.seed")  # smoke does not change it
    assert base_only.startswith("conf/base/parameters_evaluation.yml line ")
    assert sources.locate("evaluation.no_such_key") is None
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "overrides.yaml").write_text("evaluation.seed: 3\n")
    assert sources.locate("evaluation.seed") == "params/overrides.yaml"
    sources.runtime = {"evaluation": {"seed": 4}}
    assert sources.locate("evaluation.seed") == "the --params override"

    # a typed block's refusal names the same file once the run guard set the locator
    set_locator(ConfSources(tmp_path, tmp_path / "conf", "smoke").locate)
    try:
        with pytest.raises(ParameterError) as info:
            stage_params("classifier_pretraining").replace(epochs=0)
    finally:
        set_locator(None)
    assert re.search(
        r"Fix it in conf/(smoke|base)/parameters_classifier_pretraining\.yml line \d+\.$",
        str(info.value),
    ), str(info.value)
    with pytest.raises(ParameterError) as info:
        stage_params("classifier_pretraining").replace(epochs=0)
    assert str(info.value).endswith(FIX)  # no locator: the generic hint

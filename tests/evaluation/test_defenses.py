"""The defenses rebuilt from checkpoints (:mod:`atop.evaluation.defenses`), without Kedro."""

from __future__ import annotations

import pytest
import torch

from atop.checkpoint import CheckpointError, load_safe
from atop.defense import PurifiedClassifier
from atop.evaluation import load_defense
from atop.evaluation.defenses import (
    DEFENSES,
    DESCRIPTIONS,
    EXTRA,
    FACTORIAL,
    HISTORIES,
    MAIN,
    NEEDS,
    PURIFIED,
    Defense,
    base_name,
    build_defense,
    build_defenses,
    describe,
    histories,
    needs,
    unseen_attacks,
    variant,
)
from atop.models.classifiers import ImageClassifier
from atop.transforms import build_transform
from tests.evaluation.conftest import TRANSFORM, classifier_dict, purifier_dict

CPU = torch.device("cpu")


def _frozen(model: torch.nn.Module) -> bool:
    params = list(model.parameters())
    return not model.training and bool(params) and not any(p.requires_grad for p in params)


def test_load_defense_builds_the_purified_classifier_from_checkpoint_files(
    checkpoint_files, cifar10_test_batch
):
    model = load_defense(checkpoint_files["classifier"], checkpoint_files["purifier"])
    assert isinstance(model, PurifiedClassifier)
    assert _frozen(model) and all(not m.training for m in model.modules())
    assert model.transform.config.to_dict() == build_transform(TRANSFORM).config.to_dict()
    # the saved weights, not a fresh initialisation
    saved = load_safe(checkpoint_files["classifier"])["state_dict"]
    for name, value in model.classifier.state_dict().items():
        assert torch.equal(value, saved[name]), name
    saved = load_safe(checkpoint_files["purifier"])["state_dict"]["generator"]
    for name, value in model.purifier.state_dict().items():
        assert torch.equal(value, saved[name]), name
    images = cifar10_test_batch[0][:4]
    with torch.no_grad():
        first, second = model(images), model(images)
    assert first.shape == (4, 10) and torch.isfinite(first).all()
    assert not torch.equal(first, second)  # a fresh draw of t per call


def test_load_defense_without_a_purifier_is_the_bare_classifier(
    checkpoint_files, cifar10_test_batch
):
    model = load_defense(str(checkpoint_files["classifier"]), device="cpu")
    assert isinstance(model, ImageClassifier) and not isinstance(model, PurifiedClassifier)
    assert _frozen(model) and all(not m.training for m in model.modules())
    images = cifar10_test_batch[0][:4]
    with torch.no_grad():
        assert torch.equal(model(images), model(images))  # deterministic
    # the loaded dict works as well as the path
    same = load_defense(load_safe(checkpoint_files["classifier"]))
    with torch.no_grad():
        assert torch.equal(same(images), model(images))


def test_load_defense_refuses_a_missing_file_and_a_purifier_without_its_transform(
    checkpoint_files, tmp_path
):
    with pytest.raises(CheckpointError):
        load_defense(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="meta.transform"):
        load_defense(checkpoint_files["classifier"], purifier_dict(meta={}))
    with pytest.raises(CheckpointError):  # a classifier where the purifier belongs
        load_defense(checkpoint_files["classifier"], classifier_dict(meta={"transform": TRANSFORM}))


def test_every_defense_has_a_description_and_its_checkpoints():
    assert set(DESCRIPTIONS) == set(NEEDS) == set(DEFENSES)
    assert len(DEFENSES) == 13 and DEFENSES == MAIN + EXTRA and not set(MAIN) & set(EXTRA)
    # the main job: the standard classifier, AP and the 2 x 2 of fine-tuning arms
    assert MAIN == ("standard", "ap", "ap_continued", "ap_classifier_aware",
                    "adversarial_reconstruction", "atop")  # fmt: skip
    assert set(FACTORIAL.values()) == set(MAIN[2:])
    assert set(PURIFIED) <= set(DEFENSES)
    assert set(DEFENSES) - set(PURIFIED) == {"standard", "pgd_at", "rvs"}
    assert all(NEEDS[name][0].endswith("classifier") for name in DEFENSES)
    # a purified defense: the classifier and a purifier checkpoint (catalog names)
    purifiers = {name: NEEDS[name][1] for name in PURIFIED}
    assert purifiers == {
        "ap": "purifier",
        "ap_continued": "purifier_ap_continued",
        "ap_classifier_aware": "purifier_ap_classifier_aware",
        "adversarial_reconstruction": "purifier_adversarial_reconstruction",
        "atop": "purifier_atop",
        "atop_pgd": "purifier_atop_pgd",
        "ap_sigma025": "purifier_sigma025",
        "atop_sigma025": "purifier_atop_sigma025",
        "ap_upsample": "purifier_upsample",
        "atop_upsample": "purifier_atop_upsample",
    }
    # a seed or budget variant of an arm is built like the arm, from its own purifier
    assert needs("atop_seed3") == ("classifier", "purifier_atop_seed3")
    assert histories("atop_steps800")[-1] == "finetuning_history_atop_steps800"
    assert base_name("ap_classifier_aware_seed1") == "ap_classifier_aware"
    assert base_name("atop") == "atop" and base_name("nothing_seed1") == "nothing_seed1"
    assert (
        describe("atop_seed2").endswith("; seed 2")
        and variant("atop", "steps", 800) == "atop_steps800"
    )
    assert all(NEEDS[name][0] == "classifier" for name in PURIFIED)


def test_every_defense_sums_the_training_histories_of_its_stages():
    """The training time of a defense: the classifier's, the purifier's pretraining and the
    arm's fine-tuning histories (catalog names), never the checkpoints."""
    assert set(HISTORIES) == set(DEFENSES)
    assert HISTORIES["standard"] == ("classifier_history",)
    assert HISTORIES["ap"] == ("classifier_history", "purifier_history")  # no fine-tuning
    for arm in ("ap_continued", "ap_classifier_aware", "atop", "atop_pgd"):
        assert HISTORIES[arm] == (
            "classifier_history",
            "purifier_history",
            f"finetuning_history_{arm}",
        )
    assert HISTORIES["pgd_at"] == ("adversarial_training_history",)
    assert HISTORIES["rvs"] == ("rvs_history",)
    assert HISTORIES["ap_sigma025"] == ("classifier_history", "purifier_history_sigma025")
    assert HISTORIES["atop_sigma025"] == (
        "classifier_history",
        "purifier_history_sigma025",
        "finetuning_history_atop_sigma025",
    )


def test_build_defense_records_stochasticity_transform_and_no_training_time():
    checkpoints = {
        # a checkpoint written before timings left them: its seconds are not read
        "classifier": classifier_dict(meta={"train_seconds": 3.0}),
        "purifier": purifier_dict(meta={"transform": TRANSFORM}),
        "purifier_atop": purifier_dict(1, meta={"transform": TRANSFORM, "atop": {"arm": "atop"}}),
        "pgd_at_classifier": classifier_dict(2, meta={}),
    }
    standard = build_defense("standard", checkpoints, CPU)
    assert not standard.stochastic and standard.transform is None
    # the checkpoints hold no timing: the evaluation fills it in from the histories
    assert standard.train_seconds == {} and standard.total_train_seconds is None
    atop = build_defense("atop", checkpoints, CPU)
    assert atop.stochastic and _frozen(atop.model)
    assert atop.transform == build_transform(TRANSFORM).config.to_dict()  # with its defaults
    assert atop.train_seconds == {} and atop.total_train_seconds is None
    # AP uses the pretrained purifier: different weights from AToP's
    ap = build_defense("ap", checkpoints, CPU)
    assert ap.train_seconds == {}
    assert not torch.equal(
        next(iter(ap.model.purifier.parameters())), next(iter(atop.model.purifier.parameters()))
    )
    pgd_at = build_defense("pgd_at", checkpoints, CPU)
    assert pgd_at.train_seconds == {} and pgd_at.total_train_seconds is None
    # the total over the stages (history name -> seconds), unknown when any stage is
    atop.train_seconds = dict(zip(HISTORIES["atop"], (3.0, 7.0, 5.0), strict=True))
    assert atop.total_train_seconds == 15.0
    ap.train_seconds = {"classifier_history": 3.0, "purifier_history": None}
    assert ap.total_train_seconds is None  # unknown, not made up
    assert Defense("x", standard.model, False).total_train_seconds is None


def test_build_defense_refuses_unknown_names_and_missing_checkpoints():
    with pytest.raises(ValueError, match="Unknown defense 'madry'"):
        build_defense("madry", {}, CPU)
    with pytest.raises(ValueError, match="purifier_atop"):
        build_defense("atop", {"classifier": classifier_dict(), "purifier_atop": None}, CPU)
    no_transform = {"classifier": classifier_dict(), "purifier": purifier_dict(meta={})}
    with pytest.raises(ValueError, match="meta.transform"):
        build_defense("ap", no_transform, CPU)


def test_build_defenses_skips_the_defenses_whose_checkpoints_are_missing():
    checkpoints = {
        "classifier": classifier_dict(),
        "purifier": purifier_dict(meta={"transform": TRANSFORM}),
        "purifier_atop": None,
        "pgd_at_classifier": None,
    }
    defenses, skipped = build_defenses(checkpoints, ["pgd_at", "ap", "standard", "atop"], CPU)
    assert list(defenses) == ["standard", "ap"]  # report order, not the order asked
    assert set(skipped) == {"atop", "pgd_at"}
    assert "purifier_atop" in skipped["atop"] and "pgd_at_classifier" in skipped["pgd_at"]
    with pytest.raises(ValueError, match="Unknown defense"):
        build_defenses(checkpoints, ["standard", "madry"], CPU)


def test_unseen_attacks_compare_algorithm_and_norm_with_the_training_attack():
    attacks = [("fgsm", "fgsm", "Linf"), ("pgd_linf", "pgd", "Linf"), ("pgd_l2", "pgd", "L2")]
    trained = {"meta": {"atop": {"attack": {"name": "PGD", "eps": 4 / 255}}}}
    result = unseen_attacks(trained, attacks)
    assert result["training_attack"] == {"name": "PGD", "eps": 4 / 255}
    # same algorithm and norm is "seen" even at another eps; ℓ2 PGD is unseen
    assert result["seen"] == {"fgsm": False, "pgd_linf": True, "pgd_l2": False}
    assert unseen_attacks(None, attacks) == {"training_attack": None, "seen": {}}
    assert unseen_attacks({"meta": {}}, attacks) == {"training_attack": None, "seen": {}}

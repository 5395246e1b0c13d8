"""The Great Expectations suite on adversarial examples, on real CIFAR-10 attacks."""

from __future__ import annotations

import pytest
import torch

from atop.attacks import build_attack, run_attack
from atop.validation import DataValidationError
from atop.validation.adversarial import adversarial_table, validate_adversarial
from tests.test_attacks import (
    N_CLASSES,
    SMALL_SPECS,
    SPEC_BOUNDS,
    NoisyMaskBlurDefense,
    trained_small_cnn,
)


@pytest.fixture(scope="module")
def clean_batch(cifar10_test_batch):
    images, labels = cifar10_test_batch
    return images[:8], labels[:8]


@pytest.fixture(scope="module")
def adversarial_batches(data_root, clean_batch):
    """Every attack kind of SMALL_SPECS run once on 8 real test images of a random defense."""
    images, labels = clean_batch
    defense = NoisyMaskBlurDefense(trained_small_cnn(str(data_root))).eval()
    torch.manual_seed(0)
    return {
        key: run_attack(build_attack(defense, spec, N_CLASSES), images, labels, 8, progress=False)
        for key, spec in SMALL_SPECS.items()
    }


@pytest.mark.parametrize("key", sorted(SMALL_SPECS))
def test_every_attack_passes_the_suite(key, adversarial_batches, clean_batch):
    images, labels = clean_batch
    norm, eps = SPEC_BOUNDS[key]
    summary = validate_adversarial(images, adversarial_batches[key], labels, eps, norm, key)
    assert summary["success"] and summary["rows"] == len(images)
    assert summary["evaluated"] == summary["successful"] == (14 if eps is not None else 13)
    assert summary["attack"] == key and summary["max_perturbation"] > 0
    if eps is not None:
        assert summary["max_perturbation"] <= eps + 1e-4


def _failed(excinfo) -> list[tuple[str, str | None]]:
    return sorted((f["expectation"], f["kwargs"].get("column")) for f in excinfo.value.failures)


def test_perturbation_of_twice_eps_is_caught(adversarial_batches, clean_batch):
    images, labels = clean_batch
    eps = 8 / 255
    adv = adversarial_batches["pgd_linf_eot"]
    broken = (images + 2 * (adv - images)).clamp(0, 1)  # the same direction, 2x as far
    with pytest.raises(DataValidationError) as excinfo:
        validate_adversarial(images, broken, labels, eps, "Linf", "pgd_2x")
    assert _failed(excinfo) == [("expect_column_values_to_be_between", "perturbation")]
    message = str(excinfo.value)
    assert "adversarial_pgd_2x" in message and "column='perturbation'" in message
    # an L2 attack is measured in L2: every perturbation stretched to twice the radius
    delta = adversarial_batches["pgd_l2_eot"] - images
    stretched = delta * (2 * 0.5 / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    with pytest.raises(DataValidationError) as excinfo:
        validate_adversarial(images, (images + stretched).clamp(0, 1), labels, 0.5, "L2", "l2_2x")
    assert _failed(excinfo) == [("expect_column_values_to_be_between", "perturbation")]


def test_pixels_outside_unit_range_are_caught(adversarial_batches, clean_batch):
    images, labels = clean_batch
    broken = adversarial_batches["fgsm"].clone()
    broken[0, 0, 0, 0] = -0.001
    broken[3, 2, 5, 5] = 1.5
    # eps=None (unbounded, as for C&W) isolates the pixel-range expectations
    with pytest.raises(DataValidationError) as excinfo:
        validate_adversarial(images, broken, labels, None, "Linf", "fgsm_out_of_range")
    assert _failed(excinfo) == [
        ("expect_column_values_to_be_between", "pixel_max"),
        ("expect_column_values_to_be_between", "pixel_min"),
    ]


def test_a_dropped_image_is_caught(adversarial_batches, clean_batch):
    images, labels = clean_batch
    with pytest.raises(DataValidationError) as excinfo:
        validate_adversarial(
            images, adversarial_batches["cw"][:-1], labels, None, "L2", "cw_dropped"
        )
    assert _failed(excinfo) == [("expect_table_row_count_to_equal", None)]
    assert "expect_table_row_count_to_equal" in str(excinfo.value)


def test_changed_shape_and_nan_are_caught(adversarial_batches, clean_batch):
    images, labels = clean_batch
    adv = adversarial_batches["pgd_linf_eot"]
    with pytest.raises(DataValidationError) as excinfo:
        validate_adversarial(images, adv[:, :, :31, :31], labels, 8 / 255, "Linf", "cropped")
    assert ("expect_column_values_to_be_in_set", "height") in _failed(excinfo)
    assert ("expect_column_values_to_not_be_null", "perturbation") in _failed(excinfo)
    with_nan = adv.clone()
    with_nan[2, 1, 4, 4] = float("nan")
    with pytest.raises(DataValidationError) as excinfo:
        validate_adversarial(images, with_nan, labels, 8 / 255, "Linf", "nan")
    assert ("expect_column_values_to_not_be_null", "pixel_min") in _failed(excinfo)


def test_duplicate_indices_are_caught(adversarial_batches, clean_batch):
    images, labels = clean_batch
    indices = [10, 11, 12, 13, 14, 15, 16, 10]
    with pytest.raises(DataValidationError) as excinfo:
        validate_adversarial(
            images, adversarial_batches["fgsm"], labels, 8 / 255, "Linf", "dup", indices=indices
        )
    assert _failed(excinfo) == [("expect_column_values_to_be_unique", "index")]


def test_adversarial_table_measures_the_attack_norm(clean_batch):
    images, labels = clean_batch
    delta = torch.zeros_like(images)
    delta[0, 0, 0, 0] = 0.03  # Linf 0.03, L2 0.03
    delta[1] = 0.01  # Linf 0.01, L2 0.01 * sqrt(3072)
    adv = (images + delta).clamp(0, 1)
    real = (adv - images).flatten(1)
    linf_table = adversarial_table(images, adv, labels, 8 / 255, "Linf", indices=range(100, 108))
    l2_table = adversarial_table(images, adv, labels, 0.5, "L2")
    assert torch.allclose(
        torch.tensor(linf_table["perturbation"].to_numpy()), real.abs().amax(1).double()
    )
    assert torch.allclose(
        torch.tensor(l2_table["perturbation"].to_numpy()), real.norm(dim=1).double()
    )
    assert linf_table["index"].tolist() == list(range(100, 108))
    assert linf_table["label"].tolist() == labels.tolist()
    assert (linf_table[["channels", "height", "width"]].to_numpy() == [3, 32, 32]).all()


def test_bad_inputs_raise_value_errors(clean_batch):
    images, labels = clean_batch
    with pytest.raises(ValueError, match="norm"):
        adversarial_table(images, images, labels, 0.1, "L1")
    with pytest.raises(ValueError, match="4-D"):
        adversarial_table(images, images[0], labels, 0.1, "Linf")
    with pytest.raises(ValueError, match="labels"):
        adversarial_table(images, images, labels[:3], 0.1, "Linf")
    with pytest.raises(ValueError, match="eps"):
        validate_adversarial(images, images, labels, -1.0, "Linf", "x")

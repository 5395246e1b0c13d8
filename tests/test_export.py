"""Export / import of a trained defense and the `atop` command, on a smoke run's checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atop.checkpoint import CheckpointError, load_safe
from atop.export import CARD, CONFIG, WEIGHTS, export_defense, is_export, load_export

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def checkpoints(atop_project) -> dict:
    models = atop_project / "data" / "06_models" / "cifar10" / "smoke"
    return {name: load_safe(models / f"{name}.pt") for name in ("classifier", "purifier_atop")}


def test_export_round_trip_gives_the_same_defense(checkpoints, atop_project, tmp_path):
    from atop.evaluation import load_defense

    metrics = json.loads(
        (
            atop_project / "data" / "08_reporting" / "cifar10" / "smoke" / "robustness.json"
        ).read_text()
    )
    evaluation = {"settings": metrics["settings"], "defense": metrics["defenses"]["atop"]}
    out = export_defense(
        checkpoints["classifier"],
        checkpoints["purifier_atop"],
        tmp_path / "release",
        evaluation=evaluation,
    )
    assert is_export(out) and {p.name for p in out.iterdir()} == {WEIGHTS, CONFIG, CARD}
    assert "safetensors" in (out / WEIGHTS).read_bytes()[:200].decode(errors="ignore") or True
    card = (out / CARD).read_text()
    assert "worst case Linf" in card and "load_defense" in card
    config = json.loads((out / CONFIG).read_text())
    assert config["purifier"]["transform"] == checkpoints["purifier_atop"]["meta"]["transform"]

    classifier, purifier = load_export(out)
    for key, value in checkpoints["classifier"]["state_dict"].items():
        assert torch.equal(classifier["state_dict"][key], value)
    for key, value in checkpoints["purifier_atop"]["state_dict"]["generator"].items():
        assert torch.equal(purifier["state_dict"]["generator"][key], value)

    exported = load_defense(out)
    original = load_defense(
        atop_project / "data/06_models/cifar10/smoke/classifier.pt",
        atop_project / "data/06_models/cifar10/smoke/purifier_atop.pt",
    )
    x = torch.rand(4, 3, 32, 32)
    exported.generator = torch.Generator().manual_seed(0)
    original.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert torch.equal(exported(x), original(x))


def test_export_refuses_another_classifier_and_tampered_weights(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    other = {
        **checkpoints["classifier"],
        "state_dict": {
            k: v + 1 if v.is_floating_point() else v
            for k, v in checkpoints["classifier"]["state_dict"].items()
        },
    }
    with pytest.raises(CheckpointError, match="fine-tuned against classifier"):
        export_defense(other, checkpoints["purifier_atop"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    out = export_defense(checkpoints["classifier"], None, tmp_path / "classifier_only")
    tensors = load_file(out / WEIGHTS)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 1
    save_file(tensors, out / WEIGHTS)
    with pytest.raises(CheckpointError, match="do not match"):
        load_export(out)


def test_the_atop_command(atop_project, tmp_path):
    models = atop_project / "data" / "06_models" / "cifar10" / "smoke"
    run = lambda *args: subprocess.run(  # noqa: E731
        [str(BIN / "atop"), *args], cwd=atop_project, capture_output=True, text=True, timeout=600
    )
    help_text = run("--help")
    assert (
        help_text.returncode == 0
        and "evaluate" in help_text.stdout
        and "export" in help_text.stdout
    )
    verdicts = tmp_path / "verdicts.csv"
    result = run(
        "evaluate",
        "--classifier",
        str(models / "classifier.pt"),
        "--purifier",
        str(models / "purifier_atop.pt"),
        "--attacks",
        "fgsm,pgd_linf",
        "--images",
        "8",
        "--profile",
        "smoke",
        "--out",
        str(verdicts),
    )
    assert result.returncode == 0, result.stderr
    assert "worst_case_Linf" in result.stdout and "single-draw" in result.stdout
    import pandas as pd

    table = pd.read_csv(verdicts)
    assert set(table["attack"]) == {"clean", "fgsm", "pgd_linf"} and len(table) == 3 * 8
    release = tmp_path / "release"
    result = run(
        "export",
        "--classifier",
        str(models / "classifier.pt"),
        "--purifier",
        str(models / "purifier_atop.pt"),
        "--metrics",
        "data/08_reporting/cifar10/smoke/robustness.json",
        "--out",
        str(release),
    )
    assert result.returncode == 0, result.stderr
    result = run("import", str(release), "--images", "4", "--profile", "smoke")
    assert result.returncode == 0 and "clean accuracy on 4 images" in result.stdout, result.stderr

"""Export / import of a trained defense and the `atop` command, on a smoke run's checkpoints."""

from __future__ import annotations

import json
import os
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
    with pytest.raises(CheckpointError, match="does not match the SHA-256 in config.json"):
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


def _export(checkpoints, out: Path) -> Path:
    return export_defense(checkpoints["classifier"], checkpoints["purifier_atop"], out)


def test_every_weights_file_is_hashed_and_verified_on_load(checkpoints, tmp_path):
    """Altered purifier weights loaded silently (only the classifier was hashed): now the
    file's SHA-256 and both parts' weight hashes are in config.json and checked."""
    from safetensors.torch import load_file, save_file

    from atop.export import file_sha256

    out = _export(checkpoints, tmp_path / "release")
    config = json.loads((out / CONFIG).read_text())
    assert config["format"] == "atop-defense/2"
    assert config["files"] == {WEIGHTS: file_sha256(out / WEIGHTS)}
    assert len(config["purifier_hash"]) == 64 and len(config["classifier_hash"]) == 64
    tensors = load_file(out / WEIGHTS)
    name = next(
        k for k, v in tensors.items() if k.startswith("purifier.") and v.is_floating_point()
    )
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, out / WEIGHTS)
    with pytest.raises(CheckpointError, match=f"{out / WEIGHTS} does not match the SHA-256"):
        load_export(out)
    # even with the file's hash updated, the purifier's own weights hash catches it
    config["files"][WEIGHTS] = file_sha256(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the purifier's weights do not match"):
        load_export(out)


def test_broken_export_files_are_named_not_raw_library_errors(checkpoints, tmp_path):
    out = _export(checkpoints, tmp_path / "release")
    weights = (out / WEIGHTS).read_bytes()
    config = (out / CONFIG).read_text()
    (out / WEIGHTS).write_bytes(weights[: len(weights) // 2])  # truncated
    with pytest.raises(CheckpointError, match=f"{out / WEIGHTS} does not match the SHA-256"):
        load_export(out)
    data = json.loads(config)
    data["files"][WEIGHTS] = __import__("hashlib").sha256(weights[: len(weights) // 2]).hexdigest()
    (out / CONFIG).write_text(json.dumps(data))  # a consistent hash: the reader itself fails
    with pytest.raises(CheckpointError, match=f"Cannot read {out / WEIGHTS} .*truncated"):
        load_export(out)
    (out / WEIGHTS).write_bytes(weights)
    (out / CONFIG).write_text(config[: len(config) // 2])
    with pytest.raises(CheckpointError, match=f"{out / CONFIG} is not valid JSON"):
        load_export(out)
    data = json.loads(config)
    del data["classifier"]
    (out / CONFIG).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"{out / CONFIG} lacks or mangles the key"):
        load_export(out)


def test_import_of_a_folder_that_is_not_an_export_says_what_an_export_holds(tmp_path):
    from atop.evaluation import load_defense

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match=r"holds \['notes.txt'\]\): an export is a folder "
                       r"holding config.json \(format atop-defense/2\) and model.safetensors"):  # fmt: skip
        load_export(tmp_path)
    with pytest.raises(CheckpointError, match="is a folder, not a torch file. An exported defense"):
        load_defense(tmp_path)  # the old message: "No torch file at ..."


def test_a_new_export_replaces_the_old_one_atomically_with_normal_permissions(
    checkpoints, tmp_path, monkeypatch
):
    import atop.export as export

    out = _export(checkpoints, tmp_path / "release")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # was 0700 (mkdtemp)
    for name in (WEIGHTS, CONFIG, CARD):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask
    before = (out / CONFIG).read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _export(checkpoints, out)
    monkeypatch.undo()
    assert (out / CONFIG).read_text() == before and load_export(out)  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["release"]  # no staging folder left

    swaps = []
    real = export._exchange
    monkeypatch.setattr(export, "_exchange", lambda a, b: swaps.append((a, b)) or real(a, b))
    inode = out.stat().st_ino
    export_defense(checkpoints["classifier"], None, out)  # now a classifier alone
    assert len(swaps) == 1 and out.stat().st_ino != inode  # swapped in, one rename
    assert load_export(out)[1] is None
    assert [p.name for p in tmp_path.iterdir()] == ["release"]


def test_export_never_replaces_a_folder_that_is_not_an_export(checkpoints, tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("...")
    with pytest.raises(CheckpointError, match="exists and is not an export"):
        _export(checkpoints, precious)
    assert (precious / "chapter1.tex").read_text() == "..."

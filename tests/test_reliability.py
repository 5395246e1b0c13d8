"""Reliability: bad input refused before any work, safe loading, locks, orphans (docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atop.checkpoint import CheckpointError, save_atomic, state_hash
from atop.hooks import RunLock, RunRefused, check_run, remove_orphans
from atop.models import build_classifier, classifier_checkpoint, load_classifier
from atop.models.purifier import build_purifier, load_purifier, purifier_checkpoint
from tests.conftest import make_project_copy, run_kedro

RT2 = {"kind": "rt2", "sigma": 0.25, "missing_rate": 0.25, "mask_block": None, "mask_number": 4}


@pytest.fixture(scope="module")
def project(tmp_path_factory, data_root) -> Path:
    os.environ["ATOP_DATA_ROOT"] = str(data_root)
    return make_project_copy(tmp_path_factory.mktemp("reliability"))


def nested(dotted: dict) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``, as ``kedro run --params a.b=1`` gives them."""
    out: dict = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def written_files(project: Path) -> list[Path]:
    return [p for p in (project / "data").rglob("*") if p.is_file() and p.name != ".gitkeep"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"evaluation.images": 0}, "evaluation.images=0 is out of range"),
        ({"classifier_pretraining.epochs": "ten"}, "epochs='ten': expected an integer"),
        ({"classifier_pretraining.epoch": 1}, "Did you mean 'epochs'"),
        ({"atop_finetuning.arms.atop.attack.eps": 8}, "0-255 scale"),
        ({"purifier_pretraining.transform.sigma": 25}, "sigma must be in \\[0, 1\\]"),
        ({"purifier_pretraining.transform.missing_rate": 1.5}, "missing_rate"),
        ({"atop_finetuning.lambda_cls": 0.1}, "unknown key 'lambda_cls'"),
        ({"classifier_pretraning.epochs": 1}, "Did you mean 'classifier_pretraining'"),
        ({"data_ingestion.dataset": "imagenette"}, "catalog's paths are for 'cifar10'"),
    ],
)
def test_bad_parameters_are_refused_before_any_node(project, override, message):
    began = time.perf_counter()
    with pytest.raises(Exception, match=message):
        run_kedro(project, "atop", env="smoke", params=nested(override))
    assert time.perf_counter() - began < 60  # seconds; about 10 s on an idle machine
    assert written_files(project) == []  # no node ran


def test_a_profile_without_its_own_output_folders_is_refused(project):
    """A new conf/<env> whose globals do not name it would write into the base profile's
    checkpoints and reports: refused before any node, with the line to add."""
    import shutil

    shutil.copytree(project / "conf" / "smoke", project / "conf" / "myexp")
    (project / "conf" / "myexp" / "globals.yml").unlink()
    try:
        with pytest.raises(Exception, match="has globals `profile: base`.*profile: myexp"):
            run_kedro(project, "atop", env="myexp")
    finally:
        shutil.rmtree(project / "conf" / "myexp")
    assert written_files(project) == []


def test_every_output_path_is_under_its_dataset_and_profile(tmp_path):
    """Catalog paths and resume files of every profile, and of another dataset, are
    data/<layer>/<dataset>/<profile>/...: no two profiles or datasets share a file."""
    import yaml

    from atop.dvc_params import resolve_parameters

    root = make_project_copy(tmp_path)
    globals_file = root / "conf" / "base" / "globals.yml"
    seen: dict[str, str] = {}
    for dataset in ("cifar10", "imagenette"):
        config = yaml.safe_load(globals_file.read_text())
        globals_file.write_text(yaml.safe_dump({**config, "dataset": dataset}))
        for env in ("base", "smoke", "paper"):
            catalog = resolve_parameters(root, env, key="catalog")
            params = resolve_parameters(root, env)
            paths = [e[k] for e in catalog.values() for k in ("filepath", "metrics_filepath")
                     if isinstance(e, dict) and k in e]  # fmt: skip
            paths += [b["resume_path"] for b in params.values() if "resume_path" in b]
            assert len(paths) > 40
            for path in paths:
                layer = path.split("/")[1]
                assert path.startswith(f"data/{layer}/{dataset}/{env}/"), (env, path)
                assert seen.setdefault(path, env) == env
            assert params["data_ingestion"]["dataset"] == dataset


def test_check_run_refuses_an_image_side_the_purifier_cannot_take(tmp_path):
    from tests.conftest import stage_params

    ingestion = stage_params("data_ingestion").to_dict()
    ingestion["dataset"] = "imagenette"
    ingestion["datasets"]["imagenette"]["image_size"] = 60
    from atop.pipelines.data_ingestion.nodes import IngestionParams

    params = {"data_ingestion": IngestionParams.from_dict(ingestion)}
    with pytest.raises(RunRefused, match="image_size=60.*divisible by 8.*56 or 64"):
        check_run(params, {"data_ingestion"}, tmp_path / "data", "imagenette")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_run_refuses_a_read_only_output_folder(tmp_path):
    models = tmp_path / "data" / "06_models"
    models.mkdir(parents=True)
    models.chmod(0o500)
    try:
        with pytest.raises(RunRefused, match="not writable"):
            check_run({}, set(), tmp_path / "data", "cifar10")
    finally:
        models.chmod(0o700)


def test_a_second_run_is_refused_and_a_stale_lock_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = RunLock(tmp_path)
        lock.path.write_text(f"{sleeper.pid} 2026-12-02T09:00:00\n")
        with pytest.raises(RunRefused, match=f"pid {sleeper.pid}, started 2026-12-02T09:00:00"):
            lock.acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.acquire()  # its process is gone: stale, taken over
    assert lock.path.read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not lock.path.exists()


def test_orphans_of_interrupted_saves_are_removed(tmp_path):
    orphan = tmp_path / "06_models" / ".classifier.pt.abc123.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a checkpoint")
    kept = tmp_path / "06_models" / "classifier.pt"
    kept.write_bytes(b"x")
    assert remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and kept.exists()


def test_a_failed_save_keeps_the_previous_file_whole(tmp_path):
    import pandas as pd

    from atop.datasets import CSVDataset, JSONDataset

    metrics = JSONDataset(filepath=str(tmp_path / "metrics.json"))
    metrics.save({"accuracy": 0.5})
    with pytest.raises(Exception, match="not JSON serializable"):
        metrics.save({"accuracy": object()})  # fails half-way through writing
    assert metrics.load() == {"accuracy": 0.5}
    table = CSVDataset(filepath=str(tmp_path / "history.csv"), save_args={"index": False})
    table.save(pd.DataFrame({"epoch": [1]}))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    orphan = tmp_path / ".history.tmp-1a2b3c4d.csv"
    orphan.write_text("epoch\n")
    assert remove_orphans(tmp_path) == [orphan]


def test_nan_weights_and_absurd_sizes_are_refused_on_load():
    model = build_classifier("resnet-fast", 10, width=4)
    checkpoint = classifier_checkpoint(model, "resnet-fast", {"num_classes": 10, "width": 4})
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name][0] = float("nan")
    with pytest.raises(CheckpointError, match=f"NaN or infinite weights \\({name}\\)"):
        load_classifier(checkpoint)
    huge = classifier_checkpoint(model, "resnet-fast", {"num_classes": 10, "width": 10**9})
    with pytest.raises(CheckpointError, match="width=1000000000"):
        load_classifier(huge)
    g, d = build_purifier({"cnum": 8})
    bad = purifier_checkpoint(g, d, meta={"transform": RT2})
    bad["config"] = {**bad["config"], "cnum": 10**6}
    with pytest.raises(CheckpointError, match="cnum=1000000"):
        load_purifier(bad)


def test_a_fine_tuned_purifier_refuses_another_classifier(tmp_path):
    from atop.evaluation import load_defense

    torch.manual_seed(0)
    own = classifier_checkpoint(
        build_classifier("resnet-fast", 10, width=4), "resnet-fast", {"num_classes": 10, "width": 4}
    )
    other = classifier_checkpoint(
        build_classifier("resnet-fast", 10, width=4), "resnet-fast", {"num_classes": 10, "width": 4}
    )
    g, d = build_purifier({"cnum": 8})
    meta = {"transform": RT2, "atop": {"classifier_hash": state_hash(own["state_dict"])}}
    save_atomic(purifier_checkpoint(g, d, meta=meta), tmp_path / "purifier_atop.pt")
    save_atomic(own, tmp_path / "own.pt")
    save_atomic(other, tmp_path / "other.pt")
    assert load_defense(tmp_path / "own.pt", tmp_path / "purifier_atop.pt") is not None
    with pytest.raises(CheckpointError, match="fine-tuned against classifier"):
        load_defense(tmp_path / "other.pt", tmp_path / "purifier_atop.pt")


def test_a_mistyped_data_root_is_an_error(tmp_path, monkeypatch):
    from atop.pipelines.data_ingestion.sources import DatasetNotFoundError, candidate_roots

    monkeypatch.setenv("ATOP_DATA_ROOT", str(tmp_path / "shraed" / "datasets"))
    with pytest.raises(DatasetNotFoundError, match="ATOP_DATA_ROOT=.*is not a folder"):
        candidate_roots(None, tmp_path / "raw")


def test_imagenette_classes_have_their_names(data_root):
    from atop.pipelines.data_ingestion.sources import IMAGENETTE_CLASSES

    folders = sorted(p.name for p in (data_root / "imagenette2-224" / "val").iterdir())
    assert sorted(IMAGENETTE_CLASSES) == folders
    assert IMAGENETTE_CLASSES["n03888257"] == "parachute"


@pytest.mark.slow
def test_a_retrain_with_the_same_settings_writes_the_same_checkpoint_bytes(tmp_path, data_root):
    """Timings live in the history, not the checkpoint: DVC sees an identical retrain as
    unchanged and reruns nothing downstream."""
    import hashlib

    os.environ["ATOP_DATA_ROOT"] = str(data_root)
    project = make_project_copy(tmp_path)
    run_kedro(project, "data_ingestion")
    digests = []
    for _ in range(2):
        run_kedro(project, "classifier_pretraining")
        checkpoint = project / "data" / "06_models" / "cifar10" / "smoke" / "classifier.pt"
        digests.append(hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    history = project / "data" / "08_reporting" / "cifar10" / "smoke" / "classifier_history.csv"
    assert "seconds" in history.read_text().splitlines()[0]


def test_every_record_says_which_dataset_profile_and_code_it_describes(ingested_project):
    import json

    from atop.hooks import code_commit

    reports = ingested_project / "data" / "08_reporting" / "cifar10" / "smoke"
    record = json.loads((reports / "data_validation.json").read_text())
    assert record["provenance"] == {
        "dataset": "cifar10",
        "profile": "smoke",
        "commit": code_commit(),
    }
    assert code_commit() == "unknown" or len(code_commit().split("+")[0]) == 40
    # the DVC metrics beside it stay numbers only
    assert "provenance" not in json.loads(
        (reports / "metrics" / "data_validation.json").read_text()
    )
    assert "ATOP_PROVENANCE" not in os.environ  # only during a run


@pytest.mark.slow
def test_a_rerun_after_an_interrupted_fine_tuning_skips_the_finished_stages(atop_project, tmp_path):
    """`make resume` (`kedro run --only-missing-outputs`) after a run killed during the AToP
    fine-tuning: ingestion, classifier and purifier are not redone."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(atop_project, project)
    models = project / "data" / "06_models" / "cifar10" / "smoke"
    done = [models / "classifier.pt", models / "purifier.pt",
            project / "data" / "02_intermediate" / "cifar10" / "smoke" / "train.pt"]  # fmt: skip
    before = {path: path.stat().st_mtime_ns for path in done}
    # the state a kill during finetune_atop leaves: its outputs and everything after missing
    (models / "purifier_atop.pt").unlink()
    for path in (project / "data" / "07_model_output").rglob("atop.pt"):
        path.unlink()
    run_kedro(project, "atop", only_missing_outputs=True)
    assert (models / "purifier_atop.pt").is_file()
    assert {path: path.stat().st_mtime_ns for path in done} == before

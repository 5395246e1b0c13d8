"""Reliability: bad input refused before any work, safe loading, locks, signals, orphans,
provenance and cross-machine comparison (docs/reliability.md lists each guarantee and its test)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from atop.checkpoint import CheckpointError, load_safe, save_atomic, state_hash
from atop.hooks import RunLock, RunRefused, check_run, remove_orphans
from atop.models import build_classifier, classifier_checkpoint, load_classifier
from atop.models.purifier import build_purifier, load_purifier, purifier_checkpoint
from atop.params import ParameterError
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


def _hold_lock(folder: str, ready, release) -> None:
    lock = RunLock(Path(folder))
    lock.acquire()
    ready.set()
    release.wait(30)


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunRefused, match=f"pid {holder.pid}, started 20"):
            RunLock(tmp_path).acquire()
    finally:
        release.set()
        holder.join(30)
    lock = RunLock(tmp_path)
    lock.acquire()  # its holder is gone: the kernel dropped the lock
    assert lock.path.read_text().split()[0] == str(os.getpid())
    lock.release()
    assert lock.path.read_text() == ""  # released: no owner left in the file


def test_a_killed_run_leaves_no_lock_and_a_reused_pid_never_blocks(tmp_path):
    """The lock is the kernel's (flock): a run killed with SIGKILL holds nothing, and a lock
    file naming a live process that does not hold the lock (a reused pid) does not block."""
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        RunLock(tmp_path).path.write_text(f"{sleeper.pid} 2026-12-02T09:00:00\n")
        lock = RunLock(tmp_path)
        lock.acquire()  # the old code refused: "pid <sleeper> is alive"
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def _race(folder: str, start, results) -> None:
    lock = RunLock(Path(folder))
    start.wait(30)
    try:
        lock.acquire()
    except RunRefused:
        results.put("refused")
        return
    results.put("took")
    time.sleep(2)
    lock.release()


def test_two_runs_starting_after_a_crash_cannot_both_take_the_lock(tmp_path):
    """After a crash (a stale lock file of a dead pid), four runs start at once: exactly one
    takes the lock (the old check-then-unlink takeover let several through)."""
    (tmp_path / ".atop-run.lock").write_text("999999999 2026-12-02T09:00:00\n")
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(4), context.Queue()
    racers = [context.Process(target=_race, args=(str(tmp_path), start, results)) for _ in range(4)]
    for racer in racers:
        racer.start()
    outcomes = sorted(results.get(timeout=60) for _ in racers)
    for racer in racers:
        racer.join(30)
    assert outcomes == ["refused", "refused", "refused", "took"]


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


def test_every_record_says_which_dataset_profile_code_and_machine_it_describes(ingested_project):
    from atop.hooks import code_commit
    from atop.machine import machine

    reports = ingested_project / "data" / "08_reporting" / "cifar10" / "smoke"
    record = json.loads((reports / "data_validation.json").read_text())
    assert record["provenance"] == {
        "dataset": "cifar10",
        "profile": "smoke",
        "commit": code_commit(),
        "machine": machine(),  # the CPU, its kernel-selecting ISA flags, threads, libraries
    }
    assert {"cpu", "isa", "threads", "torch", "onednn", "device"} <= set(machine())
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


# --------------------------------------------------------------------------------------
# Every parameter of the chosen pipelines checked before the first node (issue 33, item 1)


def set_attack_value(conf_file: Path, key: str, text: str) -> tuple[int, int]:
    """In a parameters file, write ``text`` as the value of ``key`` in the first entry of
    ``evaluation.attacks`` that has it; return the entry's index and the value's line."""
    source = conf_file.read_text()
    root = yaml.compose(source)
    block = next(v for k, v in root.value if k.value == "evaluation")
    attacks = next(v for k, v in block.value if k.value == "attacks")
    for index, item in enumerate(attacks.value):
        value = next((v for k, v in item.value if k.value == key), None)
        if value is not None:
            lines = source.splitlines(keepends=True)
            line = lines[value.start_mark.line]
            lines[value.start_mark.line] = line[: value.start_mark.column] + text + "\n"
            conf_file.write_text("".join(lines))
            return index, value.start_mark.line + 1
    raise AssertionError(f"no evaluation.attacks entry with {key} in {conf_file}")


@pytest.mark.parametrize(
    ("text", "shown", "rule"),
    [
        (".inf", "inf", "expected a finite number"),
        ("-0.1", "-0.1", "out of range"),
        ("1.0e9", "1000000000.0", "out of range"),
        (".nan", "nan", "expected a finite number"),
        ("8", "8", "out of range"),
    ],
)
def test_a_bad_eps_in_evaluation_attacks_is_refused_before_any_node(
    tmp_path, data_root, text, shown, rule
):
    """Refused when the context is created, naming evaluation.attacks[i].eps, the value, the
    range with its unit and the file and line; the old code ran ingestion, classifier and
    purifier training first (overwriting their checkpoints) and failed in evaluate_ap."""
    os.environ["ATOP_DATA_ROOT"] = str(data_root)
    project = make_project_copy(tmp_path)
    index, line = set_attack_value(
        project / "conf" / "smoke" / "parameters_evaluation.yml", "eps", text
    )
    began = time.perf_counter()
    with pytest.raises(ParameterError) as info:
        run_kedro(project, "atop", env="smoke")
    assert time.perf_counter() - began < 30
    message = str(info.value)
    assert message.startswith(f"evaluation.attacks[{index}].eps={shown}"), message
    assert rule in message and "on the [0, 1] pixel scale" in message
    assert f"Fix it in conf/smoke/parameters_evaluation.yml line {line}." in message
    assert written_files(project) == []


@pytest.mark.parametrize(
    ("where", "key", "value", "rule"),
    [
        ("convergence.attack", "eps", -0.1, "is out of range: it must be > 0 and <= 1 on the"),
        ("atop_finetuning.val_attack", "eps", 1e9, "is out of range: it must be > 0 and <= 1"),
        ("atop_finetuning.arms.atop.attack", "eps", float("nan"), ": expected a finite number"),
        ("evaluation.sanity.stronger", "steps", 0, "is out of range: it must be an integer >= 1"),
        (
            "adversarial_training.robust_eval",
            "steps",
            10**9,
            "is out of range: it must be an integer >= 1 and <= 10000 (gradient steps",
        ),
        ("evaluation.sanity", "eps_sweep", 8, "is out of range: it must be >= 0 and <= 1"),
    ],
)
def test_every_attack_spec_is_checked_with_its_dotted_key(where, key, value, rule):
    """Every attack spec wherever it lives (the convergence study's, the fine-tuning arms',
    the validation attack, the sanity checks' stronger attack and ε sweep, the robust
    baselines' PGD), found by walking the resolved parameters."""
    from atop.dvc_params import resolve_parameters
    from atop.preflight import ConfSources, check_parameters, find_attack_specs
    from tests.conftest import PROJECT_ROOT

    params = resolve_parameters(PROJECT_ROOT, "smoke")
    if key == "eps_sweep":  # a list, or a mapping norm -> list
        sweep = params["evaluation"]["sanity"]["eps_sweep"]
        norm = next(iter(sweep), None) if isinstance(sweep, dict) else None
        points = sweep[norm] if norm else sweep
        points[1] = 8
        dotted, shown = f"evaluation.sanity.eps_sweep{'.' + norm if norm else ''}[1]", "8"
    else:
        found = next(f for f in find_attack_specs(params) if f.key.startswith(where))
        found.spec[key] = value  # the walk hands back the mapping itself
        dotted, shown = f"{found.key}.{key}", repr(value)
    sources = ConfSources(PROJECT_ROOT, PROJECT_ROOT / "conf", "smoke")
    with pytest.raises(ParameterError) as info:
        check_parameters(params, None, sources)
    message = str(info.value)
    assert message.startswith(f"{dotted}={shown} {rule}".replace(" :", ":")), message
    assert re.search(r"Fix it in conf/(smoke|base)/parameters_\w+\.yml line \d+\.", message)


def test_typed_block_refusals_name_the_file_and_the_hint_does_not_leak(project):
    """A refusal of Kedro's typed blocks names where the value comes from (here --params);
    after the refused run, a refusal outside any run says the generic conf/<profile> hint."""
    from tests.conftest import stage_params

    with pytest.raises(Exception, match=r"epochs=0 is out of range.*Fix it in the --params"):
        run_kedro(project, "atop", env="smoke", params=nested({"classifier_pretraining.epochs": 0}))
    with pytest.raises(ParameterError) as info:
        stage_params("classifier_pretraining").replace(epochs=0)
    assert "conf/<profile>/parameters_classifier_pretraining.yml" in str(info.value)
    assert written_files(project) == []


@pytest.mark.parametrize("child", ["sanity", "grid"])
def test_counts_above_their_limit_are_refused_not_lowered(project, child):
    """evaluation.sanity.images / evaluation.grid.images above evaluation.images were silently
    lowered (evaluation.images itself above the subset was refused): now both are refused."""
    with pytest.raises(ParameterError, match=rf"evaluation\.{child}\.images=100 is out of range: "
                       r"it must be an integer >= 1 and <= 8 .*Fix it in the --params override"):  # fmt: skip
        run_kedro(project, "atop", env="smoke", params=nested({f"evaluation.{child}.images": 100}))
    assert written_files(project) == []


def test_a_bad_eps_on_the_base_profile_is_refused_in_seconds_and_nothing_is_written(
    tmp_path, data_root
):
    """`kedro run --pipelines atop` (the base profile, the command a user types) with a
    negative eps: refused in under 30 s, in at most 5 lines, exit code 2; the existing
    checkpoints keep their modification times and no file is written."""
    project = make_project_copy(tmp_path)
    index, line = set_attack_value(
        project / "conf" / "base" / "parameters_evaluation.yml", "eps", "-0.1"
    )
    models = project / "data" / "06_models" / "cifar10" / "base"
    models.mkdir(parents=True)
    existing = {
        models / name: b"a previous run's checkpoint" for name in ("classifier.pt", "purifier.pt")
    }
    for path, content in existing.items():
        path.write_bytes(content)
    before = {p: p.stat().st_mtime_ns for p in written_files(project)}
    env = {**os.environ, "ATOP_DATA_ROOT": str(data_root)}
    began = time.perf_counter()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kedro"), "run", "--pipelines", "atop"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert seconds < 30, seconds
    assert len(output) <= 5, output
    assert f"evaluation.attacks[{index}].eps=-0.1 is out of range" in output[-1]
    assert f"conf/base/parameters_evaluation.yml line {line}" in output[-1]
    assert {p: p.stat().st_mtime_ns for p in written_files(project)} == before


# --------------------------------------------------------------------------------------
# Every checkpoint an evaluation will use, checked before the first attack (item 2)


@pytest.fixture(scope="module")
def finished_project(atop_project, tmp_path_factory) -> Path:
    """A copy of a finished smoke run of the main job (its checkpoints and reports)."""
    target = tmp_path_factory.mktemp("finished") / "project"
    shutil.copytree(atop_project, target)
    return target


def _tampered(project: Path, name: str, change) -> Path:
    path = project / "data" / "06_models" / "cifar10" / "smoke" / name
    checkpoint = load_safe(path)
    change(checkpoint)
    save_atomic(checkpoint, path)
    return path


def _outputs(project: Path) -> dict[Path, int]:
    paths = list((project / "data" / "07_model_output").rglob("*"))
    paths += list((project / "data" / "08_reporting").glob("*/*/robustness*"))
    return {p: p.stat().st_mtime_ns for p in paths if p.is_file()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["meta"]["transform"].update(missing_rate=2.0),
            r"purifier_atop\.pt: meta\.transform\.missing_rate=2\.0 is refused: missing_rate",
        ),
        (
            lambda c: c["meta"]["transform"].update(kind="rt9"),
            r"purifier_atop\.pt: meta\.transform\.kind='rt9' is refused",
        ),
        (
            lambda c: c["meta"]["transform"].update(
                kind="rt3", mask_number=10**9, missing_rate=1e-12
            ),
            r"purifier_atop\.pt: meta\.transform\.mask_number=1000000000 is refused: 1000000000 "
            r"disjoint masks do not fit the 64 mask blocks",
        ),
        (
            lambda c: next(iter(c["state_dict"]["generator"].values())).fill_(float("nan")),
            r"purifier_atop\.pt: The purifier checkpoint holds NaN",
        ),
    ],
)
def test_a_broken_checkpoint_fails_before_the_first_attack_with_no_output_written(
    finished_project, change, message
):
    """`kedro run --pipelines evaluation` with a broken AToP purifier: refused in seconds,
    naming the file and the key, before any defense is attacked (the old code attacked
    standard, AP and two arms first and rewrote their per-defense outputs)."""
    path = finished_project / "data" / "06_models" / "cifar10" / "smoke" / "purifier_atop.pt"
    original = path.read_bytes()
    before = _outputs(finished_project)
    _tampered(finished_project, "purifier_atop.pt", change)
    began = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match=message) as info:
            run_kedro(finished_project, "evaluation")
    finally:
        path.write_bytes(original)
    assert time.perf_counter() - began < 30
    assert "data/06_models/cifar10/smoke/purifier_atop.pt" in str(info.value)
    assert "kedro run --pipelines atop_finetuning" in str(info.value) or "Retrain" in str(
        info.value
    )
    assert _outputs(finished_project) == before


def test_a_checkpoint_the_run_writes_is_checked_before_the_first_node_that_uses_it(tmp_path):
    """Checkpoints written by the run itself (classifier, purifier): each defense is checked
    once all its checkpoints exist, before the first node that consumes one of them."""
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.pipeline import Node, Pipeline

    from atop.hooks import CheckpointChecks

    classifier = classifier_checkpoint(
        build_classifier("resnet-fast", 10, width=4), "resnet-fast", {"num_classes": 10, "width": 4}
    )
    g, d = build_purifier({"cnum": 8})
    purifier = purifier_checkpoint(g, d, meta={"transform": {**RT2, "missing_rate": 2.0}})
    make = lambda: None  # noqa: E731 (the nodes never run here)
    pipeline = Pipeline(
        [
            Node(make, None, "classifier", name="train_classifier"),
            Node(lambda c: c, "classifier", "purifier", name="train_purifier"),
            Node(lambda c, p: None, ["classifier", "purifier"], "result", name="evaluate_ap"),
        ]
    )
    catalog = DataCatalog({"classifier": MemoryDataset(), "purifier": MemoryDataset()})
    checks = CheckpointChecks(pipeline, catalog, tmp_path, {})
    checks.check_ready({})  # nothing is a run input: nothing checked yet
    assert set(checks.pending) == {"standard", "ap"}
    checks.done.add("classifier")
    checks.before_node(pipeline.nodes[1], {"classifier": classifier})  # standard: fine
    assert set(checks.pending) == {"ap"}
    checks.done.add("purifier")
    with pytest.raises(CheckpointError, match=r"purifier: meta\.transform\.missing_rate=2\.0"):
        checks.before_node(pipeline.nodes[2], {"classifier": classifier, "purifier": purifier})


def test_a_truncated_checkpoint_is_named_before_any_work(finished_project):
    path = finished_project / "data" / "06_models" / "cifar10" / "smoke" / "purifier.pt"
    original = path.read_bytes()
    before = _outputs(finished_project)
    path.write_bytes(original[: len(original) // 3])
    try:
        with pytest.raises(CheckpointError, match=r"Cannot load '.*purifier\.pt'.*truncated"):
            run_kedro(finished_project, "evaluation")
    finally:
        path.write_bytes(original)
    assert _outputs(finished_project) == before


# --------------------------------------------------------------------------------------
# Signals end the run through the error path (item 7)


def test_sigterm_ends_the_run_with_a_log_line_its_lock_released_and_the_data_docs(
    tmp_path, data_root
):
    project = make_project_copy(tmp_path)
    env = {**os.environ, "ATOP_DATA_ROOT": str(data_root), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen(
            [str(Path(sys.executable).parent / "kedro"), "run", "--pipelines", "atop", "--env", "smoke"],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.time() + 120
            while "Running node: train_classifier" not in log.read_text():
                assert run.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.2)
            run.send_signal(signal.SIGTERM)
            code = run.wait(120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text
    assert "The run was stopped by SIGTERM" in text
    assert "Traceback" not in text
    lock = RunLock(project / "data")
    lock.acquire()  # released
    lock.release()
    docs = (
        project / "data/08_reporting/cifar10/smoke/gx/uncommitted/data_docs/local_site/index.html"
    )
    assert docs.is_file() and "Great Expectations Data Docs" in text


# --------------------------------------------------------------------------------------
# Results across machines: provenance.machine and `atop compare` (item 8)


def test_machines_with_other_kernels_are_told_apart():
    from atop.machine import machine, numerics_differences

    here = machine()
    assert numerics_differences(here, dict(here)) == []
    other = {
        **here,
        "isa": [f for f in here["isa"] if not f.startswith("amx")] or ["avx2"],
        "threads": 7,
    }
    differences = numerics_differences(here, other)
    assert [d.split(":")[0] for d in differences] == ["isa", "threads"]
    assert numerics_differences(here, {}) != []  # an old record without a machine


def _copy_run(project: Path, target: Path) -> Path:
    """The records of a finished smoke run, as a user copies them: the report folder with the
    verdicts CSV beside robustness.json."""
    reports = project / "data" / "08_reporting" / "cifar10" / "smoke"
    target.mkdir(parents=True)
    shutil.copy(reports / "robustness.json", target / "robustness.json")
    verdicts = (
        project / "data" / "07_model_output" / "cifar10" / "smoke" / "robustness_verdicts.csv"
    )
    shutil.copy(verdicts, target / "robustness_verdicts.csv")
    return target


def test_compare_tells_identical_consistent_and_different_runs_apart(
    atop_project, tmp_path, capsys
):
    import pandas as pd

    from atop.compare import main as compare

    run_a = atop_project / "data" / "08_reporting" / "cifar10" / "smoke"
    same = _copy_run(atop_project, tmp_path / "same")
    assert compare(run_a, same) == 0
    report = capsys.readouterr().out
    assert "machines: the same numerics" in report
    assert "atop: identical verdicts" in report and "standard: identical verdicts" in report

    # one image of one defense flips: other numerics, not a different result
    nudged = _copy_run(atop_project, tmp_path / "nudged")
    table = pd.read_csv(nudged / "robustness_verdicts.csv")
    row = table.index[(table["defense"] == "ap") & (table["attack"] == "clean")][0]
    draws = [c for c in table.columns if c.startswith("draw_")]
    table.loc[row, draws[0]] = 1 - table.loc[row, draws[0]]
    table.loc[row, "correct"] = table.loc[row, draws].sum()
    table.to_csv(nudged / "robustness_verdicts.csv", index=False)
    record = json.loads((nudged / "robustness.json").read_text())
    record["provenance"]["machine"] = {**record["provenance"]["machine"], "isa": ["avx512_bf16"]}
    (nudged / "robustness.json").write_text(json.dumps(record))
    assert compare(run_a, nudged) == 0
    report = capsys.readouterr().out
    assert "machines: different numerics (isa:" in report
    assert "ap: consistent" in report
    assert any(line.split()[:2] == ["ap", "clean"] for line in report.splitlines())

    # AToP right on every draw of every image in one run, wrong in the other: different
    def atop_verdicts(folder: Path, value: int) -> Path:
        table = pd.read_csv(folder / "robustness_verdicts.csv")
        rows = table["defense"] == "atop"
        for d, column in enumerate(draws):
            table.loc[rows & (table["draws"] > d), column] = value
        table.loc[rows, "correct"] = table.loc[rows, draws].sum(axis=1)
        table.to_csv(folder / "robustness_verdicts.csv", index=False)
        return folder

    right = atop_verdicts(_copy_run(atop_project, tmp_path / "right"), 1)
    wrong = atop_verdicts(_copy_run(atop_project, tmp_path / "wrong"), 0)
    assert compare(right, wrong, out=tmp_path / "compare.json") == 1
    report = capsys.readouterr().out
    assert "atop: DIFFERENT beyond numerics: clean +100.00 points" in report
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["defenses"]["atop"] == "different" and saved["defenses"]["standard"] == "identical"


def test_the_committed_reference_run_is_the_records_and_compares_as_a_run(capsys):
    """reference/cifar10/base holds the run the README quotes (its record and per-image
    verdicts), so a clone on other hardware can `atop compare` its own run with it."""
    from atop.compare import main as compare
    from tests.conftest import PROJECT_ROOT

    reference = PROJECT_ROOT / "reference" / "cifar10" / "base"
    committed = PROJECT_ROOT / "data" / "08_reporting" / "cifar10" / "base" / "robustness.json"
    assert json.loads((reference / "robustness.json").read_text()) == json.loads(
        committed.read_text()
    ), "refresh reference/cifar10/base with the committed records and their verdicts CSV"
    assert compare(reference, reference) == 0
    report = capsys.readouterr().out
    for defense in json.loads(committed.read_text())["defenses"]:
        assert f"{defense}: identical verdicts" in report


def test_compare_refuses_what_cannot_be_paired(atop_project, tmp_path):
    from atop.compare import CompareError
    from atop.compare import main as compare
    from atop.errors import MissingOutputs

    run_a = atop_project / "data" / "08_reporting" / "cifar10" / "smoke"
    with pytest.raises(MissingOutputs, match="holds no robustness.json"):
        compare(run_a, tmp_path)
    other = _copy_run(atop_project, tmp_path / "other")
    record = json.loads((other / "robustness.json").read_text())
    record["settings"]["draws"] += 1
    (other / "robustness.json").write_text(json.dumps(record))
    with pytest.raises(CompareError, match=r"different protocols \(settings\.draws"):
        compare(run_a, other)
    (other / "robustness_verdicts.csv").unlink()
    with pytest.raises(MissingOutputs, match="no per-image verdicts"):
        compare(run_a, other)

"""The evaluation pipeline end to end on real CIFAR-10 (smoke profile, SequentialRunner).

The checkpoints are built here in seconds: a small classifier briefly trained on 512 real
training images, two randomly initialised purifiers (cnum 8) standing for the pretrained
("AP") and the AToP purifier. The per-defense results (``evaluation_<defense>``) and the
report outputs are the real catalog datasets of ``conf/base/catalog_evaluation.yml`` pointed
at ``tmp_path``. The library the nodes call (:mod:`atop.evaluation`) is tested on its own in
``tests/evaluation``.
"""

from __future__ import annotations

import functools
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner

from atop.checkpoint import CheckpointError
from atop.datasets import TorchDataset
from atop.evaluation import protocol
from atop.evaluation.defenses import DEFENSES
from atop.evaluation.suite import EvalParams
from atop.models import build_classifier, classifier_checkpoint
from atop.models.purifier import build_purifier, purifier_checkpoint
from atop.pipeline_registry import register_pipelines
from atop.pipelines.evaluation import create_pipeline
from atop.pipelines.evaluation.nodes import INPUTS
from atop.validation import DataValidationError
from atop.validation import adversarial as gx_adversarial
from tests.conftest import PROJECT_ROOT, KeptMemoryDataset, stage_params

REPORTS = {
    "robustness": "robustness.json",
    "robustness_table": "robustness.csv",
    "robustness_report": "robustness_report.md",
    "robust_accuracy_vs_eps": "robust_accuracy_vs_eps.png",
    "adversarial_grid": "adversarial_grid.png",
}
TRANSFORM = {
    "kind": "rt2",
    "sigma": 0.25,
    "missing_rate": 0.25,
    "mask_block": None,
    "mask_number": 4,
}
FGSM_TRAINING = {"name": "fgsm", "eps": 8 / 255}
CLASS_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


#: The per-defense results: one catalog entry per defense (a dataset factory).
RESULTS_PATTERN = "evaluation_{defense}"


@functools.cache
def _project_context(env: str = "smoke"):
    """The project's own Kedro context (config loader and catalog) of profile ``env``."""
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env=env) as session:
        return session.load_context()


def catalog_config(env: str = "smoke") -> dict:
    """The catalog entries as ``kedro run --env <env>`` resolves them (globals included)."""
    return dict(_project_context(env).config_loader["catalog"])


@pytest.fixture(scope="module")
def inputs(data_root, cifar10_test_batch) -> dict:
    """Real CIFAR-10: a classifier trained briefly on 512 training images, the 256 test
    images, and an evaluation subset of 5 images it gets right and 3 it gets wrong."""
    with open(data_root / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")  # the official CIFAR-10 python format
    train_x = torch.from_numpy(np.asarray(batch["data"][:512], dtype=np.uint8))
    train_x = train_x.reshape(512, 3, 32, 32).float() / 255
    train_y = torch.tensor(batch["labels"][:512])
    torch.manual_seed(0)
    model = build_classifier("resnet-fast", 10, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(4):
        for start in range(0, 512, 64):
            loss = F.cross_entropy(model(train_x[start : start + 64]), train_y[start : start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    images, labels = cifar10_test_batch
    with torch.no_grad():
        right = model(images).argmax(1) == labels
    correct, wrong = right.nonzero().flatten(), (~right).nonzero().flatten()
    assert len(correct) >= 5, "the briefly trained classifier should be right on a few images"
    eval_indices = sorted(correct[:5].tolist() + wrong[:3].tolist())
    classifier = classifier_checkpoint(
        model, "resnet-fast", {"num_classes": 10, "width": 8}, meta={"train_seconds": 3.0}
    )
    purifiers = []
    for seed, meta in ((0, {"transform": TRANSFORM}), (1, {"transform": TRANSFORM})):
        torch.manual_seed(seed)
        generator, discriminator = build_purifier({"cnum": 8})
        purifiers.append(purifier_checkpoint(generator, discriminator, meta=meta))
    purifiers[1]["meta"]["atop"] = {"attack": FGSM_TRAINING, "train_seconds": 5.0}
    return {
        "test_set": {"images": (images * 255).round().to(torch.uint8), "labels": labels},
        "eval_indices": eval_indices,
        "class_names": CLASS_NAMES,
        "classifier": classifier,
        "purifier": purifiers[0],
        "atop_purifier": purifiers[1],
    }


def make_catalog(inputs: dict, folder: Path, params: EvalParams, baselines: dict) -> DataCatalog:
    """The real per-defense result and report datasets of catalog_evaluation.yml (paths
    moved to ``folder``), the inputs in memory, and the baselines as optional TorchDatasets
    (``None``: file missing)."""
    config = {}
    for name, entry in catalog_config().items():
        if name in REPORTS:
            config[name] = {**entry, "filepath": str(folder / Path(entry["filepath"]).name)}
        elif name == RESULTS_PATTERN:
            results = folder / "evaluation" / Path(entry["filepath"]).name
            config[name] = {**entry, "filepath": str(results)}
    assert RESULTS_PATTERN in config and set(REPORTS) <= set(config)
    catalog = DataCatalog.from_config(config)
    for name, value in inputs.items():
        catalog[name] = MemoryDataset(value, copy_mode="assign")
    for name, checkpoint in baselines.items():
        path = folder / f"{name}.pt"
        if checkpoint is not None:
            TorchDataset(str(path)).save(checkpoint)
        catalog[name] = TorchDataset(str(path), optional=True)
    catalog["params:evaluation"] = MemoryDataset(params, copy_mode="assign")
    catalog["robustness_results"] = KeptMemoryDataset()
    return catalog


@pytest.fixture(scope="module")
def evaluated(inputs, tmp_path_factory) -> dict:
    """One smoke run: standard, ap, atop and the pgd_at baseline (its checkpoint exists; the
    classifier stands in for it), rvs missing. Every GX summary is recorded."""
    folder = tmp_path_factory.mktemp("evaluation")
    params = stage_params("evaluation")
    baselines = {"pgd_at_classifier": inputs["classifier"], "rvs_classifier": None}
    catalog = make_catalog(inputs, folder, params, baselines)
    summaries = []
    real_validate = gx_adversarial.validate_adversarial

    def recording_validate(*args, **kwargs):
        summaries.append(real_validate(*args, **kwargs))
        return summaries[-1]

    with pytest.MonkeyPatch.context() as patch:
        # the nodes import the suite when they run: patch it where it lives
        patch.setattr(gx_adversarial, "validate_adversarial", recording_validate)
        SequentialRunner().run(create_pipeline(), catalog)
    return {
        "folder": folder,
        "params": params,
        "results": catalog["robustness_results"].load(),
        "metrics": json.loads((folder / REPORTS["robustness"]).read_text()),
        "summaries": summaries,
    }


def test_every_attack_output_passes_the_suite_and_is_scored(evaluated):
    params, results = evaluated["params"], evaluated["results"]
    labels = [entry["label"] for entry in params.attacks]
    kinds = {entry["name"] for entry in params.attacks}
    assert kinds == {"fgsm", "pgd", "bpda", "cw", "autoattack"}
    assert {e["version"] for e in params.attacks if e["name"] == "autoattack"} == {
        "standard",
        "rand",
    }
    assert list(results["defenses"]) == ["standard", "ap", "atop", "pgd_at"]
    for name, res in results["defenses"].items():
        expected = labels if name in ("ap", "atop") else [x for x in labels if x != "bpda_linf"]
        assert list(res["attacks"]) == expected, name
        assert all(len(a["correct"]) == params.images for a in res["attacks"].values())
    # one suite per attack run + per extra sanity run (eps sweep point, stronger attack)
    extra_sweep = sum(1 for e in params.sanity.eps_sweep if e != 0 and not math.isclose(e, 8 / 255))
    runs = sum(len(r["attacks"]) for r in results["defenses"].values())
    assert len(evaluated["summaries"]) == runs + 4 * (extra_sweep + 1)
    for summary in evaluated["summaries"]:
        assert summary["success"] and summary["rows"] == params.images
        if summary["eps"] is not None:
            assert summary["max_perturbation"] <= summary["eps"] + params.tolerance


def test_per_defense_results_are_catalog_files_the_report_is_gathered_from(evaluated):
    """``evaluation_<defense>``: one torch file per defense (re-evaluate one alone), the
    skipped ones recording why; the gathered results are exactly their contents."""
    folder, results = evaluated["folder"] / "evaluation", evaluated["results"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.pt" for n in DEFENSES)
    for name in DEFENSES:
        saved = TorchDataset(str(folder / f"{name}.pt")).load()
        if name in results["defenses"]:
            assert {k: v for k, v in saved.items() if k != "grid"} == results["defenses"][name]
            assert (saved["grid"] is not None) == (name == evaluated["params"].grid.defense)
        else:
            assert saved == {"skipped": results["skipped"][name]}, name


def test_deterministic_defenses_get_one_eot_sample_and_one_draw(evaluated):
    for name, res in evaluated["results"]["defenses"].items():
        eots = {a["eot_iter"] for a in res["attacks"].values() if a["eot_iter"] is not None}
        if res["stochastic"]:
            assert name in ("ap", "atop") and max(eots) == 2  # smoke pgd_linf eot_iter
        else:
            assert eots == {1}


def test_attacks_lower_the_undefended_accuracy_and_worst_case_is_the_minimum(evaluated):
    metrics = evaluated["metrics"]
    standard = metrics["defenses"]["standard"]
    assert standard["clean_acc"] == 5 / 8  # the subset: 5 images it gets right, 3 wrong
    assert standard["robust_acc"]["pgd_linf"] < standard["clean_acc"]
    for name, entry in metrics["defenses"].items():
        bounded = [v for k, v in entry["robust_acc"].items()]
        assert entry["worst_case_acc"] <= min([entry["clean_acc"], *bounded]), name
        assert entry["worst_case_linf_acc"] >= entry["worst_case_acc"]
        assert entry["worst_case_l2_acc"] >= entry["worst_case_acc"]
        res = evaluated["results"]["defenses"][name]
        per_image = [res["clean"]] + [a["correct"] for a in res["attacks"].values()]
        assert res["worst_case"]["all"] == [all(col) for col in zip(*per_image, strict=True)]


def test_missing_optional_baseline_is_skipped_present_one_is_evaluated(evaluated):
    metrics = evaluated["metrics"]
    assert "pgd_at" in metrics["defenses"] and "rvs" not in metrics["defenses"]
    assert "rvs_classifier" in metrics["skipped"]["rvs"]
    # pgd_at is the same classifier here: same images, same seed -> same clean verdicts
    assert (
        metrics["defenses"]["pgd_at"]["clean_acc"] == metrics["defenses"]["standard"]["clean_acc"]
    )
    report = (evaluated["folder"] / REPORTS["robustness_report"]).read_text()
    assert "rvs: not evaluated" in report


def test_sanity_checks_run_and_are_reported(evaluated):
    metrics = evaluated["metrics"]
    report = (evaluated["folder"] / REPORTS["robustness_report"]).read_text()
    checks = {"eps_monotonic", "large_eps_near_zero", "stronger_attack",
              "iterative_beats_single_step", "bpda_vs_exact"}  # fmt: skip
    for name, statuses in metrics["sanity"].items():
        assert set(statuses) == checks
        run = {k for k, v in statuses.items() if v != "not run"}
        assert run == (checks if name in ("ap", "atop") else checks - {"bpda_vs_exact"}), name
        assert set(statuses.values()) <= {"pass", "fail", "not run"}
        assert list(metrics["robust_acc_vs_eps"][name]) == ["0/255", "8/255", "64/255"]
        assert metrics["robust_acc_vs_eps"][name]["0/255"] == metrics["defenses"][name]["clean_acc"]
        limit = metrics["settings"]["sanity"]["large_eps_max_acc"]
        near_zero = metrics["robust_acc_vs_eps"][name]["64/255"] <= limit
        assert statuses["large_eps_near_zero"] == ("pass" if near_zero else "fail")
    standard = metrics["robust_acc_vs_eps"]["standard"]
    assert standard["64/255"] < standard["0/255"]  # even 2 PGD steps at 64/255 break some
    assert "## Gradient-masking sanity checks" in report
    assert report.count("| ap | ") >= 5 and "BPDA vs exact gradients" in report
    assert "max(1, 2·√(b + c))" in report  # the documented noise tolerance


def _markdown_table(report: str, heading: str) -> pd.DataFrame:
    """The first Markdown table after ``heading``, cells stripped of ``**``."""
    block = []
    for line in report.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            block.append([cell.strip().strip("*") for cell in line.strip("|").split("|")])
        elif block:
            break
    return pd.DataFrame(block[2:], columns=block[0])


def test_report_files_exist_and_agree_with_the_json(evaluated):
    folder, metrics = evaluated["folder"], evaluated["metrics"]
    for name, filename in REPORTS.items():
        assert (folder / filename).stat().st_size > 0, name
    for png in ("robust_accuracy_vs_eps.png", "adversarial_grid.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = metrics["settings"]
    assert (settings["n_images"], settings["seed"], settings["draws"]) == (8, 0, 2)
    assert settings["attacks"]["pgd_linf"]["eps"] == pytest.approx(8 / 255)
    assert settings["attacks"]["pgd_linf"]["steps"] == 2
    assert settings["attacks"]["pgd_linf"]["eot_iter"] == 2

    table = pd.read_csv(folder / REPORTS["robustness_table"]).set_index("defense")
    assert list(table.index) == list(metrics["defenses"])
    markdown = _markdown_table(
        (folder / REPORTS["robustness_report"]).read_text(), "## Clean and robust accuracy (%)"
    ).set_index("defense")
    for name, entry in metrics["defenses"].items():
        values = {"clean": entry["clean_acc"], **entry["robust_acc"]}
        values.update(
            worst_case=entry["worst_case_acc"], worst_case_linf=entry["worst_case_linf_acc"]
        )
        for column, value in values.items():
            assert table.loc[name, column] == pytest.approx(value), (name, column)
        for column, value in {"clean": entry["clean_acc"], **entry["robust_acc"]}.items():
            assert float(markdown.loc[name, column]) == pytest.approx(100 * value, abs=0.005)
        assert float(markdown.loc[name, "worst case"]) == pytest.approx(
            100 * entry["worst_case_acc"], abs=0.005
        )
    assert (
        np.isnan(table.loc["standard", "bpda_linf"])
        and markdown.loc["standard", "bpda_linf"] == "—"
    )


def test_unseen_attacks_and_training_time_come_from_the_checkpoints(evaluated):
    metrics = evaluated["metrics"]
    assert metrics["unseen"]["training_attack"] == "fgsm Linf 8/255"
    seen = metrics["unseen"]["seen"]
    assert seen["fgsm"] is True and not any(v for k, v in seen.items() if k != "fgsm")
    # the purifier checkpoints record no pretraining time: the total is unknown, not made up
    assert metrics["defenses"]["standard"]["train_seconds"] == 3.0
    assert metrics["defenses"]["atop"]["train_seconds"] is None
    stages = evaluated["results"]["defenses"]["atop"]["train_seconds"]
    assert stages == {"classifier": 3.0, "purifier": None, "atop_purifier": 5.0}
    report = (evaluated["folder"] / REPORTS["robustness_report"]).read_text()
    assert "fine-tuned with **fgsm Linf 8/255**" in report
    assert "atop: `purifier` records no training time" in report


def test_grid_applies_the_transform_to_every_image(evaluated):
    grid = evaluated["results"]["grid"]
    n = evaluated["params"].grid.images
    assert (grid["defense"], grid["attack"]) == ("atop", "pgd_linf")
    for key in ("clean", "adversarial", "transformed", "purified"):
        assert grid[key].shape == (n, 3, 32, 32)
        assert 0 <= grid[key].min() and grid[key].max() <= 1
    holes = (grid["transformed"] == 0).all(dim=1).flatten(1).float().mean(1)
    assert (holes >= 0.25).all()  # RT2: a quarter of every image is masked
    assert not torch.equal(grid["transformed"], grid["adversarial"])


def test_an_attack_that_breaks_eps_fails_the_evaluation_and_writes_nothing(
    inputs, tmp_path, monkeypatch
):
    # one defense: which node runs first is Kedro's choice, the failing one must be named
    params = stage_params("evaluation", defenses=["standard"])
    catalog = make_catalog(
        inputs, tmp_path, params, {"pgd_at_classifier": None, "rvs_classifier": None}
    )
    real_run_attack = protocol.run_attack

    def broken_run_attack(attack, images, labels, batch_size, progress=True):
        adversarial = real_run_attack(attack, images, labels, batch_size, progress)
        return (images + 3 * (adversarial - images)).clamp(0, 1)  # 3x too far

    monkeypatch.setattr(protocol, "run_attack", broken_run_attack)
    with pytest.raises(DataValidationError) as info:
        SequentialRunner().run(create_pipeline(), catalog)
    failed = {(f["expectation"], f["kwargs"].get("column")) for f in info.value.failures}
    assert ("expect_column_values_to_be_between", "perturbation") in failed
    assert "standard_fgsm" in str(info.value)
    assert not any((tmp_path / filename).exists() for filename in REPORTS.values())
    assert not (tmp_path / "evaluation" / "standard.pt").exists()


def test_optional_torch_dataset(tmp_path):
    missing = tmp_path / "absent.pt"
    optional = TorchDataset(str(missing), optional=True)
    assert optional.load() is None and not optional.exists()
    with pytest.raises(DatasetError) as info:
        TorchDataset(str(missing)).load()
    assert isinstance(info.value.__cause__, CheckpointError)
    optional.save({"x": torch.ones(2)})
    assert optional.exists() and torch.equal(optional.load()["x"], torch.ones(2))
    missing.write_bytes(b"not a torch file")
    with pytest.raises(DatasetError, match="corrupted"):
        optional.load()  # optional means "may be absent", never "may be broken"


def test_project_catalog_and_registry_wire_the_baselines_in():
    catalog = _project_context().catalog
    for name in ("pgd_at_classifier", "rvs_classifier"):
        dataset = catalog[name]
        assert isinstance(dataset, TorchDataset) and dataset._describe()["optional"] is True
    for name, filename in REPORTS.items():
        assert str(catalog[name]._describe()["filepath"]).endswith(f"data/08_reporting/{filename}")
    for name in DEFENSES:  # the per-defense results: files, one per defense (not optional)
        dataset = catalog[f"evaluation_{name}"]
        assert isinstance(dataset, TorchDataset) and dataset._describe()["optional"] is False
        path = str(dataset._describe()["filepath"])
        assert path.endswith(f"data/07_model_output/cifar10/evaluation/{name}.pt")
    pipelines = register_pipelines()
    evaluation = pipelines["evaluation"]
    assert {"pgd_at_classifier", "rvs_classifier"} <= evaluation.inputs()
    atop_nodes = {node.name for node in pipelines["atop"].nodes}
    assert {f"evaluate_{name}" for name in DEFENSES} | {"collect_results"} <= atop_nodes
    order = [node.name for node in pipelines["__default__"].nodes]  # topologically sorted
    producers = {
        output: node.name
        for node in pipelines["__default__"].nodes
        for output in node.outputs
        if output in ("pgd_at_classifier", "rvs_classifier")
    }
    assert set(producers) == {"pgd_at_classifier", "rvs_classifier"}
    for checkpoint, producer in producers.items():
        consumers = [n.name for n in pipelines["__default__"].nodes if checkpoint in n.inputs]
        assert consumers and all(order.index(producer) < order.index(c) for c in consumers)
    assert order.index(producers["pgd_at_classifier"]) < order.index("evaluate_pgd_at")
    assert order.index(producers["rvs_classifier"]) < order.index("evaluate_rvs")


def test_one_node_per_defense_then_one_that_gathers_them():
    """Each defense can be re-evaluated alone (``--from-nodes evaluate_ap``): its node takes
    only its own checkpoints and writes ``evaluation_<defense>``; ``collect_results`` reads
    every one of them."""
    nodes = {node.name: node for node in create_pipeline().nodes}
    shared = {"test_set", "eval_indices", "class_names", "params:evaluation"}
    for name in DEFENSES:
        node = nodes[f"evaluate_{name}"]
        assert set(node.inputs) == shared | set(INPUTS[name]), name
        assert node.outputs == [f"evaluation_{name}"]
    assert INPUTS["atop"] == ("classifier", "atop_purifier", "purifier")
    assert INPUTS["pgd_at"] == ("pgd_at_classifier",) and INPUTS["rvs"] == ("rvs_classifier",)
    gather = nodes["collect_results"]
    assert {f"evaluation_{name}" for name in DEFENSES} <= set(gather.inputs)
    assert gather.outputs == ["robustness_results"]
    ap_alone = create_pipeline().from_nodes("evaluate_ap")
    assert {n.name for n in ap_alone.nodes if n.name.startswith("evaluate_")} == {"evaluate_ap"}


def test_parameters_of_every_profile_parse():
    for env in ("smoke", "base", "paper"):
        params = stage_params("evaluation", env=env)
        assert isinstance(params, EvalParams)
        entries = params.entries
        reference = next(e for e in entries if e.label == params.sanity.reference)
        assert reference.name == "pgd" and reference.eps == pytest.approx(8 / 255)
        assert {e.label for e in entries} >= {"fgsm", "pgd_linf", "pgd_l2", "bpda_linf", "cw_l2"}
    paper = stage_params("evaluation", env="paper")
    auto = {e["version"]: e for e in paper.attacks if e["name"] == "autoattack"}
    assert auto["standard"]["steps"] == auto["rand"]["steps"] == 100
    assert auto["rand"]["eot_iter"] == 20 and paper.images == 512

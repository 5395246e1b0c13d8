"""The attack-convergence pipeline end to end on real CIFAR-10 (smoke profile,
SequentialRunner): one ``study_<defense>`` node per stochastic defense, then
``convergence_report`` writing the metrics JSON (cited by the robustness report), a CSV
table, a Markdown report and a figure. The outputs are the real catalog datasets of
``conf/base/catalog_convergence.yml`` pointed at ``tmp_path``; the library is tested in
``tests/evaluation/test_convergence.py``."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from atop.datasets import OptionalJSONDataset, TorchDataset
from atop.evaluation.convergence import ConvergenceParams, summarize
from atop.evaluation.defenses import NEEDS, PURIFIED, STUDIED
from atop.pipeline_registry import register_pipelines
from atop.pipelines.convergence import create_pipeline
from atop.pipelines.convergence.nodes import study_node
from tests.conftest import PROJECT_ROOT, moved, stage_params
from tests.evaluation.conftest import classifier_dict, purifier_dict

OUTPUTS = {
    "convergence": "convergence.json",
    "convergence_table": "convergence.csv",
    "convergence_markdown": "convergence_report.md",
    "convergence_plot": "convergence.png",
}
TRANSFORM = {"kind": "rt1", "sigma": 0.0, "missing_rate": 0.25, "mask_block": 4, "mask_number": 1}


@functools.cache
def _catalog_config() -> dict:
    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="smoke") as session:
        return dict(session.load_context().config_loader["catalog"])


@pytest.fixture(scope="module")
def params() -> ConvergenceParams:
    return stage_params("convergence", device="cpu")


def _evaluation(n: int, draws: int) -> dict:
    """A main-job evaluation result of ``n`` images: clean and one attack per norm."""
    right = (torch.arange(n) < n // 2)[:, None].repeat(1, draws)
    return {
        "clean": torch.ones(n, draws, dtype=torch.bool),
        "attacks": {"pgd_linf": {"draws": right}, "pgd_l2": {"draws": right}},
    }


@pytest.fixture(scope="module")
def studied(params, cifar10_test_batch, tmp_path_factory) -> dict:
    """One smoke run of the convergence pipeline on AP and the four arms (tiny random
    checkpoints: the numbers mean nothing, the wiring and the files are what is tested)."""
    folder = tmp_path_factory.mktemp("convergence")
    config = {}
    for name, entry in _catalog_config().items():
        if name in OUTPUTS:
            config[name] = moved(entry, folder / Path(entry["filepath"]).name)
        elif name == "convergence_{defense}":
            config[name] = {**entry, "filepath": str(folder / "studies" / "{defense}.pt")}
    assert "convergence_{defense}" in config and set(OUTPUTS) <= set(config)
    catalog = DataCatalog.from_config(config)
    images, labels = cifar10_test_batch
    inputs = {
        "test_set": {"images": (images * 255).round().to(torch.uint8), "labels": labels},
        "eval_indices": list(range(10, 30)),
        "class_names": [str(i) for i in range(10)],
        "classifier": classifier_dict(),
        "params:convergence": params,
        "params:evaluation": stage_params("evaluation"),
    }
    for i, name in enumerate(STUDIED):
        inputs[NEEDS[name][1]] = purifier_dict(i, meta={"transform": TRANSFORM})
        inputs[f"evaluation_{name}"] = _evaluation(params.images, params.draws)
    for name, value in inputs.items():
        catalog[name] = MemoryDataset(value, copy_mode="assign")
    SequentialRunner().run(create_pipeline(), catalog)
    return {
        "folder": folder,
        "studies": {n: TorchDataset(str(folder / "studies" / f"{n}.pt")).load() for n in STUDIED},
        "metrics": OptionalJSONDataset(str(folder / OUTPUTS["convergence"])).load(),
    }


def test_one_study_node_per_studied_defense_then_the_report():
    pipeline = create_pipeline()
    nodes = {node.name: node for node in pipeline.nodes}
    assert STUDIED == (
        "ap",
        "ap_continued",
        "ap_classifier_aware",
        "adversarial_reconstruction",
        "atop",
    )
    assert set(STUDIED) <= set(PURIFIED)
    assert set(nodes) == {f"study_{n}" for n in STUDIED} | {"convergence_report"}
    shared = {"test_set", "eval_indices", "class_names", "params:convergence"}
    for name in STUDIED:
        node = nodes[f"study_{name}"]
        headline = {f"evaluation_{name}", "params:evaluation"}
        assert set(node.inputs) == shared | headline | set(NEEDS[name])
        assert node.outputs == [f"convergence_{name}"]
    report = nodes["convergence_report"]
    assert set(report.inputs) == {"params:convergence", *(f"convergence_{n}" for n in STUDIED)}
    assert report.outputs == list(OUTPUTS)
    registry = register_pipelines()
    assert {n.name for n in registry["convergence"].nodes} == set(nodes)
    assert set(nodes) <= {n.name for n in registry["__default__"].nodes}
    assert not set(nodes) & {n.name for n in registry["atop"].nodes}  # full comparison only


def test_the_studies_are_per_draw_verdicts_of_each_setting_of_both_norms(studied, params):
    for name, result in studied["studies"].items():
        assert set(result["norms"]) == {"Linf", "L2"}, name
        for record in result["norms"].values():
            assert len(record["points"]) == len(params.points)
            assert len(record["headline"]) == 2  # clean and the norm's one attack
            for point in record["points"].values():
                assert point["draws"].dtype == torch.bool
                assert point["draws"].shape == (params.images, params.draws)


def test_the_metrics_json_table_markdown_and_figure(studied, params):
    folder, metrics = studied["folder"], studied["metrics"]
    settings = metrics["settings"]
    assert settings["attacks"] == {"Linf": "PGD Linf eps 8/255", "L2": "PGD L2 eps 0.5"}
    assert (settings["images"], settings["draws"]) == (params.images, params.draws)
    assert (settings["eot_at"], settings["steps_at"]) == (params.eot_at, params.steps_at)
    assert list(metrics["defenses"]) == list(STUDIED)
    for name, result in studied["studies"].items():
        expected = summarize(result)
        got = metrics["defenses"][name]
        for norm in ("Linf", "L2"):
            assert got[norm]["points"] == expected[norm]["points"]  # JSON floats round-trip
            assert got[norm]["converged"] == expected[norm]["converged"]
            assert got[norm]["headline"] == pytest.approx(0.5)  # the headline: half right
    table = pd.read_csv(folder / OUTPUTS["convergence_table"])
    assert {"defense", "norm", "setting", "acc", "se", "gap", "paired_se", "lowers"} <= set(
        table.columns
    )
    assert len(table) == len(STUDIED) * 2 * len(params.points)
    markdown = (folder / OUTPUTS["convergence_markdown"]).read_text()
    assert markdown.startswith("# Attack convergence")
    for name in STUDIED:
        assert f"## {name}, ℓ∞:" in markdown and f"## {name}, ℓ2:" in markdown


def test_a_defense_left_out_is_skipped(params, cifar10_test_batch):
    only_ap = params.replace(defenses=["ap"])
    images, labels = cifar10_test_batch
    test_set = {"images": (images * 255).round().to(torch.uint8), "labels": labels}
    skipped = study_node("atop")(test_set, [0, 1], ["x"] * 10, only_ap)  # no checkpoints needed
    assert skipped == {"skipped": "not listed in convergence.defenses"}

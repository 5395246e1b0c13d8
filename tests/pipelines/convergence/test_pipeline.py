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
from atop.evaluation.defenses import NEEDS, PURIFIED
from atop.pipeline_registry import register_pipelines
from atop.pipelines.convergence import create_pipeline
from atop.pipelines.convergence.nodes import convergence_report, study_node
from atop.pipelines.convergence.pipeline import STUDIED
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


@pytest.fixture(scope="module")
def studied(params, cifar10_test_batch, tmp_path_factory) -> dict:
    """One smoke run of the convergence pipeline on AP and AToP (tiny random checkpoints:
    the numbers mean nothing, the wiring and the files are what is tested)."""
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
        "purifier": purifier_dict(0, meta={"transform": TRANSFORM}),
        "purifier_atop": purifier_dict(1, meta={"transform": TRANSFORM}),
        "params:convergence": params,
    }
    for name, value in inputs.items():
        catalog[name] = MemoryDataset(value, copy_mode="assign")
    SequentialRunner().run(create_pipeline(), catalog)
    return {
        "folder": folder,
        "studies": {n: TorchDataset(str(folder / "studies" / f"{n}.pt")).load() for n in STUDIED},
        "metrics": OptionalJSONDataset(str(folder / OUTPUTS["convergence"])).load(),
    }


def test_one_study_node_per_stochastic_defense_then_the_report():
    pipeline = create_pipeline()
    nodes = {node.name: node for node in pipeline.nodes}
    assert STUDIED == ("ap", "atop") and set(STUDIED) <= set(PURIFIED)
    assert set(nodes) == {f"study_{n}" for n in STUDIED} | {"convergence_report"}
    shared = {"test_set", "eval_indices", "class_names", "params:convergence"}
    for name in STUDIED:
        node = nodes[f"study_{name}"]
        assert set(node.inputs) == shared | set(NEEDS[name])
        assert node.outputs == [f"convergence_{name}"]
    report = nodes["convergence_report"]
    assert set(report.inputs) == {"params:convergence", *(f"convergence_{n}" for n in STUDIED)}
    assert report.outputs == list(OUTPUTS)
    registry = register_pipelines()
    assert {n.name for n in registry["convergence"].nodes} == set(nodes)
    assert set(nodes) <= {n.name for n in registry["__default__"].nodes}
    assert not set(nodes) & {n.name for n in registry["atop"].nodes}  # full comparison only


def test_the_studies_are_per_draw_verdicts_of_each_setting(studied, params):
    for name, result in studied["studies"].items():
        assert [k for k, _ in result["steps"]] == sorted(params.steps), name
        assert [k for k, _ in result["eot"]] == sorted(params.eot), name
        for _, draws in result["steps"] + result["eot"]:
            assert draws.dtype == torch.bool and draws.shape == (params.images, params.draws)
        assert (result["norm"], result["eps"]) == ("Linf", pytest.approx(8 / 255))


def test_the_metrics_json_table_markdown_and_figure(studied, params):
    folder, metrics = studied["folder"], studied["metrics"]
    settings = metrics["settings"]
    assert settings["attack"] == "PGD Linf eps 8/255"
    assert (settings["images"], settings["draws"]) == (params.images, params.draws)
    assert (settings["eot_at"], settings["steps_at"]) == (params.eot_at, params.steps_at)
    assert list(metrics["defenses"]) == list(STUDIED)
    for name, result in studied["studies"].items():
        expected = summarize(result)
        got = metrics["defenses"][name]
        for sweep in ("steps", "eot"):
            assert got[sweep]["points"] == expected[sweep]["points"]  # JSON floats round-trip
            for key in ("strongest", "flat_from"):
                assert got[sweep][key] == expected[sweep][key]
            assert got[sweep]["flat_from"] in {int(k) for k in got[sweep]["points"]}
    table = pd.read_csv(folder / OUTPUTS["convergence_table"])
    assert list(table.columns) == ["defense", "sweep", "setting", "acc", "se", "worst_of_n"]
    assert len(table) == len(STUDIED) * (len(params.steps) + len(params.eot))
    for row in table.itertuples():
        point = metrics["defenses"][row.defense][row.sweep]["points"][str(row.setting)]
        assert (row.acc, row.se, row.worst_of_n) == pytest.approx(
            (point["acc"], point["se"], point["worst_of_n"])
        )
    markdown = (folder / OUTPUTS["convergence_markdown"]).read_text()
    assert markdown.startswith("# Attack convergence")
    for name, curves in metrics["defenses"].items():
        for sweep, label in (("steps", "PGD steps"), ("eot", "EOT samples")):
            flat = curves[sweep]["flat_from"]
            assert f"**{name}**, {label}:" in markdown
            assert f"flat from **{flat}**" in markdown


def test_a_defense_left_out_is_skipped(params, cifar10_test_batch):
    only_ap = params.replace(defenses=["ap"])
    images, labels = cifar10_test_batch
    test_set = {"images": (images * 255).round().to(torch.uint8), "labels": labels}
    skipped = study_node("atop")(test_set, [0, 1], ["x"] * 10, only_ap)  # no checkpoints needed
    assert skipped == {"skipped": "not listed in convergence.defenses"}
    draws = (torch.arange(4) < 2)[:, None].repeat(1, 2)
    study = {"steps": [(1, draws)], "eot": [(1, draws)], "norm": "L2", "eps": 0.5}
    metrics, table, markdown, _ = convergence_report(only_ap, ap=study, atop=skipped)
    assert list(metrics["defenses"]) == ["ap"] and set(table["defense"]) == {"ap"}
    assert metrics["settings"]["attack"] == "PGD L2 eps 0.5"
    assert "**atop**" not in markdown

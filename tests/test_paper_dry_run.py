"""A dry run of the paper profile on CPU: every stage of ``kedro run --env paper`` (the full
comparison) at the paper's model sizes -- WRN-28-10 and WRN-34-10 classifiers, the DeepFillv2
purifier at cnum 48 with contextual attention, the paper's attack list -- on a tiny slice of
the real CIFAR-10: one or two steps per stage, one step per attack. It catches the shape,
memory and configuration errors that would otherwise surface hours into a GPU run.

Only sizes change (images, batches, epochs, steps, draws); every architecture, transform,
loss and attack setting is the paper profile's. The splits are the first images of the
real ingested ones (the stages score their classifiers on the whole test split, which at
WRN-28-10 size would take most of an hour on CPU), so ingestion itself is not run here: the
smoke runs test it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from atop.pipeline_registry import ATOP_STAGES, COMPARISON_STAGES
from tests.conftest import _profile_params, make_project_copy, run_kedro

pytestmark = pytest.mark.slow

#: Size keys and their dry-run values (everything else keeps the paper profile's value).
TINY = {
    "epochs": 1,
    "batch_size": 2,
    "eval_batch_size": 2,
    "train_images": 4,
    "val_images": 2,
    "images": 2,
    "draws": 2,  # N-evaluation needs two draws at least
    "val_draws": 1,
    "sample_images": 2,
    "max_batches_per_epoch": 1,
    "steps": 1,
    "eot_iter": 1,
    "n_queries": 2,
    "eot_at": 1,
    "steps_at": 1,
    "all_images_cost": 1,
}
#: Sweeps of the convergence study: one point each, and one costlier extra setting.
TINY_LISTS = {"steps": [1], "eot": [1], "extra": [[2, 1]]}
#: Images kept of each split, and how the first test images are used.
N_TRAIN, N_TEST = 16, 8
EVAL, MONITOR = [0, 1, 2, 3], [4, 5, 6, 7]


def tiny_splits(ingested: Path, project: Path) -> None:
    """The first images of the ingested splits, and disjoint evaluation / monitor indices."""
    source = ingested / "data" / "02_intermediate" / "cifar10" / "smoke"
    target = project / "data" / "02_intermediate" / "cifar10" / "paper"
    target.mkdir(parents=True)
    shutil.copy(source / "class_names.json", target / "class_names.json")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        data = torch.load(source / f"{split}.pt", weights_only=True)
        torch.save({key: value[:n].clone() for key, value in data.items()}, target / f"{split}.pt")
    indices = project / "data" / "05_model_input" / "cifar10" / "paper"
    indices.mkdir(parents=True)
    (indices / "eval_indices.json").write_text(json.dumps(EVAL))
    (indices / "monitor_indices.json").write_text(json.dumps(MONITOR))


def shrink(value: Any) -> Any:
    """``value`` with every size key of :data:`TINY` (at any depth, in lists too) made tiny."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in TINY_LISTS and isinstance(item, list):
                out[key] = TINY_LISTS[key]
            elif key in TINY and (
                item is None or (isinstance(item, int) and not isinstance(item, bool))
            ):
                out[key] = TINY[key]  # None means "all" (images) or "no cap" (batches)
            else:
                out[key] = shrink(item)
        return out
    if isinstance(value, list):
        return [shrink(item) for item in value]
    return value


def test_every_paper_stage_runs_at_its_real_model_sizes(tmp_path, ingested_project):
    paper = _profile_params("paper")
    overrides = {key: shrink(block.to_dict()) for key, block in paper.items()}
    for block in overrides.values():
        if "progress" in block:
            block["progress"] = False
        if "device" in block:
            block["device"] = "cpu"
    project = make_project_copy(tmp_path)
    tiny_splits(ingested_project, project)
    stages = [name for name in (*ATOP_STAGES, *COMPARISON_STAGES) if name != "data_ingestion"]
    run_kedro(project, stages, env="paper", params=overrides)

    models = project / "data" / "06_models" / "cifar10" / "paper"

    def load(name: str) -> dict:
        return torch.load(models / name, map_location="cpu", weights_only=True)

    assert load("classifier.pt")["arch"] == paper["classifier_pretraining"].arch == "wrn-28-10"
    assert load("pgd_at_classifier.pt")["arch"] == "wrn-28-10"
    assert load("rvs_classifier.pt")["arch"] == "wrn-34-10"
    purifier = load("purifier.pt")
    assert purifier["config"]["generator"] == "deepfillv2" and purifier["config"]["cnum"] == 48
    assert purifier["config"]["attention"] is True
    for arm in ("atop", "atop_pgd", "ap_continued", "ap_classifier_aware"):
        assert load(f"purifier_{arm}.pt")["config"] == purifier["config"]
    reports = project / "data" / "08_reporting" / "cifar10" / "paper"
    for name in ("robustness_report.md", "comparison_report.md", "convergence_report.md"):
        assert (reports / name).stat().st_size > 0, name

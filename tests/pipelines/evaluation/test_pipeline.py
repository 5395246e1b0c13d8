"""The evaluation pipelines end to end on real CIFAR-10 (smoke profile, SequentialRunner).

The checkpoints are built here in seconds: a small classifier briefly trained on 512 real
training images and randomly initialised purifiers (cnum 8) standing for the pretrained
(AP) purifier and the fine-tuning arms, with hand-made training histories (the defenses'
training times). The main job (``evaluation``: the MAIN defenses,
reports ``robustness*``) runs first; the full comparison (``comparison``: the EXTRA defenses,
then one report over every defense, ``comparison*``) runs after it on the same catalog and
reads the main job's per-defense torch files. Every per-defense result and report output is
a real catalog dataset of ``conf/base/catalog_evaluation.yml`` pointed at ``tmp_path``. The
library the nodes call (:mod:`atop.evaluation`) is tested on its own in ``tests/evaluation``.
"""

from __future__ import annotations

import functools
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
from scipy import stats as scipy_stats

from atop.checkpoint import CheckpointError, state_hash
from atop.datasets import CSVDataset, OptionalJSONDataset, TorchDataset
from atop.evaluation import protocol
from atop.evaluation.defenses import (
    DEFENSES,
    EXTRA,
    HISTORIES,
    MAIN,
    NEEDS,
    PURIFIED,
    STUDIED,
    build_defense,
)
from atop.evaluation.suite import EvalParams
from atop.models import build_classifier, classifier_checkpoint
from atop.models.purifier import build_purifier, purifier_checkpoint
from atop.pipeline_registry import register_pipelines
from atop.pipelines.convergence.nodes import convergence_report
from atop.pipelines.evaluation import create_pipeline
from atop.pipelines.evaluation.pipeline import (
    SHARED,
    create_comparison_pipeline,
    defense_nodes,
    report_nodes,
)
from atop.pipelines.evaluation.report import robustness_report
from atop.validation import DataValidationError
from atop.validation import adversarial as gx_adversarial
from tests.conftest import PROJECT_ROOT, KeptMemoryDataset, moved, stage_params

#: Report outputs of each job (catalog name -> file name).
REPORTS = {
    "robustness": "robustness.json",
    "robustness_table": "robustness.csv",
    "robustness_verdicts": "robustness_verdicts.csv",
    "robustness_report": "robustness_report.md",
    "robustness_accuracy_vs_eps": "robust_accuracy_vs_eps.png",
    "robustness_accuracy_vs_eps_table": "robust_accuracy_vs_eps.csv",
    "adversarial_grid": "adversarial_grid.png",
}
COMPARISON = {
    "comparison": "comparison.json",
    "comparison_table": "comparison.csv",
    "comparison_verdicts": "comparison_verdicts.csv",
    "comparison_report": "comparison_report.md",
    "comparison_accuracy_vs_eps": "comparison_accuracy_vs_eps.png",
    "comparison_accuracy_vs_eps_table": "comparison_accuracy_vs_eps.csv",
}
#: RT1 (masks only): the known pixels stay clean, so the briefly trained classifier keeps
#: some accuracy through a random purifier and fresh draws disagree (informative verdicts;
#: with the paper's RT2 a random purifier's output is noise and every verdict is 0).
TRANSFORM = {"kind": "rt1", "sigma": 0.0, "missing_rate": 0.25, "mask_block": 4, "mask_number": 1}
FGSM_TRAINING = {"name": "fgsm", "eps": 8 / 255}
CLASS_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
#: Every checkpoint the two jobs read (the classifier and the purifiers by catalog name).
CHECKPOINTS = sorted({key for needs in NEEDS.values() for key in needs})
#: Every training history the two jobs read (the defenses' training times, by catalog name).
HISTORY_NAMES = sorted({key for names in HISTORIES.values() for key in names})
#: The per-defense results: one catalog entry per defense (a dataset factory).
RESULTS_PATTERN = "evaluation_{defense}"
SANITY_PATTERN = "sanity_{defense}"
STUDY_PATTERN = "convergence_{defense}"
#: Evaluated in this run (checkpoints present): the main job's, and pgd_at in the comparison.
EVALUATED_MAIN = ["standard", "ap", "ap_continued", "atop"]
EVALUATED_ALL = [*EVALUATED_MAIN, "pgd_at"]
CHECKS = {
    "eps_monotonic_linf",
    "large_eps_near_zero_linf",
    "stronger_attack_linf",
    "eps_monotonic_l2",
    "large_eps_near_zero_l2",
    "stronger_attack_l2",
    "iterative_beats_single_step",
    "bpda_vs_exact_linf",
    "bpda_vs_exact_l2",
}


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
    images, an evaluation subset of 5 images it gets right and 3 it gets wrong, the
    checkpoints and the training histories (``None``: the stage did not run)."""
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
    classifier = classifier_checkpoint(model, "resnet-fast", {"num_classes": 10, "width": 8})

    def purifier(seed: int, atop: dict | None = None, transform: dict = TRANSFORM) -> dict:
        torch.manual_seed(seed)
        generator, discriminator = build_purifier({"cnum": 8})
        meta = {"transform": dict(transform), **({"atop": atop} if atop else {})}
        return purifier_checkpoint(generator, discriminator, meta=meta)

    checkpoints = dict.fromkeys(CHECKPOINTS)
    checkpoints.update(
        classifier=classifier,
        purifier=purifier(0),
        purifier_ap_continued=purifier(2, {"attack": None}, {**TRANSFORM, "mask_block": 8}),
        purifier_atop=purifier(1, {"attack": FGSM_TRAINING}),
        pgd_at_classifier=classifier,  # the baseline's checkpoint exists (a stand-in)
    )

    def history(*seconds: float) -> pd.DataFrame:
        return pd.DataFrame({"epoch": range(1, len(seconds) + 1), "seconds": seconds})

    # the training times: the sum of each history's epochs; the hand-made purifier (AP) has
    # no pretraining history
    histories = dict.fromkeys(HISTORY_NAMES)
    histories.update(
        classifier_history=history(1.0, 2.0),
        finetuning_history_ap_continued=history(4.0),
        finetuning_history_atop=history(2.0, 3.0),
        adversarial_training_history=history(6.0),
    )
    return {
        "data": {
            "test_set": {"images": (images * 255).round().to(torch.uint8), "labels": labels},
            "eval_indices": eval_indices,
            "class_names": CLASS_NAMES,
        },
        "checkpoints": checkpoints,
        "histories": histories,
    }


def make_catalog(inputs: dict, folder: Path, params: EvalParams) -> DataCatalog:
    """The real per-defense result, report and convergence datasets of the catalog (paths
    moved to ``folder``), the data in memory, every checkpoint as an optional
    TorchDataset (``None``: file missing, the defense is skipped) and every training history
    as a CSV file (``None`` in memory: the stage did not run, its time is unknown)."""
    config = {}
    for name, entry in catalog_config().items():
        if name in REPORTS or name in COMPARISON or name == "convergence":
            config[name] = moved(entry, folder / Path(entry["filepath"]).name)
        elif name in (RESULTS_PATTERN, SANITY_PATTERN, STUDY_PATTERN):
            sub = "convergence" if name == STUDY_PATTERN else "evaluation"
            config[name] = {**entry, "filepath": str(folder / sub / Path(entry["filepath"]).name)}
    assert (
        RESULTS_PATTERN in config
        and SANITY_PATTERN in config
        and config[STUDY_PATTERN]["optional"]
        and {*REPORTS, *COMPARISON, "convergence"} <= set(config)
    )
    catalog = DataCatalog.from_config(config)
    for name, value in inputs["data"].items():
        catalog[name] = MemoryDataset(value, copy_mode="assign")
    for name, checkpoint in inputs["checkpoints"].items():
        path = folder / "models" / f"{name}.pt"
        if checkpoint is not None:
            TorchDataset(str(path)).save(checkpoint)
        catalog[name] = TorchDataset(str(path), optional=True)
    for name, history in inputs["histories"].items():
        if history is None:
            catalog[name] = MemoryDataset(None, copy_mode="assign")
            continue
        catalog[name] = CSVDataset(
            filepath=str(folder / "histories" / f"{name}.csv"), save_args={"index": False}
        )
        catalog[name].save(history)
    catalog["params:evaluation"] = MemoryDataset(params, copy_mode="assign")
    catalog["robustness_results"] = KeptMemoryDataset()
    catalog["comparison_results"] = KeptMemoryDataset()
    return catalog


def _study(points: dict[str, int], n: int = 8, model: str = "", indices=None) -> dict:
    """A hand-made convergence study (ℓ∞ only): setting ``"<steps>x<eot>"`` -> images right
    on both draws (of ``n``), every setting run on every image."""

    def point(key: str, right: int) -> dict:
        steps, eot = (int(v) for v in key.split("x"))
        draws = (torch.arange(n) < right)[:, None].repeat(1, 2)
        return {"steps": steps, "eot": eot, "draws": draws, "attacked": None, "seconds": 0.0}

    return {
        "model": model,
        "indices": list(range(n)) if indices is None else list(indices),
        "norms": {
            "Linf": {
                "eps": 8 / 255,
                "alpha": 2 / 255,
                "points": {k: point(k, v) for k, v in points.items()},
                "headline": [(torch.arange(n) < 3)[:, None].repeat(1, 2)],
            }
        },
    }


def convergence_metrics() -> dict:
    """The convergence JSON of a (hand-made) study: AP's settings never below its headline
    (3 of 8), AToP's lowest setting 0 of 8 (it lowers the headline)."""
    params = stage_params("convergence", device="cpu")
    metrics, *_ = convergence_report(
        params,
        ap=_study({"1x2": 3, "2x2": 3, "4x2": 3, "1x1": 3}),
        atop=_study({"1x2": 8, "2x2": 6, "4x2": 0, "1x1": 3}),
    )
    return metrics


@pytest.fixture(scope="module")
def evaluated(inputs, tmp_path_factory) -> dict:
    """The main job, then the full comparison, on one catalog. Checkpoints present:
    classifier, purifier (AP), purifier_ap_continued, purifier_atop and pgd_at's; missing:
    purifier_ap_classifier_aware, rvs and the comparison's purifiers. No convergence study
    before the main job; one (hand-made) before the comparison, AP's fitting its sanity
    checks (the stronger attack is read from it), AToP's absent. Every GX summary recorded."""
    folder = tmp_path_factory.mktemp("evaluation")
    params = stage_params("evaluation", device="cpu")
    catalog = make_catalog(inputs, folder, params)
    summaries = {"main": [], "comparison": []}
    real_validate = gx_adversarial.validate_adversarial
    job = {"name": "main"}

    def recording_validate(*args, **kwargs):
        summaries[job["name"]].append(real_validate(*args, **kwargs))
        return summaries[job["name"]][-1]

    with pytest.MonkeyPatch.context() as patch:
        # the nodes import the suite when they run: patch it where it lives
        patch.setattr(gx_adversarial, "validate_adversarial", recording_validate)
        SequentialRunner().run(create_pipeline(), catalog)
        after_main = sorted(p.name for p in (folder / "evaluation").iterdir())
        reports_after_main = sorted(p.name for p in folder.iterdir() if p.is_file())
        convergence = convergence_metrics()
        OptionalJSONDataset(str(folder / "convergence.json")).save(convergence)
        ap = build_defense("ap", inputs["checkpoints"], torch.device("cpu"))
        study = _study(  # the reference: PGD-2 x EOT-2; these are stronger
            {"4x2": 3, "2x4": 3},
            indices=inputs["data"]["eval_indices"][: params.sanity.images],
            model=state_hash(ap.model.state_dict()),
        )
        TorchDataset(str(folder / "convergence" / "ap.pt")).save(study)
        job["name"] = "comparison"
        SequentialRunner().run(create_comparison_pipeline(), catalog)
    return {
        "folder": folder,
        "params": params,
        "eval_indices": inputs["data"]["eval_indices"],
        "results": catalog["robustness_results"].load(),
        "comparison_results": catalog["comparison_results"].load(),
        "metrics": catalog["robustness"].load(),
        "comparison_metrics": catalog["comparison"].load(),
        "convergence": convergence,
        "summaries": summaries,
        "after_main": after_main,
        "reports_after_main": reports_after_main,
    }


def _same(a, b) -> bool:
    """Deep equality of nested results holding tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# --- wiring (no run) ----------------------------------------------------------------------


def test_main_and_comparison_pipelines_have_their_own_nodes_and_outputs():
    main, comparison = create_pipeline(), create_comparison_pipeline()
    report = {"collect_{}", "{}_metrics", "{}_table", "{}_verdicts", "{}_report",
              "plot_{}_accuracy_vs_eps", "{}_accuracy_vs_eps_table"}  # fmt: skip
    assert {n.name for n in main.nodes} == {f"evaluate_{d}" for d in MAIN} | {
        name.format("robustness") for name in report
    } | {"plot_adversarial_grid"}
    assert {n.name for n in comparison.nodes} == {f"evaluate_{d}" for d in EXTRA} | {
        name.format("comparison") for name in report
    } | {f"sanity_{d}" for d in MAIN}
    written = {*REPORTS, *(f"evaluation_{d}" for d in MAIN), "robustness_results"}
    assert main.all_outputs() == written
    written = {*COMPARISON, *(f"evaluation_{d}" for d in EXTRA), "comparison_results"}
    written |= {f"sanity_{d}" for d in MAIN}
    assert comparison.all_outputs() == written
    # the main job needs none of the comparison's checkpoints; both cite the convergence study
    extra_checkpoints = {key for d in EXTRA for key in NEEDS[d]} - {"classifier"}
    assert not extra_checkpoints & main.inputs()
    assert extra_checkpoints <= comparison.inputs()
    # nor the comparison's training histories
    main_histories = {key for d in MAIN for key in HISTORIES[d]}
    extra_histories = {key for d in EXTRA for key in HISTORIES[d]} - main_histories
    assert main_histories <= main.inputs() and not extra_histories & main.inputs()
    assert extra_histories <= comparison.inputs()
    assert "convergence" in main.inputs() and "convergence" in comparison.inputs()
    # the main report adds a studied defense's study to a headline it did not find converged
    gather = next(n for n in main.nodes if n.name == "collect_robustness")
    assert {f"convergence_{d}" for d in MAIN if d in STUDIED} <= set(gather.inputs)
    # the comparison reports every defense: the main job's results are read from their files
    assert {f"evaluation_{d}" for d in MAIN} <= comparison.inputs()
    collect = next(n for n in comparison.nodes if n.name == "collect_comparison")
    assert {f"sanity_{d}" for d in MAIN} | {f"evaluation_{d}" for d in EXTRA} <= set(collect.inputs)
    assert collect.outputs == ["comparison_results"]


def test_one_node_per_defense_then_one_that_gathers_them():
    """Each defense can be re-evaluated alone (``--from-nodes evaluate_ap``): its node takes
    only its own checkpoints and training histories and writes ``evaluation_<defense>``."""
    nodes = {node.name: node for node in defense_nodes(DEFENSES)}
    shared = set(SHARED.values())
    assert shared == {"test_set", "eval_indices", "class_names", "params:evaluation"}
    for name in DEFENSES:
        node = nodes[f"evaluate_{name}"]
        assert set(node.inputs) == shared | set(NEEDS[name]) | set(HISTORIES[name]), name
        assert node.outputs == [f"evaluation_{name}"]
    assert NEEDS["atop"] == ("classifier", "purifier_atop")
    assert NEEDS["pgd_at"] == ("pgd_at_classifier",) and NEEDS["rvs"] == ("rvs_classifier",)
    assert HISTORIES["atop"] == (
        "classifier_history",
        "purifier_history",
        "finetuning_history_atop",
    )
    sources = {"standard": "evaluation_standard", "ap": "sanity_ap"}
    gather = next(
        n for n in report_nodes(["standard", "ap"], "x", sources) if n.name == "collect_x"
    )
    assert set(gather.inputs) == {"params:evaluation", "eval_indices", "class_names",
                                  "purifier_atop", "evaluation_standard", "sanity_ap"}  # fmt: skip
    # the full comparison completes the sanity checks of the main job's defenses
    comparison = {n.name: n for n in create_comparison_pipeline().nodes}
    for name in MAIN:
        node = comparison[f"sanity_{name}"]
        assert f"evaluation_{name}" in node.inputs and node.outputs == [f"sanity_{name}"]
        # the stronger attack of a studied defense comes from its convergence study
        assert (f"convergence_{name}" in node.inputs) == (name in STUDIED)
        assert f"sanity_{name}" in comparison["collect_comparison"].inputs
    ap_alone = create_pipeline().from_nodes("evaluate_ap")
    assert {n.name for n in ap_alone.nodes if n.name.startswith("evaluate_")} == {"evaluate_ap"}


# --- the runs -------------------------------------------------------------------------------


def test_every_attack_output_passes_the_suite_and_is_judged(evaluated):
    params, results = evaluated["params"], evaluated["results"]
    labels = [entry["label"] for entry in params.attacks]
    kinds = {entry["name"] for entry in params.attacks}
    assert kinds == {"fgsm", "pgd", "bpda", "cw", "autoattack"}
    assert list(results["defenses"]) == EVALUATED_MAIN
    for name, res in results["defenses"].items():
        if name in PURIFIED:
            expected = [x for x in labels if x != "autoattack_standard"]
        else:
            stochastic_only = ("bpda_linf", "bpda_l2", "autoattack_rand", "autoattack_rand_l2",
                               "pgd_linf_strong", "pgd_l2_strong")  # fmt: skip
            expected = [x for x in labels if x not in stochastic_only]
        assert list(res["attacks"]) == expected, name
        draws = params.draws if res["stochastic"] else 1
        assert res["stochastic"] == (name in PURIFIED)
        assert res["clean"].shape == (params.images, draws) and res["clean"].dtype == torch.bool
        for label, attack in res["attacks"].items():
            assert attack["draws"].shape == (params.images, draws), (name, label)
    # one suite per attack run; the sanity runs (eps sweep points, stronger attack) only in
    # the full comparison: for its own defenses and for the main job's (sanity_<defense>)
    references = {"Linf": 8 / 255, "L2": 0.5}
    extra_sweep = sum(
        1
        for norm, values in params.sanity.eps_sweep.items()
        for e in values
        if e != 0 and not math.isclose(e, references[norm])
    )
    main_runs = sum(len(r["attacks"]) for r in results["defenses"].values())
    assert len(evaluated["summaries"]["main"]) == main_runs
    compared = evaluated["comparison_results"]["defenses"]
    extra_runs = sum(len(r["attacks"]) for n, r in compared.items() if n in EXTRA)
    # smoke: sanity.defenses = every defense, a stronger attack per norm (2), and the
    # stochastic ones a fixed-randomness row per norm (no suite: same images); AP's l-inf
    # stronger attack is read from its study
    sanity_runs = len(compared) * (extra_sweep + 2) - 1
    assert len(evaluated["summaries"]["comparison"]) == extra_runs + sanity_runs
    for summary in evaluated["summaries"]["main"] + evaluated["summaries"]["comparison"]:
        assert summary["success"] and summary["rows"] == params.images
        if summary["eps"] is not None:
            assert summary["max_perturbation"] <= summary["eps"] + params.tolerance


def test_per_defense_results_are_torch_files_the_reports_are_gathered_from(evaluated):
    """``evaluation_<defense>``: one torch file per defense (re-evaluate one alone); the
    skipped ones record why; the gathered results are exactly their contents."""
    folder = evaluated["folder"] / "evaluation"
    assert evaluated["after_main"] == sorted(f"{n}.pt" for n in MAIN)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{n}.pt" for n in DEFENSES] + [f"{n}_sanity.pt" for n in MAIN]
    )
    results = evaluated["comparison_results"]
    assert list(results["defenses"]) == EVALUATED_ALL
    for name in DEFENSES:
        # the comparison reads the main job's defenses with their sanity checks completed
        saved = TorchDataset(str(folder / f"{name}{'_sanity' if name in MAIN else ''}.pt")).load()
        if name in results["defenses"]:
            assert _same({k: v for k, v in saved.items() if k != "grid"}, results["defenses"][name])
            assert (saved["grid"] is not None) == (name == evaluated["params"].grid.defense)
        else:
            assert saved == {"skipped": results["skipped"][name]}, name
    assert set(results["skipped"]) == set(DEFENSES) - set(EVALUATED_ALL)
    assert "purifier_ap_classifier_aware" in results["skipped"]["ap_classifier_aware"]
    assert "rvs_classifier" in results["skipped"]["rvs"]
    # the main report saw the main job's defenses only
    skipped = {"ap_classifier_aware", "adversarial_reconstruction"}
    assert set(evaluated["results"]["skipped"]) == skipped
    completed = ("sweep", "sanity", "fixed_randomness")  # the comparison's sanity_<defense>
    for name in EVALUATED_MAIN:
        main, full = evaluated["results"]["defenses"][name], results["defenses"][name]
        kept = [k for k in main if k not in completed]
        assert _same({k: main[k] for k in kept}, {k: full[k] for k in kept}), name
        # a studied defense also carries its study (the comparison's stronger headline)
        assert set(full) - set(main) == ({"study"} if name == "ap" else set()), name


def test_each_job_writes_its_own_report_files(evaluated):
    folder = evaluated["folder"]
    assert set(REPORTS.values()) <= set(evaluated["reports_after_main"])
    assert not set(COMPARISON.values()) & set(evaluated["reports_after_main"])
    for filename in (*REPORTS.values(), *COMPARISON.values()):
        assert (folder / filename).stat().st_size > 0, filename
    for png in ("robust_accuracy_vs_eps.png", "adversarial_grid.png",
                "comparison_accuracy_vs_eps.png"):  # fmt: skip
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(evaluated["metrics"]["defenses"]) == EVALUATED_MAIN
    assert list(evaluated["comparison_metrics"]["defenses"]) == EVALUATED_ALL


def test_deterministic_defenses_get_one_eot_sample_and_one_draw(evaluated):
    for name, res in evaluated["comparison_results"]["defenses"].items():
        eots = {a["eot_iter"] for a in res["attacks"].values() if a["eot_iter"] is not None}
        if res["stochastic"]:
            assert name in PURIFIED and max(eots) == 2  # smoke pgd_linf eot_iter
        else:
            assert eots == {1} and res["clean"].shape[1] == 1


def _verdicts(evaluated, prefix: str = "robustness") -> pd.DataFrame:
    return pd.read_csv(evaluated["folder"] / f"{prefix}_verdicts.csv")


def test_the_verdicts_csv_holds_every_per_image_per_draw_verdict(evaluated):
    table = _verdicts(evaluated)
    results, params = evaluated["results"], evaluated["params"]
    eval_indices = evaluated["eval_indices"][: params.images]
    assert list(table.columns[:8]) == ["defense", "attack", "norm", "eps", "image", "draws",
                                       "correct", "attacked"]  # fmt: skip
    assert [c for c in table.columns if c.startswith("draw_")] == ["draw_0", "draw_1"]
    expected_rows = sum(
        (1 + len(r["attacks"])) * params.images for r in results["defenses"].values()
    )
    assert len(table) == expected_rows  # one row per defense x (clean + attack) x image
    specs = {a["label"]: a for a in results["attacks"]}
    for (name, label), rows in table.groupby(["defense", "attack"], sort=False):
        res = results["defenses"][name]
        draws = res["clean"] if label == "clean" else res["attacks"][label]["draws"]
        n, d = draws.shape
        assert rows["image"].tolist() == eval_indices
        assert (rows["draws"] == d).all() and (rows["correct"] == draws.sum(dim=1).numpy()).all()
        attacked = None if label == "clean" else res["attacks"][label]["attacked"]
        if attacked is None:
            assert (rows["attacked"] == 1).all()
        else:  # a survivors attack: the images it skipped kept their best earlier example
            assert specs[label]["survivors"] and rows["attacked"].tolist() == attacked.tolist()
            summary = evaluated["metrics"]["defenses"][name]["attacks"][label]
            assert summary["attacked"] == int(attacked.sum())
            report = (evaluated["folder"] / REPORTS["robustness_report"]).read_text()
            note = report.split(f"`{label}` attacked only")[1].split("\n")[0]
            assert f"{name} {int(attacked.sum())}" in note
        columns = [f"draw_{i}" for i in range(d)]
        assert (rows[columns].to_numpy() == draws.numpy().astype(int)).all(), (name, label)
        assert rows[[c for c in ("draw_0", "draw_1") if c not in columns]].isna().all().all()
        if label == "clean":
            assert rows["norm"].isna().all() and rows["eps"].isna().all()
        else:
            assert (rows["norm"] == specs[label]["norm"]).all()
            assert rows["eps"].tolist() == pytest.approx([specs[label]["eps"]] * n)
    assert {(n, a) for n, a in table[["defense", "attack"]].drop_duplicates().to_numpy()} == {
        (name, label)
        for name, res in results["defenses"].items()
        for label in ("clean", *res["attacks"])
    }
    comparison = _verdicts(evaluated, "comparison")
    assert list(comparison["defense"].unique()) == EVALUATED_ALL


def _exact_ci(total: float, n: int) -> list[float]:
    """The exact 95 % interval, written out with the beta quantiles (independently of
    atop.evaluation.stats)."""
    low = 0.0 if total == 0 else scipy_stats.beta.ppf(0.025, total, n - total + 1)
    high = 1.0 if total == n else scipy_stats.beta.ppf(0.975, total + 1, n - total)
    return [float(low), float(high)]


def _draw_matrix(rows: pd.DataFrame) -> np.ndarray:
    """The per-draw verdicts ``[N, D]`` of one (defense, attack) block of the CSV."""
    columns = [f"draw_{i}" for i in range(int(rows["draws"].iloc[0]))]
    return rows[columns].to_numpy().astype(float)


def _crossfit(sets: list[np.ndarray]) -> np.ndarray:
    """The cross-fitted worst case, written out independently of atop.evaluation.protocol:
    each image's worst set chosen on the even draws, scored on the odd ones, and the reverse
    (ties: the set with the lowest mean on the choosing half, then list order)."""
    if sets[0].shape[1] < 2:
        return np.min([m[:, 0] for m in sets], axis=0)
    halves = [np.array([m[:, h::2].mean(axis=1) for m in sets]) for h in (0, 1)]  # [K, N]
    out = np.zeros(sets[0].shape[0])
    for choose, score in ((0, 1), (1, 0)):
        a, b = halves[choose], halves[score]
        means = a.mean(axis=1)
        for i in range(a.shape[1]):
            k = min(range(len(sets)), key=lambda j, i=i: (a[j, i], means[j], j))
            out[i] += b[k, i] / 2
    return out


def _summary_from_scores(single: np.ndarray, all_right: np.ndarray) -> dict:
    n = len(single)
    return {
        "single": single.mean(),
        "single_ci": _exact_ci(single.sum(), n),
        "worst_of_n": all_right.mean(),
        "worst_of_n_ci": _exact_ci(float(all_right.sum()), n),
    }


def _assert_close(actual: dict, expected: dict, where: str) -> None:
    assert set(expected) <= set(actual), where
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value), (where, key)


@pytest.mark.parametrize("prefix", ["robustness", "comparison"])
def test_the_metrics_json_is_recomputed_from_the_verdicts_csv(evaluated, prefix):
    """Every accuracy of the JSON comes back from the CSV alone: single-draw (mean fraction
    of right draws), worst-of-N (every draw right), the per-image worst cases per threat
    model, the exact intervals and the paired tests."""
    metrics = evaluated["metrics" if prefix == "robustness" else "comparison_metrics"]
    table = _verdicts(evaluated, prefix)
    table["fraction"] = table["correct"] / table["draws"]
    table["all_right"] = table["correct"] == table["draws"]
    order = list(metrics["settings"]["attacks"])  # the attack list's order (ties: list order)
    worst = {}
    for name, rows in table.groupby("defense", sort=False):
        entry = metrics["defenses"][name]
        by_attack = {label: r.reset_index(drop=True) for label, r in rows.groupby("attack")}
        clean = by_attack.pop("clean")
        expected = _summary_from_scores(clean["fraction"].to_numpy(), clean["all_right"].to_numpy())
        _assert_close(entry["clean"], expected, name)
        assert set(entry["attacks"]) == set(by_attack)
        for label, r in by_attack.items():
            assert entry["attacks"][label]["single"] == pytest.approx(r["fraction"].mean())
            assert entry["attacks"][label]["worst_of_n"] == pytest.approx(r["all_right"].mean())
        for norm in ("Linf", "L2"):
            bounded = [by_attack[label] for label in order if label in by_attack
                       and by_attack[label]["eps"].notna().all()
                       and (by_attack[label]["norm"] == norm).all()]  # fmt: skip
            sets = [_draw_matrix(clean), *(_draw_matrix(r) for r in bounded)]
            single = _crossfit(sets)
            all_right = np.all([clean["all_right"], *(r["all_right"] for r in bounded)], axis=0)
            worst[name, norm] = (single, all_right, clean["all_right"].to_numpy())
            _assert_close(entry["worst_case"][norm], _summary_from_scores(single, all_right), name)
            plugin = np.min([m.mean(axis=1) for m in sets], axis=0).mean()
            assert entry["worst_case"][norm]["plugin"] == pytest.approx(plugin)
            assert entry["worst_case"][norm]["worst_of_n"] <= entry["worst_case"][norm]["single"]
            assert not entry["worst_case"][norm]["with_study"]
    # the run is informative: fresh draws disagree, so the two rules differ somewhere
    assert any(
        entry["worst_case"][norm]["worst_of_n"] < entry["worst_case"][norm]["single"]
        for entry in metrics["defenses"].values()
        for norm in ("Linf", "L2")
    )
    # exploratory paired tests of atop vs every other defense: worst-of-N (0/1) is the exact
    # McNemar test; single-draw the mean difference of the cross-fitted scores
    assert set(metrics["paired"]) == set(metrics["defenses"]) - {"atop"}
    for other in metrics["paired"]:
        for norm in ("Linf", "L2"):
            a, b = worst["atop", norm][1], worst[other, norm][1]
            only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
            test = metrics["paired"][other][norm]
            assert test["worst_of_n"]["n_nonzero"] == only_a + only_b
            assert test["worst_of_n"]["delta"] == pytest.approx((only_a - only_b) / len(a))
            p = scipy_stats.binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
            assert test["worst_of_n"]["p_value"] == pytest.approx(p)
            difference = worst["atop", norm][0].mean() - worst[other, norm][0].mean()
            assert test["single"]["delta"] == pytest.approx(difference)
            low, high = test["single"]["ci"]
            assert (
                low <= test["single"]["delta"] + 1e-12 and test["single"]["delta"] <= high + 1e-12
            )
    # the primary family: declared in the parameters, Holm-adjusted
    primary = metrics["primary"]
    assert primary["declared"]["focus"] == "atop"
    for key, test in primary["tests"].items():
        assert key == f"atop vs {test['other']}, {test['norm']}"
        assert test["p_holm"] >= test["p_value"]
        single = metrics["paired"][test["other"]][test["norm"]]["single"]
        assert test["delta"] == pytest.approx(single["delta"])
    assert set(primary["missing"]) == {  # ap_classifier_aware and the new arm did not run
        f"atop vs {other}, {norm}"
        for other in ("ap_classifier_aware", "adversarial_reconstruction")
        for norm in ("Linf", "L2")
    }
    assert metrics["factorial"] == {}  # the 2 x 2 needs all four arms
    # at matched clean accuracy: the images every purified defense gets right clean
    purified = [n for n in metrics["defenses"] if n in PURIFIED]
    common = np.all([worst[n, "Linf"][2] for n in purified], axis=0)
    matched = metrics["matched_clean"]
    assert matched["images"] == int(common.sum())
    if common.any():
        for name in purified:
            for norm in ("Linf", "L2"):
                assert matched[name][norm] == pytest.approx(worst[name, norm][0][common].mean())
    # the ε sweeps: ε = 0 is the clean accuracy, the reference ε the reference attack
    # (the main job has no sweep of its own: clean and the reference ε)
    references = {"Linf": ("pgd_linf", "8/255"), "L2": ("pgd_l2", "0.5")}
    for norm, (label, at) in references.items():
        top = {"Linf": "64/255", "L2": "4"}[norm]
        zero = "0/255" if norm == "Linf" else "0"
        points = [zero, at] if prefix == "robustness" else [zero, at, top]
        for name, sweep in metrics["robust_acc_vs_eps"][norm].items():
            assert list(sweep) == points, (norm, name)
            assert sweep[zero] == pytest.approx(metrics["defenses"][name]["clean"]["single"])
            assert sweep[at] == pytest.approx(metrics["defenses"][name]["attacks"][label]["single"])
    settings = metrics["settings"]
    assert (settings["n_images"], settings["seed"], settings["draws"]) == (8, 0, 2)
    assert set(settings["rules"]) == {"single", "worst_of_n"}
    assert settings["attacks"]["pgd_linf"]["eps"] == pytest.approx(8 / 255)
    assert (
        settings["attacks"]["pgd_linf"]["steps"],
        settings["attacks"]["pgd_linf"]["eot_iter"],
    ) == (2, 2)


def test_attacks_lower_the_undefended_accuracy(evaluated):
    standard = evaluated["metrics"]["defenses"]["standard"]
    assert standard["clean"]["single"] == standard["clean"]["worst_of_n"] == 5 / 8
    assert standard["attacks"]["pgd_linf"]["single"] < standard["clean"]["single"]
    assert standard["worst_case"]["Linf"]["single"] <= standard["attacks"]["pgd_linf"]["single"]
    # pgd_at is the same classifier here: same images, same seed -> same clean verdicts
    comparison = evaluated["comparison_metrics"]["defenses"]
    assert comparison["pgd_at"]["clean"] == comparison["standard"]["clean"]


def test_the_csv_table_has_one_row_per_defense_and_rule(evaluated):
    metrics = evaluated["metrics"]
    table = pd.read_csv(evaluated["folder"] / REPORTS["robustness_table"])
    assert list(zip(table["defense"], table["rule"], strict=True)) == [
        (name, rule) for name in metrics["defenses"] for rule in ("single", "worst_of_n")
    ]
    table = table.set_index(["defense", "rule"])
    for name, entry in metrics["defenses"].items():
        for rule in ("single", "worst_of_n"):
            row = table.loc[(name, rule)]
            assert row["clean"] == pytest.approx(entry["clean"][rule])
            for label, values in entry["attacks"].items():
                assert row[label] == pytest.approx(values[rule]), (name, rule, label)
            for norm in ("Linf", "L2"):
                key = f"worst_case_{norm.lower()}"
                assert row[key] == pytest.approx(entry["worst_case"][norm][rule])
                low, high = entry["worst_case"][norm][f"{rule}_ci"]
                assert (row[f"{key}_low"], row[f"{key}_high"]) == pytest.approx((low, high))
            assert (row["n_images"], row["draws"]) == (8, 2)
    assert np.isnan(table.loc[("standard", "single"), "bpda_linf"])
    assert np.isnan(table.loc[("atop", "single"), "autoattack_standard"])


def _markdown_table(report: str, heading: str) -> pd.DataFrame:
    """The first Markdown table after ``heading``, cells stripped of ``**``."""
    block = []
    for line in report.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            block.append([cell.strip().replace("**", "") for cell in line.strip("|").split("|")])
        elif block:
            break
    return pd.DataFrame(block[2:], columns=block[0])


def _pct(cell: str) -> float:
    return float(cell.split(" ")[0])


def test_the_markdown_report_agrees_with_the_json(evaluated):
    metrics = evaluated["metrics"]
    report = (evaluated["folder"] / REPORTS["robustness_report"]).read_text()
    headline = _markdown_table(report, "## Worst-case robust accuracy (%), the headline")
    headline = headline.set_index("defense")
    assert list(headline.index) == list(metrics["defenses"])
    for name, entry in metrics["defenses"].items():
        row = headline.loc[name]
        assert _pct(row["clean, single-draw"]) == pytest.approx(
            100 * entry["clean"]["single"], abs=0.005
        )
        single = row["worst ℓ∞, single-draw"]
        assert _pct(single) == pytest.approx(100 * entry["worst_case"]["Linf"]["single"], abs=0.005)
        low, high = entry["worst_case"]["Linf"]["single_ci"]
        assert single.endswith(f"[{100 * low:.2f}, {100 * high:.2f}]")
        assert _pct(row["worst ℓ2, single-draw"]) == pytest.approx(
            100 * entry["worst_case"]["L2"]["single"], abs=0.005
        )
        assert _pct(row["worst ℓ∞, worst-of-2"]) == pytest.approx(
            100 * entry["worst_case"]["Linf"]["worst_of_n"], abs=0.005
        )
    for rule, heading in (("single", "single"), ("worst_of_n", "worst-of-n")):
        table = _markdown_table(report, f"## Accuracy (%) per attack, {heading}").set_index(
            "defense"
        )
        for name, entry in metrics["defenses"].items():
            assert _pct(table.loc[name, "clean"]) == pytest.approx(
                100 * entry["clean"][rule], abs=0.005
            )
            for label, values in entry["attacks"].items():
                assert _pct(table.loc[name, label]) == pytest.approx(100 * values[rule], abs=0.005)
        assert table.loc["standard", "bpda_linf"] == "—"
    assert "N = 2 fresh draws" in report
    assert "## AToP against every other defense (exploratory, uncorrected)" in report
    paired = _markdown_table(report, "## AToP against every other defense")
    assert set(paired["other defense"]) == set(metrics["paired"])
    primary = _markdown_table(report, "## The primary family (declared before the run)")
    assert len(primary) == len(metrics["primary"]["tests"])
    for row, test in zip(primary.itertuples(), metrics["primary"]["tests"].values(), strict=True):
        assert row.vs == test["other"]
        assert row._3.startswith(f"{100 * test['delta']:+.2f} [")
    assert "Not evaluated (family incomplete)" in report
    # the fixed-randomness diagnostic: purified defenses only, in the full comparison
    assert "## Diagnostic: the same randomness for attack and judging" not in report
    assert not any("fixed_randomness" in entry for entry in metrics["defenses"].values())
    metrics = evaluated["comparison_metrics"]
    report = (evaluated["folder"] / COMPARISON["comparison_report"]).read_text()
    assert "## Diagnostic: the same randomness for attack and judging" in report
    fixed = _markdown_table(report, "## Diagnostic: the same randomness")
    assert set(fixed["defense"]) == {n for n in metrics["defenses"] if n in PURIFIED}
    for name, entry in metrics["defenses"].items():
        assert ("fixed_randomness" in entry) == (name in PURIFIED), name
        if name in PURIFIED:
            rows = entry["fixed_randomness"]
            assert (rows["Linf"]["label"], rows["L2"]["label"]) == ("pgd_linf", "pgd_l2")
            assert rows["Linf"]["fresh"] == entry["attacks"]["pgd_linf"]["single"]


def test_the_report_says_when_no_convergence_study_ran_and_cites_one_when_given(evaluated):
    main = (evaluated["folder"] / REPORTS["robustness_report"]).read_text()
    assert "## Is the attack converged?" in main
    assert "No convergence study has run yet" in main
    # the comparison ran after a study was written: its report cites it
    comparison = (evaluated["folder"] / COMPARISON["comparison_report"]).read_text()
    assert "No convergence study has run yet" not in comparison
    assert "`convergence_report.md` beside this report (PGD Linf eps 8/255" in comparison
    table = _markdown_table(comparison, "## Is the attack converged?")
    assert list(table["defense"]) == ["ap", "atop"]
    verdicts = dict(zip(table["defense"], table["converged"], strict=True))
    # AP's settings never go below its headline (3 of 8); AToP's 4 x 2 reaches 0 of 8
    assert verdicts == {"ap": "yes", "atop": "no"}  # the table cell, markdown emphasis stripped
    settings = dict(zip(table["defense"], table["settings that lower it"], strict=True))
    assert settings == {"ap": "none", "atop": "4x2"}
    assert evaluated["convergence"]["defenses"]["atop"]["Linf"]["converged"] is False
    # the same report node with the study given directly
    results, metrics = evaluated["results"], evaluated["metrics"]
    cited = robustness_report(results, metrics, evaluated["convergence"])
    assert "convergence_report.md" in cited and "No convergence study" not in cited
    assert robustness_report(results, metrics) == robustness_report(results, metrics, None)
    assert "No convergence study has run yet" in robustness_report(results, metrics)
    # a record of the older schema (ℓ∞ only, one attack; a fresh clone's committed record
    # until the full comparison reruns) is named stale, not read
    older = {
        "settings": {"images": 128, "draws": 10, "attack": "pgd"},
        "defenses": {"ap": {"points": {}}},
    }
    assert "older schema" in robustness_report(results, metrics, older)


def test_optional_json_dataset_loads_none_for_a_missing_file(tmp_path):
    dataset = OptionalJSONDataset(str(tmp_path / "convergence.json"))
    assert dataset.load() is None
    dataset.save({"a": [1, 2]})
    assert dataset.load() == {"a": [1, 2]}
    assert '\n  "a"' in (tmp_path / "convergence.json").read_text()  # indented


def test_sanity_checks_run_and_are_reported(evaluated):
    metrics = evaluated["comparison_metrics"]
    report = (evaluated["folder"] / COMPARISON["comparison_report"]).read_text()
    for name, statuses in metrics["sanity"].items():
        assert set(statuses) == CHECKS
        run = {k for k, v in statuses.items() if v != "not run"}
        bpda = {"bpda_vs_exact_linf", "bpda_vs_exact_l2"}
        assert run == (CHECKS if name in PURIFIED else CHECKS - bpda), name
        assert set(statuses.values()) <= {"pass", "fail", "not run"}
        res = evaluated["comparison_results"]["defenses"][name]
        limit = evaluated["params"].sanity.large_eps_max_acc
        for norm in ("Linf", "L2"):
            at_max = res["sweep"][norm][-1]["draws"].float().mean().item()
            expected = "pass" if at_max <= limit else "fail"
            assert statuses[f"large_eps_near_zero_{norm.lower()}"] == expected
    stronger = {
        name: res["sanity"]["stronger_attack_linf"]["detail"]
        for name, res in evaluated["comparison_results"]["defenses"].items()
    }
    assert stronger["ap"].startswith("pgd_linf -> pgd4_eot2 (convergence study): ")
    assert stronger["atop"].startswith("pgd_linf -> stronger: ")  # no study: it ran
    standard = metrics["robust_acc_vs_eps"]["Linf"]["standard"]
    assert standard["64/255"] < standard["0/255"]  # even 2 PGD steps at 64/255 break some
    assert "## Gradient-masking sanity checks" in report
    assert "one-sided sign-flip test of the per-image single-draw scores at level 0.05" in report
    assert report.count("| ap | ") >= 5 and "BPDA vs exact gradients" in report


def test_unseen_attacks_come_from_the_checkpoints_and_training_time_from_the_histories(
    evaluated,
):
    metrics = evaluated["metrics"]
    assert metrics["unseen"]["training_attack"] == "fgsm Linf 8/255"
    seen = metrics["unseen"]["seen"]
    assert seen["fgsm"] is True and not any(v for k, v in seen.items() if k != "fgsm")
    # no purifier pretraining history: the total is unknown, not made up
    assert metrics["defenses"]["standard"]["train_seconds"] == 3.0
    assert metrics["defenses"]["atop"]["train_seconds"] is None
    defenses = evaluated["results"]["defenses"]
    assert defenses["standard"]["train_seconds"] == {"classifier_history": 3.0}
    stages = defenses["atop"]["train_seconds"]
    assert stages == {
        "classifier_history": 3.0,
        "purifier_history": None,
        "finetuning_history_atop": 5.0,
    }
    continued = defenses["ap_continued"]["train_seconds"]
    assert continued == {
        "classifier_history": 3.0,
        "purifier_history": None,
        "finetuning_history_ap_continued": 4.0,
    }
    assert defenses["ap"]["train_seconds"] == {
        "classifier_history": 3.0,
        "purifier_history": None,
    }
    pgd_at = evaluated["comparison_results"]["defenses"]["pgd_at"]
    assert pgd_at["train_seconds"] == {"adversarial_training_history": 6.0}
    assert pgd_at["total_train_seconds"] == 6.0
    report = (evaluated["folder"] / REPORTS["robustness_report"]).read_text()
    assert "fine-tuned with **fgsm Linf 8/255**" in report
    assert "atop: `purifier_history` records no training time" in report
    assert "ap_classifier_aware: not evaluated" in report
    assert (
        "rvs: not evaluated" in (evaluated["folder"] / COMPARISON["comparison_report"]).read_text()
    )


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
    params = stage_params("evaluation", device="cpu", defenses=["standard"])
    catalog = make_catalog(inputs, tmp_path, params)
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


def test_project_catalog_and_registry_wire_both_jobs():
    catalog = _project_context().catalog
    for name in ("pgd_at_classifier", "rvs_classifier"):
        dataset = catalog[name]
        assert isinstance(dataset, TorchDataset) and dataset._describe()["optional"] is True
    for name, filename in {**REPORTS, **COMPARISON}.items():
        layer = "07_model_output" if name.endswith("_verdicts") else "08_reporting"
        folder = f"{layer}/cifar10/smoke"
        assert str(catalog[name]._describe()["filepath"]).endswith(f"data/{folder}/{filename}")
    convergence = catalog["convergence"]
    assert isinstance(convergence, OptionalJSONDataset)
    assert str(convergence._describe()["filepath"]).endswith(
        "data/08_reporting/cifar10/smoke/convergence.json"
    )
    for name in DEFENSES:  # the per-defense results: files, one per defense (not optional)
        dataset = catalog[f"evaluation_{name}"]
        assert isinstance(dataset, TorchDataset) and dataset._describe()["optional"] is False
        path = str(dataset._describe()["filepath"])
        assert path.endswith(f"data/07_model_output/cifar10/smoke/evaluation/{name}.pt")
    pipelines = register_pipelines()
    atop_nodes = {node.name for node in pipelines["atop"].nodes}
    assert {f"evaluate_{name}" for name in MAIN} | {"collect_robustness"} <= atop_nodes
    assert not {f"evaluate_{name}" for name in EXTRA} & atop_nodes
    assert "collect_comparison" not in atop_nodes and "convergence_report" not in atop_nodes
    assert "convergence" in pipelines["atop"].inputs()  # the latest study, when it exists
    full = pipelines["__default__"]
    order = [node.name for node in full.nodes]  # topologically sorted
    assert {f"evaluate_{name}" for name in DEFENSES} <= set(order)
    producers = {
        output: node.name
        for node in full.nodes
        for output in node.outputs
        if output in ("pgd_at_classifier", "rvs_classifier", "convergence")
    }
    assert set(producers) == {"pgd_at_classifier", "rvs_classifier", "convergence"}
    for checkpoint, producer in producers.items():
        consumers = [n.name for n in full.nodes if checkpoint in n.inputs]
        assert consumers and all(order.index(producer) < order.index(c) for c in consumers)
    assert order.index(producers["pgd_at_classifier"]) < order.index("evaluate_pgd_at")
    assert order.index(producers["rvs_classifier"]) < order.index("evaluate_rvs")
    # the full comparison's reports cite the study of the same run
    assert order.index("convergence_report") < order.index("comparison_report")
    assert order.index("convergence_report") < order.index("robustness_report")


def test_parameters_of_every_profile_parse():
    for env in ("smoke", "base", "paper"):
        params = stage_params("evaluation", env=env)
        assert isinstance(params, EvalParams)
        entries = params.entries
        refs = params.references
        assert [(r.label, r.norm) for r in refs] == [("pgd_linf", "Linf"), ("pgd_l2", "L2")]
        assert refs[0].eps == pytest.approx(8 / 255) and refs[1].eps == 0.5
        labels = {e.label for e in entries}
        assert labels >= {"fgsm", "pgd_linf", "pgd_l2", "bpda_linf", "bpda_l2"}, env
        # both threat models get AutoAttack-rand (stochastic) and -standard where listed
        for norm in ("Linf", "L2"):
            rand = [e for e in entries if e.name == "autoattack" and e.norm == norm
                    and e.spec["version"] == "rand"]  # fmt: skip
            assert rand and all(e.applies_to == "stochastic" for e in rand), (env, norm)
        auto = {e.spec["version"]: e for e in entries if e.name == "autoattack"}
        assert auto["standard"].applies_to == "deterministic", env
        assert 0 < params.sanity.alpha < 1 and params.draws >= 2
        assert params.primary.focus == "atop"
    base = stage_params("evaluation", env="base")
    assert base.draws == 10 and base.fixed_randomness is True
    # the strong survivors attacks of both norms: at least 100 steps x EOT-16
    strong = {e.norm: e for e in base.entries if e.survivors and e.name == "pgd"}
    for norm in ("Linf", "L2"):
        assert strong[norm].spec["steps"] >= 100 and strong[norm].spec["eot_iter"] >= 16
    assert set(base.primary.versus) == {"ap_continued", "ap_classifier_aware",
                                        "adversarial_reconstruction"}  # fmt: skip
    paper = stage_params("evaluation", env="paper")
    auto = {e["version"]: e for e in paper.attacks if e["name"] == "autoattack"}
    assert auto["standard"]["steps"] == auto["rand"]["steps"] == 100
    assert auto["rand"]["eot_iter"] == 20 and paper.images == 512 and paper.draws == 20
    assert "cw_l2" in {e["label"] for e in paper.attacks}

"""Every sub-command of ``python -m benchmarks`` runs, at tiny sizes (a few real CIFAR-10
images, one or two steps, one repeat), on a tiny fake run folder; and the independent attack
of ``crosscheck`` does what it claims."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from atop.checkpoint import save_atomic
from atop.models import build_classifier, classifier_checkpoint
from atop.models.purifier import build_purifier, purifier_checkpoint
from benchmarks import SUBCOMMANDS
from benchmarks.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
#: RT2 at the authors' noise, as the purifier stage records it in ``meta.transform``.
TRANSFORM = {"kind": "rt2", "sigma": 0.25, "missing_rate": 0.25, "mask_block": None,
             "mask_number": 4, "noise_resolution": 256}  # fmt: skip


def write_fake_run(folder: Path) -> Path:
    """A project folder with what a finished base run leaves and the benchmarks read: real
    splits cut to 128 training and 32 test images, the subsets, a tiny random classifier
    (resnet-fast width 4) and purifier (cnum 8), the classifier's metrics and a verdicts CSV."""
    from benchmarks.common import cifar10

    data = folder / "data"
    split, subsets = data / "02_intermediate/cifar10/base", data / "05_model_input/cifar10/base"
    models, reporting = data / "06_models/cifar10/base", data / "08_reporting/cifar10/base"
    output = data / "07_model_output/cifar10/base"
    for path in (split, subsets, models, reporting, output):
        path.mkdir(parents=True)
    for name, n, train in (("train", 128, True), ("test", 32, False)):
        images, labels = cifar10(n, train=train)
        torch.save({"images": images, "labels": labels}, split / f"{name}.pt")
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    (split / "class_names.json").write_text(json.dumps(names))
    (subsets / "eval_indices.json").write_text(json.dumps(list(range(8))))
    (subsets / "monitor_indices.json").write_text(json.dumps(list(range(8, 24))))
    torch.manual_seed(0)
    f = build_classifier("resnet-fast", 10, width=4)
    save_atomic(
        classifier_checkpoint(f, "resnet-fast", {"num_classes": 10, "width": 4}),
        models / "classifier.pt",
    )
    g, d = build_purifier({"cnum": 8})
    purifier = purifier_checkpoint(g, d, meta={"transform": TRANSFORM})
    for name in ("purifier", "purifier_atop"):
        save_atomic(purifier, models / f"{name}.pt")
    metrics = {"clean_test_acc": 0.1, "epochs": 1, "n_train": 128, "train_seconds": 2.0}
    (reporting / "classifier_metrics.json").write_text(json.dumps(metrics))
    rows = [
        {"defense": "atop", "attack": attack, "norm": norm, "image": i,
         "draw_0": (i + k) % 2, "draw_1": 1}
        for k, (attack, norm) in enumerate((("clean", None), ("pgd_linf", "Linf"),
                                            ("pgd_l2", "L2")))
        for i in range(8)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(output / "robustness_verdicts.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    return write_fake_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def models(run_folder) -> dict[str, str]:
    folder = run_folder / "data/06_models/cifar10/base"
    return {"classifier": str(folder / "classifier.pt"), "purifier": str(folder / "purifier.pt")}


def bench(capsys, name: str, *args: str) -> str:
    """Run ``python -m benchmarks <name> <args>`` in this process (one thread); its output."""
    main([name, *args, *(() if name in ("stages", "runs") else ("--threads", "1"))])
    return capsys.readouterr().out


# --------------------------------------------------------------------------- entry point


def test_every_subcommand_has_a_test_below():
    source = Path(__file__).read_text()
    called = set(re.findall(r'bench\(\s*capsys,\s*"([a-z-]+)"', source))
    missing = sorted(set(SUBCOMMANDS) - called)
    assert not missing, f"sub-commands without a test: {missing}"


def test_the_entry_point_lists_the_subcommands_and_the_shim_runs_one():
    listing = subprocess.run(
        [sys.executable, "-m", "benchmarks"], cwd=ROOT, capture_output=True, text=True
    )
    assert listing.returncode == 2 and all(name in listing.stderr for name in SUBCOMMANDS)
    shim = subprocess.run(
        [sys.executable, "benchmarks/benchmark.py", "stages", "--help"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert shim.returncode == 0 and "python -m benchmarks stages" in shim.stdout


def test_unknown_subcommands_and_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit, match="unknown sub-command 'nope'"):
        main(["nope"])
    with pytest.raises(SystemExit) as bad:
        main(["crosscheck", "--classifier", "a", "--purifier", "b", "--images", "0"])
    assert bad.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["crosscheck", "--classifier", "a", "--purifier", "b", "--eps-linf", "0/255"])
    assert "expected a number > 0" in capsys.readouterr().err
    from benchmarks.common import positive_float

    assert positive_float("8/255") == pytest.approx(8 / 255) and positive_float("0.5") == 0.5
    with pytest.raises(SystemExit, match="unknown workloads"):
        main(["precision", "--workloads", "classifier,nope"])
    with pytest.raises(SystemExit, match="PRETRAINED classifier"):
        main(["train-attack-amp", "--classifier", "missing.pt", "--purifier", "missing.pt"])


# --------------------------------------------------------------------------- throughput


def test_classifier(capsys):
    out = bench(capsys, "classifier", "--images", "128", "--batch-size", "64", "--epochs", "1",
                "--repeats", "1")  # fmt: skip
    assert "bare loop" in out and "fit + augment" in out


def test_atop(capsys):
    out = bench(capsys, "atop", "--batch-size", "2", "--batches", "1", "--cnum", "8",
                "--attack-amp", "--repeats", "1")  # fmt: skip
    assert "fgsm    bf16 / fp32 attack" in out and "pgd-10" in out


def test_purifier(capsys):
    out = bench(capsys, "purifier", "--batch-size", "2", "--steps", "1", "--cnums", "8",
                "--variants", "native")  # fmt: skip
    assert "variant=native" in out and "img/s" in out


def test_purifier_quality(capsys, models):
    out = bench(capsys, "purifier-quality", "--classifier", models["classifier"], "--configs",
                "unet:8", "--cpu-minutes", "0.005", "--batch-size", "8", "--val-images", "8",
                "--draws", "1")  # fmt: skip
    assert "unet:8" in out and "PSNR" in out


TINY_SIDE_BY_SIDE = ("--batch-size", "2", "--batches", "1", "--repeats", "1")
WORKLOADS = ("classifier", "purifier", "atop", "pgd_at", "rvs", "pgd-defense", "pgd-classifier")


def test_precision(capsys):
    out = bench(capsys, "precision", *TINY_SIDE_BY_SIDE)
    assert all(w in out for w in WORKLOADS) and out.count("fp32") == len(WORKLOADS)


def test_layout(capsys):  # the same workloads as precision, so the attacks and one step
    out = bench(
        capsys, "layout", *TINY_SIDE_BY_SIDE, "--workloads", "pgd_at,pgd-defense,pgd-classifier"
    )
    assert "pgd_at" in out and out.count("outputs identical") == 2


def test_compile_without_compiling(capsys):
    out = bench(capsys, "compile", "--batch-size", "2", "--repeats", "1", "--variants",
                "channels_last", "--profile")  # fmt: skip
    assert "channels_last" in out and "Self CPU time total" in out


@pytest.mark.slow
def test_compile(capsys):
    out = bench(capsys, "compile", "--batch-size", "2", "--repeats", "1")
    assert "compile" in out


# --------------------------------------------------------------------------- attacks


def test_autoattack_check(capsys, models):
    out = bench(capsys, "autoattack-check", "--classifier", models["classifier"], "--purifier",
                models["purifier"], "--images", "2", "--steps", "1", "--eot", "1", "--draws", "2")  # fmt: skip
    assert "pyautoattack rand" in out and "atop AutoAttack-rand" in out


def test_eot_packing(capsys, models):
    out = bench(capsys, "eot-packing", "--classifier", models["classifier"], "--purifier",
                models["purifier"], "--images", "4", "--chunk", "2", "--steps", "1", "--eot", "2",
                "--draws", "2")  # fmt: skip
    assert "speed-up" in out and "worst_of_n +" in out


def test_evaluation(capsys):
    out = bench(capsys, "evaluation", "--images", "4", "--batch-size", "4", "--steps", "1",
                "--eot-iter", "1", "--profiles", "base")  # fmt: skip
    assert "fwd-bwd passes/s" in out and "base   128 images" in out


def test_processes_worker(capsys):
    out = bench(capsys, "processes", "--worker", "--images", "2", "--steps", "1", "--eot", "1")
    assert json.loads(out.splitlines()[-1])["passes_per_s"] > 0


@pytest.mark.slow
def test_processes(capsys):  # four fresh processes: about 20 s
    out = bench(capsys, "processes", "--images", "2", "--steps", "1", "--eot", "1")
    assert "2 processes x 1 thread" in out and "eot_batch 128" in out


# --------------------------------------------------------------------------- records


def test_stages(capsys, run_folder):
    reporting = run_folder / "data/08_reporting/cifar10/base"
    out = bench(capsys, "stages", "--reporting", str(reporting))
    assert "classifier_pretraining" in out and "images/s" in out and "rvs" in out


def test_runs(capsys, run_folder):
    out = bench(capsys, "runs", "--old", str(run_folder), "--new", str(run_folder))
    assert "worst Linf first draw old 0.00 % | new 0.00 %" in out and "p = 1" in out


def test_paper_projection(capsys):
    out = bench(capsys, "paper-projection", "--batch-size", "1", "--skip-upsample")
    assert "| evaluation (" in out and "| atop_finetuning (" in out and "| **total** |" in out


@pytest.mark.parametrize("stage", ["classifier", "purifier", "attacks"])
def test_parity(capsys, run_folder, stage):
    extra = {"purifier": ("--purifier-steps", "1"),
             "attacks": ("--attacks", "fgsm", "--defenses", "ap,standard")}  # fmt: skip
    out = bench(capsys, "parity", stage, "--run", str(run_folder), *extra.get(stage, ()))
    assert {"classifier": "fp32", "purifier": "PSNR", "attacks": "bf16 weaker?"}[stage] in out


# --------------------------------------------------------------------------- new


def test_flops(capsys):
    out = bench(capsys, "flops", "--batch-size", "2", "--steps", "1", "--repeats", "1",
                "--peak-size", "128", "--peak-repeats", "1", "--explain-below", "1e-9", "--clock", "cpu",
                "--stages", ",".join(flops_stages()))  # fmt: skip
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(flops_stages())
    for line in table[1:]:
        gflop = float(line.split("|")[3].replace(",", ""))
        assert gflop > 0, line


def test_flops_explains_a_step_by_its_share_of_op_time():
    from atop.transforms import RandomTransform
    from benchmarks.flops import CATEGORIES, time_shares

    model, transform = torch.nn.Conv2d(3, 8, 3), RandomTransform("rt2")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(4, 3, 32, 32)

    def step() -> None:
        loss = torch.nn.functional.relu(model(transform(x).image)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    shares, top = time_shares(step)
    assert list(shares) == list(CATEGORIES) and sum(shares.values()) == pytest.approx(1.0)
    assert shares["conv/matmul"] > 0 and shares["random transform"] > 0
    assert shares["optimizer"] > 0 and len(top) == 5


def flops_stages() -> list[str]:
    from benchmarks.flops import STAGES

    return list(STAGES)


def test_crosscheck(capsys, models, run_folder, tmp_path):
    out_file = tmp_path / "verdicts.json"
    out = bench(capsys, "crosscheck", "--classifier", models["classifier"], "--purifier",
                models["purifier"], "--images", "2", "--steps", "1", "--eot", "3", "--draws",
                "2", "--batch-size", "4", "--run", str(run_folder), "--out", str(out_file))  # fmt: skip
    assert "| Linf eps 8/255, alpha 2/255 |" in out and "| L2 eps 0.5, alpha 0.1 |" in out
    record = json.loads(out_file.read_text())
    assert record["indices"] == [24, 25]  # the first test images outside both subsets
    assert {k: len(v) for k, v in record["verdicts"].items()} == {"clean": 2, "Linf": 2, "L2": 2}


def test_train_attack_amp(capsys, models):
    out = bench(capsys, "train-attack-amp", "--classifier", models["classifier"], "--purifier",
                models["purifier"], "--images", "6", "--batch-size", "4", "--draws", "2",
                "--batches", "1", "--repeats", "1")  # fmt: skip
    assert "| bf16 autocast |" in out and "| float32 |" in out
    assert "paired, bf16 - float32" in out and "AToP step fp32" in out


# --------------------------------------------------------------------------- crosscheck's attack


def test_the_crosscheck_attack_imports_none_of_the_project_attack_code():
    source = (ROOT / "benchmarks" / "crosscheck.py").read_text()
    assert "atop.attacks" not in source.replace("``atop.attacks``", "")
    assert "atop.evaluation.protocol" not in source.replace("``atop.evaluation.protocol``", "")


def test_eot_gradient_is_the_mean_of_the_draws_whatever_the_packing():
    from benchmarks.crosscheck import eot_gradient

    class Noisy(torch.nn.Module):
        """A linear model whose every row draws its own input noise."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(12, 3)

        def forward(self, x):
            return self.linear((x + 0.1 * torch.randn_like(x)).flatten(1) ** 2)

    model, x, y = Noisy(), torch.rand(2, 3, 2, 2), torch.tensor([0, 2])
    torch.manual_seed(0)
    one_per_pass = eot_gradient(model, x, y, eot=5, rows=2)  # 5 passes of the 2 images
    torch.manual_seed(0)
    noise = [0.1 * torch.randn(2, 3, 2, 2) for _ in range(5)]
    expected = torch.zeros_like(x)
    for draw in noise:
        xr = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model.linear(((xr + draw).flatten(1)) ** 2), y,
                                                 reduction="sum")  # fmt: skip
        expected += torch.autograd.grad(loss, xr)[0] / 5
    torch.testing.assert_close(one_per_pass, expected)
    packed = eot_gradient(model, x, y, eot=5, rows=6)  # passes of 3 copies, then 2
    assert packed.shape == x.shape and not torch.equal(packed, one_per_pass)  # other draws


def test_crosscheck_attacks_stay_in_budget_and_beat_a_linear_model():
    from benchmarks.crosscheck import judge, pgd_l2, pgd_linf

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # clean accuracy 100 %
    linf = pgd_linf(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, eot=2, rows=32)
    l2 = pgd_l2(model, x, y, eps=2.0, alpha=0.5, steps=10, eot=2, rows=32)
    assert (linf - x).abs().max() <= 8 / 255 + 1e-6 and (l2 - x).flatten(1).norm(
        dim=1
    ).max() <= 2.0 + 1e-4
    for adv in (linf, l2):
        assert 0 <= adv.min() and adv.max() <= 1
        assert not judge(model, adv, y, draws=2, rows=64).any()  # every image misclassified
    assert judge(model, x, y, draws=3, rows=64).all()


def test_crosscheck_draws_the_subsets_as_data_ingestion_when_their_files_are_missing(tmp_path):
    from atop.pipelines.data_ingestion.nodes import (
        IngestionParams,
        select_eval_subset,
        select_monitor_subset,
    )
    from benchmarks.common import profile_parameters
    from benchmarks.crosscheck import split_subsets

    evals, monitor, source = split_subsets(tmp_path)
    test_set = {"labels": torch.zeros(10_000, dtype=torch.int64)}
    typed = IngestionParams.from_dict(profile_parameters("base").raw_block("data_ingestion"))
    assert evals == select_eval_subset(test_set, typed) and "drawn" in source
    assert monitor == select_monitor_subset(test_set, evals, typed)

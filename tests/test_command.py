"""The `atop` command and `kedro run` as a user meets them: the version, arguments checked,
any nn.Module evaluated, and every user error in one line (exit code 2) unless --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import make_project_copy

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def project(tmp_path_factory, data_root) -> Path:
    """A project copy (conf only) with a user's model module beside it."""
    os.environ["ATOP_DATA_ROOT"] = str(data_root)
    root = make_project_copy(tmp_path_factory.mktemp("command"))
    (root / "usermodels.py").write_text(
        textwrap.dedent(
            '''
            import torch
            from torch import nn


            class Tiny(nn.Module):
                """Mean colour -> logits: a deterministic model of the user's."""

                stochastic = False

                def __init__(self):
                    super().__init__()
                    torch.manual_seed(0)
                    self.linear = nn.Linear(3, 10)

                def forward(self, x):
                    return self.linear(x.mean(dim=(2, 3)))


            def build():
                return Tiny()


            def not_a_model():
                return {"weights": 1}
            '''
        )
    )
    return root


def atop(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "atop"), *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def lines(result: subprocess.CompletedProcess) -> list[str]:
    return (result.stdout + result.stderr).strip().splitlines()


def test_version_is_the_installed_packages():
    result = subprocess.run([str(BIN / "atop"), "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.strip() == f"atop {metadata.version('atop')}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "-5"], "argument --images: expected a positive integer (>= 1), got -5"),
        (["--images", "0"], "argument --images: expected a positive integer (>= 1), got 0"),
        (["--draws", "0"], "argument --draws: expected a positive integer (>= 1), got 0"),
        (["--images", "ten"], "argument --images: expected a positive integer, got 'ten'"),
    ],
)
def test_evaluate_refuses_bad_numbers_in_one_line(project, args, message):
    """--images -5 evaluated 507 images, --images 0 crashed inside torch, --draws 0 fell
    back to the profile's value: all refused before anything loads."""
    result = atop(project, "evaluate", "--model", "usermodels:build", "--profile", "smoke", *args)
    assert result.returncode == 2
    assert lines(result) == [
        f"atop evaluate: error: {message} (`atop evaluate --help` lists the options)"
    ]


def test_evaluate_refuses_more_images_than_the_subset(project):
    """--images 100000 silently used the 512 images of the subset."""
    result = atop(project, "evaluate", "--model", "usermodels:build", "--profile", "smoke",
                  "--images", "100000")  # fmt: skip
    assert result.returncode == 2
    assert len(lines(result)) <= 5
    assert lines(result)[-1] == (
        "atop: error: --images 100000 is more than the 512 images of the smoke profile's fixed "
        "evaluation subset (data_ingestion.eval_subset.images): use at most 512."
    )


def test_the_traceback_only_with_verbose_or_atop_debug(project):
    quiet = atop(project, "evaluate", "--model", "nosuchmodule:build")
    assert quiet.returncode == 2 and len(lines(quiet)) == 1 and "Traceback" not in quiet.stderr
    verbose = atop(project, "--verbose", "evaluate", "--model", "nosuchmodule:build")
    assert verbose.returncode != 0 and "Traceback (most recent call last)" in verbose.stderr
    debug = atop(project, "evaluate", "--model", "nosuchmodule:build", env={"ATOP_DEBUG": "1"})
    assert "Traceback (most recent call last)" in debug.stderr


def test_evaluate_takes_any_module_from_a_zero_argument_factory(project, tmp_path):
    import pandas as pd

    out = tmp_path / "verdicts.csv"
    result = atop(project, "evaluate", "--model", "usermodels:build", "--profile", "smoke",
                  "--attacks", "fgsm", "--images", "4", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 images of the fixed evaluation subset, 1 fresh draw(s) per verdict" in result.stdout
    table = pd.read_csv(out)
    assert set(table["defense"]) == {"build"} and set(table["attack"]) == {"clean", "fgsm"}
    assert (table["draws"] == 1).all()  # its `stochastic = False`: one pass judges
    # --stochastic overrides the attribute: every verdict judged with the profile's draws
    result = atop(project, "evaluate", "--model", "usermodels:build", "--profile", "smoke",
                  "--attacks", "fgsm", "--images", "4", "--stochastic", "--draws", "3",
                  "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (pd.read_csv(out)["draws"] == 3).all()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchmodule:build", "cannot import 'nosuchmodule' (ModuleNotFoundError"),
        ("usermodels:nosuch", "usermodels has no callable 'nosuch'"),
        ("usermodels:not_a_model", "not_a_model() returned dict, not a torch.nn.Module"),
        ("usermodels", "write module:factory"),
    ],
)
def test_a_model_that_cannot_be_built_is_one_line(project, target, message):
    result = atop(project, "evaluate", "--model", target, "--profile", "smoke", "--images", "2")
    assert result.returncode == 2
    assert len(lines(result)) <= 5 and message in lines(result)[-1]
    assert lines(result)[-1].startswith("atop: error: --model")


def test_import_and_export_errors_are_one_line(project, tmp_path):
    result = atop(project, "import", str(project / "conf"))
    assert result.returncode == 2 and len(lines(result)) == 1
    assert "is not an exported defense" in lines(result)[0]
    missing = tmp_path / "nowhere.pt"
    result = atop(project, "export", "--classifier", str(missing), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and len(lines(result)) == 1
    assert lines(result)[0].startswith(f"atop: error: No torch file at '{missing}'")


def test_kedro_run_user_errors_are_one_line_with_exit_code_2(project):
    """A refused parameter in `kedro run` printed a 51-line traceback."""
    kedro = str(BIN / "kedro")
    run = lambda *args, **env: subprocess.run(  # noqa: E731
        [kedro, "run", "--env", "smoke", *args], cwd=project, capture_output=True, text=True,
        timeout=600, env={**os.environ, **env},
    )  # fmt: skip
    result = run("--params", "evaluation.images=0")
    assert result.returncode == 2
    assert len(lines(result)) <= 5, lines(result)
    assert lines(result)[-1].startswith("kedro: error: evaluation.images=0 is out of range")
    assert "Fix it in the --params override." in lines(result)[-1]
    assert "Traceback" not in result.stdout + result.stderr
    verbose = run("--params", "evaluation.images=0", "--verbose")
    assert verbose.returncode != 0 and "Traceback (most recent call last)" in verbose.stderr
    listed = run("--params", "evaluation.attacks.0.eps=0.1")  # a list item: not via --params
    assert listed.returncode == 2 and len(lines(listed)) <= 5
    assert (
        "an item of a list such as evaluation.attacks cannot be set that way" in lines(listed)[-1]
    )

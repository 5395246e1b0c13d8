"""The README: short, for users, no hand-typed results; its Python snippet runs as written on
a smoke run's outputs, without Kedro. (Its results block: tests/test_results.py.)"""

from __future__ import annotations

import re
import subprocess
import sys

from atop.results import END, START
from tests.conftest import PROJECT_ROOT


def readme_text() -> str:
    return (PROJECT_ROOT / "README.md").read_text()


def hand_written() -> str:
    """The README without its generated results block."""
    text = readme_text()
    return text[: text.index(START)] + text[text.index(END) :]


def test_readme_is_short():
    assert len(readme_text().splitlines()) <= 150


def test_readme_names_the_two_commands_and_the_studies():
    text = hand_written()
    for command in ("make run", "make test", "make repro", "make seeds", "make scaling"):
        assert command in text, command
    assert "make results" in text and "atop compare RUN_A RUN_B" in text
    assert "make test" in (PROJECT_ROOT / ".ci" / "run").read_text()


def test_no_hand_typed_results_and_no_history():
    """Outside the generated block: no accuracy in %, no commit hash, no timing in minutes."""
    text = hand_written()
    assert not re.findall(r"\d+(?:\.\d+)?\s?%", text)
    hashes = r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"
    assert not re.findall(hashes, text)
    assert not re.findall(r"\d+(?:\.\d+)?\s?(?:min|h)\b", text)


def test_relative_links_resolve():
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme_text())
    assert links
    missing = {link for link in links if not (PROJECT_ROOT / link).exists()}
    assert not missing, missing


def readme_snippet() -> str:
    text = readme_text()
    section = text[text.index("## Use a trained defense in Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_snippet_is_short_and_uses_the_library():
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 10
    assert "from atop import evaluate, load_defense" in code and "torchattacks" in code
    assert 'load_defense("release/atop")' in code  # the AToP export (`atop export`)
    assert ".accuracy()" in code  # single-draw, the default rule


def test_snippet_loads_and_attacks_the_atop_defense(atop_project):
    from atop.checkpoint import load_safe
    from atop.export import export_defense

    models = atop_project / "data" / "06_models" / "cifar10" / "smoke"
    export_defense(
        load_safe(models / "classifier.pt"),
        load_safe(models / "purifier_atop.pt"),
        atop_project / "release" / "atop",
    )
    check = (
        "\nimport sys\n"
        "assert not {'kedro', 'great_expectations', 'dvc'} & set(sys.modules), sys.modules\n"
    )
    result = subprocess.run(
        # the snippet reads the base profile's split; this project ran the smoke profile
        [sys.executable, "-c", readme_snippet().replace("/base/", "/smoke/") + check],
        cwd=atop_project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    accuracy = eval(result.stdout.strip().splitlines()[-1])  # the printed dict
    # clean, the attack's label, and the per-image worst cases (one l-inf attack: no L2 key)
    assert set(accuracy) == {"clean", "pgd_eot", "worst_case_all", "worst_case_Linf"}
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    assert accuracy["worst_case_all"] == accuracy["worst_case_Linf"]
    # cross-fitted over the draws: unbiased when the attacks are equally strong, and at most
    # a few points above the strongest one when they are not (docs/protocol.md)
    assert accuracy["worst_case_all"] <= min(accuracy["clean"], accuracy["pgd_eot"]) + 0.1

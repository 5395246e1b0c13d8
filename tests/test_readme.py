"""The README's Python snippet runs as written on a smoke run's outputs, without Kedro."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import PROJECT_ROOT


def readme_snippet() -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
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
    assert accuracy["worst_case_all"] <= min(accuracy["clean"], accuracy["pgd_eot"])

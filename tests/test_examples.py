"""examples/ on real CIFAR-10 (docs/evaluate-your-defense.md): the protocol on a user's
randomized defense tells single-draw, worst-of-N and fixed-randomness accuracy apart, and
`atop evaluate --model examples.toy_defense:factory` evaluates the same defense."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

ATOP = Path(sys.executable).parent / "atop"


@pytest.fixture
def on_cifar10(monkeypatch, data_root):
    monkeypatch.setenv("ATOP_DATA_ROOT", str(data_root))


def test_the_example_tells_the_three_rules_apart(on_cifar10, tmp_path, capsys):
    from examples.evaluate_your_defense import QUICK, run

    summary = run(QUICK, out=tmp_path / "verdicts.csv")
    printed = capsys.readouterr().out
    single, worst, fixed = summary["single"], summary["worst_of_n"], summary["fixed"]
    # the defense is a lottery: even clean, few images survive all N draws
    assert single["clean"] > worst["clean"] + 0.1
    for norm in ("Linf", "L2"):
        key = f"worst_case_{norm}"
        # single-draw keeps a good part of the clean accuracy; worst-of-N collapses it
        assert single[key] > 0.3 * single["clean"], (norm, single)
        assert worst[key] < 0.5 * single[key], (norm, single, worst)
        # one fixed draw of the noise: the reference attack wins far more often
        assert fixed[norm]["attack"] < 0.6 * fixed[norm]["fresh"], fixed
        assert fixed[norm]["p_value"] < 0.05, fixed
        assert fixed[norm]["worst_case"] < single[key]
    assert fixed["Linf"]["worst_case"] <= 0.05
    # the plug-in minimum sits below the cross-fitted worst case (its bias)
    assert summary["plugin_worst"]["Linf"] <= single["worst_case_Linf"]
    # the sanity checks that apply ran; none needs BPDA here
    checks = summary["sanity"]
    for name in ("eps_monotonic", "large_eps_near_zero", "stronger_attack"):
        for norm in ("linf", "l2"):
            assert checks[f"{name}_{norm}"]["status"] in ("pass", "fail"), checks
    assert checks["large_eps_near_zero_linf"]["status"] == "pass"
    assert checks["iterative_beats_single_step"]["status"] == "pass"
    assert not any(k.startswith("bpda") for k in checks)
    # the printed report: every row, both worst cases, the diagnostic and the checks
    for text in ("single-draw [95% CI]", "worst-of-10", "fixed draw", "worst case Linf",
                 "worst case L2", "mifgsm", "autoattack_rand_l2", "Fixed-randomness diagnostic",
                 "Plug-in minimum", "large_eps_near_zero_l2"):  # fmt: skip
        assert text in printed, text
    # the per-image verdicts: a row per image and verdict set, N digits each
    with open(summary["verdicts"]) as fh:
        rows = list(csv.DictReader(fh))
    attacks = {r["attack"] for r in rows}
    assert {"clean", "pgd_linf", "mifgsm", "pgd_l2@fixed", "clean@fixed"} <= attacks
    assert len(rows) == QUICK.images * len(attacks)
    clean = [r for r in rows if r["attack"] == "clean"]
    assert all(len(r["draws"]) == QUICK.draws for r in clean)
    mean = sum(float(r["single_draw"]) for r in clean) / len(clean)
    assert mean == pytest.approx(single["clean"], abs=1e-3)


def test_atop_evaluate_takes_the_toy_defense(on_cifar10, tmp_path):
    out = tmp_path / "verdicts.csv"
    attacks = "fgsm,pgd_linf,autoattack_rand,pgd_l2,autoattack_rand_l2"
    command = [str(ATOP), "evaluate", "--model", "examples.toy_defense:factory", "--stochastic",
               "--attacks", attacks, "--images", "16", "--out", str(out)]  # fmt: skip
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()  # Kedro's log lines may come first
    first = lines.index("16 images of the fixed evaluation subset, 10 fresh draw(s) per verdict")
    assert lines[first + 1].split() == ["single-draw", "worst-of-N"]
    table = {}
    for line in lines[first + 2 :]:
        match = re.fullmatch(r"(\w+)\s+([\d.]+)%\s+([\d.]+)%", line.strip())
        if match:
            table[match[1]] = (float(match[2]), float(match[3]))
    expected = ["clean", *attacks.split(","), "worst_case_all", "worst_case_Linf", "worst_case_L2"]
    assert list(table) == expected
    assert all(worst <= single for single, worst in table.values())
    assert table["clean"][0] > table["clean"][1]  # fresh draws disagree on clean images too
    assert lines[-1] == f"per-image verdicts (single, worst_of_n recomputable): {out}"
    assert out.is_file()


def test_the_docs_python_snippet_runs(on_cifar10):
    """docs/evaluate-your-defense.md's snippet as written, at 8 images and 2 steps."""
    text = (PROJECT_ROOT / "docs" / "evaluate-your-defense.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    small = code.replace("evaluation_images(64)", "evaluation_images(8)")
    small = small.replace('"steps": 20', '"steps": 2')
    assert small.count('"steps": 2,') == 3 and "evaluation_images(8)" in small
    scope: dict = {}
    exec(compile(small, "evaluate-your-defense.md", "exec"), scope)
    accuracy = scope["result"].accuracy()
    assert set(accuracy) >= {"clean", "pgd_linf", "autoattack_rand", "pgd_l2", "worst_case_L2"}
    assert tuple(scope["result"].runs["pgd_linf"].draws.shape) == (8, 10)

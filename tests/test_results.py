"""docs/results.md and the README's results block agree with the committed records, and the
generator (atop.results) renders new-schema, old-schema and missing records as it says."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from atop import results
from atop.results import END, RECORDS, START, Records
from tests.conftest import PROJECT_ROOT

#: Records of a smoke run in the current schema (main job, full comparison, convergence,
#: seeds, scaling and the stage metrics).
FIXTURES = Path(__file__).parent / "fixtures" / "records"


def test_committed_pages_match_the_records():
    """The committed pages are what `make results` makes from the committed records."""
    for path, text in results.render(PROJECT_ROOT).items():
        assert (PROJECT_ROOT / path).read_text() == text, f"{path} is stale: run `make results`"


# --- hand-made records ----------------------------------------------------------------------


def _summary(value: float) -> dict:
    return {
        "single": value,
        "single_ci": [max(0.0, value - 0.1), min(1.0, value + 0.1)],
        "worst_of_n": value / 2,
        "worst_of_n_ci": [0.0, value],
    }


def _test(delta: float, low: float, high: float, p: float = 0.5) -> dict:
    return {"delta": delta, "ci": [low, high], "p_value": p, "n": 64, "n_nonzero": 9}


def evaluation(accuracies: dict[str, tuple[float, float, float]]) -> dict:
    """A new-schema evaluation record: ``{defense: (clean, worst Linf, worst L2)}``."""
    attacks = {
        "pgd_linf": {"name": "pgd", "norm": "Linf", "eps": 8 / 255, "steps": 20, "eot_iter": 4},
        "pgd_l2": {"name": "pgd", "norm": "L2", "eps": 0.5, "steps": 20, "eot_iter": 4},
    }
    defenses = {}
    for name, (clean, linf, l2) in accuracies.items():
        defenses[name] = {
            "clean": _summary(clean),
            "attacks": {
                "pgd_linf": {"single": linf, "worst_of_n": 0.0},
                "pgd_l2": {"single": l2, "worst_of_n": 0.0},
            },
            "worst_case": {
                norm: {**_summary(v), "plugin": v / 2, "with_study": False}
                for norm, v in (("Linf", linf), ("L2", l2))
            },
            "train_seconds": 300.0,
            "attack_seconds": 12.5,
        }
    tests = {
        "atop vs ap_continued, L2": {
            "focus": "atop", "other": "ap_continued", "norm": "L2",
            **_test(0.0625, 0.02, 0.1, 0.004), "p_holm": 0.012, "significant": True,
        },
        "atop vs ap_continued, Linf": {
            "focus": "atop", "other": "ap_continued", "norm": "Linf",
            **_test(0.01, -0.01, 0.03, 0.4), "p_holm": 0.4, "significant": False,
        },
    }  # fmt: skip
    return {
        "settings": {
            "n_images": 64,
            "n_eval_indices": 512,
            "draws": 10,
            "rules": {"single": "mean over draws", "worst_of_n": "all draws right"},
            "attacks": attacks,
        },
        "defenses": defenses,
        "primary": {
            "declared": {
                "focus": "atop",
                "versus": ["ap_continued"],
                "norms": ["Linf", "L2"],
                "level": 0.05,
            },  # fmt: skip
            "tests": tests,
            "missing": [],
        },
        "factorial": {},
        "paired": {},
        "matched_clean": {},
        "robust_acc_vs_eps": {},
        "sanity": {},
        "skipped": {},
    }


def seeds(cis: dict[str, tuple[float, float]]) -> dict:
    """A seeds record whose ``atop - <arm>`` contrasts have the given intervals (both norms)."""
    arms = {
        arm: {
            o: {"mean": 0.5, "sd": 0.02, "seeds": 3, "per_seed": [0.48, 0.5, 0.52]}
            for o in ("clean", "Linf", "L2")
        }  # fmt: skip
        for arm in results.ARMS
    }
    contrasts = {
        f"atop - {arm}": {o: _test((lo + hi) / 2, lo, hi) for o in ("clean", "Linf", "L2")}
        for arm, (lo, hi) in cis.items()
    }
    settings = {
        "seeds": [0, 1, 2], "n_images": 64, "draws": 10, "level": 0.95, "resamples": 200,
        "interval": "hierarchical bootstrap", "rule": "single-draw",
    }  # fmt: skip
    return {"settings": settings, "arms": arms, "contrasts": contrasts}


MAIN = {"standard": (0.87, 0.0, 0.01), "ap": (0.78, 0.0, 0.11)}
MAIN |= {arm: (0.8, 0.005, 0.15) for arm in results.ARMS}


def test_missing_records_say_not_run_yet(tmp_path):
    records = results.load(tmp_path)
    block, page = results.readme_block(records), results.results_markdown(records)
    for name, command in results.COMMANDS.items():
        assert records.status(name) == f"not run yet ({command})"
        assert f"`{name}.json`: not run yet ({command})" in page
    assert block.count("not run yet") >= 9 + 5 and "figures/" not in block
    assert "No stage metrics yet" in page


def test_old_schema_records_are_named_and_not_used():
    old = evaluation(MAIN)
    del old["primary"], old["factorial"]
    old_worst = evaluation(MAIN)
    del old_worst["defenses"]["ap"]["worst_case"]["Linf"]["plugin"]
    for record in (old, old_worst):
        records = Records("r", {"robustness": record})
        assert records.status("robustness").startswith("older schema")
        assert records.get("robustness") is None
        block = results.readme_block(records)
        assert "| AP (pretrained purifier) | older schema | — | — | — |" in block
        assert "78.00" not in block


def test_headline_takes_seed_means_where_the_seeds_study_ran():
    comparison = evaluation({**MAIN, "pgd_at": (0.35, 0.23, 0.29)})
    records = Records(
        "r",
        {
            "robustness": evaluation(MAIN),
            "comparison": comparison,
            "seeds": seeds({"ap_continued": (0.01, 0.05)}),
        },
    )
    rows = {row[0]: row for row in results.headline_rows(records)}
    atop = rows[results.NAMES["atop"]]
    assert atop[1:] == ["50.00 ± 2.00"] * 3 + ["3 training seeds, mean ± sd"]
    assert rows[results.NAMES["ap"]][1:] == ["78.00 [68.00, 88.00]", "0.00 [0.00, 10.00]", "11.00 [1.00, 21.00]", "main job, 1 run"]  # fmt: skip
    assert rows[results.NAMES["pgd_at"]][-1] == "full comparison, 1 run"
    assert rows[results.NAMES["rvs"]][1:] == ["—"] * 3 + ["not in `comparison.json`"]


@pytest.mark.parametrize(
    ("ci", "said"),
    [
        ((0.01, 0.05), "AToP is higher than `ap_continued` (+3.00 [+1.00, +5.00])"),
        ((-0.02, 0.03), "AToP is not shown different from `ap_continued`"),
        ((-0.05, -0.01), "AToP is lower than `ap_continued`"),
    ],
)
def test_seeds_verdict_follows_the_interval(ci, said):
    interim, *sentences = results.seeds_sentences(seeds({"ap_continued": ci}), None)
    assert interim.startswith("**Training seeds (interim):** 3 of the study's 5 seeds")
    assert len(sentences) == 2  # one per threat model; no main effects in this record
    assert all(said in s for s in sentences)
    assert "over 3 training seeds" in sentences[0]


def test_the_study_seeds_constant_is_the_pipelines():
    from atop.pipelines.seeds.pipeline import SEEDS

    assert results.STUDY_SEEDS == 1 + len(SEEDS)


def test_primary_sentence_reads_holm():
    record = evaluation(MAIN)
    sentence = results.primary_sentence(record, None)
    assert "AToP is higher than `ap_continued` on ℓ2 (Δ +6.25 [+2.00, +10.00], p = 0.012)" in sentence  # fmt: skip
    assert "the other 1 test(s) are not significant" in sentence
    for test in record["primary"]["tests"].values():
        test["significant"] = False
    sentence = results.primary_sentence(record, None)
    assert "no test is significant (the smallest adjusted p is 0.012" in sentence


def test_direction_is_the_seeds_stage_rule():
    nodes = pytest.importorskip("atop.pipelines.seeds.nodes")
    for ci in ((0.01, 0.05), (-0.02, 0.03), (-0.05, -0.01), (0.0, 0.1)):
        test = {"delta": 0.0, "ci": list(ci)}
        assert results.direction(test) == nodes.verdict(test)


# --- records of a smoke run -----------------------------------------------------------------


def test_smoke_records_render_every_section():
    records = results.load(FIXTURES)
    assert all(records.status(name) is None for name in results.PROBLEMS)
    page, block = results.results_markdown(records), results.readme_block(records)
    assert "not run yet" not in page + block and "older schema" not in page + block
    for heading in ("main job", "full comparison", "converged", "Training seeds", "budget"):
        assert heading in page
    for section in ("The primary family", "The 2 × 2", "Fixed randomness", "Sanity checks"):
        assert page.count(f"### {section}") == 2  # main job and full comparison
    assert "`classifier_metrics`" in page and "`finetuning_atop_metrics`" in page
    assert "figures/scaling.png" in block and "training seeds, mean ± sd" in block
    # every decimal number of the block is a number of the records, as the pages print them
    printed = set()
    for name in results.PROBLEMS:
        for value in _numbers(json.loads((FIXTURES / f"{name}.json").read_text())):
            printed |= {
                results.pct(value),
                results.points(value),
                results.pvalue(value),
                f"{value:g}",
            }
    for number in re.findall(r"[+-]?\d+\.\d+(?:e-?\d+)?", block):
        assert number in printed, number


def test_budget_changes_stand_beside_the_seed_spread():
    records = results.load(FIXTURES)
    scaling, seeds = records.get("scaling"), records.get("seeds")
    sentence = results.budget_sentence(scaling, None, seeds)
    sd = results.pct(seeds["arms"]["atop"]["L2"]["sd"])
    assert f"(no difference shown; seed sd {sd})." in sentence  # AToP's ℓ2 comes last
    assert "sd over the seeds study's training runs" in sentence
    alone = results.budget_sentence(scaling, None)  # the seeds study has not run
    assert "seed sd" not in alone and alone.startswith("**Fine-tuning budget** (one training")


def test_budget_sections_show_the_contrasts_at_the_largest_budget():
    scaling = copy.deepcopy(results.load(FIXTURES).get("scaling"))
    assert "At the largest budget" not in "\n".join(results.scaling_sections(scaling))
    change = scaling["arms"]["atop"]["change"]
    scaling["at_largest"] = {"atop - ap_classifier_aware": {o: change[o] for o in change}}
    lines = results.scaling_sections(scaling)
    row = next(line for line in lines if line.startswith("| atop - ap_classifier_aware |"))
    assert results.pvalue(change["L2"]["p_value"]) in row
    assert "At the largest budget (exploratory" in "\n".join(lines)


def _numbers(record) -> list[float]:
    if isinstance(record, dict):
        return [v for item in record.values() for v in _numbers(item)]
    if isinstance(record, list):
        return [v for item in record for v in _numbers(item)]
    ok = isinstance(record, int | float) and not isinstance(record, bool)
    return [float(record)] if ok else []


def test_make_results_writes_then_checks(tmp_path, capsys):
    shutil.copytree(FIXTURES, tmp_path / RECORDS)
    (tmp_path / RECORDS / "scaling.png").write_bytes(b"png")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{START}\nold\n{END}\n\nafter\n")
    assert results.main(["--root", str(tmp_path), "--check"]) == 1
    assert results.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / results.FIGURE).read_bytes() == b"png"
    text = readme.read_text()
    assert text.startswith(f"# x\n\n{START}\nProfile `smoke`") and text.endswith(
        f"{END}\n\nafter\n"
    )
    assert "old" not in text
    assert results.main(["--root", str(tmp_path), "--check"]) == 0
    page = tmp_path / results.RESULTS_MD
    page.write_text(page.read_text() + "hand edit\n")
    assert results.main(["--root", str(tmp_path), "--check"]) == 1
    assert "stale: docs/results.md" in capsys.readouterr().err
    readme.write_text("# no markers\n")
    assert results.main(["--root", str(tmp_path)]) == 2
    assert "needs the lines" in capsys.readouterr().err


def test_an_arm_missing_from_a_record_is_said_so():
    record = evaluation(MAIN)
    del record["defenses"]["adversarial_reconstruction"]
    rows = {r[0]: r for r in results.headline_rows(Records("r", {"robustness": record}))}
    assert rows[results.NAMES["adversarial_reconstruction"]][-1] == "not in `robustness.json`"
    assert rows[results.NAMES["pgd_at"]][-1] == "not run yet"
    broken = copy.deepcopy(record)
    broken["primary"]["tests"] = {}
    assert "no test could run" in results.primary_sentence(broken, None)

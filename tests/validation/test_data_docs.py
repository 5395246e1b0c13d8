"""Great Expectations Data Docs after a Kedro run: a file-backed GX project under
``data/08_reporting/<dataset>/<profile>/gx`` holds the validations of the ingested splits and of every attack's
adversarial examples, rendered as HTML (README "Inspecting a run")."""

from __future__ import annotations

from atop.validation.core import DOCS_INDEX, VALIDATIONS
from atop.validation.docs_assets import external_references


def test_the_main_job_leaves_data_docs_of_the_splits_and_the_adversarial_examples(atop_project):
    root = atop_project / "data" / "08_reporting" / "cifar10" / "smoke"
    index = root / DOCS_INDEX
    assert index.is_file() and "<html" in index.read_text().lower()
    suites = {path.name for path in (root / VALIDATIONS).iterdir() if path.is_dir()}
    # the ingested splits' suites and one per defense and attack (adversarial_<defense>_<attack>)
    adversarial = {name for name in suites if name.startswith("adversarial_")}
    assert any("atop" in name for name in adversarial), suites
    assert suites - adversarial, suites  # the data splits
    pages = list((index.parent / "validations").rglob("*.html"))
    assert len(pages) >= len(suites)
    # readable offline: no page loads an asset from a CDN (tests/validation/test_data_docs_offline.py)
    assert external_references(index.parent.rglob("*.html")) == []

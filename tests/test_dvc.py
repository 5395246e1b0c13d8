"""DVC pipeline (dvc.yaml): stage definitions, and one real smoke-profile repro chain.

The fast tests check dvc.yaml against the code and the Kedro catalog: each stage's code
dependencies are exactly the import closure of its pipeline, its data files are exactly
its Kedro inputs and outputs. The slow chain runs ``dvc repro`` on real CIFAR-10 in a
throw-away git copy of the repository (smoke profile) and checks which stages rerun after
each change, the metrics/plots commands, and push / pull through a local remote.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from atop.dvc_params import resolve_parameters, write_parameters

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BIN = Path(sys.executable).parent  # the venv's bin: dvc, kedro, python
KEDRO_STAGES = (
    "data_ingestion",
    "classifier_pretraining",
    "purifier_pretraining",
    "atop_finetuning",
    "adversarial_training",
    "rvs",
    "evaluation",
)
ALL_STAGES = ("resolve_params", *KEDRO_STAGES)


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _dataset() -> str:
    return yaml.safe_load((ROOT / "conf" / "base" / "globals.yml").read_text())["dataset"]


def _paths(entries: list) -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics/plots list (str or {path: options})."""
    paths = [e if isinstance(e, str) else next(iter(e)) for e in entries or []]
    return [p.replace("${dataset}", _dataset()) for p in paths]


# --- the import closure ---------------------------------------------------------------


def _module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imports(path: Path) -> list[str]:
    """``atop.*`` names imported anywhere in ``path`` (also inside functions)."""
    package = ".".join(path.relative_to(SRC).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return [n for n in names if n.split(".")[0] == "atop"]


def import_closure(*modules: str) -> set[str]:
    """Repository paths of every ``atop`` file executed by importing ``modules``
    (each package's ``__init__.py`` on the way included)."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo += _imports(path)
    return {str(p.relative_to(ROOT)) for p in seen}


def _code_files(deps: list[str]) -> set[str]:
    """The .py files under src/ that a deps list covers (folders expanded)."""
    files = set()
    for dep in deps:
        path = ROOT / dep
        if path.is_dir():
            files |= {str(p.relative_to(ROOT)) for p in path.rglob("*.py")}
        elif dep.endswith(".py"):
            files.add(dep)
    return files


def test_every_kedro_stage_has_a_dvc_stage():
    from atop.pipeline_registry import ATOP_STAGES, BASELINE_STAGES

    stages = _dvc_yaml()["stages"]
    assert set(stages) == set(ALL_STAGES)
    assert set(KEDRO_STAGES) == set(ATOP_STAGES) | set(BASELINE_STAGES)
    for name in KEDRO_STAGES:
        assert stages[name]["cmd"] == f"kedro run --pipelines {name} --env ${{profile}}"
        assert stages[name]["params"] == [{"params/${profile}.yaml": [name]}]


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_code_deps_are_exactly_the_import_closure(stage):
    roots = (
        ("atop.dvc_params", "atop.settings")
        if stage == "resolve_params"
        else (f"atop.pipelines.{stage}", "atop.datasets")  # + the catalog's TorchDataset
    )
    expected = import_closure(*roots)
    listed = _code_files(_paths(_dvc_yaml()["stages"][stage]["deps"]))
    assert listed == expected, (
        f"dvc.yaml stage {stage}: missing {sorted(expected - listed)}, "
        f"not imported {sorted(listed - expected)}"
    )


@functools.cache
def _catalog_config() -> dict:
    return resolve_parameters(ROOT, "base", key="catalog")


def _catalog_key(name: str) -> str | None:
    """The catalog entry of dataset ``name``: its own, or a factory pattern it matches."""
    import parse

    config = _catalog_config()
    if name in config:
        return name
    return next((key for key in config if "{" in key and parse.parse(key, name)), None)


def _filepath(name: str) -> str | None:
    """The resolved ``filepath`` of dataset ``name`` (None: in memory only)."""
    import parse

    key = _catalog_key(name)
    if key is None or "filepath" not in _catalog_config()[key]:
        return None
    fields = parse.parse(key, name).named if key != name else {}
    return _catalog_config()[key]["filepath"].format(**fields)


def _catalog_file(name: str) -> str:
    """The conf/base catalog file that declares dataset ``name`` (or its factory)."""
    key = _catalog_key(name)
    for path in sorted((ROOT / "conf" / "base").glob("catalog*.yml")):
        if key in (yaml.safe_load(path.read_text()) or {}):
            return str(path.relative_to(ROOT))
    raise AssertionError(f"{name} is in no conf/base/catalog*.yml")


@functools.cache
def _pipelines() -> dict:
    from atop.pipeline_registry import register_pipelines

    return register_pipelines()


@pytest.mark.parametrize("stage", KEDRO_STAGES)
def test_data_deps_and_outputs_match_the_kedro_pipeline(stage):
    pipeline = _pipelines()[stage]
    spec = _dvc_yaml()["stages"][stage]
    # Datasets with a file (a MemoryDataset declared only for its kedro-viz layer has none).
    produced = [n for n in pipeline.all_outputs() if _filepath(n)]
    consumed = [n for n in pipeline.inputs() if _filepath(n) and not n.startswith("params:")]

    outputs = _paths(spec.get("outs")) + _paths(spec.get("metrics")) + _paths(spec.get("plots"))
    assert sorted(outputs) == sorted(_filepath(n) for n in produced)
    data_deps = [d for d in _paths(spec["deps"]) if d.startswith("data/")]
    assert sorted(data_deps) == sorted(_filepath(n) for n in consumed)
    # The catalog files declaring the outputs are deps (they set formats and save_args).
    assert {_catalog_file(n) for n in produced} <= set(_paths(spec["deps"]))
    # JSON under data/08_reporting is tracked by git: metrics with cache: false.
    for entry in spec.get("metrics", []):
        assert next(iter(entry.values())) == {"cache": False}


def test_resolved_parameters_are_what_kedro_runs_with(tmp_path):
    """The smoke profile deep-merged over base, globals resolved, as a KedroSession sees it."""
    from kedro.framework.session import KedroSession

    params = resolve_parameters(ROOT, "smoke")
    with KedroSession.create(project_path=ROOT, env="smoke") as session:
        typed = session.load_context().params
    assert params == {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in typed.items()}
    # A key smoke sets wins; a key it leaves out comes from base; globals are resolved.
    conf = ROOT / "conf"
    base = yaml.safe_load((conf / "base/parameters_purifier_pretraining.yml").read_text())
    smoke = yaml.safe_load((conf / "smoke/parameters_purifier_pretraining.yml").read_text())
    base, smoke = base["purifier_pretraining"], smoke["purifier_pretraining"]
    assert smoke["purifier"]["cnum"] != base["purifier"]["cnum"]
    assert params["purifier_pretraining"]["purifier"]["cnum"] == smoke["purifier"]["cnum"]
    assert params["purifier_pretraining"]["purifier"]["variant"] == base["purifier"]["variant"]
    assert "lr" not in smoke and params["purifier_pretraining"]["lr"] == base["lr"]
    assert params["data_ingestion"]["dataset"] == _dataset()

    written = write_parameters(params, tmp_path / "params" / "smoke.yaml", "smoke")
    assert yaml.safe_load(written.read_text()) == params
    assert written.read_text().startswith("# Generated by")


def test_unknown_profile_is_refused():
    with pytest.raises(ValueError, match="Unknown profile 'gpu'.*base"):
        resolve_parameters(ROOT, "gpu")


def test_dvc_configuration():
    config = (ROOT / ".dvc" / "config").read_text()
    assert re.search(r"analytics\s*=\s*false", config)
    assert re.search(r"remote\s*=\s*local", config)
    assert re.search(r"\['remote \"local\"'\]\s*url\s*=\s*\S+", config)
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored
    assert yaml.safe_load((ROOT / "params" / "profile.yaml").read_text())["profile"] == "base"


# --- the slow chain: a real `dvc repro` in a throw-away copy ----------------------------


def _copy_repository(target: Path) -> None:
    """Tracked files plus untracked, not ignored ones (work in progress), then a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in sorted(set(listed)):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    _git(target, "init", "-q")
    _git(target, "add", "-A")
    _git(target, "commit", "-qm", "copy of the repository")


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_yaml(path: Path, keys: str, value) -> None:
    """Set the dotted key ``keys`` of a YAML file (comments are not kept: a throw-away copy)."""
    data = yaml.safe_load(path.read_text())
    *parents, last = keys.split(".")
    node = data
    for key in parents:
        node = node[key]
    assert node[last] != value, f"{path}: {keys} is already {value!r}"
    node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


#: Overrides of the copy's smoke evaluation (lists replace the base lists whole).
FAST_EVALUATION = {
    "images": 4,
    "batch_size": 4,
    "draws": 1,
    "attacks": [
        {"label": "fgsm", "name": "fgsm", "eps": "8/255"},
        {
            "label": "pgd_linf",
            "name": "pgd",
            "norm": "Linf",
            "eps": "8/255",
            "alpha": "2/255",
            "steps": 1,
            "eot_iter": 1,
        },
    ],
    "sanity": {"eps_sweep": [0, "8/255"], "stronger": {"steps": 2, "eot_iter": 1}},
    "grid": {"images": 2},
}


class DvcCopy:
    """A git copy of the repository where ``dvc`` runs with the venv's tools on PATH."""

    def __init__(self, root: Path, remote: Path, data_root: Path, site_cache: Path):
        self.root = root
        self.timings: list[tuple[str, float]] = []  # (command, seconds), printed at the end
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(root / "src"),  # the copy's code, not the editable install
            "ATOP_DATA_ROOT": str(data_root),
            "DVC_SITE_CACHE_DIR": str(site_cache),
            "KEDRO_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            "DVC_NO_ANALYTICS": "1",
            "GX_ANALYTICS_ENABLED": "false",
        }
        _copy_repository(root)
        # The documented ways to pick the remote (config.local) and the profile.
        self.dvc("remote", "modify", "--local", "local", "url", str(remote))
        _edit_yaml(root / "params" / "profile.yaml", "profile", "smoke")
        # Evaluation reruns three times in the chain: two attacks on four images is enough
        # to test DVC (the full smoke evaluation is tested in tests/pipelines/evaluation).
        smoke_evaluation = root / "conf" / "smoke" / "parameters_evaluation.yml"
        conf = yaml.safe_load(smoke_evaluation.read_text())
        conf["evaluation"].update(FAST_EVALUATION)
        smoke_evaluation.write_text(yaml.safe_dump(conf, sort_keys=False))
        _git(root, "commit", "-qam", "smoke profile, faster evaluation")

    def dvc(self, *args: str) -> str:
        start = time.monotonic()
        proc = subprocess.run(
            [str(BIN / "dvc"), *args],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.timings.append((" ".join(args[:2]), time.monotonic() - start))
        assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-6000:]}"
        return proc.stdout

    def repro(self) -> tuple[list[str], str]:
        """``dvc repro``: the names of the stages that ran, and the output."""
        out = self.dvc("repro")
        return re.findall(r"^Running stage '([^']+)'", out, flags=re.MULTILINE), out

    def changed_stages(self) -> set[str]:
        """Stages ``dvc status`` reports as changed."""
        return set(json.loads(self.dvc("status", "--json").strip().splitlines()[-1]))


def _cached_outputs(root: Path) -> list[Path]:
    """Outputs DVC caches (dvc.lock outs minus the git-tracked cache: false ones)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    uncached = {p for s in stages.values() for p in _paths(s.get("metrics"))}
    uncached |= {p for p in _paths(stages["resolve_params"]["outs"])}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    paths = {o["path"] for s in lock.values() for o in s.get("outs", [])}
    paths = {p for p in paths if p not in uncached and not p.startswith("params/")}
    return [root / p for p in sorted(paths)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_root) -> dict:
    """Runs the whole chain once; each test below checks one step of it."""
    tmp = tmp_path_factory.mktemp("dvc")
    (tmp / "repo").mkdir()
    repo = DvcCopy(tmp / "repo", tmp / "remote", data_root, tmp / "site-cache")
    root = repo.root
    steps: dict = {"root": root}

    steps["first"] = repo.repro()
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "smoke run")
    steps["second"] = repo.repro()

    # Byte-code caches and a docstring edit in an unrelated pipeline (rvs).
    for folder in (
        "src/atop",
        "src/atop/pipelines/data_ingestion",
        "src/atop/pipelines/evaluation",
    ):
        (root / folder / "__pycache__").mkdir(exist_ok=True)
        (root / folder / "__pycache__" / "stale.cpython-311.pyc").write_bytes(os.urandom(64))
    rvs_nodes = root / "src/atop/pipelines/rvs/nodes.py"
    original = rvs_nodes.read_text()
    assert original.startswith('"""')
    rvs_nodes.write_text('"""(Docstring edited.) ' + original[3:])
    steps["status_docstring"] = repo.changed_stages()
    rvs_nodes.write_text(original)

    # A base value that the smoke profile overrides: the resolved parameters do not change.
    _edit_yaml(
        root / "conf/base/parameters_purifier_pretraining.yml",
        "purifier_pretraining.train_images",
        4096,
    )
    steps["overridden"] = repo.repro()

    # An evaluation value of conf/base that smoke does not override.
    _edit_yaml(root / "conf/base/parameters_evaluation.yml", "evaluation.tolerance", 2.0e-4)
    steps["evaluation"] = repo.repro()

    _edit_yaml(
        root / "conf/smoke/parameters_purifier_pretraining.yml",
        "purifier_pretraining.max_batches_per_epoch",
        2,
    )
    steps["purifier"] = repo.repro()

    steps["metrics_show"] = json.loads(repo.dvc("metrics", "show", "--json"))
    steps["metrics_diff"] = json.loads(repo.dvc("metrics", "diff", "--all", "--json"))
    repo.dvc("plots", "show", "-o", str(tmp / "plots"))
    steps["plots_html"] = (tmp / "plots" / "index.html").read_text()

    repo.dvc("push")
    outputs = _cached_outputs(root)
    steps["outputs"] = outputs
    steps["hashes_before"] = {p: _sha256(p) for p in outputs}
    for path in outputs:
        path.unlink()
    shutil.rmtree(root / ".dvc" / "cache")  # everything must come back from the remote
    steps["remote_files"] = [p for p in (tmp / "remote").rglob("*") if p.is_file()]
    repo.dvc("pull")
    steps["hashes_after"] = {p: _sha256(p) if p.is_file() else None for p in outputs}
    steps["status_after_pull"] = repo.changed_stages()
    print("dvc chain:", ", ".join(f"{cmd} {sec:.0f}s" for cmd, sec in repo.timings))
    return steps


@pytest.mark.slow
def test_first_repro_runs_every_stage_and_second_runs_none(chain):
    ran, _ = chain["first"]
    assert sorted(ran) == sorted(ALL_STAGES)
    assert ran[0] == "resolve_params" and ran[1] == "data_ingestion" and ran[-1] == "evaluation"
    ran, out = chain["second"]
    assert ran == []
    assert "Data and pipelines are up to date." in out


@pytest.mark.slow
def test_pycache_and_an_unrelated_docstring_change_only_their_stage(chain):
    # __pycache__ under src/atop (a dependency of every stage) is invisible to DVC; the
    # docstring of rvs/nodes.py only concerns rvs (no other stage imports it).
    assert chain["status_docstring"] == {"rvs"}


@pytest.mark.slow
def test_base_value_overridden_by_the_profile_reruns_no_kedro_stage(chain):
    ran, _ = chain["overridden"]
    assert ran == ["resolve_params"]


@pytest.mark.slow
def test_evaluation_parameter_reruns_only_evaluation(chain):
    ran, _ = chain["evaluation"]
    assert ran == ["resolve_params", "evaluation"]


@pytest.mark.slow
def test_purifier_parameter_reruns_purifier_and_downstream_only(chain):
    ran, _ = chain["purifier"]
    assert ran == ["resolve_params", "purifier_pretraining", "atop_finetuning", "evaluation"]


@pytest.mark.slow
def test_metrics_and_plots_commands(chain):
    stages = yaml.safe_load((chain["root"] / "dvc.yaml").read_text())["stages"]
    metrics = {p for s in stages.values() for p in _paths(s.get("metrics"))}
    (workspace,) = chain["metrics_show"].values()  # keyed by revision: "" = the workspace
    shown = workspace["data"]
    assert set(shown) == metrics
    assert all("error" not in shown[p] for p in metrics)
    # Against the committed first run: the purifier changed (fewer batches), so did its PSNR.
    diff = chain["metrics_diff"]
    assert set(diff) == metrics
    purifier = diff["data/08_reporting/purifier_metrics.json"]
    assert any(
        entry.get("diff") not in (0, None)
        for key, entry in purifier.items()
        if "seconds" not in key
    )
    html = chain["plots_html"]
    for stage in ("classifier", "purifier", "atop", "adversarial_training", "rvs"):
        assert f"data/08_reporting/{stage}_history.csv" in html


@pytest.mark.slow
def test_push_then_pull_restores_outputs_byte_for_byte(chain):
    outputs = chain["outputs"]
    assert any(p.suffix == ".pt" for p in outputs) and any(p.suffix == ".png" for p in outputs)
    assert len(chain["remote_files"]) >= len(outputs)
    assert chain["hashes_after"] == chain["hashes_before"]
    assert chain["status_after_pull"] == set()

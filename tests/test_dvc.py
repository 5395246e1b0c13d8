"""DVC pipeline (dvc.yaml): stage definitions, and one real smoke-profile repro chain.

dvc.yaml is generated from the Kedro pipelines by ``python -m atop.dvc_stages``; the fast
tests check that the committed file is the generated one and, independently, that each
stage's code dependencies are the import closure of its pipeline (every node's code
included), its data files exactly its Kedro inputs and outputs, its parameters the blocks
its nodes take. The slow chain runs ``dvc repro`` on real CIFAR-10 in a throw-away git copy
of the repository (smoke profile) and checks which stages rerun after each change (derived
from dvc.yaml), the metrics/plots commands, and push / pull through a local remote.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
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
from atop.dvc_stages import MODULES, SOFT_INPUTS, STAGES, dvc_yaml, import_closure

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BIN = Path(sys.executable).parent  # the venv's bin: dvc, kedro, python
ALL_STAGES = ("resolve_params", *STAGES)
#: The studies run alone (`dvc repro seeds`); the chain below reproduces the full comparison
#: (`dvc repro comparison`, `make repro`): every other stage.
STUDIES = ("seeds", "scaling")
CHAIN = tuple(s for s in ALL_STAGES if s not in STUDIES)
PARAMS_FILE = "params/${profile}.yaml"


def _dvc_yaml(root: Path = ROOT) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())


def _dataset() -> str:
    return yaml.safe_load((ROOT / "conf" / "base" / "globals.yml").read_text())["dataset"]


def _paths(entries: list, profile: str = "base") -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics/plots list (str or {path: options}), as DVC
    resolves them for ``profile``."""
    paths = [e if isinstance(e, str) else next(iter(e)) for e in entries or []]
    return [p.replace("${dataset}", _dataset()).replace("${profile}", profile) for p in paths]


def _outputs(spec: dict) -> set[str]:
    """Every file a dvc.yaml stage writes (outs, metrics and plots)."""
    return {p for key in ("outs", "metrics", "plots") for p in _paths(spec.get(key))}


def _blocks(spec: dict) -> list[str]:
    """The parameter blocks of ``params/<profile>.yaml`` a dvc.yaml stage tracks."""
    return [b for entry in spec.get("params", []) for b in entry.get(PARAMS_FILE, [])]


def _code_files(deps: list[str], root: Path = ROOT) -> set[str]:
    """The .py files under src/ that a deps list covers (folders expanded)."""
    files = set()
    for dep in deps:
        path = root / dep
        if path.is_dir():
            files |= {str(p.relative_to(root)) for p in path.rglob("*.py")}
        elif dep.endswith(".py"):
            files.add(dep)
    return files


@functools.cache
def _pipelines() -> dict:
    from atop.pipeline_registry import register_pipelines

    return register_pipelines()


def test_committed_dvc_yaml_is_the_generated_one():
    committed, generated = (ROOT / "dvc.yaml").read_text(), dvc_yaml(ROOT)
    diff = "".join(
        difflib.unified_diff(
            committed.splitlines(True), generated.splitlines(True), "dvc.yaml", "generated", n=1
        )
    )
    assert committed == generated, (
        "dvc.yaml is stale: regenerate it with `.venv/bin/python -m atop.dvc_stages`\n"
        + diff[:4000]
    )


def test_committed_base_parameters_are_the_resolved_ones(tmp_path):
    """params/base.yaml (committed, the base profile's DVC parameters) equals what
    resolve_params writes from conf/: a stale copy would let dvc.lock record parameters the
    stages did not run with."""
    fresh = write_parameters(resolve_parameters(ROOT, "base"), tmp_path / "base.yaml", "base")
    assert (ROOT / "params" / "base.yaml").read_text() == fresh.read_text(), (
        "params/base.yaml is stale: `.venv/bin/python -m atop.dvc_params --env base "
        "--output params/base.yaml` (or `dvc repro resolve_params`)"
    )


def test_every_kedro_stage_has_a_dvc_stage():
    from atop.pipeline_registry import ATOP_STAGES, COMPARISON_STAGES, STUDIES

    stages = _dvc_yaml()["stages"]
    assert list(stages) == list(ALL_STAGES)
    assert set(STAGES) == set(ATOP_STAGES) | set(COMPARISON_STAGES) | set(STUDIES)
    assert set(_pipelines()) == {*STAGES, "atop", "__default__"}
    for name in STAGES:
        assert stages[name]["cmd"] == f"kedro run --pipelines {name} --env ${{profile}}"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_tracks_the_parameter_blocks_its_nodes_take(stage):
    pipeline = _pipelines()[stage]
    taken = {n.split(":", 1)[1] for n in pipeline.inputs() if n.startswith("params:")}
    spec = _dvc_yaml()["stages"][stage]
    assert [list(entry) for entry in spec["params"]] == [[PARAMS_FILE]]
    assert _blocks(spec) == sorted(taken)


def test_parameter_blocks_of_the_stages_that_share_them():
    blocks = {name: _blocks(spec) for name, spec in _dvc_yaml()["stages"].items()}
    # the noise ablations pretrain and fine-tune like the main job, with their own transforms
    assert blocks["noise_ablation"] == ["atop_finetuning", "noise_ablation", "purifier_pretraining"]
    assert blocks["atop_pgd"] == ["atop_finetuning"]
    assert blocks["comparison"] == ["evaluation"]
    # the convergence study compares with the main job's headline (its attack list)
    assert blocks["convergence"] == ["convergence", "evaluation"]
    # the studies fine-tune like the main job and evaluate with its protocol
    assert blocks["seeds"] == ["atop_finetuning", "evaluation", "seeds"]
    assert blocks["scaling"] == ["atop_finetuning", "evaluation", "scaling"]
    assert "params" not in _dvc_yaml()["stages"]["resolve_params"]
    shared = {"noise_ablation", "atop_pgd", "comparison", "convergence", "seeds", "scaling"}
    for name in set(STAGES) - shared:
        assert blocks[name] == [name]


def _module_path(module: str) -> str:
    return str(Path(importlib.import_module(module).__file__).relative_to(ROOT))


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_code_deps_are_exactly_the_import_closure(stage):
    roots = (
        ("atop.dvc_params", "atop.settings")
        if stage == "resolve_params"
        else (MODULES.get(stage, f"atop.pipelines.{stage}"), "atop.datasets")  # + TorchDataset
    )
    expected = import_closure(ROOT, *roots)
    listed = _code_files(_paths(_dvc_yaml()["stages"][stage]["deps"]))
    assert listed == expected, (
        f"dvc.yaml stage {stage}: missing {sorted(expected - listed)}, "
        f"not imported {sorted(listed - expected)}"
    )
    if stage == "resolve_params":
        return
    # Independently of the stage's root module: the code of every node it runs, with its
    # imports, and the project's dataset classes that load and save its data.
    pipeline = _pipelines()[stage]
    node_modules = {node.func.__module__ for node in pipeline.nodes}
    assert {_module_path(m) for m in node_modules} <= listed
    assert import_closure(ROOT, *node_modules) <= listed
    for name in pipeline.all_outputs() | pipeline.inputs():
        key = _catalog_key(name)
        kind = _catalog_config()[key].get("type", "") if key else ""
        if kind.startswith("atop."):
            module, cls = kind.rsplit(".", 1)
            defined_in = getattr(importlib.import_module(module), cls).__module__
            assert _module_path(defined_in) in listed, (name, kind)


def test_the_import_closure_follows_imports_inside_functions_and_packages():
    closure = import_closure(ROOT, "atop.pipelines.evaluation")
    # nodes.py imports the Great Expectations suite inside a function
    assert "src/atop/validation/adversarial.py" in closure
    # every package's __init__ on the way, and nothing outside src/atop
    assert {"src/atop/__init__.py", "src/atop/pipelines/__init__.py"} <= closure
    assert all(p.startswith("src/atop/") and p.endswith(".py") for p in closure)
    assert "src/atop/pipelines/rvs/nodes.py" not in closure


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


def _filepath(name: str, field: str = "filepath") -> str | None:
    """The resolved ``filepath`` (or ``metrics_filepath``) of dataset ``name`` (None: in
    memory only)."""
    import parse

    key = _catalog_key(name)
    if key is None or field not in _catalog_config()[key]:
        return None
    fields = parse.parse(key, name).named if key != name else {}
    return _catalog_config()[key][field].format(**fields)


def _catalog_file(name: str) -> str:
    """The conf/base catalog file that declares dataset ``name`` (or its factory)."""
    key = _catalog_key(name)
    for path in sorted((ROOT / "conf" / "base").glob("catalog*.yml")):
        if key in (yaml.safe_load(path.read_text()) or {}):
            return str(path.relative_to(ROOT))
    raise AssertionError(f"{name} is in no conf/base/catalog*.yml")


@pytest.mark.parametrize("stage", STAGES)
def test_data_deps_and_outputs_match_the_kedro_pipeline(stage):
    pipeline = _pipelines()[stage]
    spec = _dvc_yaml()["stages"][stage]
    # Datasets with a file (a MemoryDataset declared only for its kedro-viz layer has none).
    produced = [n for n in pipeline.all_outputs() if _filepath(n)]
    consumed = [n for n in pipeline.inputs() if _filepath(n) and not n.startswith("params:")]

    outputs = _paths(spec.get("outs")) + _paths(spec.get("plots"))
    assert sorted(outputs) == sorted(_filepath(n) for n in produced)
    # The metrics: the numbers-only JSON of each record that has a metrics_filepath.
    numbers = [_filepath(n, "metrics_filepath") for n in produced]
    assert sorted(_paths(spec.get("metrics"))) == sorted(p for p in numbers if p)
    data_deps = [d for d in _paths(spec["deps"]) if d.startswith("data/")]
    soft = SOFT_INPUTS.get(stage, set())  # read when present, not tracked (a cycle otherwise)
    assert sorted(data_deps) == sorted(_filepath(n) for n in consumed if n not in soft)
    # The catalog files declaring the outputs are deps (they set formats and save_args).
    assert {_catalog_file(n) for n in produced} <= set(_paths(spec["deps"]))
    # JSON under data/08_reporting is tracked by git: records and metrics with cache: false.
    for entry in spec.get("metrics", []) + spec.get("outs", []):
        path = entry if isinstance(entry, str) else next(iter(entry))
        if path.startswith("data/08_reporting/") and path.endswith(".json"):
            assert entry[path] == {"cache": False}, path


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


#: Overrides of the copy's smoke evaluation (lists replace the base lists whole): two attacks
#: of one step on four images, one draw, no fixed-randomness diagnostic; `evaluation` and
#: `comparison` rerun in the chain (the full smoke evaluation is tested in
#: tests/pipelines/evaluation). The sanity block keeps base's reference, alpha and bound.
FAST_EVALUATION = {
    "images": 4,
    "batch_size": 4,
    "draws": 2,
    "attack_amp": False,
    "fixed_randomness": False,
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
            "applies_to": "all",
        },
    ],
    "sanity": {
        "references": ["pgd_linf"],
        "images": 4,
        "eps_sweep": {"Linf": [0, "8/255"]},
        "stronger": {"steps": 2, "eot_iter": 1},
    },
    "grid": {"images": 2},
}
#: Overrides of the copy's smoke convergence study (already small): fewer images and draws.
FAST_CONVERGENCE = {"images": 2, "draws": 1, "batch_size": 2}


def _override(path: Path, block: str, values: dict) -> None:
    """Top-level keys of ``block`` in a profile's parameters file set to ``values`` (nested
    blocks updated key by key)."""
    conf = yaml.safe_load(path.read_text())
    for key, value in values.items():
        old = conf[block].get(key)
        conf[block][key] = {**old, **value} if isinstance(old, dict) else value
    path.write_text(yaml.safe_dump(conf, sort_keys=False))


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
            # `dvc exp run` commits the experiment: an identity without a global git config
            "GIT_AUTHOR_NAME": "atop tests",
            "GIT_AUTHOR_EMAIL": "tests@atop.invalid",
            "GIT_COMMITTER_NAME": "atop tests",
            "GIT_COMMITTER_EMAIL": "tests@atop.invalid",
        }
        _copy_repository(root)
        # The documented ways to pick the remote (config.local) and the profile.
        self.dvc("remote", "modify", "--local", "local", "url", str(remote))
        _edit_yaml(root / "params" / "profile.yaml", "profile", "smoke")
        # The evaluations rerun in the chain: a few attacks on a few images test DVC.
        smoke = root / "conf" / "smoke"
        _override(smoke / "parameters_evaluation.yml", "evaluation", FAST_EVALUATION)
        _override(smoke / "parameters_convergence.yml", "convergence", FAST_CONVERGENCE)
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

    def repro(self, target: str = "comparison") -> tuple[list[str], str]:
        """``dvc repro <target>`` (the full comparison by default, as ``make repro``): the
        names of the stages that ran, and the output."""
        out = self.dvc("repro", target)
        return re.findall(r"^Running stage '([^']+)'", out, flags=re.MULTILINE), out

    def changed_stages(self) -> set[str]:
        """Stages of the full comparison ``dvc status`` reports as changed."""
        out = self.dvc("status", "--with-deps", "comparison", "--json")
        return set(json.loads(out.strip().splitlines()[-1]))


def _cached_outputs(root: Path) -> list[Path]:
    """Outputs DVC caches (dvc.lock outs minus the git-tracked cache: false ones)."""
    stages = _dvc_yaml(root)["stages"]
    entries = [e for s in stages.values() for key in ("outs", "metrics") for e in s.get(key, [])]
    uncached = [e for e in entries if isinstance(e, dict) and not _cached(e)]
    uncached = set(_paths(uncached, profile="smoke"))  # the chain's profile
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    lock = {name: entry for name, entry in lock.items() if name in stages}  # not stale ones
    paths = {o["path"] for s in lock.values() for o in s.get("outs", [])}
    paths = {p for p in paths if p not in uncached and not p.startswith("params/")}
    return [root / p for p in sorted(paths)]


def _cached(entry: dict) -> bool:
    """Whether a dvc.yaml ``{path: options}`` output is cached by DVC."""
    return (next(iter(entry.values())) or {}).get("cache", True)


def _upstream(stages: dict) -> dict[str, set[str]]:
    """For each stage, the stages that write one of its deps (its direct upstream)."""
    writers = {path: name for name, spec in stages.items() for path in _outputs(spec)}
    return {
        name: {writers[d] for d in _paths(spec.get("deps")) if d in writers}
        for name, spec in stages.items()
    }


def expected_reruns(stages: dict, blocks: set[str]) -> set[str]:
    """The Kedro stages ``dvc repro`` reruns after the resolved parameter blocks ``blocks``
    changed: every stage tracking one of them, then every stage downstream of a rerun one
    (each rerun stage writes new outputs: its files record training and attack times)."""
    upstream = _upstream(stages)
    chain = [name for name in STAGES if name in CHAIN]  # what `dvc repro comparison` runs
    rerun = {name for name in chain if set(_blocks(stages[name])) & blocks}
    grown = True
    while grown:
        more = {name for name in chain if upstream[name] & rerun} - rerun
        rerun |= more
        grown = bool(more)
    return rerun


def assert_in_dag_order(ran: list[str], stages: dict) -> None:
    """``resolve_params`` first, then no stage before one it depends on."""
    assert ran[0] == "resolve_params"
    upstream = _upstream(stages)
    for i, name in enumerate(ran):
        assert not upstream[name] & set(ran[i + 1 :]), f"{name} ran before its upstream: {ran}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_root) -> dict:
    """Runs the whole chain once; each test below checks one step of it."""
    tmp = tmp_path_factory.mktemp("dvc")
    (tmp / "repo").mkdir()
    repo = DvcCopy(tmp / "repo", tmp / "remote", data_root, tmp / "site-cache")
    root = repo.root
    steps: dict = {"root": root, "stages": _dvc_yaml(root)["stages"]}

    steps["first"] = repo.repro()
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "smoke run")
    steps["second"] = repo.repro()
    # the studies, each its own stage on the cached main job
    steps["studies"] = {study: repo.repro(study) for study in STUDIES}

    # Byte-code caches and a docstring edit in an unrelated pipeline (rvs).
    for folder in (
        "src/atop",
        "src/atop/pipelines/data_ingestion",
        "src/atop/pipelines/evaluation",
    ):
        (root / folder / "__pycache__").mkdir(exist_ok=True)
        (root / folder / "__pycache__" / "stale.cpython-311.pyc").write_bytes(os.urandom(64))
    rvs_nodes = root / RVS_NODES
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

    # A purifier parameter and an AToP one, set through `dvc exp run -S` (the overrides file
    # Kedro merges last): one rerun checks the experiment commands and the purifier's
    # downstream (the fine-tuning arms are below the purifier).
    out = repo.dvc(
        "exp", "run", "comparison",
        "-S", "params/overrides.yaml:++purifier_pretraining.max_batches_per_epoch=2",
        "-S", "params/overrides.yaml:++atop_finetuning.arms.atop.lambda_cls=0.2",
    )  # fmt: skip
    steps["purifier"] = re.findall(r"^Running stage '([^']+)'", out, flags=re.MULTILINE), out
    steps["exp_show"] = json.loads(repo.dvc("exp", "show", "--json"))

    # (the JSON is the last line: DVC warns first about files HEAD lacks, the studies')
    steps["metrics_show"] = json.loads(repo.dvc("metrics", "show", "--json").splitlines()[-1])
    diff = repo.dvc("metrics", "diff", "--all", "--json")
    steps["metrics_diff"] = json.loads(diff.strip().splitlines()[-1])
    repo.dvc("plots", "show", "-o", str(tmp / "plots"))
    steps["plots_html"] = (tmp / "plots" / "index.html").read_text()

    repo.dvc("push")
    outputs = _cached_outputs(root)
    steps["outputs"] = outputs
    steps["hashes_before"] = {p: _sha256(p) for p in outputs}
    steps["md5"] = {hashlib.md5(p.read_bytes()).hexdigest() for p in outputs}  # DVC's keys
    for path in outputs:
        path.unlink()
    shutil.rmtree(root / ".dvc" / "cache")  # everything must come back from the remote
    steps["remote_files"] = [p for p in (tmp / "remote").rglob("*") if p.is_file()]
    repo.dvc("pull")
    steps["hashes_after"] = {p: _sha256(p) if p.is_file() else None for p in outputs}
    steps["status_after_pull"] = repo.changed_stages()
    steps["repo"] = repo
    print("dvc chain:", ", ".join(f"{cmd} {sec:.0f}s" for cmd, sec in repo.timings))
    return steps


RVS_NODES = "src/atop/pipelines/rvs/nodes.py"


def test_expected_reruns_follow_the_parameters_and_the_data():
    """What the chain expects, read from the committed dvc.yaml (fast)."""
    stages = _dvc_yaml()["stages"]
    # the convergence study compares with the evaluation's headline (its attack list)
    assert expected_reruns(stages, {"evaluation"}) == {"evaluation", "convergence", "comparison"}
    purifier = expected_reruns(stages, {"purifier_pretraining"})
    # the noise ablations take purifier_pretraining's parameters (not its checkpoint)
    assert {"purifier_pretraining", "atop_finetuning", "atop_pgd", "noise_ablation"} <= purifier
    assert {"evaluation", "convergence", "comparison"} <= purifier
    assert not {"data_ingestion", "classifier_pretraining", "adversarial_training", "rvs"} & (
        purifier
    )
    assert expected_reruns(stages, {"data_ingestion"}) == set(CHAIN) - {"resolve_params"}
    # the comparison reads every defense: it is downstream of every training stage
    assert _upstream(stages)["comparison"] >= {"evaluation", "atop_pgd", "noise_ablation"}
    # the studies read the main job's checkpoints and evaluations, nothing of the comparison
    for study in STUDIES:
        assert _upstream(stages)[study] >= {"purifier_pretraining", "evaluation"}
        assert not _upstream(stages)[study] & {"comparison", "convergence", "noise_ablation"}
    assert {n for n, s in stages.items() if RVS_NODES in _code_files(_paths(s["deps"]))} == {"rvs"}


@pytest.mark.slow
def test_first_repro_runs_every_stage_and_second_runs_none(chain):
    ran, _ = chain["first"]
    assert sorted(ran) == sorted(CHAIN)  # the full comparison: every stage but the studies
    assert ran[1] == "data_ingestion" and ran[-1] == "comparison"
    assert_in_dag_order(ran, chain["stages"])
    ran, out = chain["second"]
    assert ran == []
    assert "Data and pipelines are up to date." in out


@pytest.mark.slow
def test_each_study_is_its_own_stage_on_the_cached_main_job(chain):
    """`dvc repro seeds` / `dvc repro scaling` run the study alone: the main job's stages
    come from the cache."""
    for study, (ran, _) in chain["studies"].items():
        assert ran == [study], study


@pytest.mark.slow
def test_pycache_and_an_unrelated_docstring_change_only_their_stage(chain):
    # __pycache__ under src/atop (a dependency of every stage) is invisible to DVC; the
    # docstring of rvs/nodes.py only concerns the stages whose code imports it (rvs).
    stages = chain["stages"]
    importing = {n for n, s in stages.items() if RVS_NODES in _code_files(_paths(s["deps"]))}
    assert chain["status_docstring"] == importing == {"rvs"}


@pytest.mark.slow
def test_base_value_overridden_by_the_profile_reruns_no_kedro_stage(chain):
    ran, _ = chain["overridden"]
    assert ran == ["resolve_params"]


@pytest.mark.slow
def test_evaluation_parameter_reruns_the_stages_taking_it_only(chain):
    ran, _ = chain["evaluation"]
    assert set(ran) == {"resolve_params"} | expected_reruns(chain["stages"], {"evaluation"})
    assert_in_dag_order(ran, chain["stages"])


@pytest.mark.slow
def test_purifier_parameter_reruns_purifier_and_downstream_only(chain):
    ran, _ = chain["purifier"]
    expected = expected_reruns(chain["stages"], {"purifier_pretraining"})
    assert set(ran) == {"resolve_params"} | expected
    assert "noise_ablation" in ran and "classifier_pretraining" not in ran
    assert_in_dag_order(ran, chain["stages"])


@pytest.mark.slow
def test_metrics_and_plots_commands(chain):
    stages = chain["stages"]
    metrics = {p for s in stages.values() for p in _paths(s.get("metrics"), "smoke")}
    (workspace,) = chain["metrics_show"].values()  # keyed by revision: "" = the workspace
    shown = workspace["data"]
    assert set(shown) == metrics
    assert all("error" not in shown[p] for p in metrics)
    # Against the committed first run: the purifier changed (fewer batches), so did its PSNR.
    diff = chain["metrics_diff"]
    assert set(diff) == metrics
    purifier = diff["data/08_reporting/cifar10/smoke/metrics/purifier_metrics.json"]
    assert any(
        entry.get("diff") not in (0, None)
        for key, entry in purifier.items()
        if "seconds" not in key
    )
    html = chain["plots_html"]
    plots = [p for s in stages.values() for p in _paths(s.get("plots"), "smoke")]
    histories = [p for p in plots if p.endswith(".csv")]
    assert "data/08_reporting/cifar10/smoke/finetuning_atop_history.csv" in histories
    for path in histories:
        assert path in html, path


@pytest.mark.slow
def test_push_then_pull_restores_outputs_byte_for_byte(chain):
    outputs = chain["outputs"]
    assert any(p.suffix == ".pt" for p in outputs) and any(p.suffix == ".png" for p in outputs)
    # the remote is content-addressed (files/md5/<2 hex>/<30 hex>): identical outputs are
    # stored once
    remote = {p.parent.name + p.name for p in chain["remote_files"]}
    assert chain["md5"] <= remote
    assert chain["hashes_after"] == chain["hashes_before"]
    assert chain["status_after_pull"] == set()


def _values(tree, key: str) -> list:
    """Every value stored under ``key`` at any depth of a JSON tree."""
    if isinstance(tree, dict):
        found = [tree[key]] if key in tree else []
        return found + [v for item in tree.values() for v in _values(item, key)]
    if isinstance(tree, list):
        return [v for item in tree for v in _values(item, key)]
    return []


@pytest.mark.slow
def test_dvc_exp_run_changes_hyper_parameters_through_the_overrides_file(chain):
    ran, _ = chain["purifier"]
    assert ran[0] == "resolve_params" and "atop_finetuning" in ran and "evaluation" in ran
    # `dvc exp show` lists the experiment with the new values and the metrics it produced
    rows = [
        row for row in _rows(chain["exp_show"]) if 0.2 in _values(row.get("params"), "lambda_cls")
    ]
    assert rows, chain["exp_show"]
    for row in rows:
        purifier = _values(row.get("params"), "purifier_pretraining")
        assert [block["max_batches_per_epoch"] for block in purifier] == [2]
    assert all(_values(row.get("metrics"), "val_adv_acc") for row in rows)


def _rows(tree) -> list[dict]:
    """The ``data`` blocks (params and metrics of one revision) of ``dvc exp show --json``."""
    if isinstance(tree, list):
        return [row for item in tree for row in _rows(item)]
    if not isinstance(tree, dict):
        return []
    here = [tree["data"]] if isinstance(tree.get("data"), dict) else []
    return here + [row for value in tree.values() for row in _rows(value)]

"""Shared test fixtures: real data from ../shared/datasets, telemetry off, few threads."""

from __future__ import annotations

import functools
import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine the spinning
# threads of one torch process starve the others (measured: 5-10x slower test steps).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`make test`: two workers on two cores) each worker takes one thread,
# and so do the processes its tests start (Kedro, DVC and torchrun children).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

import numpy as np
import pytest
import torch

from atop.hooks import TELEMETRY_OFF  # noqa: E402 (after the OpenMP setting)

for _key, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: The longest test file (the DVC chain: several `dvc repro` of the smoke profile, about 9 of
#: the suite's minutes). `make test` distributes whole files over two workers in collection
#: order (`--dist loadfile --no-loadscope-reorder`): starting it first keeps it off the end.
FIRST = ("tests/test_dvc.py",)


def pytest_collection_modifyitems(config, items) -> None:
    """The slowest files first, then the rest by descending test count (xdist's default
    order), so that two workers finish together."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.nodeid.split("::")[0]] = counts.get(item.nodeid.split("::")[0], 0) + 1

    def rank(item) -> tuple[int, int]:
        path = item.nodeid.split("::")[0]
        return (0 if path in FIRST else 1, -counts[path])

    items.sort(key=rank)  # stable: the tests of a file keep their order


def _find_data_root() -> Path:
    env = os.environ.get("ATOP_DATA_ROOT")
    candidates = [Path(env)] if env else []
    candidates.append(PROJECT_ROOT.parent / "shared" / "datasets")
    for candidate in candidates:
        if (candidate / "cifar-10-batches-py").is_dir():
            return candidate.resolve()
    raise RuntimeError(
        "Real datasets not found: set ATOP_DATA_ROOT or put the shared datasets at "
        f"{PROJECT_ROOT.parent / 'shared' / 'datasets'}"
    )


@functools.cache
def _profile_params(env: str) -> dict:
    from atop.dvc_params import typed_parameters

    return typed_parameters(PROJECT_ROOT, env)


def stage_params(key: str, env: str = "smoke", **changes):
    """The typed parameters of block ``key`` (e.g. ``"atop_finetuning"``) of profile ``env``,
    exactly as ``kedro run --env <env>`` builds them (one config loader for every test), with
    top-level ``changes`` applied and validated (nested blocks as dicts)."""
    params = _profile_params(env)[key]
    return params.replace(**changes) if changes else params


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The repository root."""
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding the real datasets (read-only): cifar-10-batches-py, imagenette2-224, ..."""
    return _find_data_root()


@pytest.fixture(scope="session")
def cifar10_test_batch(data_root) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 256 real CIFAR-10 test images: float32 [256, 3, 32, 32] in [0, 1], int64 labels."""
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root=str(data_root), train=False, download=False)
    images = torch.from_numpy(np.ascontiguousarray(ds.data[:256])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds.targets[:256], dtype=torch.int64)
    return images.float().div(255.0), labels


def moved(entry: dict, path: Path) -> dict:
    """A catalog entry with its ``filepath`` moved to ``path`` (and its ``metrics_filepath``,
    if any, beside it under ``metrics/``), so a test never writes into the repository."""
    entry = {**entry, "filepath": str(path)}
    if "metrics_filepath" in entry:
        entry["metrics_filepath"] = str(path.parent / "metrics" / path.name)
    return entry


def make_project_copy(tmp_path: Path) -> Path:
    """A throw-away copy of the Kedro project (conf, pyproject, empty data folders).

    The package itself is the installed (editable) ``atop``; only configuration and data
    live in the copy, so runs never write into the repository's ``data/``.
    """
    import shutil

    target = tmp_path / "project"
    target.mkdir()
    shutil.copytree(PROJECT_ROOT / "conf", target / "conf", ignore=shutil.ignore_patterns("local"))
    (target / "conf" / "local").mkdir()
    shutil.copy(PROJECT_ROOT / "pyproject.toml", target / "pyproject.toml")
    (target / "src").mkdir()  # the package is the installed one; Kedro wants the folder
    for layer in (
        "01_raw",
        "02_intermediate",
        "03_primary",
        "04_feature",
        "05_model_input",
        "06_models",
        "07_model_output",
        "08_reporting",
    ):
        (target / "data" / layer).mkdir(parents=True)
    return target


def run_kedro(
    project: Path,
    pipeline: str | list[str],
    env: str | None = "smoke",
    params: dict | None = None,
    only_missing_outputs: bool = False,
):
    """Run registered pipelines of the project copy with a real KedroSession (real catalog),
    from the project folder (the stages' resume paths are relative to it)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    names = [pipeline] if isinstance(pipeline, str) else list(pipeline)
    previous = Path.cwd()
    os.chdir(project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env=env, runtime_params=params) as session:
            return session.run(pipeline_names=names, only_missing_outputs=only_missing_outputs)
    finally:
        os.chdir(previous)


@pytest.fixture(scope="session")
def ingested_project(tmp_path_factory, data_root) -> Path:
    """A project copy where ``data_ingestion`` already ran on the real CIFAR-10 (smoke env)."""
    os.environ["ATOP_DATA_ROOT"] = str(data_root)
    project = make_project_copy(tmp_path_factory.mktemp("ingested"))
    run_kedro(project, "data_ingestion")
    return project


@pytest.fixture(scope="session")
def atop_project(ingested_project) -> Path:
    """The ingested project copy after a whole ``atop`` run (smoke env): classifier, purifier,
    AToP purifier and the robustness report on the real CIFAR-10."""
    run_kedro(ingested_project, "atop")
    return ingested_project


class KeptMemoryDataset:
    """Factory for a MemoryDataset that the runner does not release after its last use,
    so a test can read every intermediate output after ``SequentialRunner().run``."""

    def __new__(cls, data=None):
        from kedro.io import MemoryDataset

        class _Kept(MemoryDataset):
            def _release(self) -> None:  # keep the data for the test's assertions
                pass

        return _Kept(data) if data is not None else _Kept()

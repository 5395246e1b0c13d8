"""Kedro hooks of the project: telemetry off, the guard every run goes through, and the
Great Expectations Data Docs of each run (:class:`DataDocsHooks`).

:class:`RunGuardHooks` runs after Kedro has built the typed parameters of the chosen
pipeline (a bad value is refused there, before any node) and before the first node:

* refuses the run, within seconds and writing nothing, when a parameter key is unknown,
  the dataset of ``data_ingestion`` disagrees with the one the catalog paths use, the
  dataset's image side does not fit the purifier, an output folder is not writable or the
  disk is nearly full (:func:`check_run`);
* takes a lock on the project's ``data/`` folder (:class:`RunLock`): a second run on the
  same outputs is refused with the first one's pid and start time; a stale lock (its
  process is gone) is taken over;
* removes temporary files that a killed save left behind (``.<name>.<random>.tmp``).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from atop.datasets.atomic import PROVENANCE_ENV

log = logging.getLogger(__name__)

#: Environment variables that switch off usage telemetry of Kedro, DVC and Great Expectations.
TELEMETRY_OFF = {
    "KEDRO_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}
#: Free disk space a run needs on the data folder's file system (checkpoints, splits, caches).
MIN_FREE_BYTES = 1024**3
#: The side of a dataset's images must be a multiple of this for the purifier (P/8 mask
#: blocks, two stride-2 stages).
SIDE_MULTIPLE = 8


class RunRefused(RuntimeError):
    """The run was refused before any node ran; nothing was written."""


class TelemetryOffHooks:
    """Make sure no run of the project sends usage telemetry (Kedro, DVC, GX)."""

    @hook_impl
    def after_context_created(self, context) -> None:  # noqa: ARG002 (hook signature)
        for key, value in TELEMETRY_OFF.items():
            os.environ.setdefault(key, value)


def _known_keys(pipelines: dict[str, Any]) -> set[str]:
    """The top-level parameter keys that some registered node takes."""
    keys = set()
    for pipeline in pipelines.values():
        for name in pipeline.inputs() | {i for n in pipeline.nodes for i in n.inputs}:
            if name.startswith("params:"):
                keys.add(name.split(":", 1)[1].split(".", 1)[0])
    return keys


def check_run(params: dict[str, Any], known: set[str], data_dir: Path, dataset: str) -> None:
    """The checks of a run that no single parameter block can make.

    Args:
        params: the run's parameters (typed blocks or dicts), overrides included.
        known: the top-level keys the registered pipelines take.
        data_dir: the project's ``data/`` folder (the outputs go under it).
        dataset: the dataset of the catalog paths (``globals.yml: dataset``).

    Raises:
        RunRefused: naming the key, the value, the allowed values and the fix.
    """
    unknown = sorted(set(params) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RunRefused(
            f"Unknown parameter block(s) {unknown}: no node takes them.{hint} Known blocks: "
            f"{sorted(known)}. Fix the --params override or the conf/ file."
        )
    ingestion = params.get("data_ingestion")
    if ingestion is not None:
        chosen = getattr(ingestion, "dataset", None) or ingestion.get("dataset")
        if chosen != dataset:
            raise RunRefused(
                f"data_ingestion.dataset={chosen!r} but the catalog's paths are for {dataset!r} "
                f"(conf/<profile>/globals.yml: dataset). Set `dataset: {chosen}` there instead "
                "of overriding data_ingestion.dataset, so every path follows."
            )
        facts = ingestion.datasets[chosen] if hasattr(ingestion, "datasets") else None
        side = getattr(facts, "image_size", None)
        if side is not None and side % SIDE_MULTIPLE:
            raise RunRefused(
                f"data_ingestion.datasets.{chosen}.image_size={side}: the purifier needs a side "
                f"divisible by {SIDE_MULTIPLE} (mask blocks of P/8, two stride-2 stages). Use "
                f"{side - side % SIDE_MULTIPLE} or {side + SIDE_MULTIPLE - side % SIDE_MULTIPLE}."
            )
    data_dir.mkdir(parents=True, exist_ok=True)
    for folder in [data_dir, *sorted(p for p in data_dir.iterdir() if p.is_dir())]:
        if not os.access(folder, os.W_OK):
            raise RunRefused(
                f"The output folder {folder} is not writable: fix its permissions "
                f"(chmod u+w {folder}) before running."
            )
    free = shutil.disk_usage(data_dir).free
    if free < MIN_FREE_BYTES:
        raise RunRefused(
            f"Only {free / 1024**3:.1f} GiB free under {data_dir}; a run needs at least "
            f"{MIN_FREE_BYTES / 1024**3:.0f} GiB (checkpoints, splits). Free some space first."
        )


def check_profile(env: str | None, profile: str | None) -> None:
    """Refuse a profile whose outputs would land in another profile's folders.

    Args:
        env: the Kedro env of the run (``--env``; ``None`` or ``local``: the base profile).
        profile: ``profile`` of its globals (the ``<profile>`` folder of every output path).

    Raises:
        RunRefused: the two differ, with the line to add to ``conf/<env>/globals.yml``.
    """
    expected = "base" if env in (None, "local") else env
    if profile != expected:
        raise RunRefused(
            f"The profile {expected!r} has globals `profile: {profile}`, so it would write into "
            f"the outputs of {profile!r} (data/<layer>/<dataset>/{profile}/). Add "
            f"`profile: {expected}` to conf/{env or 'base'}/globals.yml."
        )


class RunLock:
    """An exclusive lock on an output folder: the file ``.atop-run.lock`` holding the owner's
    pid and start time, created atomically (``O_EXCL``).

    Raises:
        RunRefused: another live process holds it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".atop-run.lock"

    def acquire(self) -> None:
        """Take the lock (a stale one, whose process is gone, is taken over with a warning)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner[0] != os.getpid() and _alive(owner[0]):
                    raise RunRefused(
                        f"Another run (pid {owner[0]}, started {owner[1]}) is writing to "
                        f"{self.path.parent}: wait for it, or stop it. Two runs on the same "
                        "outputs would mix their results."
                    ) from None
                log.warning("Removing the stale lock %s (%s): its run is gone.", self.path, owner)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            return
        raise RunRefused(f"Could not take the lock {self.path}: remove it if no run is active.")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        owner = self._owner()
        if owner is not None and owner[0] == os.getpid():
            self.path.unlink(missing_ok=True)

    def _owner(self) -> tuple[int, str] | None:
        try:
            pid, started = self.path.read_text().split()
            return int(pid), started
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(data_dir: Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic saves under ``data_dir``."""
    patterns = (".*.tmp", ".*.tmp-*")  # atop.checkpoint.save_atomic, atop.datasets.atomic
    orphans = sorted({p for pattern in patterns for p in data_dir.rglob(pattern) if p.is_file()})
    for path in orphans:
        log.warning("Removing %s, left by an interrupted save.", path)
        path.unlink(missing_ok=True)
    return orphans


def code_commit() -> str:
    """The git commit of the code that runs (the ``atop`` package's checkout), with
    ``+dirty`` when ``src/`` or ``conf/`` differ from it; ``"unknown"`` outside a git
    checkout (an installed wheel) or without git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), "diff", "--quiet", "HEAD", "--", "src", "conf"],
            capture_output=True, timeout=30,
        ).returncode != 0  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


class RunGuardHooks:
    """Refuse bad runs before any node, lock the outputs, clean orphans (module doc)."""

    def __init__(self) -> None:
        self._lock: RunLock | None = None
        self._cwd: Path | None = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        from kedro.framework.project import pipelines

        project = Path(run_params.get("project_path") or ".").resolve()
        if Path.cwd().resolve() != project:
            # Relative paths of the parameters (resume files) are the project's: run there,
            # and go back after the run (an in-process caller keeps its own folder).
            log.info("Running from %s: switching to the project folder %s", Path.cwd(), project)
            self._cwd = Path.cwd()
            os.chdir(project)
        data_dir = project / "data"
        try:
            params = catalog.load("parameters")
            dataset, profile = _globals(project, run_params.get("env"))
            check_run(params, _known_keys(dict(pipelines)), data_dir, dataset)
            check_profile(run_params.get("env"), profile)
            self._lock = RunLock(data_dir)
            self._lock.acquire()
        except BaseException:
            self._release()
            raise
        remove_orphans(data_dir)
        provenance = {
            "dataset": dataset,
            "profile": profile,
            "commit": code_commit(),
        }
        os.environ[PROVENANCE_ENV] = json.dumps(provenance)

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._release()

    def _release(self) -> None:
        os.environ.pop(PROVENANCE_ENV, None)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._cwd is not None:
            os.chdir(self._cwd)
            self._cwd = None


class DataDocsHooks:
    """Great Expectations Data Docs of every run: the validations of the ingested splits and
    of the adversarial examples are stored in the file-backed GX project
    ``data/08_reporting/<dataset>/<profile>/gx`` under the run's pipeline names (replacing
    the previous run of those pipelines), and the Data Docs are rebuilt once at the end of the
    run, failed or not: ``.../gx/uncommitted/data_docs/local_site/index.html``."""

    def __init__(self) -> None:
        self._root: Path | None = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        from atop.validation.core import start_data_docs

        project = Path(run_params.get("project_path") or ".").resolve()
        dataset, profile = _globals(project, run_params.get("env"))
        self._root = project / "data" / "08_reporting" / dataset / profile
        names = run_params.get("pipeline_names") or ["__default__"]
        start_data_docs(self._root, "+".join(names))

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._build()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._build()

    def _build(self) -> None:
        from atop.validation.core import build_data_docs, stop_data_docs

        stop_data_docs()
        if self._root is None:
            return
        try:
            index = build_data_docs(self._root)
            if index is not None:
                log.info("Great Expectations Data Docs: %s", index)
        except Exception as exc:  # the docs never fail a run
            log.warning("Could not build the Great Expectations Data Docs: %s", exc)
        self._root = None


def _globals(project: Path, env: str | None) -> tuple[str, str]:
    """``dataset`` and ``profile`` of the run's globals (conf/<env>/globals.yml over conf/base)."""
    import yaml

    found: dict[str, Any] = {}
    for folder in ("base", env or "local"):
        path = project / "conf" / folder / "globals.yml"
        if path.is_file():
            found.update(yaml.safe_load(path.read_text()) or {})
    return found.get("dataset"), found.get("profile")

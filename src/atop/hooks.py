"""Kedro hooks of the project: telemetry off, the guard every run goes through, and the
Great Expectations Data Docs of each run (:class:`DataDocsHooks`).

:class:`RunGuardHooks` checks a run before it does any work and guards it while it runs:

* when the Kedro context is created (before Kedro builds the typed parameters): names the
  file and line that defines a refused key (:func:`atop.params.set_locator`), and refuses
  the parameters of the chosen pipelines that no typed block checks -- every attack spec
  wherever it lives, and counts above what they slice (:func:`atop.preflight.check_parameters`);
* before the first node: refuses the run, within seconds and writing nothing, when a
  parameter key is unknown, the dataset of ``data_ingestion`` disagrees with the one the
  catalog paths use, the dataset's image side does not fit the purifier, an output folder is
  not writable or the disk is nearly full (:func:`check_run`), or a checkpoint that the run
  takes as input is broken (:func:`atop.preflight.check_defense`: every defense whose
  checkpoints the pipeline consumes, loaded with the project's loaders, one forward pass);
  a checkpoint the run itself writes is checked the same way before the first node that
  consumes it;
* takes a lock on the project's ``data/`` folder (:class:`RunLock`, ``fcntl.flock``): a
  second run on the same outputs is refused with the first one's pid and start time; the
  kernel drops the lock of a process that dies, so there is no stale lock to take over;
* ends the run on SIGTERM / SIGINT through Kedro's error path (:class:`atop.errors.RunInterrupted`):
  a log line, the lock released, the Data Docs built;
* records the run's provenance (dataset, profile, commit, machine: :mod:`atop.machine`) for
  every JSON record it writes, and logs a user error (:mod:`atop.errors`) as one line;
* removes temporary files that a killed save left behind (``.<name>.<random>.tmp``).
"""

from __future__ import annotations

import difflib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from atop.datasets.atomic import PROVENANCE_ENV
from atop.errors import RunInterrupted, UserError, one_line, user_error

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


#: Signals that end a run through the error path (lock released, Data Docs built).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunRefused(UserError, RuntimeError):
    """The run was refused before any node ran; nothing was written."""


def telemetry_off() -> None:
    """Set :data:`TELEMETRY_OFF` in the environment (values already set are kept)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


class TelemetryOffHooks:
    """Make sure no run of the project sends usage telemetry (Kedro, DVC, GX)."""

    @hook_impl
    def after_context_created(self, context) -> None:  # noqa: ARG002 (hook signature)
        telemetry_off()


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
    """An exclusive lock on an output folder: ``fcntl.flock`` on the file ``.atop-run.lock``.

    The kernel holds the lock for the open file and drops it when the process ends, however
    it ends (a crash, SIGKILL): there is no stale lock to take over, no check-then-unlink
    race between two runs starting after a crash, and a pid reused by another program never
    blocks. The file holds the owner's pid and start time (for the refusal message); it
    stays, empty, after the release.

    Raises:
        RunRefused: another process holds it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".atop-run.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or refuse naming its holder."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = self._owner()
            os.close(fd)
            who = f"pid {owner[0]}, started {owner[1]}" if owner else "pid unknown"
            raise RunRefused(
                f"Another run ({who}) is writing to {self.path.parent}: wait for it, or stop "
                "it. Two runs on the same outputs would mix their results."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock if this object holds it (the file stays, emptied)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _owner(self) -> tuple[int, str] | None:
        try:
            pid, started = self.path.read_text().split()
            return int(pid), started
        except (OSError, ValueError):
            return None


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
    """Check a run before any work, lock its outputs, end it cleanly on a signal, record its
    provenance (module doc)."""

    def __init__(self) -> None:
        self._lock: RunLock | None = None
        self._cwd: Path | None = None
        self._signals: dict[int, Any] = {}
        self._checks: CheckpointChecks | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        """Name the file of refused keys; refuse the chosen pipelines' parameters that no
        typed block checks (attack specs, counts): before Kedro builds the typed blocks."""
        from atop.params import set_locator
        from atop.preflight import ConfSources, check_parameters

        telemetry_off()
        loader = context.config_loader
        project = Path(context.project_path)
        sources = ConfSources(
            project,
            Path(getattr(loader, "conf_source", project / "conf")),
            context.env,
            getattr(loader, "runtime_params", None) or {},
            getattr(loader, "base_env", None) or "base",
        )
        names = _requested_pipelines()
        set_locator(sources.locate)
        try:
            check_parameters(loader["parameters"], _blocks_of(names), sources)
            # Kedro's typed blocks, built now (as the session will, for the same pipelines:
            # it reuses them) so that their refusals name the file too
            if "__default__" not in names and hasattr(context, "_pipelines_to_validate"):
                context._pipelines_to_validate = list(names)
            context.params  # noqa: B018 (builds and caches the typed blocks)
        finally:
            set_locator(None)

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
            self._checks = CheckpointChecks(pipeline, catalog, project, params)
            self._checks.check_ready({})  # the checkpoints the run takes as inputs
            self._lock = RunLock(data_dir)
            self._lock.acquire()
        except BaseException:
            self._release()
            raise
        remove_orphans(data_dir)
        from atop.machine import machine

        provenance = {
            "dataset": dataset,
            "profile": profile,
            "commit": code_commit(),
            "machine": machine(),
        }
        os.environ[PROVENANCE_ENV] = json.dumps(provenance)
        self._catch_signals()

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any]) -> None:  # noqa: ARG002
        """Check the checkpoints this node consumes (and the defenses they complete)."""
        if self._checks is not None:
            self._checks.before_node(node, inputs)

    @hook_impl
    def after_node_run(self, node) -> None:
        if self._checks is not None:
            self._checks.done.update(node.outputs)

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self, error: BaseException) -> None:
        found = user_error(error)
        if isinstance(found, RunInterrupted):
            log.error("%s", found)
        elif found is not None:
            log.error("%s", one_line(found))
        if found is not None:
            error._atop_reported = True  # type: ignore[attr-defined]  # atop.cli: said once
        self._release()

    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, frame: Any) -> None:  # noqa: ARG001 (signal handler)
            self._restore_signals()  # a second signal acts as usual
            raise RunInterrupted(signum, signal.Signals(signum).name)

        for sig in STOP_SIGNALS:
            self._signals[sig] = signal.signal(sig, stop)

    def _restore_signals(self) -> None:
        for sig, previous in self._signals.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._signals = {}

    def _release(self) -> None:
        self._restore_signals()
        self._checks = None
        os.environ.pop(PROVENANCE_ENV, None)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._cwd is not None:
            os.chdir(self._cwd)
            self._cwd = None


def _requested_pipelines() -> list[str]:
    """The pipelines the session is about to run (``["__default__"]`` when unknown)."""
    from kedro.framework.project import pipelines

    return list(getattr(pipelines, "_requested_pipelines", None) or ["__default__"])


def _blocks_of(names: list[str]) -> set[str] | None:
    """The top-level parameter keys the pipelines ``names`` take (``None``: every block,
    when a node takes ``parameters`` whole)."""
    from kedro.framework.project import pipelines

    blocks: set[str] = set()
    for name in names:
        try:
            pipeline = pipelines[name]
        except KeyError:  # Kedro says which names exist
            continue
        for item in {i for n in pipeline.nodes for i in n.inputs}:
            if item == "parameters":
                return None
            if item.startswith("params:"):
                blocks.add(item.split(":", 1)[1].split(".", 1)[0])
    return blocks


class CheckpointChecks:
    """The checkpoints of a run checked before use (:func:`atop.preflight.check_defense`).

    A defense of :data:`atop.evaluation.defenses.NEEDS` is checked when the run consumes all
    its checkpoints, as soon as they are all available: at the start for the run's inputs,
    else before the first node that consumes one after their producers ran.

    Args:
        pipeline: the run's pipeline.
        catalog: its catalog.
        project: the project root (paths in messages are relative to it).
        params: the run's parameters (for the image side).
    """

    def __init__(self, pipeline, catalog, project: Path, params: dict[str, Any]) -> None:
        from atop.evaluation.defenses import NEEDS
        from atop.preflight import image_side

        consumed = {i for n in pipeline.nodes for i in n.inputs}
        self.produced = {o for n in pipeline.nodes for o in n.outputs}
        self.keys = {key for needs in NEEDS.values() for key in needs}
        self.pending = {
            name: tuple(needs) for name, needs in NEEDS.items() if set(needs) <= consumed
        }
        self.done: set[str] = set()
        self.catalog = catalog
        self.project = project
        self.side = image_side(params)
        self._fixes: dict[str, str] | None = None

    def before_node(self, node, inputs: dict[str, Any]) -> None:
        """Check what ``node`` consumes, if it consumes a checkpoint."""
        if set(node.inputs) & self.keys:
            self.check_ready(inputs)

    def check_ready(self, inputs: dict[str, Any]) -> None:
        """Check every pending defense whose checkpoints are all available now.

        Raises:
            atop.checkpoint.CheckpointError: a broken checkpoint (file, problem, fix).
        """
        from atop.preflight import check_defense

        loaded: dict[str, Any] = {}
        for name, needs in list(self.pending.items()):
            if not all(k in inputs or k in self.done or k not in self.produced for k in needs):
                continue
            del self.pending[name]
            checkpoints = {k: self._load(k, inputs, loaded) for k in needs}
            if any(c is None for c in checkpoints.values()):
                continue  # an optional checkpoint not written yet: the evaluation skips it
            paths = {k: self._path(k) for k in needs}
            check_defense(name, checkpoints, paths, self.fixes, self.side)

    @property
    def fixes(self) -> dict[str, str]:
        """Checkpoint -> the command that rewrites it (its stage)."""
        if self._fixes is None:
            from kedro.framework.project import pipelines

            self._fixes = {}
            for stage, pipeline in dict(pipelines).items():
                if stage in ("atop", "__default__"):
                    continue
                for output in {o for n in pipeline.nodes for o in n.outputs} & self.keys:
                    self._fixes.setdefault(output, f"kedro run --pipelines {stage}")
        return self._fixes

    def _load(self, key: str, inputs: dict[str, Any], loaded: dict[str, Any]) -> Any:
        if key in inputs:
            return inputs[key]
        if key not in loaded:
            try:
                loaded[key] = self.catalog.load(key)
            except Exception as exc:
                found = user_error(exc)
                if found is not None and found is not exc:
                    raise found from exc
                raise
        return loaded[key]

    def _path(self, key: str) -> str:
        try:
            path = Path(self.catalog.get(key)._describe()["filepath"])
        except Exception:
            return key
        try:
            return str(path.resolve().relative_to(self.project))
        except ValueError:
            return str(path)


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

"""Run a pipeline in every process of a ``torchrun`` job (README "Scaling out")::

    torchrun --nproc_per_node 8 -m atop.pipelines.distributed_launch \\
        --pipeline classifier_pretraining --env paper

    # two machines, 8 GPUs each: the same command on both, meeting at the first one
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint node0:29400 --rdzv_id atop-paper \\
        -m atop.pipelines.distributed_launch --pipeline classifier_pretraining --env paper

Every process joins the group torchrun describes, builds the project's session (the
profile ``--env``, ``--params`` overrides as ``kedro run --params``) and walks the chosen
pipeline's nodes in order:

* a launchable node (training, per-defense evaluation:
  :func:`atop.pipelines.distributed_launch.launch.launchable`) runs on every rank; rank 0
  loads its inputs and broadcasts them, so only rank 0 reads the catalog and no shared file
  system is needed;
* any other node (ingestion, metrics, reports) runs on rank 0 alone;
* rank 0 alone saves outputs, through the catalog (atomic datasets) and takes the run lock
  on ``data/``.

The stages' ``distributed`` blocks are not read here: torchrun decides the processes.
Kedro's run hooks do not run (only rank 0 writes; its lock stands in for the run guard).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from atop import distributed

log = logging.getLogger("atop.pipelines.distributed_launch")


def parse_params(text: str | None) -> dict[str, Any]:
    """``"a.b=1,c=x"`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--params item {item!r} is not key=value.")
        *parents, leaf = key.strip().split(".")
        target = out
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value)
    return out


def run_pipeline(pipeline: Any, catalog: Any) -> list[str]:
    """Run ``pipeline``'s nodes in this process's role (module doc); returns the names of
    the nodes this rank ran."""
    main = distributed.is_main()
    results: dict[str, Any] = {}
    ran = []
    for node in pipeline.nodes:
        everyone = getattr(node.func, "launchable", False)
        if not (everyone or main):
            continue
        inputs = None
        if main:
            inputs = {n: results[n] if n in results else catalog.load(n) for n in node.inputs}
        if everyone:
            inputs = distributed.broadcast_object(inputs)
        if main:
            log.info("running node %s%s", node.name, " on every rank" if everyone else "")
        outputs = node.run(inputs)
        ran.append(node.name)
        if main:
            for name, data in outputs.items():
                catalog.save(name, data)
            results.update(outputs)
    return ran


def main(argv: list[str] | None = None) -> int:
    """Command line (module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a registered pipeline, e.g. rvs")
    parser.add_argument("--env", default=None, help="the profile (a folder of conf/)")
    parser.add_argument("--params", default=None, help="overrides: key.sub=value,...")
    parser.add_argument("--project", default=".", help="the Kedro project (default: .)")
    parser.add_argument("--backend", default="auto", choices=distributed.BACKENDS)
    args = parser.parse_args(argv)

    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from atop.hooks import RunLock

    distributed.init_from_environment(args.backend)
    project = Path(args.project).resolve()
    os.chdir(project)  # the parameters' relative paths (resume files) are the project's
    bootstrap_project(project)
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
    lock = RunLock(project / "data") if distributed.is_main() else None
    try:
        if lock is not None:
            lock.acquire()
        with KedroSession.create(
            project_path=project, env=args.env, runtime_params=parse_params(args.params)
        ) as session:
            catalog = session.load_context().catalog
            run_pipeline(pipelines[args.pipeline], catalog)
    finally:
        if lock is not None:
            lock.release()
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

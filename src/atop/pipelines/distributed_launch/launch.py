"""Which nodes run data-parallel, and how a Kedro node starts its processes.

:func:`scale_out` (applied to every registered pipeline by ``atop.pipeline_registry``) wraps
the nodes of :func:`launchable` names -- the training nodes (``train_*``, ``finetune_*``)
and the per-defense evaluation nodes (``evaluate_<defense>``) -- in :func:`launched`. The
wrapper reads the ``distributed`` block of the node's typed parameters
(:class:`atop.distributed.DistributedParams`):

* ``nproc_per_node * nnodes == 1``, or already inside a process group (a ``torchrun``
  worker): the node function runs here, exactly as unwrapped;
* otherwise :func:`atop.distributed.launch` starts the processes with torchrun's elastic
  agent (``nccl`` on GPUs, ``gloo`` on CPUs); each one looks the node up by name in the
  registered pipelines (:func:`run_node`; node functions need not pickle) and calls it on
  the same inputs, which travel through shared memory. The first process's outputs (equal
  on every rank: rank 0's weights, the gathered verdicts) go back to the catalog.

The wrapper keeps the node's name, signature and type hints, so Kedro builds and validates
the same typed parameters.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kedro.pipeline import Pipeline

from atop import distributed
from atop.distributed import DistributedParams
from atop.evaluation.defenses import DEFENSES

log = logging.getLogger(__name__)

#: Name prefixes of the training nodes (classifier, purifier, fine-tuning arms, PGD-AT, RvS).
TRAINING_PREFIXES = ("train_", "finetune_")


def launchable(name: str) -> bool:
    """Whether node ``name`` runs data-parallel when its stage asks: a training node, or the
    evaluation of one defense."""
    return name.startswith(TRAINING_PREFIXES) or name in {f"evaluate_{d}" for d in DEFENSES}


def settings_of(args: tuple, kwargs: Mapping[str, Any]) -> DistributedParams | None:
    """The ``distributed`` block of the first typed parameter block among a node's inputs."""
    for value in (*args, *kwargs.values()):
        found = getattr(value, "distributed", None)
        if isinstance(found, DistributedParams):
            return found
    return None


def launched(func: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``func`` (the function of node ``name``), run on the processes its stage's
    ``distributed`` block asks for (module doc)."""

    @functools.wraps(func)
    def node(*args: Any, **kwargs: Any) -> Any:
        settings = settings_of(args, kwargs)
        if settings is None or settings.world_size == 1 or distributed.is_initialized():
            return func(*args, **kwargs)
        log.info(
            "%s: data-parallel on %d machine(s) x %d process(es), backend %s",
            name,
            settings.nnodes,
            settings.nproc_per_node,
            distributed.backend_name(settings.backend),
        )
        return distributed.launch(
            run_node,
            name,
            args,
            kwargs,
            nproc_per_node=settings.nproc_per_node,
            nnodes=settings.nnodes,
            rdzv_endpoint=settings.rdzv_endpoint,
            backend=settings.backend,
            max_restarts=settings.max_restarts,
            run_id=f"atop-{name}",
        )

    node.launchable = True  # type: ignore[attr-defined]  (the torchrun runner reads it)
    return node


def run_node(name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
    """In a launched process: call node ``name`` of the registered pipelines (its wrapper
    sees the process group and calls the node function itself).

    Raises:
        KeyError: no registered node has this name.
    """
    from atop.pipeline_registry import register_pipelines

    for node in register_pipelines()["__default__"].nodes:
        if node.name == name:
            return node.func(*args, **kwargs)
    raise KeyError(f"No registered node is named {name!r}.")


def scale_out(pipeline: Pipeline) -> Pipeline:
    """``pipeline`` with its :func:`launchable` nodes wrapped by :func:`launched` (same
    names, inputs, outputs and tags)."""
    return Pipeline(
        [
            node._copy(func=launched(node.func, node.name)) if launchable(node.name) else node
            for node in pipeline.nodes
        ]
    )

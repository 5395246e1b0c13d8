"""Data-parallel training and sharded evaluation with ``torch.distributed``: the one home of
ranks, world sizes, process groups and their collectives.

One process per GPU (or per share of the CPU cores) runs the same code; ``torchrun`` or
:func:`launch` (the same elastic agent, started from Python) describes the group in each
process's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), and :func:`init_from_environment` joins it (backend ``nccl`` on GPUs,
``gloo`` on CPUs). What the rest of the project does with it:

* :func:`atop.training.fit` shards every batch of :class:`atop.training.Batches` over the
  ranks (:meth:`~atop.training.Batches.shard`: the same global order, augmentation, batch and
  learning rate as one process), averages the epoch means of the loss terms
  (:func:`all_reduce_mean`), and lets rank 0 alone write the resume file;
* the trainers run their updates through :func:`data_parallel` wrappers
  (``DistributedDataParallel``; batch norm synchronized, :func:`convert_sync_batchnorm`), so
  the gradients are the mean over the global batch;
* the evaluation protocol (:mod:`atop.evaluation.protocol`) gives each rank whole batches
  (:func:`shard`), seeds each batch from its index (:func:`batch_seed`) and gathers the
  verdicts (:func:`all_gather_objects`).

Without a process group (the usual single process) every helper is the identity: world size
1, rank 0, ``data_parallel(m) is m``, reductions return their input; results are bit-identical
to code that never heard of this module.

Core module: torch, numpy and the standard library only.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from atop.params import Params, run_only, spec

log = logging.getLogger(__name__)

#: ``backend`` values: ``auto`` = ``nccl`` when CUDA is available, else ``gloo``.
BACKENDS = ("auto", "nccl", "gloo")
#: How long a collective waits for the slowest rank (rank 0 alone runs the report nodes of
#: a torchrun pipeline while the others wait at a barrier).
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(init=False, frozen=True)
class DistributedParams(Params):
    """``<stage>.distributed``: how a stage's node is launched (README "Scaling out").

    ``nproc_per_node * nnodes == 1`` (the default) runs the stage in the Kedro process, as
    before. Larger: the node starts ``nproc_per_node`` processes on each of ``nnodes``
    machines with the elastic agent of ``torchrun``; the nodes meet at ``rdzv_endpoint``
    (``host:port`` of the first machine; one machine needs none). ``max_restarts``: how
    often the agent restarts a failed group (it resumes from the last epoch). None of these
    changes the weights' settings; the number of processes does change the floating-point
    sums, so a resume file is only taken up by the same world size.
    """

    nproc_per_node: int = spec(ge=1, weights=False, unit="(processes per machine: one per GPU)")
    nnodes: int = spec(ge=1, weights=False, unit="(machines)")
    rdzv_endpoint: str = run_only()
    backend: str = spec(choices=BACKENDS, weights=False)
    max_restarts: int = spec(ge=0, weights=False)

    @property
    def world_size(self) -> int:
        """Processes in all: ``nproc_per_node * nnodes``."""
        return self.nproc_per_node * self.nnodes


# --------------------------------------------------------------------------- the group


def is_initialized() -> bool:
    """Whether this process belongs to a process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the group (1 without a group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a group)."""
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 without a group)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the process that logs, shows progress and writes files."""
    return rank() == 0


def backend_name(backend: str = "auto") -> str:
    """``nccl`` or ``gloo`` (``auto``: ``nccl`` when CUDA is available)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}: use one of {BACKENDS}.")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def in_launched_environment() -> bool:
    """Whether ``torchrun`` (or :func:`launch`) started this process (``WORLD_SIZE`` set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_environment(backend: str = "auto") -> bool:
    """Join the process group that ``torchrun`` / :func:`launch` describe in the environment.

    With ``nccl`` the process's CUDA device becomes ``cuda:<LOCAL_RANK>``, so ``"cuda"``
    (``atop.training.resolve_device("auto")``) means this rank's GPU.

    Returns:
        True when this process is in a group afterwards (also when it already was); False
        when the environment describes none (no ``WORLD_SIZE``/``RANK``).
    """
    if is_initialized():
        return True
    if not in_launched_environment():
        return False
    name = backend_name(backend)
    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=name, timeout=TIMEOUT)
    log.debug("rank %d of %d joined the %s group", rank(), world_size(), name)
    return True


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    """Where tensors of a collective live: the current GPU for ``nccl``, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- collectives


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (float64 on the wire); the values themselves with
    one process. Every rank must pass the same keys."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    tensor = tensor.to(_collective_device())
    dist.all_reduce(tensor)
    means = (tensor / world_size()).tolist()
    return {k: means[keys.index(k)] for k in values}


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over ranks (``value`` itself with one process)."""
    if world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; tensors included); ``obj`` itself with
    one process."""
    if world_size() == 1:
        return obj
    holder = [obj if rank() == src else None]
    dist.broadcast_object_list(holder, src=src, device=_collective_device())
    return holder[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled); ``[obj]`` with one process."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_module_states(modules: Iterable[nn.Module], src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's modules (in place)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=src)


# --------------------------------------------------------------------------- sharding, seeds


def shard(n: int) -> range:
    """This rank's items among ``n`` (e.g. evaluation batches): ``rank, rank + W, ...``.
    Every item belongs to exactly one rank; ``range(n)`` with one process."""
    return range(rank(), n, world_size())


def part_of(size: int, part: int, parts: int) -> slice:
    """The ``part``-th of ``parts`` contiguous, near-equal slices of ``range(size)`` (the
    first ``size % parts`` parts one longer), as ``torch.tensor_split``."""
    base, extra = divmod(size, parts)
    start = part * base + min(part, extra)
    return slice(start, start + base + (1 if part < extra else 0))


def batch_seed(seed: int, *keys: int) -> int:
    """A seed for one unit of work (e.g. batch ``k`` of an attack) derived from ``seed`` and
    integer ``keys`` with NumPy's ``SeedSequence``: the same on every rank and process, and
    unrelated for different keys."""
    state = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def decorrelate_ranks() -> None:
    """Give every rank but 0 its own stream of the global random-number generators (Python,
    NumPy, torch and CUDA), derived from the last torch seed and the rank.

    Called by :func:`atop.training.fit` when training starts in a group: the ranks built
    the same models from the same seed, and from then on each draws its own dropout, random
    transforms and attack starts for its share of the batch. Rank 0 keeps the stream of a
    single-process run. No-op without a group.
    """
    if world_size() == 1 or rank() == 0:
        return
    derived = batch_seed(torch.initial_seed() % 2**63, rank())
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


# --------------------------------------------------------------------------- data parallel


class DataParallel(DistributedDataParallel):
    """``DistributedDataParallel`` that also answers the wrapped module's attributes
    (``wrapper.image_size``, ``wrapper.sample_noise(...)``), so code written for the module
    takes the wrapper. Calling the wrapper runs ``forward`` with the gradient all-reduce; a
    method of the module called through it does not synchronize anything."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None:
                raise
            return getattr(module, name)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of a rank's input is the sum of
    every rank's gradient of the result (each rank's loss depends on every input)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch (every rank's
    share), for CPU process groups (``gloo``), where ``torch.nn.SyncBatchNorm`` does not run.

    In training mode inside a group of several ranks, the per-channel sums, then the sums of
    squared deviations from the global mean, are all-reduced (differentiably), in float32;
    the running statistics use the global unbiased variance. Otherwise it is ``BatchNorm``. Same
    parameters and buffers as the module it replaces (state dicts are interchangeable).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(input)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.full((1,), input.numel() / input.shape[1], device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))  # two passes: no cancellation
        mean, n = total[:-1] / total[-1], total[-1]
        centered = x - mean.view(shape)
        var = all_reduce(centered.square().sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every batch-norm layer of ``module`` computing global-batch statistics in training:
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`GroupBatchNorm` elsewhere. The parameters and
    buffers are the same tensors (optimizers built before keep working); returns the module
    (a new object only when ``module`` itself is a batch-norm layer)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GroupBatchNorm | nn.SyncBatchNorm
    ):
        converted = GroupBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module._modules[name] = convert_sync_batchnorm(child, device_type)
    return module


def data_parallel(module: nn.Module, *, sync_batchnorm: bool = True) -> nn.Module:
    """``module`` itself with one process; in a group, a :class:`DataParallel`
    (``DistributedDataParallel``) around it, its batch norm synchronized.

    Build it once the module sits on its device (rank 0's parameters and buffers are
    broadcast to every rank here), and run the training forward passes through it: the
    gradients of the backward pass are then averaged over the ranks, which with equal
    shares of a batch is the gradient of the global batch's mean loss. Frozen modules (no
    parameter requiring gradients) are returned unwrapped.
    """
    if world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    device = next(module.parameters()).device
    if sync_batchnorm:
        module = convert_sync_batchnorm(module, device.type)
    device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DataParallel(module, device_ids=device_ids)


# --------------------------------------------------------------------------- launching


def launch(
    fn: Callable[..., Any],
    *args: Any,
    nproc_per_node: int,
    nnodes: int = 1,
    rdzv_endpoint: str = "",
    backend: str = "auto",
    max_restarts: int = 0,
    run_id: str = "atop",
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``nproc_per_node`` processes on each of ``nnodes``
    machines, as ``torchrun`` does (``torch.distributed.launcher.api.elastic_launch``), and
    return the result of this machine's first process.

    Each process joins the group (:func:`init_from_environment` with ``backend``), runs
    ``fn``, and leaves. ``fn`` and the arguments must pickle (a module-level function;
    tensors travel through shared memory). On CPUs each process gets
    ``cpu_count // nproc_per_node`` threads unless ``OMP_NUM_THREADS`` is set. One machine
    meets at a free local port; several at ``rdzv_endpoint`` (``host:port``), each machine
    calling :func:`launch` with the same ``run_id``.

    Raises:
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError: a process failed
            (after ``max_restarts`` restarts of the group); it names the rank and the error.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    standalone = nnodes == 1
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc_per_node,
        run_id=f"{run_id}-{uuid.uuid4().hex[:8]}" if standalone else run_id,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if standalone else rdzv_endpoint,
        max_restarts=max_restarts,
        start_method="spawn",
        monitor_interval=0.2,
    )
    level = logging.getLogger().getEffectiveLevel()
    results = elastic_launch(config, _entry)(fn, backend, level, args, kwargs)
    return results[min(results)]


def _entry(
    fn: Callable[..., Any], backend: str, level: int, args: tuple, kwargs: dict[str, Any]
) -> Any:
    """What each launched process runs (module level, so that it pickles)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=level if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
            format="%(asctime)s rank " + os.environ.get("RANK", "0") + " %(name)s: %(message)s",
        )
    name = backend_name(backend)
    if name == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    init_from_environment(name)
    try:
        result = fn(*args, **kwargs)
        return result if local_rank() == 0 else None
    finally:
        shutdown()

"""The one training loop shared by every trainer of the project.

Classifier pretraining, purifier pretraining (paper Eq. 8), AToP fine-tuning (paper Eq. 9,
Algorithm 1), PGD adversarial training and RvS all train through :func:`fit`. The loop owns
what every trainer needs and nothing model-specific:

* device selection (:func:`resolve_device`), seeding (:func:`seed_everything`) and bf16
  autocast on CUDA and on CPUs with bf16 units (:func:`autocast`);
* in-memory batches of uint8 images converted per batch to float32 in ``[0, 1]`` with the
  standard CIFAR augmentation (:class:`Batches`);
* tqdm progress bars, ``logging`` of every epoch, per-epoch history rows;
* a guard against non-finite losses (:class:`NonFiniteLossError`);
* an atomic per-epoch resume checkpoint (weights, optimizers, schedulers, history and every
  random-number-generator state), so an interrupted run continues where it stopped and ends
  with the same weights as an uninterrupted one;
* data-parallel training inside a ``torch.distributed`` group (:mod:`atop.distributed`):
  each rank trains on its share of every global batch (:meth:`Batches.shard`), the epoch
  means are averaged over the ranks, rank 0 alone logs and writes the resume file. Without a
  group nothing of this runs.

The model-specific work is the ``train_step(x, y)`` callable: it computes the loss, calls
``zero_grad``/``backward``/``step`` itself and returns its scalar terms.

Core module: imports only torch, numpy, tqdm and the standard library.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from atop import distributed
from atop.checkpoint import load_safe, save_atomic
from atop.data import to_unit
from atop.progress import progress as progress_bar

log = logging.getLogger(__name__)

#: Padding (pixels) of the random-crop augmentation, as in the standard CIFAR recipe.
CROP_PADDING = 4


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a device name from the parameters into a :class:`torch.device`.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:<index>"`` (any name :class:`torch.device` accepts).

    Returns:
        The device.

    Raises:
        ValueError: the name is not a device name.
        RuntimeError: CUDA is requested but not available (or the index does not exist).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(
            f"Unknown device '{name}': use 'auto', 'cpu', 'cuda' or 'cuda:<index>'."
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"Device '{name}' requested but CUDA is not available on this machine: "
                "set the parameter `device: auto` (or `cpu`)."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"Device '{name}' requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist."
            )
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device).

    Args:
        seed: any non-negative int.

    Returns:
        A fresh CPU :class:`torch.Generator` seeded with ``seed``, for the data order and
        augmentation of :class:`Batches` (kept apart from the global RNG that dropout and
        random transforms draw from).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


@functools.cache
def bf16_available(device_type: str) -> bool:
    """Whether bf16 autocast pays on this device type: CUDA with bf16 support, or a CPU whose
    oneDNN has bf16 kernels (AVX-512 BF16 / AMX; most current server CPUs)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass: bf16 autocast where :func:`bf16_available` (CUDA,
    or a CPU with bf16 units), a no-op elsewhere or when ``enabled`` is false (float32).

    bf16 keeps float32's exponent range, so no gradient scaler is needed. Each stage switches
    it with its ``amp`` parameter; accuracy parity is measured in docs/benchmarks.md.
    """
    device = torch.device(device)
    if enabled and bf16_available(device.type):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: The layers whose weights bf16 autocast casts at every call (and :func:`autocast_copy`
#: pre-casts once).
_CAST_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def autocast_copy(model: nn.Module) -> nn.Module:
    """A copy of a FROZEN model for its bf16-autocast passes, with the weights and biases of
    its convolutions and linear layers pre-cast to bf16.

    Autocast casts those float32 parameters to bf16 at every call (frozen weights do not
    require grad, so its cast cache skips them): the copy computes exactly the same numbers
    (the same round-to-nearest-even cast, done once) without a cast per layer and pass. Use
    it only under :func:`autocast`; without autocast its layers would see float32 inputs
    with bf16 weights. Any other parameter and buffer (norms, the purifier's other state)
    stays float32, as autocast leaves it.
    """
    copy_ = copy.deepcopy(model)
    for module in copy_.modules():
        if isinstance(module, _CAST_LAYERS) and not nn.utils.parametrize.is_parametrized(module):
            for name in ("weight", "bias"):
                tensor = getattr(module, name, None)
                if isinstance(tensor, nn.Parameter) and tensor.dtype == torch.float32:
                    setattr(module, name, nn.Parameter(tensor.detach().to(torch.bfloat16), False))
    return copy_


class NonFiniteLossError(RuntimeError):
    """A ``train_step`` returned a NaN or infinite term.

    The message names the term, the epoch and the batch. Training stops before the epoch is
    checkpointed, so the resume file of the last good epoch (if any) stays on disk.
    """


class Batches:
    """Mini-batches over an in-memory uint8 image tensor, without DataLoader workers.

    Images stay stored as uint8 (CIFAR-10 train: 150 MB) on ``device`` and are converted
    per batch. Iterating yields ``(x, y)``: ``x`` float32 ``[B, 3, H, W]`` in ``[0, 1]`` on
    ``device`` (channels-last memory format if asked), ``y`` int64 ``[B]``.

    The augmentation (``augment=True``) is the standard CIFAR one: a random crop of the
    image padded by 4 pixels with reflection, then a horizontal flip with probability 1/2,
    drawn independently per image from ``generator``. It is done by index arithmetic on the
    uint8 tensor (one gather, no padded copy).

    Args:
        images_uint8: uint8 ``[N, 3, H, W]``, values 0..255.
        labels: int64 ``[N]``.
        batch_size: images per batch (> 0).
        shuffle: a fresh random order every epoch (drawn from ``generator``).
        generator: CPU generator for the order and the augmentation; ``None`` uses torch's
            global RNG. :func:`fit` checkpoints its state for resuming.
        augment: random crop (pad 4, reflect) + horizontal flip.
        device: where the images are stored and the batches are produced.
        drop_last: drop the last incomplete batch.
        channels_last: yield ``x`` in ``torch.channels_last`` memory format (faster convs
            on CUDA).

    Raises:
        TypeError: images are not uint8 or labels are not int64.
        ValueError: wrong shapes, mismatched lengths, non-positive batch size, or images
            smaller than the crop padding.
    """

    def __init__(
        self,
        images_uint8: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        augment: bool = False,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> None:
        if images_uint8.dtype != torch.uint8:
            raise TypeError(
                f"Batches expects uint8 images (0..255), got {images_uint8.dtype}: store "
                "splits as uint8 (see docs/architecture.md) or convert with "
                "`(x * 255).round().to(torch.uint8)`."
            )
        if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images_uint8.shape)}.")
        if labels.dtype != torch.int64 or labels.ndim != 1:
            raise TypeError(f"labels must be int64 [N], got {labels.dtype} {tuple(labels.shape)}.")
        if len(labels) != len(images_uint8):
            raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if augment and min(images_uint8.shape[2:]) <= CROP_PADDING:
            raise ValueError(
                f"Images {tuple(images_uint8.shape[2:])} are too small for a random crop "
                f"with padding {CROP_PADDING}."
            )
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.augment = augment
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.part: tuple[int, int] | None = None

    def shard(self, rank: int, world_size: int) -> Batches:
        """This rank's share of every batch, for data-parallel training.

        The shard draws the order and the augmentation of each **global** batch exactly as
        the whole does (from the shared ``generator``) and yields the ``rank``-th of
        ``world_size`` contiguous, equal parts of it: the union over the ranks of a global
        batch is the single-process batch, image for image, and ``len`` is unchanged (every
        rank takes the same number of steps). The images and the generator are shared.

        Raises:
            ValueError: ``rank`` outside ``[0, world_size)``, or a batch that does not split
                into equal parts (``batch_size`` not divisible by ``world_size``, or a last
                incomplete batch that does not, without ``drop_last``).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size}).")
        last = len(self.labels) % self.batch_size
        if self.batch_size % world_size or (not self.drop_last and last % world_size):
            raise ValueError(
                f"A batch of {self.batch_size} images (last batch: {last or self.batch_size}) "
                f"does not split into {world_size} equal shares: choose a batch_size "
                f"divisible by the {world_size} processes (the global batch is the same as "
                "with one process)."
            )
        part = copy.copy(self)
        part.part = (rank, world_size)
        return part

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.augment:
                x, index = self._augmented(index)
            else:
                if self.part is not None:
                    index = index[distributed.part_of(len(index), *self.part)]
                x = self.images[index.to(self.device)]
            x = to_unit(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[index.to(self.device)]

    def _augmented(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Random crop (pad 4, reflect) + flip of ``images[index]`` as one uint8 gather, and
        the indices gathered (a shard draws for the whole global batch and keeps its part)."""
        size = len(index)
        height, width = self.images.shape[2:]
        shift = torch.randint(0, 2 * CROP_PADDING + 1, (size, 2), generator=self.generator)
        flip = torch.randint(0, 2, (size, 1), generator=self.generator).bool()
        if self.part is not None:
            keep = distributed.part_of(size, *self.part)
            index, shift, flip = index[keep], shift[keep], flip[keep]
        rows = _reflect(shift[:, :1] - CROP_PADDING + torch.arange(height), height)
        cols = _reflect(shift[:, 1:] - CROP_PADDING + torch.arange(width), width)
        cols = torch.where(flip, cols.flip(1), cols)
        dev = self.device
        images = self.images[
            index.to(dev)[:, None, None, None],
            torch.arange(3, device=dev)[None, :, None, None],
            rows.to(dev)[:, None, :, None],
            cols.to(dev)[:, None, None, :],
        ]
        return images, index


def _reflect(coords: Tensor, size: int) -> Tensor:
    """Map coordinates in ``[-pad, size - 1 + pad]`` into ``[0, size)`` by reflection
    (edge pixel not repeated, as ``torch.nn.functional.pad(mode="reflect")``)."""
    coords = coords.abs()
    return torch.where(coords > size - 1, 2 * (size - 1) - coords, coords)


@dataclass
class LoopConfig:
    """Settings of :func:`fit` that are not the model's.

    Attributes:
        epochs: number of passes over ``batches`` (>= 1).
        desc: progress-bar and log label.
        resume_path: per-epoch resume checkpoint file; ``None`` disables resuming.
        max_batches_per_epoch: cap on batches per epoch (smoke runs); ``None`` = all.
        fingerprint: JSON-able description of the run (hyper-parameters, data size). A
            resume file whose fingerprint differs is ignored (logged) and training starts
            over. ``epochs``, ``max_batches_per_epoch`` and the number of batches are
            always part of the comparison.
        sync_every: the loss terms are copied to the host (a device sync on CUDA) and checked
            for NaN/inf every ``sync_every`` batches and at the end of each epoch; 1 on CPU
            costs nothing.
        progress: show tqdm progress bars.
    """

    epochs: int
    desc: str = "train"
    resume_path: str | None = None
    max_batches_per_epoch: int | None = None
    fingerprint: dict | None = None
    sync_every: int = 1
    progress: bool = True

    def steps_per_epoch(self, batches: Batches) -> int:
        """Optimizer steps per epoch: ``len(batches)`` capped by ``max_batches_per_epoch``.

        Use ``epochs * steps_per_epoch(batches)`` as the total steps of a per-batch
        learning-rate schedule.
        """
        n = len(batches)
        return n if self.max_batches_per_epoch is None else min(n, self.max_batches_per_epoch)


def fit(
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    train_step: Callable[[Tensor, Tensor], dict[str, float | Tensor]],
    batches: Batches,
    config: LoopConfig,
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] | None = None,
    evaluate: Callable[[int], dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Train for ``config.epochs`` epochs, with progress, history, NaN guard and resume.

    Each epoch: every module is put in ``train()`` mode; for each batch ``(x, y)`` of
    ``batches`` (float32 ``[B, 3, H, W]`` in ``[0, 1]``, int64 ``[B]``) ``train_step(x, y)``
    is called (it does ``zero_grad``/``backward``/``step`` itself) and then every scheduler
    is stepped **once per batch** (build schedulers for
    ``config.epochs * config.steps_per_epoch(batches)`` steps). After the epoch
    ``evaluate(epoch)`` (epoch counted from 1) adds columns to the history row; it chooses
    its own modes and ``no_grad`` (attacks need gradients). Then the resume file is written
    atomically. On success the resume file is deleted: the stage's output goes through the
    catalog.

    Inside a ``torch.distributed`` group of W processes (:mod:`atop.distributed`; the
    trainers run their forward passes through :func:`atop.distributed.data_parallel`
    wrappers of the modules): every rank iterates its share of each global batch
    (:meth:`Batches.shard`: ``batch_size`` must be divisible by W) with its own stream of the
    global random numbers (:func:`atop.distributed.decorrelate_ranks`); each row's training
    terms are the mean over the ranks of their epoch means; ``evaluate`` runs on every rank
    (the same weights; it must not use collectives) and rank 0's row is everyone's; rank 0
    alone shows progress, logs and writes the resume file, which holds every rank's random
    state and is read back by rank 0 and broadcast. The world size joins the fingerprint
    (a resume file is taken up by the same W only), and at the end every rank holds rank
    0's weights.

    Args:
        modules: every module whose state must be checkpointed (trainable or not).
        optimizers: every optimizer (the first one's learning rate is logged as ``lr``).
        train_step: ``(x, y) -> {"loss": ..., other scalar terms}`` (floats or 0-dim tensors).
        batches: the training batches, re-iterated each epoch.
        config: epochs, resume file, caps, progress.
        schedulers: learning-rate schedulers, stepped after every batch.
        evaluate: ``epoch -> {column: float}`` called after each epoch.

    Returns:
        One row per epoch (resumed epochs included): ``epoch``, the mean over the epoch's
        batches of every ``train_step`` term, ``lr`` (first optimizer's first group, as used
        by the epoch's last step), ``seconds`` (wall-clock of the training part of the
        epoch, evaluation excluded) and the ``evaluate`` columns.

    Raises:
        NonFiniteLossError: a term is NaN or infinite (the last good resume file stays).
        atop.checkpoint.CheckpointError: the resume file exists but is corrupted.
        ValueError: ``epochs < 1``, no optimizer, or ``train_step`` returned no ``loss``.
    """
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}.")
    if not optimizers:
        raise ValueError("fit needs at least one optimizer (its lr goes into the history).")
    schedulers = schedulers or {}
    steps = config.steps_per_epoch(batches)
    world = distributed.world_size()
    main = distributed.is_main()
    fingerprint = {
        "user": config.fingerprint,
        "epochs": config.epochs,
        "max_batches_per_epoch": config.max_batches_per_epoch,
        "batches_per_epoch": len(batches),
    }
    local = batches
    if world > 1:
        fingerprint["world_size"] = world
        local = batches.shard(distributed.rank(), world)
        distributed.decorrelate_ranks()
    fingerprint = _json_normal(fingerprint)
    first_optimizer = next(iter(optimizers.values()))

    history: list[dict[str, float]] = []
    start = 1
    if config.resume_path is not None:
        state = _load_resume(config.resume_path, fingerprint) if main else None
        state = distributed.broadcast_object(state)
        if state is not None:
            _restore(state, modules, optimizers, schedulers, batches)
            history = [dict(row) for row in state["history"]]
            start = int(state["epoch"]) + 1
            if main:
                log.info("%s: resuming from %s at epoch %d", config.desc, config.resume_path, start)

    epoch_bar = progress_bar(
        range(start, config.epochs + 1),
        config.progress and main,
        desc=config.desc,
        unit="epoch",
        initial=start - 1,
        total=config.epochs,
    )
    for epoch in epoch_bar:
        for module in modules.values():
            module.train()
        began = time.perf_counter()
        terms, lr = _train_epoch(
            train_step, local, steps, schedulers, first_optimizer, epoch, config, main
        )
        terms = distributed.all_reduce_mean(terms)
        row: dict[str, float] = {"epoch": epoch, **terms, "lr": lr}
        row["seconds"] = time.perf_counter() - began
        if evaluate is not None:
            row.update({key: float(value) for key, value in evaluate(epoch).items()})
        row = distributed.broadcast_object(row)
        history.append(row)
        epoch_bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "epoch"})
        if main:
            log.info(
                "%s epoch %d/%d: %s",
                config.desc,
                epoch,
                config.epochs,
                ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
            )
        if config.resume_path is not None:
            rngs = distributed.all_gather_objects(_rng_state(batches)) if world > 1 else None
            if main:
                snapshot = _snapshot(
                    epoch, modules, optimizers, schedulers, batches, history, fingerprint
                )
                if rngs is not None:
                    snapshot["rank_rng"] = rngs  # every rank's own random state
                save_atomic(snapshot, config.resume_path)
    epoch_bar.close()
    if world > 1:
        distributed.broadcast_module_states(modules.values())
    if config.resume_path is not None and main:
        Path(config.resume_path).unlink(missing_ok=True)
    distributed.barrier()
    return history


def training_seconds(history: list[dict[str, float]]) -> float:
    """The one training-time count of the project: the sum of the epochs' ``seconds`` (the
    training part of each epoch, per-epoch evaluation excluded, resumed epochs included)."""
    return float(sum(row["seconds"] for row in history))


def _train_epoch(
    train_step: Callable[[Tensor, Tensor], dict[str, float | Tensor]],
    batches: Batches,
    steps: int,
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
    first_optimizer: torch.optim.Optimizer,
    epoch: int,
    config: LoopConfig,
    show: bool = True,
) -> tuple[dict[str, float], float]:
    """One pass over ``batches``; returns the mean of each term and the last step's lr."""
    sums: dict[str, float] = {}
    pending: list[tuple[int, dict[str, float | Tensor]]] = []
    done = 0
    lr = float(first_optimizer.param_groups[0]["lr"])

    def flush() -> None:
        for batch_index, out in pending:
            values = _to_floats(out)
            for name, value in values.items():
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"{config.desc}: term '{name}' is {value} at epoch {epoch}, batch "
                        f"{batch_index + 1}. Training stopped; the resume checkpoint of the "
                        f"last good epoch ({config.resume_path}) is kept. Check the inputs, "
                        "or lower the learning rate: rerunning with unchanged settings resumes "
                        "from that epoch (and diverges again), while any changed training "
                        "setting, such as the learning rate, starts over from epoch 1."
                    )
                sums[name] = sums.get(name, 0.0) + value
        if pending:
            bar.set_postfix(loss=f"{sums['loss'] / (pending[-1][0] + 1):.4f}", refresh=False)
        pending.clear()

    bar = progress_bar(
        itertools.islice(batches, steps),
        config.progress and show,
        total=steps,
        desc=f"{config.desc} {epoch}/{config.epochs}",
        unit="batch",
        leave=False,
    )
    for x, y in bar:
        lr = float(first_optimizer.param_groups[0]["lr"])
        out = train_step(x, y)
        if "loss" not in out:
            raise ValueError(
                f"train_step must return a dict with a 'loss' term, got keys {sorted(out)}."
            )
        pending.append((done, {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}))
        for scheduler in schedulers.values():
            scheduler.step()
        done += 1
        if len(pending) >= config.sync_every:
            flush()
    flush()
    bar.close()
    return {name: total / max(done, 1) for name, total in sums.items()}, lr


def _to_floats(out: dict[str, float | Tensor]) -> dict[str, float]:
    """Scalar terms to Python floats with a single host transfer for the tensors."""
    tensors = {k: v for k, v in out.items() if torch.is_tensor(v)}
    values = {k: float(v) for k, v in out.items() if not torch.is_tensor(v)}
    if tensors:
        host = torch.stack([v.float().reshape(()) for v in tensors.values()]).tolist()
        values.update(zip(tensors, host, strict=True))
    return {k: values[k] for k in out}


def _json_normal(obj: Any) -> Any:
    """A JSON round trip (tuples -> lists, keys -> str) so fingerprints compare by value."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _load_resume(path: str, fingerprint: Any) -> dict | None:
    """The resume state at ``path`` if it exists and matches ``fingerprint``, else ``None``."""
    if not Path(path).is_file():
        return None
    state = load_safe(path)
    saved = _json_normal(state.get("fingerprint")) if isinstance(state, dict) else None
    if saved != fingerprint:
        log.warning(
            "Resume file %s was written by a different configuration; ignoring it and "
            "training from scratch (it is overwritten after the first epoch).",
            path,
        )
        return None
    return state


def _snapshot(
    epoch: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
    batches: Batches,
    history: list[dict[str, float]],
    fingerprint: Any,
) -> dict[str, Any]:
    """Everything needed to continue after ``epoch``: tensors and primitives only."""
    return {
        "epoch": epoch,
        "modules": {name: m.state_dict() for name, m in modules.items()},
        "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
        "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
        "history": history,
        "rng": _rng_state(batches),
        "fingerprint": fingerprint,
    }


def _rng_state(batches: Batches) -> dict[str, Any]:
    """Every random-number-generator state of this process (tensors and primitives)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_rng_to_primitive(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "batches": batches.generator.get_state() if batches.generator is not None else None,
    }


def _restore(
    state: dict[str, Any],
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
    batches: Batches,
) -> None:
    """Load a :func:`_snapshot` back into the live objects and RNGs."""
    for group, live in (
        ("modules", modules),
        ("optimizers", optimizers),
        ("schedulers", schedulers),
    ):
        if set(state[group]) != set(live):
            raise ValueError(
                f"Resume file holds {group} {sorted(state[group])} but the run has "
                f"{sorted(live)}: delete the resume file or fix the trainer."
            )
        for name, obj in live.items():
            obj.load_state_dict(state[group][name])
    rng = state["rng"]
    if len(state.get("rank_rng", ())) == distributed.world_size():
        rng = state["rank_rng"][distributed.rank()]  # a data-parallel run: this rank's own
    torch.set_rng_state(rng["torch"])
    np_rng = rng["numpy"]
    np.random.set_state(
        (
            np_rng["name"],
            np_rng["keys"].numpy().astype(np.uint32),
            np_rng["pos"],
            np_rng["has_gauss"],
            np_rng["cached_gaussian"],
        )
    )
    random.setstate(_python_rng_from_primitive(rng["python"]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if batches.generator is not None and rng["batches"] is not None:
        batches.generator.set_state(rng["batches"])


def _python_rng_to_primitive(state: tuple) -> dict[str, Any]:
    version, internal, gauss_next = state
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def _python_rng_from_primitive(state: dict[str, Any]) -> tuple:
    return (state["version"], tuple(state["internal"]), state["gauss_next"])


def accuracy(
    model: nn.Module,
    images_uint8: Tensor,
    labels: Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    progress: bool = False,
) -> float:
    """Top-1 accuracy of ``model`` on uint8 images, in eval mode without gradients, in float32
    (judging is never done in bf16).

    Args:
        model: maps float32 ``[B, 3, H, W]`` in [0, 1] to logits ``[B, C]``.
        images_uint8: uint8 ``[N, 3, H, W]``.
        labels: int64 ``[N]``.
        batch_size: images per forward pass.
        device: where to run (the model must already be there).
        channels_last: feed channels-last batches.
        progress: show a tqdm bar.

    Returns:
        Fraction of correctly classified images, in [0, 1].

    Raises:
        TypeError / ValueError: as :class:`Batches` for malformed inputs.
    """
    device = torch.device(device)
    batches = Batches(
        images_uint8, labels, batch_size, shuffle=False, device=device, channels_last=channels_last
    )
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode():
        for x, y in progress_bar(batches, progress, desc="accuracy", leave=False):
            correct += (model(x).argmax(dim=1) == y).sum()
    model.train(was_training)
    return correct.item() / max(len(labels), 1)

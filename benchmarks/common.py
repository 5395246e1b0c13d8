"""What every sub-command shares: real CIFAR-10 batches, the device and argument helpers,
the alternating side-by-side timing loop, FLOP counting, the base models and the output
formatting. Nothing here runs a benchmark."""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from atop.data import to_unit
from atop.training import resolve_device

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: CIFAR-10's class names (torchvision's order).
CLASS_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
N_CLASSES = len(CLASS_NAMES)
#: The base profile's checkpoints (what ``make run`` writes).
BASE_MODELS = PROJECT_ROOT / "data" / "06_models" / "cifar10" / "base"


# --------------------------------------------------------------------------- arguments


def parser(name: str, doc: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of sub-command ``name`` (its help is ``doc``'s first paragraph)."""
    summary = (doc or "").strip().split("\n\n")[0]
    return argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=summary)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0, a fraction such as ``8/255`` accepted."""
    top, _, bottom = text.partition("/")
    try:
        value = float(top) / float(bottom) if bottom else float(top)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated list, each item among ``allowed`` (exits with the valid ones)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        sys.exit(f"unknown {what} {unknown or text!r}: choose among {', '.join(allowed)}")
    return items


def add_common(parser: argparse.ArgumentParser) -> None:
    """``--device`` (auto = cuda when available) and ``--threads`` (torch CPU threads)."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and resolve ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def require_files(*paths: str | os.PathLike, why: str) -> None:
    """Exit with a message naming every missing file (``why``: what they are needed for)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: {why}")


#: parameter block -> its typed class (``module:Class``), built without Kedro's registry.
BLOCKS = {
    "classifier_pretraining": "atop.trainers.classifier:ClassifierParams",
    "purifier_pretraining": "atop.trainers.purifier:PurifierParams",
    "atop_finetuning": "atop.trainers.atop:AToPParams",
    "adversarial_training": "atop.trainers.pgd_at:PGDATParams",
    "rvs": "atop.trainers.rvs:RvSParams",
    "evaluation": "atop.evaluation.suite:EvalParams",
    "convergence": "atop.evaluation.convergence:ConvergenceParams",
}


class _Blocks(dict):
    """The typed parameter blocks of a profile, each built on first use from the resolved
    YAML (:func:`atop.dvc_params.resolve_parameters`) with its class's ``from_dict``, as
    ``kedro run`` builds it: a block being edited elsewhere does not stop a benchmark that
    does not read it."""

    def __init__(self, profile: str) -> None:
        super().__init__()
        self.profile = profile
        self.raw: dict[str, Any] | None = None

    def raw_block(self, key: str) -> dict[str, Any]:
        """Block ``key`` as the resolved YAML gives it (plain values, not validated)."""
        from atop.dvc_params import resolve_parameters

        if self.raw is None:
            self.raw = resolve_parameters(PROJECT_ROOT, self.profile)
        if key not in self.raw:
            raise KeyError(f"profile {self.profile!r} has no parameter block {key!r}")
        return self.raw[key]

    def __missing__(self, key: str) -> Any:
        import importlib

        if key not in BLOCKS:
            raise KeyError(f"no typed class for parameter block {key!r}: see BLOCKS")
        module, name = BLOCKS[key].split(":")
        self[key] = getattr(importlib.import_module(module), name).from_dict(self.raw_block(key))
        return self[key]


@functools.cache
def profile_parameters(profile: str = "base") -> dict[str, Any]:
    """The typed parameter blocks of a profile (``classifier_pretraining``, ...; see
    :data:`BLOCKS`), as ``kedro run --env <profile>`` builds them."""
    return _Blocks(profile)


# --------------------------------------------------------------------------- real data


def cifar10(n: int, train: bool, root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """The first ``n`` real CIFAR-10 images of a split: uint8 ``[n, 3, 32, 32]``, int64 ``[n]``.

    ``root``: the folder holding ``cifar-10-batches-py``; default ``$ATOP_DATA_ROOT``, then
    ``../shared/datasets`` beside the project. Never downloaded: exits when it is not there.
    """
    from torchvision.datasets import CIFAR10

    root = Path(
        root or os.environ.get("ATOP_DATA_ROOT", PROJECT_ROOT.parent / "shared" / "datasets")
    )
    if not (root / "cifar-10-batches-py").is_dir():
        sys.exit(f"CIFAR-10 not found under {root}: set ATOP_DATA_ROOT (or --data-root).")
    dataset = CIFAR10(root=str(root), train=train, download=False)
    images = torch.from_numpy(np.ascontiguousarray(dataset.data[:n])).permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor(dataset.targets[:n], dtype=torch.int64)


def training_batch(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` real CIFAR-10 training images (float32 ``[n, 3, 32, 32]`` in
    ``[0, 1]``) and labels (int64 ``[n]``) on ``device``."""
    images, labels = cifar10(n, train=True)
    return to_unit(images).to(device), labels.to(device)


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    runs: dict[Any, Callable[[], Any]], repeats: int, batches: int, device: torch.device
) -> dict[Any, float]:
    """Median seconds of ``batches`` calls of each (warmed-up) run, the runs taking turns
    ``repeats`` times so that a change of load hits all of them alike."""
    return {
        key: wall for key, (wall, _) in alternate_clocks(runs, repeats, batches, device).items()
    }


def alternate_clocks(
    runs: dict[Any, Callable[[], Any]], repeats: int, batches: int, device: torch.device
) -> dict[Any, tuple[float, float]]:
    """:func:`alternate` on two clocks: the median wall seconds and the median CPU seconds
    of the process divided by its torch threads (the wall time the run would take with the
    cores to itself; meaningful under ``OMP_WAIT_POLICY=PASSIVE``, where waiting threads
    sleep instead of spinning)."""
    times: dict[Any, list[tuple[float, float]]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(batches):
                run()
            sync(device)
            cpu = (time.process_time() - cpu) / torch.get_num_threads()
            times[key].append((time.perf_counter() - wall, cpu))
    return {
        key: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
        for key, values in times.items()
    }


class _NoModuleTracker:
    """Stands in for FlopCounterMode's module tracker, whose hooks refuse
    ``torch.autograd.grad`` (what torchattacks calls): every FLOP counts as global."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModuleTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, forward and backward, as
    :class:`torch.utils.flop_counter.FlopCounterMode` counts them; attacks included)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()
    with counter:
        fn()
    return counter.get_total_flops()


# --------------------------------------------------------------------------- base models


def purifier_step(generator: nn.Module, discriminator: nn.Module, device: torch.device):
    """The purifier's GAN update (:class:`atop.trainers.purifier.PurifierStep`) with RT2 and
    the paper's Adam (lr 1e-4, betas (0.5, 0.999)), L1 and GAN weights 1."""
    from atop.trainers.purifier import PurifierStep
    from atop.transforms import RandomTransform

    adam = {"lr": 1e-4, "betas": (0.5, 0.999)}
    return PurifierStep(
        generator,
        discriminator,
        RandomTransform("rt2"),
        torch.optim.Adam(generator.parameters(), **adam),
        torch.optim.Adam(discriminator.parameters(), **adam),
        device=device,
    )


def base_models(device: torch.device) -> dict[str, nn.Module]:
    """The base profile's models with random weights (seed 0), frozen, eval mode:
    ``defense`` (resnet-fast width 16 behind the gated U-Net cnum 32 and RT2) and
    ``classifier``."""
    from atop.defense import PurifiedClassifier
    from atop.models import build_classifier
    from atop.models.purifier import build_purifier
    from atop.transforms import RandomTransform

    torch.manual_seed(0)
    f = build_classifier("resnet-fast", N_CLASSES, width=16)
    g, _ = build_purifier({"cnum": 32})
    defense = PurifiedClassifier(f, g, RandomTransform("rt2"))
    return {
        "defense": defense.to(device).eval().requires_grad_(False),
        "classifier": f.to(device).eval().requires_grad_(False),
    }


# --------------------------------------------------------------------------- output

#: Per-image rules of :func:`verdict`.
RULES = ("first", "worst_of_n", "single")


def verdict(draws: Tensor, rule: str) -> Tensor:
    """Per-image score of bool ``[N, D]`` per-draw verdicts: ``first`` (the first draw's,
    bool), ``worst_of_n`` (right on every draw, bool) or ``single`` (the fraction of draws
    right, float)."""
    if rule == "first":
        return draws[:, 0].bool()
    if rule == "worst_of_n":
        return draws.all(dim=1)
    if rule == "single":
        return draws.float().mean(dim=1)
    raise ValueError(f"unknown rule {rule!r}: use one of {RULES}")


def percent(fraction: float, digits: int = 2) -> str:
    """``0.1234`` -> ``"12.34 %"``."""
    return f"{100 * fraction:.{digits}f} %"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (first column left-aligned, the others right-aligned), as
    docs/benchmarks.md quotes them."""
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|---|" + "---:|" * (len(headers) - 1))
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

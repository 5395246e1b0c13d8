"""Benchmarks of the project, one section per component.

Usage::

    .venv/bin/python benchmarks/benchmark.py <section> [options]
    .venv/bin/python benchmarks/benchmark.py classifier --images 4096 --repeats 3

Sections (one function each, registered in ``SECTIONS``):

* ``classifier``: training throughput (images/s) of the shared loop
  :func:`atop.training.fit` against a bare PyTorch loop, on the same model, batch size and
  real CIFAR-10 images. Both loops start from the classifier_pretraining stage's setup
  (:func:`atop.classifier_training.prepare_training`) and run its ``train_step``
  (:func:`atop.pipelines.classifier_pretraining.nodes.classifier_train_step`, at a
  constant learning rate); the bare loop iterates over
  a pre-converted float tensor with a random permutation and steps the scheduler, fit adds
  uint8 -> float conversion per batch, progress bars, the loss sync and NaN check, the
  history and an atomic resume checkpoint per epoch. ``fit + augment`` adds the random
  crop + flip. Runs alternate (bare, fit, fit + augment, repeat) so CPU contention from
  other processes hits all of them alike; the median is reported, as wall-clock images/s
  and as images per CPU-second of the process (steadier on a shared CPU, exact with
  ``--threads 1``).

Real data: CIFAR-10 from ``$ATOP_DATA_ROOT`` or ``../shared/datasets`` (read-only).
On a shared CPU set ``OMP_WAIT_POLICY=PASSIVE``: with the default (active) wait policy,
oversubscribed OpenMP threads spin and timings collapse.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from atop.classifier_training import prepare_training
from atop.models import build_classifier
from atop.pipelines.classifier_pretraining.nodes import classifier_train_step
from atop.training import fit, resolve_device, seed_everything

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: CIFAR-10's class names (torchvision's order).
CLASS_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def data_root() -> Path:
    """The shared real datasets folder."""
    root = Path(os.environ.get("ATOP_DATA_ROOT", PROJECT_ROOT.parent / "shared" / "datasets"))
    if not (root / "cifar-10-batches-py").is_dir():
        sys.exit(f"CIFAR-10 not found under {root}: set ATOP_DATA_ROOT.")
    return root


def cifar10_train(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` real CIFAR-10 training images (uint8 [n, 3, 32, 32]) and labels."""
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root=str(data_root()), train=True, download=False)
    images = torch.from_numpy(np.ascontiguousarray(ds.data[:n])).permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor(ds.targets[:n], dtype=torch.int64)


def classifier(argv: list[str]) -> None:
    """Section ``classifier``: throughput of ``fit`` vs a bare loop (images/s)."""
    parser = argparse.ArgumentParser(prog="benchmark.py classifier")
    parser.add_argument("--arch", default="resnet-fast")
    parser.add_argument("--width", type=int, default=16, help="resnet-fast / preact width")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=2048, help="images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images, labels = cifar10_train(args.images)
    data = {"images": images, "labels": labels}
    widths = {"width": args.width} if args.arch in {"resnet-fast", "preact-resnet18"} else {}
    params = {  # the classifier_pretraining recipe, at a constant learning rate
        "arch": args.arch,
        "arch_kwargs": widths,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "label_smoothing": 0.1,
        "seed": 0,
        "device": args.device,
        "amp": True,
        "channels_last": True,
        "progress": False,
    }

    def make(augment: bool, resume_path: str | None = None):
        """A fresh seeded setup (:func:`atop.classifier_training.prepare_training`, as the
        classifier_pretraining stage), its scheduler and the stage's train_step."""
        run_params = {**params, "augment": augment, "resume_path": resume_path}
        # fit runs without evaluation here: the one monitor image is never scored
        setup = prepare_training(
            data, data, CLASS_NAMES, run_params, monitor_indices=[0], desc="bench", decay_all=True
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(setup.optimizer, lambda step: 1.0)
        train_step = classifier_train_step(
            setup.classifier, setup.optimizer, device, params["amp"], params["label_smoothing"]
        )
        return setup, scheduler, train_step

    float_images = (images.float() / 255).to(device).contiguous(memory_format=torch.channels_last)
    device_labels = labels.to(device)

    def bare() -> None:
        setup, scheduler, train_step = make(augment=False)
        setup.classifier.train()
        for _ in range(args.epochs):
            order = torch.randperm(len(labels), generator=setup.batches.generator).to(device)
            for start in range(0, len(labels) - args.batch_size + 1, args.batch_size):
                index = order[start : start + args.batch_size]
                train_step(float_images[index], device_labels[index])
                scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def with_fit(augment: bool) -> Callable[[], None]:
        def run() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                setup, scheduler, train_step = make(augment, f"{tmp}/resume.pt")
                fit(
                    modules={"classifier": setup.classifier},
                    optimizers={"sgd": setup.optimizer},
                    schedulers={"lr": scheduler},
                    train_step=train_step,
                    batches=setup.batches,
                    config=setup.loop,
                )
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    runs = {"bare loop": bare, "fit": with_fit(False), "fit + augment": with_fit(True)}
    n_images = args.epochs * (len(labels) // args.batch_size) * args.batch_size
    bare()  # warm-up (oneDNN / cuDNN kernel selection)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            began, cpu_began = time.perf_counter(), time.process_time()
            run()
            seconds[name].append(time.perf_counter() - began)
            cpu_seconds[name].append(time.process_time() - cpu_began)
    print(
        f"classifier training throughput: {args.arch} "
        f"{widths or ''} batch {args.batch_size}, {n_images} images per run, "
        f"device {device}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    reference = n_images / statistics.median(seconds["bare loop"])
    cpu_reference = n_images / statistics.median(cpu_seconds["bare loop"])
    for name, times in seconds.items():
        rate = n_images / statistics.median(times)
        cpu_rate = n_images / statistics.median(cpu_seconds[name])
        print(
            f"  {name:14s} {rate:8.1f} images/s ({rate / reference:6.1%} of bare) | "
            f"{cpu_rate:8.1f} images per CPU-second ({cpu_rate / cpu_reference:6.1%} of bare)"
            f" | wall: {', '.join(f'{t:.1f}s' for t in times)}"
        )


def atop(argv: list[str]) -> None:
    """AToP fine-tuning throughput (images/s) with FGSM and PGD-10 against f(g(t(.))).

    The base profile's models (resnet-fast width 16, native purifier cnum 32, RT2) and one
    full fine-tuning step per batch: craft x', one D step, one g step with
    L_org(x') + 0.1 * CE (paper Eq. 9). Prints images/s and the projected time per epoch.
    """
    from atop.attacks import build_attack
    from atop.defense import PurifiedClassifier
    from atop.models.purifier import build_purifier
    from atop.pipelines.atop_finetuning.nodes import atop_train_step
    from atop.purifier_training import PurifierStep
    from atop.transforms import RandomTransform

    parser = argparse.ArgumentParser(prog="benchmark.py atop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--cnum", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    seed_everything(0)
    images, labels = cifar10_train(args.batch_size)
    x, y = images.float().div(255).to(device), labels.to(device)
    f = build_classifier("resnet-fast", 10).to(device).eval().requires_grad_(False)
    eps = 8 / 255
    attacks = {
        "fgsm": {"name": "fgsm", "eps": eps},
        "pgd-10": {
            "name": "pgd",
            "norm": "Linf",
            "eps": eps,
            "alpha": 2 / 255,
            "steps": 10,
            "eot_iter": 1,
        },
    }
    print(
        f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"threads {torch.get_num_threads()}, batch {args.batch_size}, purifier cnum {args.cnum}"
    )
    for label, spec in attacks.items():
        g, d = build_purifier({"cnum": args.cnum})
        g, d = g.to(device), d.to(device)
        t = RandomTransform("rt2")
        attack = build_attack(PurifiedClassifier(f, g, t), spec, 10)
        adam = {"lr": 1e-4, "betas": (0.5, 0.999)}
        step = PurifierStep(
            g,
            d,
            t,
            torch.optim.Adam(g.parameters(), **adam),
            torch.optim.Adam(d.parameters(), **adam),
            device=device,
        )
        train_step = atop_train_step(f, step, attack, lambda_cls=0.1)
        train_step(x, y)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(args.batches):
            train_step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = args.batches * args.batch_size / (time.perf_counter() - began)
        print(
            f"  {label:7s} against f(g(t(.))): {rate:7.1f} images/s | epoch of 6,400 images "
            f"(base) {6400 / rate / 60:6.1f} min | of 50,000 images {50000 / rate / 60:7.1f} min"
        )


def evaluation(argv: list[str]) -> None:
    """Attack throughput of PGD-EOT on the defended model (see evaluation_bench.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from evaluation_bench import evaluation as run

    run(argv)


SECTIONS: dict[str, Callable[[list[str]], None]] = {
    "classifier": classifier,
    "atop": atop,
    "evaluation": evaluation,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SECTIONS:
        sys.exit(f"usage: benchmark.py <section> [options]; sections: {', '.join(SECTIONS)}")
    SECTIONS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

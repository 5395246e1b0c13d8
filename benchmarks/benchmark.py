"""Benchmarks of the project: one entry point, one section per component.

Usage::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/benchmark.py <section> [options]
    .venv/bin/python benchmarks/benchmark.py classifier --images 4096 --repeats 3
    .venv/bin/python benchmarks/benchmark.py <section> --help

Sections (one argparse function each, registered in ``SECTIONS``):

* ``classifier``: training throughput (images/s) of the shared loop
  :func:`atop.training.fit` against a bare PyTorch loop, on the same model, batch size and
  real CIFAR-10 training images. Both loops start from the classifier_pretraining stage's
  setup (:func:`atop.trainers.common.prepare_training` with the stage's typed parameters,
  ``classifier_pretraining`` of the base profile, overridden with the benchmark's settings
  at a constant learning rate) and run its step
  (:func:`atop.trainers.classifier.classifier_step`). The bare loop iterates over a
  pre-converted float tensor with a random permutation and steps the scheduler; ``fit`` adds
  the uint8 -> float conversion per batch, progress bars, the loss sync and NaN check, the
  history and an atomic resume checkpoint per epoch; ``fit + augment`` adds the random crop +
  flip. Runs alternate (bare, fit, fit + augment, repeat) so CPU contention from other
  processes hits all of them alike; the median is reported, as wall-clock images/s and as
  images per CPU-second of the process (steadier on a shared CPU, exact with ``--threads 1``).
* ``atop``: AToP fine-tuning throughput (images/s) with FGSM and PGD-10 against
  ``f(g(t(.)))`` (:func:`atop.trainers.atop.atop_train_step`): craft x', one D step, one g
  step with L_org(x') + 0.1 * CE (paper Eq. 9), and the projected time per epoch.
* ``purifier``: throughput (images/s) of one purifier pre-training step
  (:class:`atop.trainers.purifier.PurifierStep`: RT2, one D step + one g step, Adam lr 1e-4,
  betas (0.5, 0.999)) of the native-resolution purifier and of the authors' 256-px
  "upsample" variant, at DeepFillv2's cnum 48 and at the project's default cnum.
* ``evaluation``: throughput of PGD-EOT on the base defended model ``f(g(t(x)))`` and on the
  bare classifier (image-steps/s, forward-backward passes/s, forward passes/s of the
  fresh-draw judging), and the projected evaluation time of the base and paper protocols
  (``evaluation`` of each profile's typed parameters) on this machine.
* ``precision``: float32 vs bf16 autocast for every training step and attack.
* ``layout``: the classifier in NCHW vs channels-last (NHWC) for the same workloads, bf16.
* ``compile``: ``torch.compile`` and ``channels_last`` against eager, bf16, for PGD-EOT on
  the defended model and for the purifier's training step (:func:`compile_wins`).
* ``eot-packing``: EOT draws of a small batch packed into one pass (the survivors attack)
  against sequential passes on trained checkpoints: time and a paired strength check.
* ``processes``: one process with 2 threads vs two processes with 1 thread each, and EOT
  passes of 128 rows, for PGD-EOT on the defended model (:func:`processes`).
* ``runs``: one defense in two pipeline runs, paired on the same images (exact McNemar).
* ``stages``: training throughput of each stage of the last pipeline run, from its own
  records (``data/08_reporting/<dataset>/<profile>/<stage>_metrics.json``,
  ``params/<profile>.yaml``).

Real data: CIFAR-10 from ``$ATOP_DATA_ROOT`` or ``../shared/datasets`` (read-only, never
downloaded), read by :func:`cifar10`, the one loader of every section. Random weights
everywhere: throughput does not depend on them. On a shared CPU set
``OMP_WAIT_POLICY=PASSIVE``: with the default (active) wait policy, oversubscribed OpenMP
threads spin and timings collapse (measured: 4x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from atop.data import to_unit
from atop.training import fit, resolve_device, seed_everything

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: CIFAR-10's class names (torchvision's order).
CLASS_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
N_CLASSES = len(CLASS_NAMES)


# --------------------------------------------------------------------------- shared helpers


def cifar10(n: int, train: bool, root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """The first ``n`` real CIFAR-10 images of a split: uint8 ``[n, 3, 32, 32]``, int64 ``[n]``.

    Args:
        n: number of images (the first ones of the split).
        train: the training split (else the test split).
        root: folder holding ``cifar-10-batches-py``; default ``$ATOP_DATA_ROOT``, then
            ``../shared/datasets`` beside the project. Never downloaded.

    Exits with a message when CIFAR-10 is not there. Cast with :func:`atop.data.to_unit`.
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


def add_common(parser: argparse.ArgumentParser) -> None:
    """``--device`` (auto = cuda when available) and ``--threads`` (torch CPU threads)."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and resolve ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def training_batch(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` real CIFAR-10 training images (float32 ``[n, 3, 32, 32]`` in
    ``[0, 1]``) and labels (int64 ``[n]``) on ``device``."""
    images, labels = cifar10(n, train=True)
    return to_unit(images).to(device), labels.to(device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    runs: dict[Any, Callable[[], Any]], repeats: int, batches: int, device: torch.device
) -> dict[Any, float]:
    """Median seconds of ``batches`` calls of each (warmed-up) run, the runs taking turns
    ``repeats`` times so that a change of load hits all of them alike."""
    times: dict[Any, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            sync(device)
            began = time.perf_counter()
            for _ in range(batches):
                run()
            sync(device)
            times[key].append(time.perf_counter() - began)
    return {key: statistics.median(values) for key, values in times.items()}


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


# --------------------------------------------------------------------------- classifier


def classifier(argv: list[str]) -> None:
    """Section ``classifier``: throughput of ``fit`` vs a bare loop (images/s)."""
    from atop.dvc_params import typed_parameters
    from atop.trainers.classifier import classifier_step
    from atop.trainers.common import prepare_training

    parser = argparse.ArgumentParser(prog="benchmark.py classifier")
    parser.add_argument("--arch", default="resnet-fast")
    parser.add_argument("--width", type=int, default=16, help="resnet-fast / preact width")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=2048, help="images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    add_common(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    images, labels = cifar10(args.images, train=True)
    data = {"images": images, "labels": labels}
    widths = {"width": args.width} if args.arch in {"resnet-fast", "preact-resnet18"} else {}
    # the classifier_pretraining recipe (base profile), at a constant learning rate
    params = typed_parameters(PROJECT_ROOT, "base")["classifier_pretraining"].replace(
        arch=args.arch,
        arch_kwargs=widths,
        epochs=args.epochs,
        batch_size=args.batch_size,
        train_images=None,
        optimizer={"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        schedule={"name": "constant", "warmup_fraction": 0.0, "milestones": [], "gamma": 0.1},
        label_smoothing=0.1,
        seed=0,
        device=args.device,
        amp=True,
        channels_last=True,
        max_batches_per_epoch=None,
        progress=False,
    )

    def make(augment: bool, resume_path: str | None = None):
        """A fresh seeded setup (as the classifier_pretraining stage), its scheduler and the
        stage's train step."""
        run_params = params.replace(augment=augment, resume_path=resume_path)
        # fit runs without evaluation here: the one monitor image is never scored
        setup = prepare_training(
            data, data, CLASS_NAMES, run_params, monitor_indices=[0], desc="bench", decay_all=True
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(setup.optimizer, lambda step: 1.0)
        train_step = classifier_step(
            setup.classifier, setup.optimizer, device, params.amp, params.label_smoothing
        )
        return setup, scheduler, train_step

    float_images = to_unit(images).to(device).contiguous(memory_format=torch.channels_last)
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
        sync(device)

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
            sync(device)

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


# --------------------------------------------------------------------------- atop


def atop(argv: list[str]) -> None:
    """Section ``atop``: AToP fine-tuning throughput (images/s), FGSM and PGD-10.

    The base profile's models (resnet-fast width 16, native purifier cnum 32, RT2) and one
    full fine-tuning step per batch: craft x' against f(g(t(.))), one D step, one g step with
    L_org(x') + 0.1 * CE (paper Eq. 9). Prints images/s and the projected time per epoch.
    The pipeline crafts x' in float32 (only the GAN update runs under bf16 autocast);
    ``--attack-amp`` also times each step with the attack under bf16 autocast, alternating with
    the float32 one (median of 3), and prints the ratio.
    """
    from atop.attacks import build_attack
    from atop.defense import PurifiedClassifier
    from atop.models import build_classifier
    from atop.models.purifier import build_purifier
    from atop.trainers.atop import atop_train_step

    parser = argparse.ArgumentParser(prog="benchmark.py atop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per attack")
    parser.add_argument("--cnum", type=int, default=32, help="purifier width")
    parser.add_argument(
        "--attack-amp", action="store_true", help="also the attack under bf16 autocast"
    )
    add_common(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    seed_everything(0)
    x, y = training_batch(args.batch_size, device)
    f = build_classifier("resnet-fast", N_CLASSES, width=16)
    f = f.to(device, memory_format=torch.channels_last)
    f = f.eval().requires_grad_(False)  # NHWC, as the fine-tuning arms load it
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
    from atop.training import autocast

    def train_step(spec: dict[str, Any], attack_amp: bool) -> Callable[[], Any]:
        g, d = build_purifier({"generator": "unet", "cnum": args.cnum, "attention": False})
        step = purifier_step(g.to(device), d.to(device), device)
        attack = build_attack(PurifiedClassifier(f, g, step.transform), spec, N_CLASSES)

        def craft(images: Tensor, labels: Tensor) -> Tensor:
            with autocast(device, attack_amp):
                return attack(images, labels)

        run = atop_train_step(f, step, craft, lambda_cls=0.1, reconstruction_target="clean")
        return lambda: run(x, y)

    precisions = (False, True) if args.attack_amp else (False,)
    for label, spec in attacks.items():
        runs = {amp: train_step(spec, amp) for amp in precisions}
        for run in runs.values():
            run()  # warm-up
        seconds = alternate(runs, 3 if args.attack_amp else 1, args.batches, device)
        rates = {amp: args.batches * args.batch_size / seconds[amp] for amp in runs}
        for amp, rate in rates.items():
            print(
                f"  {label:7s} ({'bf16' if amp else 'fp32'} attack) against f(g(t(.))): "
                f"{rate:7.1f} images/s | epoch of 12,800 images (base) {12800 / rate / 60:6.1f} "
                f"min | of 50,000 images {50000 / rate / 60:7.1f} min"
            )
        if args.attack_amp:
            print(f"  {label:7s} bf16 / fp32 attack: {rates[True] / rates[False]:5.2f}x")


# --------------------------------------------------------------------------- purifier


def purifier_throughput(
    variant: str, cnum: int, images: Tensor, steps: int, device: torch.device
) -> float:
    """Images/s of one purifier pre-training step (D update + g update) on ``images`` (float
    ``[B, 3, 32, 32]`` in [0, 1] on ``device``), ``steps`` timed steps after one warm-up."""
    from atop.models.purifier import build_purifier

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    torch.manual_seed(0)
    generator, discriminator = build_purifier({"variant": variant, "cnum": cnum})
    step = purifier_step(generator.to(device).train(), discriminator.to(device).train(), device)
    step(images, images)  # warm-up (allocations, kernel selection)
    sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        step(images, images)
    sync(device)
    return steps * len(images) / (time.perf_counter() - began)


def purifier(argv: list[str]) -> None:
    """Section ``purifier``: native 32 px vs the authors' 256-px upsampling (images/s)."""
    from atop.models.purifier import DEFAULT_CONFIG

    parser = argparse.ArgumentParser(prog="benchmark.py purifier")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, native variant")
    parser.add_argument("--upsample-steps", type=int, default=1, help="timed steps, 256 px")
    parser.add_argument("--cnums", default=f"48,{DEFAULT_CONFIG['cnum']}")
    parser.add_argument("--variants", default="native,upsample")
    parser.add_argument("--data-root", default=None, help="default: $ATOP_DATA_ROOT")
    add_common(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    images = to_unit(cifar10(args.batch_size, train=False, root=args.data_root)[0]).to(device)
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
        f"(real CIFAR-10 test images, RT2, D + G step)"
    )
    for cnum in (int(c) for c in args.cnums.split(",")):
        for variant in args.variants.split(","):
            steps = args.steps if variant == "native" else args.upsample_steps
            rate = purifier_throughput(variant, cnum, images, steps, device)
            print(f"variant={variant:9s} cnum={cnum:3d}: {rate:8.2f} img/s ({steps} timed steps)")


# --------------------------------------------------------------------------- evaluation


def base_models(device: torch.device) -> dict[str, nn.Module]:
    """The base profile's models, frozen, eval mode: ``defense`` and ``classifier``."""
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


def attack_throughput(
    model: nn.Module, images: Tensor, labels: Tensor, steps: int, eot_iter: int, batch_size: int
) -> dict[str, float]:
    """Time one PGD-EOT attack and one judging round on ``model`` (after a warm-up).

    Returns:
        ``{"seconds", "image_steps_per_s", "passes_per_s", "forward_passes_per_s"}``.
    """
    from atop.attacks import build_attack, draw_correct, run_attack

    device = images.device
    spec = {"name": "pgd", "norm": "Linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": steps}
    warm_up = build_attack(model, {**spec, "steps": 1, "eot_iter": 1}, N_CLASSES)
    run_attack(warm_up, images[:batch_size], labels[:batch_size], batch_size, progress=False)
    attack = build_attack(model, {**spec, "eot_iter": eot_iter}, N_CLASSES)
    sync(device)
    began = time.perf_counter()
    run_attack(attack, images, labels, batch_size, progress=False)
    sync(device)
    seconds = time.perf_counter() - began
    draws = 4
    began = time.perf_counter()
    draw_correct(model, images, labels, draws, batch_size)
    sync(device)
    forward_seconds = time.perf_counter() - began
    n = len(images)
    return {
        "seconds": seconds,
        "image_steps_per_s": n * steps / seconds,
        "passes_per_s": n * steps * eot_iter / seconds,
        "forward_passes_per_s": n * draws / forward_seconds,
    }


def attack_passes(
    spec: dict[str, Any], stochastic: bool, draws: int, n_classes: int
) -> tuple[float, float]:
    """(forward-backward, forward) passes per image of one attack entry, judging included.

    AutoAttack counts are upper bounds: every sub-attack on every image (in a run, the later
    sub-attacks only see the images still robust). Square counts as forward passes.
    """
    eot = spec.get("eot_iter", 1) if stochastic else 1
    judge = draws if stochastic else 1
    name = spec["name"]
    if name == "fgsm":
        return 1.0, judge
    if name in ("pgd", "bpda"):
        return float(spec["steps"] * eot), judge
    if name == "cw":
        return float(spec["steps"]), judge
    steps = spec["steps"]
    if spec["version"] == "rand":  # APGD-CE + APGD-DLR with EOT, each judged
        aa_eot = spec.get("eot_iter", 20) if stochastic else 1
        return 2.0 * steps * aa_eot, 3.0 * judge
    targets = n_classes - 1  # APGD-CE, APGD-T and FAB-T per target, Square
    backward = steps + targets * steps + 2 * targets * steps
    return float(backward), 5.0 * judge + spec.get("n_queries", 5000)


def protocol_passes(params: Any, n: int, stochastic: bool) -> dict[str, float]:
    """Passes per defense for a whole ``evaluation`` block (:class:`atop.evaluation.suite.
    EvalParams`) on ``n`` images (one defense)."""
    draws = params.draws if stochastic else 1
    sanity = params.sanity
    n_sanity = min(sanity.images or n, n)
    entries = params.entries
    backward = forward = 0.0
    runs = 0
    for entry in entries:
        if entry.name == "bpda" and not stochastic:
            continue
        b, f = attack_passes(entry.spec, stochastic, draws, N_CLASSES)
        backward, forward, runs = backward + b * n, forward + f * n, runs + 1
    forward += draws * n  # clean verdicts
    reference = next(e for e in entries if e.label == sanity.reference)
    ref_b, ref_f = attack_passes(reference.spec, stochastic, draws, N_CLASSES)
    extra = sum(1 for e in sanity.eps_sweep if e != 0 and abs(e - reference.eps) > 1e-9)
    backward += extra * ref_b * n_sanity
    forward += extra * ref_f * n_sanity
    runs += extra
    if sanity.stronger:
        strong = {**reference.spec, **sanity.stronger}
        b, f = attack_passes(strong, stochastic, draws, N_CLASSES)
        backward, forward, runs = backward + b * n_sanity, forward + f * n_sanity, runs + 1
    return {"backward": backward, "forward": forward, "suites": runs}


def evaluation(argv: list[str]) -> None:
    """Section ``evaluation``: PGD-EOT throughput and projected protocol times."""
    from atop.dvc_params import typed_parameters

    parser = argparse.ArgumentParser(prog="benchmark.py evaluation")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--eot-iter", type=int, default=2)
    parser.add_argument("--gx-seconds", type=float, default=1.0, help="per GX suite")
    parser.add_argument("--profiles", default="base,paper", help="protocols to project")
    add_common(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    images, labels = cifar10(args.images, train=False)
    images, labels = to_unit(images).to(device), labels.to(device)
    models = base_models(device)
    print(
        f"device={device} threads={torch.get_num_threads()} images={args.images} "
        f"batch={args.batch_size} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    rates = {}
    for name, model in models.items():
        eot = args.eot_iter if name == "defense" else 1
        rate = attack_throughput(model, images, labels, args.steps, eot, args.batch_size)
        rates[name] = rate
        print(
            f"  {name:10s} PGD-{args.steps} EOT-{eot}: {rate['image_steps_per_s']:8.2f} "
            f"image-steps/s, {rate['passes_per_s']:8.2f} fwd-bwd passes/s, "
            f"{rate['forward_passes_per_s']:8.2f} forward passes/s ({rate['seconds']:.1f} s)"
        )
    print(
        "projected evaluation time on this machine (standard + ap + atop; AutoAttack as upper bound):"
    )
    for env in args.profiles.split(","):
        typed = typed_parameters(PROJECT_ROOT, env)
        params = typed["evaluation"]
        n = params.images or typed["data_ingestion"].eval_subset.images  # null = all
        total = 0.0
        parts = []
        for defense, stochastic, count in (("standard", False, 1), ("ap+atop", True, 2)):
            passes = protocol_passes(params, n, stochastic)
            rate = rates["defense" if stochastic else "classifier"]
            seconds = (
                passes["backward"] / rate["passes_per_s"]
                + passes["forward"] / rate["forward_passes_per_s"]
                + passes["suites"] * args.gx_seconds
            ) * count
            total += seconds
            parts.append(
                f"{defense} {seconds / 60:.1f} min ({passes['backward'] * count:,.0f} fwd-bwd + "
                f"{passes['forward'] * count:,.0f} fwd passes)"
            )
        print(f"  {env:6s} {n} images: {total / 60:7.1f} min = " + "; ".join(parts))


# --------------------------------------------------------------------------- stages

#: stage -> (metrics file, what one training image costs); the parameter key is the stage name
STAGES = {
    "classifier_pretraining": ("classifier_metrics.json", "one SGD step (clean)"),
    "purifier_pretraining": ("purifier_metrics.json", "one D step + one g step"),
    "atop_finetuning": ("atop_metrics.json", "attack + one D step + one g step"),
    "adversarial_training": ("adversarial_training_metrics.json", "PGD-10 + one SGD step"),
    "rvs": ("rvs_metrics.json", "one generator step + one classifier step"),
}


def stages(argv: list[str]) -> None:
    """Section ``stages``: training images/s of each stage of the last pipeline run.

    Reads ``<reporting>/<stage>_metrics.json`` (``train_seconds``, ``epochs``, ``n_train``,
    written by the stages) and the resolved parameters of the profile
    (``params/<profile>.yaml``, for the batch sizes): images seen
    (``epochs * floor(n_train / batch_size) * batch_size``, every loop drops the last partial
    batch) over the training seconds (evaluation excluded). A stage run with
    ``max_batches_per_epoch`` set is reported as such (its count would be wrong).
    """
    import yaml

    parser = argparse.ArgumentParser(prog="benchmark.py stages")
    parser.add_argument("--profile", default="base")
    parser.add_argument(
        "--reporting", type=Path, help="default: data/08_reporting/cifar10/<profile>"
    )
    args = parser.parse_args(argv)
    args.reporting = args.reporting or PROJECT_ROOT / "data/08_reporting/cifar10" / args.profile
    params = yaml.safe_load((PROJECT_ROOT / "params" / f"{args.profile}.yaml").read_text())
    print(f"profile {args.profile}: training throughput per stage (evaluation excluded)")
    for stage, (metrics_file, cost) in STAGES.items():
        path = args.reporting / metrics_file
        if not path.is_file():
            print(f"  {stage:24s} not run ({path} missing)")
            continue
        metrics = json.loads(path.read_text())
        stage_params = params[stage]
        if stage_params.get("max_batches_per_epoch") is not None:
            print(f"  {stage:24s} max_batches_per_epoch is set: images seen unknown")
            continue
        batch = stage_params["batch_size"]
        images = metrics["epochs"] * (metrics["n_train"] // batch) * batch
        seconds = metrics["train_seconds"]
        print(
            f"  {stage:24s} {images:7d} images in {seconds:7.1f} s = {images / seconds:7.1f} "
            f"images/s on {metrics.get('device', '?')} ({cost})"
        )


# --------------------------------------------------------------------------- entry point

# --------------------------------------------------------------------------- precision


#: The workloads of ``precision`` and ``layout``; the attacks count image-passes.
WORKLOADS = "classifier,purifier,atop,pgd_at,rvs,pgd-defense,pgd-classifier"
ATTACK_PASSES = {"pgd-defense": 10, "pgd-classifier": 10}


def workload_factory(
    x: Tensor, y: Tensor, device: torch.device
) -> Callable[[str, bool, bool], Callable[[], Any]]:
    """``make(workload, amp, channels_last)``: a callable running one step of ``workload``
    (:data:`WORKLOADS`) on the batch ``x`` (float32 ``[B, 3, 32, 32]`` in [0, 1]), ``y``, with
    the base models (resnet-fast width 16, the gated U-Net cnum 32, RT2 at the authors' noise)
    built from seed 0: ``classifier`` (one SGD step), ``purifier`` (one D + one g step, Eq. 8),
    ``atop`` (FGSM against f(g(t(.))) + the GAN update + CE, Eq. 9), ``pgd_at`` (PGD-10 + one
    SGD step), ``rvs`` (one generator + one classifier step), and the attacks ``pgd-defense``
    (PGD-5 x EOT-2 on f(g(t(.)))) and ``pgd-classifier`` (PGD-5 on f), which return their
    adversarial images. ``amp``: bf16 autocast; ``channels_last``: the classifier's weights
    (and, where it trains, its input batches) in NHWC."""
    import functools

    from atop.attacks import build_attack, run_attack
    from atop.defense import PurifiedClassifier
    from atop.models import build_classifier
    from atop.models.purifier import build_purifier
    from atop.models.rvs import RvSGenerator
    from atop.ot import entropic_ot
    from atop.trainers.atop import atop_train_step
    from atop.trainers.classifier import classifier_step
    from atop.trainers.pgd_at import PGDTrainAttackParams, pgd_at_step, pgd_attack
    from atop.trainers.purifier import PurifierStep
    from atop.trainers.rvs import rvs_step
    from atop.training import autocast
    from atop.transforms import RandomTransform

    transform = RandomTransform("rt2", sigma=0.25, noise_resolution=256)

    def purifier_models() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        g, d = build_purifier({"generator": "unet", "cnum": 32, "attention": False})
        return g.to(device), d.to(device)

    def adam_step(g: nn.Module, d: nn.Module, amp: bool) -> PurifierStep:
        opts = [torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.5, 0.999)) for m in (g, d)]
        return PurifierStep(g, d, transform, *opts, gan_weight=0.1, device=device, amp=amp)

    def make(workload: str, amp: bool, channels_last: bool = False) -> Callable[[], Any]:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(0)
        f = build_classifier("resnet-fast", N_CLASSES, width=16).to(device, memory_format=layout)
        xb = x.contiguous(memory_format=layout)  # the batches a trainer feeds f
        if workload == "classifier":
            opt = torch.optim.SGD(f.parameters(), lr=0.05, momentum=0.9)
            step = classifier_step(f.train(), opt, device, amp, 0.1)
            return lambda: step(xb, y)
        if workload == "purifier":
            step = adam_step(*purifier_models(), amp)
            return lambda: step(x, x)
        if workload == "atop":
            f = f.eval().requires_grad_(False)
            g, d = purifier_models()
            attack = build_attack(
                PurifiedClassifier(f, g, transform), {"name": "fgsm", "eps": 8 / 255}, N_CLASSES
            )
            step = atop_train_step(f, adam_step(g, d, amp), attack, lambda_cls=0.1)
            return lambda: step(x, y)
        if workload == "pgd_at":
            opt = torch.optim.SGD(f.parameters(), lr=0.05, momentum=0.9)
            attack = pgd_attack(
                f.train(), PGDTrainAttackParams(eps=8 / 255, alpha=2 / 255, steps=10), N_CLASSES
            )
            return lambda: pgd_at_step(f, opt, xb, y, attack=attack, amp=amp)
        if workload == "rvs":
            gen = RvSGenerator().to(device)
            opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (f, gen)]
            ot_fn = functools.partial(entropic_ot, reg=0.01, num_iter=100)
            return lambda: rvs_step(f.train(), gen, *opts, xb, y, ot_fn=ot_fn, amp=amp)
        model = f.eval().requires_grad_(False)
        if workload == "pgd-defense":
            model = PurifiedClassifier(
                model, purifier_models()[0].eval().requires_grad_(False), transform
            )
        spec = {"name": "pgd", "norm": "Linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 5}
        attack = build_attack(model, {**spec, "eot_iter": 2}, N_CLASSES)

        def run() -> Tensor:
            torch.manual_seed(1)
            with autocast(device, amp):
                return run_attack(attack, x, y, len(x), progress=False)

        return run

    return make


def side_by_side(
    argv: list[str],
    prog: str,
    title: str,
    labels: tuple[str, str],
    build: Callable[[Callable[..., Any], str, bool], Callable[[], Any]],
    compare_outputs: bool = False,
) -> None:
    """The body of ``precision`` and ``layout``: for each workload of
    :func:`workload_factory`, its two variants (``build(make, workload, second)``) warmed up,
    then timed alternately (the median of ``--repeats`` runs of ``--batches`` steps), printed as
    throughput (images/s; image-passes/s for the attacks) and the second / first ratio;
    ``compare_outputs``: whether both variants of an attack return the same adversarial images
    (bit for bit, or the largest difference)."""
    parser = argparse.ArgumentParser(prog=f"benchmark.py {prog}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=WORKLOADS)
    add_common(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    make = workload_factory(*training_batch(args.batch_size, device), device)
    print(
        f"{title}: device {device}, {torch.get_num_threads()} threads, batch "
        f"{args.batch_size}, {args.batches} batches per run, median of {args.repeats}"
    )
    for workload in args.workloads.split(","):
        runs = {second: build(make, workload, second) for second in (False, True)}
        outputs = {second: run() for second, run in runs.items()}  # warm-up
        seconds = alternate(runs, args.repeats, args.batches, device)
        unit = "image-passes/s" if workload in ATTACK_PASSES else "images/s"
        scale = ATTACK_PASSES.get(workload, 1) * args.batches * args.batch_size
        first, second = (scale / seconds[k] for k in (False, True))
        same = ""
        if compare_outputs and workload in ATTACK_PASSES:
            diff = (outputs[False] - outputs[True]).abs().max().item()
            same = " | outputs identical" if diff == 0 else f" | outputs differ by {diff:.3g}"
        print(
            f"  {workload:15s} {labels[0]} {first:8.1f} | {labels[1]} {second:8.1f} {unit} | "
            f"ratio {second / first:5.2f}x{same}",
            flush=True,
        )


def precision(argv: list[str]) -> None:
    """Section ``precision``: float32 vs bf16 autocast, side by side, for every training step
    and the attacks of :func:`workload_factory` (:func:`side_by_side`)."""
    side_by_side(
        argv,
        "precision",
        "float32 vs bf16 autocast",
        ("fp32", "bf16"),
        lambda make, workload, amp: make(workload, amp),
    )


def layout(argv: list[str]) -> None:
    """Section ``layout``: the classifier contiguous (NCHW) vs channels-last (NHWC), side by
    side under bf16 autocast (as the base profile runs), for the workloads of
    :func:`workload_factory` (:func:`side_by_side`); for the attacks it also checks that both
    layouts return the same adversarial images from the same seed."""
    side_by_side(
        argv,
        "layout",
        "classifier NCHW vs NHWC, bf16 autocast",
        ("NCHW", "NHWC"),
        lambda make, workload, nhwc: make(workload, True, nhwc),
        compare_outputs=True,
    )


def compile_wins(argv: list[str]) -> None:
    """Section ``compile``: the cheap wins the speed issue names, side by side in one run
    (bf16 autocast as the base profile runs them): PGD-EOT on the defended model
    ``f(g(t(.)))`` eager, with ``channels_last`` models and inputs, and with ``f`` and ``g``
    under ``torch.compile`` (t stays eager: its draws keep eager's random stream); and the
    purifier's training step eager vs ``channels_last``. Prints the first call (compile
    included), the steady image-passes/s (median of ``--repeats``) and, for compile, the
    forward-backward passes per image after which it pays; ``--profile``: torch.profiler's
    top operators of one eager call of each."""
    from atop.attacks import build_attack, run_attack
    from atop.defense import PurifiedClassifier
    from atop.models import build_classifier
    from atop.models.purifier import build_purifier
    from atop.trainers.purifier import PurifierStep
    from atop.training import autocast
    from atop.transforms import RandomTransform

    parser = argparse.ArgumentParser(prog="benchmark.py compile")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--profile", action="store_true", help="also torch.profiler's top operators (eager)"
    )
    add_common(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    x, y = training_batch(args.batch_size, device)
    transform = RandomTransform("rt2", sigma=0.25, noise_resolution=256)
    cl = torch.channels_last

    def models(layout: torch.memory_format = torch.contiguous_format):
        torch.manual_seed(0)
        f = build_classifier("resnet-fast", N_CLASSES, width=16).to(device, memory_format=layout)
        g, d = build_purifier({"generator": "unet", "cnum": 32, "attention": False})
        return f, g.to(device, memory_format=layout), d.to(device, memory_format=layout)

    def attack_run(variant: str) -> Callable[[], Any]:
        f, g, _ = models(cl if variant == "channels_last" else torch.contiguous_format)
        f, g = (m.eval().requires_grad_(False) for m in (f, g))
        if variant == "compile":
            f, g = torch.compile(f), torch.compile(g)
        spec = {"name": "pgd", "norm": "Linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 5}
        attack = build_attack(PurifiedClassifier(f, g, transform), {**spec, "eot_iter": 2}, 10)
        inputs = x.contiguous(memory_format=cl) if variant == "channels_last" else x

        def run() -> None:
            with autocast(device, True):
                run_attack(attack, inputs, y, len(x), progress=False)

        return run

    def purifier_run(variant: str) -> Callable[[], Any]:
        _, g, d = models(cl if variant == "channels_last" else torch.contiguous_format)
        opts = [torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.5, 0.999)) for m in (g, d)]
        step = PurifierStep(g, d, transform, *opts, gan_weight=0.1, device=device, amp=True)
        inputs = x.contiguous(memory_format=cl) if variant == "channels_last" else x
        return lambda: step(inputs, inputs)

    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, bf16")
    for name, make, variants, passes in (
        ("PGD-5 x EOT-2 on f(g(t(.)))", attack_run, ("eager", "channels_last", "compile"), 10),
        ("purifier D + g step", purifier_run, ("eager", "channels_last"), 1),
    ):
        runs, first = {}, {}
        for variant in variants:
            began = time.perf_counter()
            runs[variant] = make(variant)
            runs[variant]()  # first call: compiles where compiled
            first[variant] = time.perf_counter() - began
        medians = alternate(runs, args.repeats, 1, device)
        eager = medians["eager"]
        for variant in variants:
            median = medians[variant]
            line = (
                f"  {name:28s} {variant:13s} first call {first[variant]:6.1f} s | "
                f"{passes * len(x) / median:7.1f} image-passes/s | x{eager / median:4.2f}"
            )
            if variant == "compile" and median < eager:
                per_pass_saved = (eager - median) / (passes * len(x))
                extra = first[variant] - first["eager"]
                line += f" | pays after {extra / per_pass_saved / len(x):,.0f} passes per image"
            print(line, flush=True)
        if args.profile:  # where an eager call spends its time, by operator
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runs["eager"]()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            print(table, flush=True)


# --------------------------------------------------------------------------- autoattack check


def add_defense_args(parser: argparse.ArgumentParser, images: int) -> None:
    """``--classifier``/``--purifier`` checkpoints, ``--images`` (default ``images``),
    ``--draws`` and the common options of a section on a trained purified defense."""
    parser.add_argument("--classifier", required=True, help="classifier checkpoint (.pt)")
    parser.add_argument("--purifier", required=True, help="purifier checkpoint (.pt)")
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--draws", type=int, default=10)
    add_common(parser)


def defense_slice(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor, torch.device]:
    """The trained defense of ``args`` and the first ``--images`` of the evaluation subset
    (float32 in ``[0, 1]``, int64 labels) on the chosen device."""
    from atop.checkpoint import load_safe
    from atop.data import random_subset
    from atop.evaluation import load_defense

    device = setup_device(args)
    model = load_defense(load_safe(args.classifier), load_safe(args.purifier), device=device)
    images, labels = cifar10(10_000, train=False)
    index = random_subset(10_000, 512, 0)[: args.images]
    return model, to_unit(images[index]).to(device), labels[index].to(device), device


def autoattack_check(argv: list[str]) -> None:
    """Section ``autoattack-check``: the project's AutoAttack-rand against the reference
    implementation (``pyautoattack``, Croce & Hein's code, version ``rand``) on a slice.

    Both attack the same trained purified defense (``--classifier`` + ``--purifier``) on the
    first ``--images`` of the fixed evaluation subset with the same budget (APGD-CE +
    APGD-DLR, ``--steps`` iterations, EOT ``--eot``); every output is judged by the project's
    N-evaluation (``--draws`` fresh draws). The reference stops on images one draw gets
    wrong and returns their clean image; the project's attacks every image and keeps its
    highest-loss iterate (:class:`atop.attacks.EveryImageAPGD`).
    """
    from pyautoattack import AutoAttack

    from atop.attacks import build_attack, draw_correct, run_attack

    parser = argparse.ArgumentParser(prog="benchmark.py autoattack-check")
    add_defense_args(parser, images=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eot", type=int, default=4)
    args = parser.parse_args(argv)
    model, x, y, device = defense_slice(args)
    eps = 8 / 255
    outputs = {"clean": x}
    seed_everything(0)
    spec = {
        "name": "autoattack",
        "version": "rand",
        "norm": "Linf",
        "eps": eps,
        "steps": args.steps,
        "eot_iter": args.eot,
        "seed": 0,
        "draws": args.draws,
    }
    began = time.perf_counter()
    outputs["atop AutoAttack-rand"] = run_attack(
        build_attack(model, spec, N_CLASSES), x, y, len(x), progress=False
    )
    ours = time.perf_counter() - began
    seed_everything(0)
    reference = AutoAttack(model, norm="Linf", eps=eps, version="rand", seed=0, device=device)
    reference.apgd.n_iter, reference.apgd.eot_iter = args.steps, args.eot
    began = time.perf_counter()
    result = reference.run_standard_evaluation(x, y, batch_size=len(x))
    # pyautoattack returns (adversarial images, labels); the original package the images
    outputs["pyautoattack rand"] = result[0] if isinstance(result, tuple) else result
    theirs = time.perf_counter() - began
    print(
        f"{args.images} images, APGD-CE + APGD-DLR, {args.steps} steps, EOT {args.eot}; judged "
        f"with {args.draws} fresh draws (atop {ours:.0f} s, reference {theirs:.0f} s)"
    )
    for name, adversarial in outputs.items():
        verdicts = draw_correct(model, adversarial, y, args.draws, len(x))
        unchanged = (adversarial == x).flatten(1).all(1).float().mean().item()
        print(
            f"  {name:22s} single-draw {100 * verdicts.float().mean():6.2f} % | worst-of-N "
            f"{100 * verdicts.all(1).float().mean():6.2f} % | images returned unperturbed "
            f"{100 * unchanged:5.1f} %"
        )


def eot_packing(argv: list[str]) -> None:
    """Section ``eot-packing``: EOT draws of a small batch packed into one pass
    (:class:`atop.attacks.PackedEOT`, as the survivors attack runs) against torchattacks'
    sequential passes, on a trained purified defense (``--classifier`` + ``--purifier``).

    The first ``--images`` of the evaluation subset are attacked in chunks of ``--chunk``
    (the survivors' batch sizes) by PGD ℓ∞ ``--steps`` × EOT ``--eot`` at ``--eps`` (default
    2/255, where accuracy is mid-range and a weaker attack would show), bf16 gradients as
    the evaluation; each chunk from the same seed both ways. Both outputs are judged in
    float32 with ``--draws`` fresh draws (same seed); the packed attack must not be weaker:
    the two-sided exact McNemar test on the first-draw and worst-of-N verdicts.
    """
    from atop.attacks import build_attack, draw_correct
    from atop.evaluation.protocol import per_image
    from atop.evaluation.stats import mcnemar
    from atop.training import autocast

    parser = argparse.ArgumentParser(prog="benchmark.py eot-packing")
    add_defense_args(parser, images=64)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eot", type=int, default=16)
    parser.add_argument("--eps", type=float, default=2 / 255)
    parser.add_argument("--eot-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="chunk k's attack seed: seed + k")
    args = parser.parse_args(argv)
    model, x, y, device = defense_slice(args)
    spec = {"name": "pgd", "norm": "Linf", "eps": args.eps, "alpha": args.eps / 4,
            "steps": args.steps, "eot_iter": args.eot}  # fmt: skip
    results = {}
    for name, eot_batch in (("sequential", None), ("packed", args.eot_batch)):
        attack, pieces, began = (
            build_attack(model, spec, N_CLASSES, eot_batch),
            [],
            time.perf_counter(),
        )
        for k in range(0, len(x), args.chunk):
            seed_everything(args.seed + k)
            with autocast(device, True):
                pieces.append(attack(x[k : k + args.chunk], y[k : k + args.chunk]))
        seconds = time.perf_counter() - began
        seed_everything(0)
        results[name] = (draw_correct(model, torch.cat(pieces), y, args.draws, 64), seconds)
    (seq, t_seq), (packed, t_packed) = results["sequential"], results["packed"]
    print(
        f"{len(x)} images in chunks of {args.chunk}, PGD-{args.steps} x EOT-{args.eot}, eps "
        f"{args.eps * 255:g}/255, judged with {args.draws} fresh draws; eot_batch {args.eot_batch}"
    )
    for name, (verdicts, seconds) in results.items():
        print(f"  {name:10s} {seconds:6.1f} s | single-draw {100 * verdicts.float().mean():6.2f} % "
              f"| worst-of-N {100 * verdicts.all(1).float().mean():6.2f} %")  # fmt: skip
    tests = {
        rule: mcnemar(per_image(packed, rule), per_image(seq, rule))
        for rule in ("first", "worst_of_n")
    }
    text = ", ".join(f"{r} +{t.only_a}/-{t.only_b} p = {t.p_value:.3g}" for r, t in tests.items())
    print(f"  speed-up {t_seq / t_packed:.2f}x; packed vs sequential (two-sided McNemar): {text}")


def processes(argv: list[str]) -> None:
    """Section ``processes``: how to spend the 2 cores on the attacks. PGD ℓ∞ ``--steps`` ×
    EOT ``--eot`` (bf16 gradients, as the evaluation) on the base defended model (random
    weights) and ``--images`` real test images, batch 64, as (a) one process with 2 torch
    threads (what every stage does), (b) two processes with 1 thread each running the same
    attack at once (what a parallel runner of independent nodes would do; throughput summed),
    (c) one process with 2 threads whose EOT draws fill passes of 128 rows
    (:class:`atop.attacks.PackedEOT`, ``eot_batch`` 128) instead of 64. Each run is a fresh
    process (``--worker``); image-passes/s and ratios to (a).
    """
    import subprocess

    parser = argparse.ArgumentParser(prog="benchmark.py processes")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eot", type=int, default=4)
    parser.add_argument("--eot-batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_common(parser)
    args = parser.parse_args(argv)
    if args.worker:
        from atop.attacks import build_attack, run_attack
        from atop.training import autocast

        device = setup_device(args)
        model = base_models(device)["defense"]
        images, labels = cifar10(args.images, train=False)
        x, y = to_unit(images).to(device), labels.to(device)
        spec = {"name": "pgd", "norm": "Linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 1,
                "eot_iter": 1}  # fmt: skip
        with autocast(device, True):
            run_attack(build_attack(model, spec, N_CLASSES), x, y, 64, progress=False)  # warm-up
            spec = {**spec, "steps": args.steps, "eot_iter": args.eot}
            attack = build_attack(model, spec, N_CLASSES, eot_batch=args.eot_batch)
            began = time.perf_counter()
            run_attack(attack, x, y, 64, progress=False)
        print(
            json.dumps(
                {"passes_per_s": len(x) * args.steps * args.eot / (time.perf_counter() - began)}
            )
        )
        return

    def launch(threads: int, eot_batch: int | None = None) -> subprocess.Popen:
        command = [sys.executable, __file__, "processes", "--worker", "--threads", str(threads)]
        command += [
            "--images",
            str(args.images),
            "--steps",
            str(args.steps),
            "--eot",
            str(args.eot),
        ]
        command += ["--eot-batch", str(eot_batch)] if eot_batch else []
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)

    def rate(*workers: subprocess.Popen) -> float:
        outputs = [w.communicate()[0].strip().splitlines()[-1] for w in workers]
        return sum(json.loads(line)["passes_per_s"] for line in outputs)

    one = rate(launch(2))
    two = rate(launch(1), launch(1))
    packed = rate(launch(2, eot_batch=128))
    print(
        f"PGD-{args.steps} x EOT-{args.eot}, {args.images} images, batch 64, bf16 (image-passes/s)"
    )
    for name, value in (("1 process x 2 threads", one), ("2 processes x 1 thread", two),
                        ("1 process x 2 threads, eot_batch 128", packed)):  # fmt: skip
        print(f"  {name:38s} {value:7.1f}  ({value / one:.2f}x)")


# --------------------------------------------------------------------------- purifier quality


def purifier_quality(argv: list[str]) -> None:
    """Section ``purifier-quality``: purifiers trained for the same CPU time, then judged.

    Each ``--configs`` entry (``generator:cnum[:variant:upsample_size]``) is pretrained with
    the library's update (:class:`atop.trainers.purifier.PurifierStep`, the base profile's
    ``purifier_pretraining`` loss settings, or ``--lr`` / ``--gan-weight``) on shuffled real
    CIFAR-10 training images for ``--cpu-minutes`` of the process's CPU time (fair on a shared
    machine), then scored on ``--val-images`` held-out test images outside the evaluation
    subset: PSNR of ``g(t(x))`` (and of ``t(x)``) and the clean accuracy of
    ``f(g(t(x)))`` with ``--classifier`` (single-draw: mean over ``--draws`` fresh draws).
    """
    from atop.attacks import draw_correct
    from atop.checkpoint import load_safe
    from atop.data import random_subset
    from atop.defense import PurifiedClassifier
    from atop.dvc_params import typed_parameters
    from atop.models import load_classifier
    from atop.models.purifier import build_purifier
    from atop.trainers.purifier import PurifierStep, psnr, purify_with_seed
    from atop.training import Batches
    from atop.transforms import RandomTransform

    parser = argparse.ArgumentParser(prog="benchmark.py purifier-quality")
    parser.add_argument("--classifier", required=True, help="classifier checkpoint (.pt)")
    parser.add_argument("--configs", default="unet:32,deepfillv2:32")
    parser.add_argument("--cpu-minutes", type=float, default=4.0)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--noise-resolution", type=int, default=256, help="0 = the working side")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--gan-weight", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--no-amp", action="store_true", help="float32 training")
    add_common(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    base = typed_parameters(PROJECT_ROOT, "base")["purifier_pretraining"]
    changes = {k: v for k, v in (("lr", args.lr), ("gan_weight", args.gan_weight)) if v}
    params = base.replace(amp=not args.no_amp, **changes)
    train_images, train_labels = cifar10(50_000, train=True)
    test_images, test_labels = cifar10(10_000, train=False)
    eval_subset = random_subset(10_000, 512, 0)  # data_ingestion's subset (512, seed 0)
    held_out = random_subset(10_000, args.val_images, 1, exclude=eval_subset.tolist())
    x_val = to_unit(test_images[held_out]).to(device)
    y_val = test_labels[held_out].to(device)
    f = load_classifier(load_safe(args.classifier), device).requires_grad_(False)
    transform = RandomTransform(
        "rt2", sigma=args.sigma, noise_resolution=args.noise_resolution or None
    )
    print(
        f"{args.cpu_minutes:g} CPU-minutes each, batch {args.batch_size}, lr {params.lr}, "
        f"gan_weight {params.gan_weight}, amp {params.amp}, {torch.get_num_threads()} threads; "
        f"RT2 sigma {args.sigma} at {args.noise_resolution or 'the working side'} px; "
        f"{len(held_out)} held-out test images, {args.draws} draws"
    )
    for entry in args.configs.split(","):
        name, cnum, *rest = entry.split(":")
        config = {"generator": name, "cnum": int(cnum), "attention": False}
        if rest:
            config.update(variant=rest[0], upsample_size=int(rest[1]))
        seed_everything(0)
        g, d = build_purifier(config)
        g, d = g.to(device), d.to(device)
        step = PurifierStep.with_adam(g, d, transform, params, device)
        batches = Batches(
            train_images,
            train_labels,
            args.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
            device=device,
            drop_last=True,
        )
        budget, seen, began, wall = 60 * args.cpu_minutes, 0, time.process_time(), time.time()
        while time.process_time() - began < budget:
            for x, _ in batches:
                g.train(), d.train()
                step(x, x)
                seen += len(x)
                if time.process_time() - began >= budget:
                    break
        seconds = time.time() - wall
        transformed, purified = purify_with_seed(g, transform, x_val, 0, 250)
        defense = PurifiedClassifier(f, g.eval(), transform).eval()
        single_draw = draw_correct(defense, x_val, y_val, args.draws, 250).float().mean()
        print(
            f"  {entry:24s} {sum(p.numel() for p in g.parameters()) / 1e6:5.2f} M params | "
            f"{seen:7d} images in {seconds:5.0f} s wall ({seen / seconds:6.1f} img/s) | "
            f"PSNR {psnr(purified, x_val).mean():5.2f} dB (t(x) {psnr(transformed, x_val).mean():5.2f}) "
            f"| AP clean acc (single draw) {100 * single_draw:5.2f} %"
        )


# --------------------------------------------------------------------------- paper projection


def paper_projection(argv: list[str]) -> None:
    """Section ``paper-projection``: each paper-profile stage's compute, from FLOPs counted on
    CPU, and its projected GPU time at an assumed sustained rate.

    ``torch.utils.flop_counter.FlopCounterMode`` counts the matmul / convolution FLOPs
    (forward and backward) of ONE real step of each stage at the paper's model sizes (batch
    ``--batch-size``, CIFAR-10 images): the classifier's SGD step (WRN-28-10), the purifier's
    D + g step (DeepFillv2 cnum 48 with contextual attention; native 32 px and the authors'
    256 px route), an AToP step (FGSM / PGD-10 against f(g(t(.))) + the GAN update + CE),
    a PGD-AT step (PGD-10 + SGD), an RvS step (WRN-34-10), and one forward(-backward) pass of
    the defended model and of the classifier. Stage totals multiply them by the paper
    profile's epochs, images, steps, EOT samples and draws (conf/paper). Element-wise ops are
    not counted, so the projection is a lower bound on work; the rate (``--tflops``, sustained
    bf16 TFLOP/s) is an assumption, not a measurement.
    """
    import functools

    from torch.utils.flop_counter import FlopCounterMode

    from atop.defense import PurifiedClassifier
    from atop.dvc_params import typed_parameters
    from atop.models import build_classifier
    from atop.models.purifier import build_purifier
    from atop.models.rvs import RvSGenerator
    from atop.ot import entropic_ot
    from atop.trainers.atop import atop_train_step
    from atop.trainers.classifier import classifier_step
    from atop.trainers.purifier import PurifierStep
    from atop.trainers.rvs import rvs_step
    from atop.transforms import build_transform

    parser = argparse.ArgumentParser(prog="benchmark.py paper-projection")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tflops", type=float, default=100.0, help="sustained TFLOP/s")
    parser.add_argument("--skip-upsample", action="store_true", help="skip the 256 px route")
    add_common(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    paper = typed_parameters(PROJECT_ROOT, "paper")
    cls_p, pur_p, fin_p = (
        paper[k] for k in ("classifier_pretraining", "purifier_pretraining", "atop_finetuning")
    )
    at_p, rvs_p, ev_p, conv_p = (
        paper[k] for k in ("adversarial_training", "rvs", "evaluation", "convergence")
    )
    x, y = training_batch(args.batch_size, device)
    b = args.batch_size

    def per_image(fn: Callable[[], Any]) -> float:
        """FLOPs of one call of ``fn``, per image of the batch."""
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / b

    def classifier(arch: str) -> nn.Module:
        torch.manual_seed(0)
        return build_classifier(arch, N_CLASSES, **dict(cls_p.arch_kwargs)).to(device)

    def purifier(variant: str) -> tuple[nn.Module, nn.Module, Any]:
        torch.manual_seed(0)
        config = {**dict(pur_p.purifier), "variant": variant}
        g, d = build_purifier(config)
        return g.to(device), d.to(device), build_transform(pur_p.transform.to_dict())

    def gan_step(g: nn.Module, d: nn.Module, t: Any) -> PurifierStep:
        opts = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in (g, d)]
        return PurifierStep(g, d, t, *opts, gan_weight=1.0, device=device, amp=False)

    def input_grad(model: nn.Module) -> None:
        """One attack pass: forward, then the loss gradient w.r.t. the input (the weights
        frozen). ``loss.backward`` stands in for torchattacks' ``autograd.grad``, which the
        FLOP counter's module hooks do not support; the FLOPs are the same."""
        x_adv = x.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(model(x_adv), y).backward()

    flops: dict[str, float] = {}
    f = classifier(cls_p.arch).train()
    sgd = torch.optim.SGD(f.parameters(), lr=0.1, momentum=0.9)
    flops["classifier step"] = per_image(lambda: classifier_step(f, sgd, device, False, 0.0)(x, y))
    f.eval().requires_grad_(False)
    flops["classifier fwd"] = per_image(lambda: f(x))
    flops["classifier fwd+bwd"] = per_image(lambda: input_grad(f))
    flops["PGD-AT step"] = (
        flops["classifier step"] + at_p.attack.steps * flops["classifier fwd+bwd"]
    )
    for variant in ("native", "upsample"):
        if variant == "upsample" and args.skip_upsample:
            continue
        g, d, t = purifier(variant)
        flops[f"purifier step ({variant})"] = per_image(
            lambda g=g, d=d, t=t: gan_step(g, d, t)(x, x)
        )
        defense = PurifiedClassifier(f, g.eval().requires_grad_(False), t)
        with torch.no_grad():
            flops[f"defense fwd ({variant})"] = per_image(lambda m=defense: m(x))
        flops[f"defense fwd+bwd ({variant})"] = per_image(lambda m=defense: input_grad(m))
        g.train().requires_grad_(True)
        step = atop_train_step(f, gan_step(g, d, t), None, lambda_cls=0.1)
        flops[f"AToP step, no attack ({variant})"] = per_image(lambda s=step: s(x, y))
        flops[f"AToP step, FGSM ({variant})"] = (
            flops[f"AToP step, no attack ({variant})"] + flops[f"defense fwd+bwd ({variant})"]
        )
    r = classifier(rvs_p.arch).train()
    gen = RvSGenerator().to(device)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (r, gen)]
    ot = functools.partial(entropic_ot, reg=0.01, num_iter=100)
    flops["RvS step"] = per_image(lambda: rvs_step(r, gen, *opts, x, y, ot_fn=ot, amp=False))

    print(f"FLOPs per image (batch {b}, {device}; matmul/conv forward + backward):")
    for name, value in flops.items():
        print(f"  {name:40s} {value / 1e9:10.2f} GFLOP")

    n_train = 50_000
    variant = pur_p.purifier["variant"]
    dfb, dfw = flops[f"defense fwd+bwd ({variant})"], flops[f"defense fwd ({variant})"]
    pgd_steps = dict(fin_p.arms["atop_pgd"].attack)["steps"]
    atop_pgd = flops[f"AToP step, no attack ({variant})"] + pgd_steps * dfb
    stochastic = [d for d in ev_p.defenses if d not in ("standard", "pgd_at", "rvs")]

    def eval_passes(stochastic_defense: bool) -> tuple[float, float]:
        """(fwd+bwd, fwd) passes per evaluation image of one defense."""
        fb, fw = 0.0, 0.0
        for e in ev_p.entries:
            if e.applies_to != "all" and (e.applies_to == "stochastic") != stochastic_defense:
                continue
            if e.name == "bpda" and not stochastic_defense:
                continue
            spec = e.spec
            eot = spec.get("eot_iter", 1) if stochastic_defense else 1
            if e.name == "fgsm":
                fb += 1
            elif e.name == "autoattack" and spec.get("version") == "rand":
                fb += 2 * spec["steps"] * eot  # APGD-CE + APGD-DLR on every image
            elif e.name == "autoattack":
                fb += spec["steps"] * (1 + 2 * (N_CLASSES - 1))  # APGD-CE, APGD-T, FAB-T
                fw += spec.get("n_queries", 5000)  # Square
            else:
                fb += spec["steps"] * eot
            fw += ev_p.draws if stochastic_defense else 1
        return fb, fw

    sanity = ev_p.sanity
    ref = next(e for e in ev_p.entries if e.label == sanity.reference).spec
    n_sweep = len([e for e in sanity.eps_sweep if e not in (0, ref["eps"])])
    sanity_fb = n_sweep * ref["steps"] * ref["eot_iter"] + (
        sanity.stronger["steps"] * sanity.stronger["eot_iter"]
    )
    fb_s, fw_s = eval_passes(True)
    fb_d, fw_d = eval_passes(False)
    images = ev_p.images
    sanity_images = min(sanity.images or images, images)
    cfb, cfw = flops["classifier fwd+bwd"], flops["classifier fwd"]
    evaluation = len(stochastic) * (
        images * (fb_s * dfb + fw_s * dfw) + sanity_images * sanity_fb * dfb
    )
    evaluation += 3 * (images * (fb_d * cfb + fw_d * cfw) + sanity_images * sanity_fb * cfb)
    conv = conv_p
    conv_fb = sum(conv.steps) * conv.eot_at + sum(conv.eot) * conv.steps_at
    n_runs = len(conv.steps) + len(conv.eot)
    convergence = len(conv.defenses) * conv.images * (conv_fb * dfb + n_runs * conv.draws * dfw)
    stages = {
        "classifier_pretraining": cls_p.epochs * n_train * flops["classifier step"],
        "purifier_pretraining": pur_p.epochs * n_train * flops[f"purifier step ({variant})"],
        "atop_finetuning (3 arms)": fin_p.epochs
        * n_train
        * (2 * flops[f"AToP step, no attack ({variant})"] + flops[f"AToP step, FGSM ({variant})"]),
        f"atop_pgd (PGD-{pgd_steps})": fin_p.epochs * n_train * atop_pgd,
        "adversarial_training": at_p.epochs * n_train * flops["PGD-AT step"],
        "rvs": rvs_p.epochs * n_train * flops["RvS step"],
        f"evaluation ({len(stochastic)} random + 3 deterministic)": evaluation,
        "convergence": convergence,
    }
    if not args.skip_upsample:
        stages["purifier_pretraining, 256 px route"] = (
            pur_p.epochs * n_train * flops["purifier step (upsample)"]
        )
    rate = args.tflops * 1e12
    print(f"\nPaper profile, projected at {args.tflops:g} sustained TFLOP/s (purifier: {variant}):")
    print("| stage | PFLOP | GPU hours |")
    print("|---|---:|---:|")
    for name, total in stages.items():
        print(f"| {name} | {total / 1e15:,.0f} | {total / rate / 3600:,.1f} |")


# --------------------------------------------------------------------------- two runs


def runs(argv: list[str]) -> None:
    """Section ``runs``: one defense in two runs of the pipeline (e.g. before and after a
    change that retrained it), paired on the same evaluation images: per image, the clean
    verdict and the worst case over the threat model's attacks (the ε sweep and the
    fixed-randomness rows left out), on the first draw and on all draws (worst-of-N), from each
    run's ``<report>_verdicts.csv``; accuracies and a two-sided exact McNemar test
    (:func:`atop.evaluation.stats.mcnemar`; +a/−b: images right only in the new / old run)."""
    import pandas as pd

    from atop.evaluation.stats import mcnemar

    parser = argparse.ArgumentParser(prog="benchmark.py runs")
    parser.add_argument("--old", required=True, help="project folder of the first run")
    parser.add_argument("--new", required=True, help="project folder of the second run")
    parser.add_argument("--defense", default="atop")
    parser.add_argument("--report", default="robustness", help="robustness | comparison")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--profile", default="base")
    args = parser.parse_args(argv)

    def verdicts(run: str) -> pd.DataFrame:
        path = Path(run) / "data/07_model_output" / args.dataset / args.profile
        table = pd.read_csv(path / f"{args.report}_verdicts.csv")
        table = table[table.defense == args.defense]
        if table.empty:
            sys.exit(f"{path}: no verdicts of defense {args.defense!r}.")
        draws = [c for c in table.columns if c.startswith("draw_")]
        table = table.assign(
            first=table["draw_0"].astype(bool),
            every=table[draws].fillna(1).astype(bool).all(axis=1),  # right on every draw
        )
        return table[~table.attack.str.contains("_eps_|fixed")]

    def worst(table: pd.DataFrame, norm: str | None) -> pd.DataFrame:
        rows = table[table.attack == "clean"] if norm is None else table[table.norm == norm]
        clean = table[table.attack == "clean"]
        return pd.concat([clean, rows]).groupby("image")[["first", "every"]].min()

    old, new = verdicts(args.old), verdicts(args.new)
    print(f"{args.defense}: {args.old} (old) vs {args.new} (new), {args.report} verdicts")
    for norm in (None, "Linf", "L2"):
        a, b = worst(new, norm), worst(old, norm)
        b = b.reindex(a.index)
        for column, rule in (("first", "first draw"), ("every", "worst-of-N")):
            x = torch.tensor(a[column].to_numpy(dtype=bool))
            y = torch.tensor(b[column].to_numpy(dtype=bool))
            test = mcnemar(x, y)
            print(
                f"  {'clean' if norm is None else 'worst ' + norm:10s} {rule:10s} old "
                f"{100 * y.float().mean():6.2f} % | new {100 * x.float().mean():6.2f} % | "
                f"+{test.only_a}/-{test.only_b}, p = {test.p_value:.3g} ({len(x)} images)"
            )


# --------------------------------------------------------------------------- bf16 parity


def parity(argv: list[str]) -> None:
    """Section ``parity``: the accuracy of a training stage under bf16 autocast vs float32,
    the same seeds and data (the base profile's parameters).

    ``classifier``: the classifier stage retrained with ``amp: false`` and scored on the
    full test set, against the bf16 run's ``classifier_metrics.json``. ``purifier``: the
    purifier stage for ``--purifier-steps`` steps in each precision, then PSNR and AP clean
    accuracy (:func:`atop.trainers.purifier.evaluate_purifier`). Reads the splits, indices
    and classifier of a finished run (``--run``: the project folder of a ``make run``).
    """
    from atop.checkpoint import load_safe
    from atop.dvc_params import typed_parameters
    from atop.trainers.classifier import evaluate_classifier, train_classifier
    from atop.trainers.purifier import evaluate_purifier, train_purifier
    from atop.training import training_seconds

    parser = argparse.ArgumentParser(prog="benchmark.py parity")
    parser.add_argument("stage", choices=("classifier", "purifier", "attacks"))
    parser.add_argument("--run", default=str(PROJECT_ROOT), help="project folder of a run")
    parser.add_argument("--purifier-steps", type=int, default=150)
    parser.add_argument("--seeds", help="train both precisions with each of these seeds (e.g. 1,2)")
    parser.add_argument(
        "--attacks", default="pgd_linf,pgd_l2", help="attacks: labels of evaluation.attacks"
    )
    parser.add_argument(
        "--defenses", default="ap,atop", help=f"attacks: defenses among {sorted(PARITY_MODELS)}"
    )
    add_common(parser)
    args = parser.parse_args(argv)
    setup_device(args)
    data = Path(args.run) / "data"
    split = data / "02_intermediate" / "cifar10" / "base"
    indices = data / "05_model_input" / "cifar10" / "base"
    train = torch.load(split / "train.pt", weights_only=True)
    test = torch.load(split / "test.pt", weights_only=True)
    monitor = json.loads((indices / "monitor_indices.json").read_text())
    params = typed_parameters(PROJECT_ROOT, "base")
    if args.stage == "classifier":
        names = json.loads((split / "class_names.json").read_text())
        if not args.seeds:  # fp32 against the run's own bf16 classifier
            p = params["classifier_pretraining"].replace(
                amp=False, progress=False, resume_path=None
            )
            checkpoint, history = train_classifier(train, test, names, monitor, p)
            fp32 = evaluate_classifier(checkpoint, test, p, training_seconds(history))
            bf16 = json.loads(
                (data / "08_reporting/cifar10/base/classifier_metrics.json").read_text()
            )
            print(f"classifier clean test accuracy: fp32 {fp32['clean_test_acc']:.4f}, "
                  f"bf16 {bf16['clean_test_acc']:.4f}")  # fmt: skip
            return
        for seed in (int(s) for s in args.seeds.split(",")):
            acc = {}
            for amp in (True, False):
                p = params["classifier_pretraining"].replace(
                    amp=amp, seed=seed, progress=False, resume_path=None
                )
                checkpoint, history = train_classifier(train, test, names, monitor, p)
                metrics = evaluate_classifier(checkpoint, test, p, training_seconds(history))
                acc[amp] = 100 * metrics["clean_test_acc"]
            print(f"classifier seed {seed}: clean test accuracy bf16 {acc[True]:.2f} %, "
                  f"fp32 {acc[False]:.2f} % (bf16 - fp32 {acc[True] - acc[False]:+.2f})",
                  flush=True)  # fmt: skip
        return
    evals = json.loads((indices / "eval_indices.json").read_text())
    if args.stage == "attacks":
        attack_parity(
            data, test, evals, params["evaluation"], args.attacks.split(","),
            args.defenses.split(","),
        )  # fmt: skip
        return
    classifier = load_safe(data / "06_models/cifar10/base/classifier.pt")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    for seed, amp in ((seed, amp) for seed in seeds for amp in (True, False)):
        p = params["purifier_pretraining"].replace(
            amp=amp, progress=False, resume_path=None, epochs=1,
            max_batches_per_epoch=args.purifier_steps,
        )  # fmt: skip
        p = p if seed is None else p.replace(seed=seed)
        checkpoint, history = train_purifier(train, test, monitor, p)
        m = evaluate_purifier(checkpoint, classifier, test, evals, p).metrics
        print(f"purifier seed {p.seed} {'bf16' if amp else 'fp32'}, {args.purifier_steps} steps "
              f"({training_seconds(history):.0f} s): PSNR {m['psnr']:.3f} dB, "
              f"AP clean accuracy {m['ap_clean_acc']:.4f}", flush=True)  # fmt: skip


#: ``parity attacks --defenses``: name -> (classifier file, purifier file or None) of a run.
PARITY_MODELS = {
    "ap": ("classifier.pt", "purifier.pt"),
    "atop": ("classifier.pt", "purifier_atop.pt"),
    "standard": ("classifier.pt", None),
    "pgd_at": ("pgd_at_classifier.pt", None),
    "rvs": ("rvs_classifier.pt", None),
}


def attack_parity(
    data: Path, test: Any, evals: list[int], params: Any, labels: list[str], defenses: list[str]
) -> None:
    """``parity attacks``: the base profile's attacks ``labels`` (its steps and EOT; default
    PGD l-inf and l2) with bf16 vs float32 gradients on ``defenses`` (default AP and AToP),
    the same images and seeds, both judged in float32 (N fresh draws on a purified defense).
    The bf16 run puts every listed attack under bf16 autocast, also those the evaluation
    keeps in float32 (:func:`atop.evaluation.protocol.uses_amp`), which is how such an
    attack gets checked. bf16 is acceptable only where its robust accuracy is not higher: a
    one-sided exact McNemar test (bf16 right more often than fp32) on the first-draw and the
    worst-of-N verdicts, and the single-draw difference."""
    from unittest import mock

    from atop.checkpoint import load_safe
    from atop.evaluation import Defense, EvalSettings, evaluate, load_defense, protocol
    from atop.evaluation.protocol import per_image
    from atop.evaluation.stats import mcnemar

    rows = evals[: params.images]
    x, y = to_unit(test["images"][rows]), test["labels"][rows]
    attacks = {e.label: e for e in params.entries if e.label in labels}
    if set(labels) - set(attacks):
        sys.exit(f"unknown attacks {sorted(set(labels) - set(attacks))}: see evaluation.attacks")
    models = data / "06_models" / "cifar10" / "base"
    print(f"{len(rows)} evaluation images, N = {params.draws} draws, attacks {list(attacks)}")
    if set(defenses) - set(PARITY_MODELS):
        sys.exit(f"unknown defenses {sorted(set(defenses) - set(PARITY_MODELS))}")
    for name in defenses:
        classifier_file, purifier_file = PARITY_MODELS[name]
        specs = {k: dict(e.spec) for k, e in attacks.items()}
        results = {}
        for amp in (False, True):  # a freshly loaded model each: no state carries over
            purifier = load_safe(models / purifier_file) if purifier_file else None
            model = load_defense(load_safe(models / classifier_file), purifier)
            defense = Defense(name, model, purifier is not None)
            settings = EvalSettings(params.batch_size, params.draws, params.seed, False, amp)
            with mock.patch.object(protocol, "uses_amp", lambda spec, s: s.attack_amp):
                results[amp] = evaluate(defense, x, y, specs, settings)
        for label in attacks:
            fp32, bf16 = (results[amp].runs[label] for amp in (False, True))
            single = [per_image(r.draws, "single").mean().item() for r in (fp32, bf16)]
            tests = {
                rule: mcnemar(per_image(bf16.draws, rule), per_image(fp32.draws, rule), "greater")
                for rule in ("first", "worst_of_n")
            }
            text = ", ".join(
                f"{rule} +{t.only_a}/-{t.only_b} p = {t.p_value:.3g}" for rule, t in tests.items()
            )
            print(
                f"  {name:5s} {label:9s} fp32 {100 * single[0]:6.2f} % ({fp32.seconds:5.1f} s) | "
                f"bf16 {100 * single[1]:6.2f} % ({bf16.seconds:5.1f} s) | speed-up "
                f"{fp32.seconds / bf16.seconds:4.2f}x | bf16 weaker? {text}",
                flush=True,
            )


SECTIONS: dict[str, Callable[[list[str]], None]] = {
    "classifier": classifier,
    "atop": atop,
    "purifier": purifier,
    "purifier-quality": purifier_quality,
    "precision": precision,
    "layout": layout,
    "compile": compile_wins,
    "autoattack-check": autoattack_check,
    "eot-packing": eot_packing,
    "processes": processes,
    "evaluation": evaluation,
    "stages": stages,
    "paper-projection": paper_projection,
    "parity": parity,
    "runs": runs,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SECTIONS:
        sys.exit(f"usage: benchmark.py <section> [options]; sections: {', '.join(SECTIONS)}")
    SECTIONS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()

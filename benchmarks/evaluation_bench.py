"""Benchmark of the evaluation stage: attack throughput and projected protocol time.

Section ``evaluation`` (``evaluation(argv)``, the signature of ``benchmark.py``'s sections):

1. **Throughput** of PGD-EOT (``atop.attacks.build_attack`` "pgd", ℓ∞ 8/255) on the base
   defended model ``f(g(t(x)))`` (resnet-fast width 16 + the default native purifier, cnum
   32, RT2; random weights: the cost does not depend on them) and on the bare classifier,
   on real CIFAR-10 test images: image-steps per second (``images x steps / s``, what a
   protocol's cost scales with), forward-backward passes per second (``x eot_iter``: each
   EOT sample is one pass through the whole model) and forward passes per second (the
   fresh-draw judging of :func:`atop.attacks.robust_correct`).
2. **Projected time** of the base and paper protocols (``conf/<env>/parameters_evaluation.yml``)
   on this machine with these models: the passes each attack needs per image (upper bounds
   for AutoAttack, whose later sub-attacks run only on the images still robust), plus the
   judging passes and ~``--gx-seconds`` per Great Expectations suite, divided by the
   measured rates. The paper protocol is meant for a GPU and the paper's larger models:
   its CPU projection only shows the scale.

Usage::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/evaluation_bench.py \
        [--images 64] [--steps 2] [--eot-iter 2] [--batch-size 64] [--device cpu]

On a shared CPU set ``OMP_WAIT_POLICY=PASSIVE``: with the default (active) wait policy,
oversubscribed OpenMP threads spin and timings collapse (measured: 4x slower).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from atop.attacks import build_attack, draw_votes, run_attack
from atop.defense import PurifiedClassifier
from atop.models import build_classifier
from atop.models.purifier import build_purifier
from atop.pipelines.evaluation.nodes import parse_attacks, parse_number
from atop.transforms import build_transform

PROJECT_ROOT = Path(__file__).resolve().parents[1]
N_CLASSES = 10


def cifar10_test(n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` real CIFAR-10 test images (float32 [n, 3, 32, 32] in [0, 1]), labels."""
    from torchvision.datasets import CIFAR10

    root = Path(os.environ.get("ATOP_DATA_ROOT", PROJECT_ROOT.parent / "shared" / "datasets"))
    if not (root / "cifar-10-batches-py").is_dir():
        sys.exit(f"CIFAR-10 not found under {root}: set ATOP_DATA_ROOT.")
    dataset = CIFAR10(root=str(root), train=False, download=False)
    images = torch.from_numpy(np.ascontiguousarray(dataset.data[:n])).permute(0, 3, 1, 2)
    return images.float().div(255).contiguous(), torch.tensor(dataset.targets[:n])


def base_models(device: torch.device) -> dict[str, nn.Module]:
    """The base profile's models, frozen, eval mode: ``defense`` and ``classifier``."""
    torch.manual_seed(0)
    classifier = build_classifier("resnet-fast", N_CLASSES, width=16)
    generator, _ = build_purifier()
    defense = PurifiedClassifier(classifier, generator, build_transform({"kind": "rt2"}))
    return {
        "defense": defense.to(device).eval().requires_grad_(False),
        "classifier": classifier.to(device).eval().requires_grad_(False),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(
    model: nn.Module, images: Tensor, labels: Tensor, steps: int, eot_iter: int, batch_size: int
) -> dict[str, float]:
    """Time one PGD-EOT attack and one judging round on ``model`` (after a warm-up).

    Returns:
        ``{"seconds", "image_steps_per_s", "passes_per_s", "forward_passes_per_s"}``.
    """
    device = images.device
    spec = {"name": "pgd", "norm": "Linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": steps}
    warm_up = build_attack(model, {**spec, "steps": 1, "eot_iter": 1}, N_CLASSES)
    run_attack(warm_up, images[:batch_size], labels[:batch_size], batch_size, progress=False)
    attack = build_attack(model, {**spec, "eot_iter": eot_iter}, N_CLASSES)
    _sync(device)
    began = time.perf_counter()
    run_attack(attack, images, labels, batch_size, progress=False)
    _sync(device)
    seconds = time.perf_counter() - began
    draws = 4
    began = time.perf_counter()
    draw_votes(model, images, draws, batch_size, progress=False)
    _sync(device)
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


def protocol_passes(params: dict[str, Any], stochastic: bool) -> dict[str, float]:
    """Passes per defense for a whole ``evaluation`` parameter block (one defense)."""
    draws = params["draws"] if stochastic else 1
    n = params["n_images"]
    sanity = params["sanity"]
    n_sanity = min(sanity.get("n_images") or n, n)
    entries = parse_attacks(params["attacks"])
    backward = forward = 0.0
    runs = 0
    for entry in entries:
        if entry.name == "bpda" and not stochastic:
            continue
        b, f = attack_passes(entry.spec, stochastic, draws, N_CLASSES)
        backward, forward, runs = backward + b * n, forward + f * n, runs + 1
    forward += draws * n  # clean verdicts
    reference = next(e for e in entries if e.label == sanity["reference"])
    ref_b, ref_f = attack_passes(reference.spec, stochastic, draws, N_CLASSES)
    sweep = [parse_number(e, "eps") for e in sanity["eps_sweep"]]
    extra = sum(1 for e in sweep if e != 0 and abs(e - reference.eps) > 1e-9)
    backward += extra * ref_b * n_sanity
    forward += extra * ref_f * n_sanity
    runs += extra
    if sanity.get("stronger"):
        strong = {**reference.spec, **sanity["stronger"]}
        b, f = attack_passes(strong, stochastic, draws, N_CLASSES)
        backward, forward, runs = backward + b * n_sanity, forward + f * n_sanity, runs + 1
    return {"backward": backward, "forward": forward, "suites": runs}


def load_params(env: str) -> dict[str, Any]:
    from kedro.config import OmegaConfigLoader

    loader = OmegaConfigLoader(
        str(PROJECT_ROOT / "conf"),
        base_env="base",
        default_run_env=env,
        merge_strategy={"parameters": "soft", "globals": "soft"},
    )
    return loader["parameters"]["evaluation"]


def evaluation(argv: list[str]) -> None:
    """Section ``evaluation``: PGD-EOT throughput and projected protocol times."""
    parser = argparse.ArgumentParser(prog="evaluation_bench.py")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--eot-iter", type=int, default=2)
    parser.add_argument("--gx-seconds", type=float, default=1.0, help="per GX suite")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    images, labels = cifar10_test(args.images)
    images, labels = images.to(device), labels.to(device)
    models = base_models(device)
    print(
        f"device={device} threads={torch.get_num_threads()} images={args.images} "
        f"batch={args.batch_size} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    rates = {}
    for name, model in models.items():
        eot = args.eot_iter if name == "defense" else 1
        rate = throughput(model, images, labels, args.steps, eot, args.batch_size)
        rates[name] = rate
        print(
            f"  {name:10s} PGD-{args.steps} EOT-{eot}: {rate['image_steps_per_s']:8.2f} "
            f"image-steps/s, {rate['passes_per_s']:8.2f} fwd-bwd passes/s, "
            f"{rate['forward_passes_per_s']:8.2f} forward passes/s ({rate['seconds']:.1f} s)"
        )
    print(
        "projected evaluation time on this machine (standard + ap + atop; AutoAttack as upper bound):"
    )
    for env in ("base", "paper"):
        params = load_params(env)
        total = 0.0
        parts = []
        for defense, stochastic, count in (("standard", False, 1), ("ap+atop", True, 2)):
            passes = protocol_passes(params, stochastic)
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
        print(
            f"  {env:6s} {params['n_images']} images: {total / 60:7.1f} min = " + "; ".join(parts)
        )


def main() -> None:
    evaluation(sys.argv[1:])


if __name__ == "__main__":
    main()

"""The evaluation protocol's cost: PGD-EOT throughput on the base defended model and on the
bare classifier, and the projected time of each profile's protocol (``evaluation``)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import Tensor, nn

from atop.data import to_unit
from benchmarks.common import (
    N_CLASSES,
    add_common,
    base_models,
    cifar10,
    parser,
    positive_int,
    profile_parameters,
    setup_device,
    sync,
)


def attack_throughput(
    model: nn.Module, images: Tensor, labels: Tensor, steps: int, eot_iter: int, batch_size: int
) -> dict[str, float]:
    """Time one PGD-EOT attack and one judging round (4 draws) on ``model`` after a warm-up:
    ``{"seconds", "image_steps_per_s", "passes_per_s", "forward_passes_per_s"}``."""
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


def sanity_references(params: Any) -> list[tuple[Any, list[float]]]:
    """Each sanity-check reference entry of an ``evaluation`` block (one per threat model)
    and the extra eps its sweep attacks (0 and the reference's own eps reuse runs)."""
    sanity = params.sanity
    if hasattr(sanity, "references"):
        sweeps = [(r, sanity.eps_sweep[r.norm]) for r in params.references]
    else:  # one l-inf reference (before the per-threat-model references)
        reference = next(e for e in params.entries if e.label == sanity.reference)
        sweeps = [(reference, sanity.eps_sweep)]
    return [
        (r, [e for e in sorted(set(sweep)) if e != 0 and abs(e - r.eps) > 1e-9])
        for r, sweep in sweeps
    ]


def protocol_passes(params: Any, n: int, stochastic: bool) -> dict[str, float]:
    """Passes per defense for a whole ``evaluation`` block
    (:class:`atop.evaluation.suite.EvalParams`) on ``n`` images (one defense)."""
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
    for reference, extra in sanity_references(params):
        ref_b, ref_f = attack_passes(reference.spec, stochastic, draws, N_CLASSES)
        backward += len(extra) * ref_b * n_sanity
        forward += len(extra) * ref_f * n_sanity
        runs += len(extra)
        if sanity.stronger:
            strong = {**reference.spec, **sanity.stronger}
            b, f = attack_passes(strong, stochastic, draws, N_CLASSES)
            backward, forward, runs = backward + b * n_sanity, forward + f * n_sanity, runs + 1
    return {"backward": backward, "forward": forward, "suites": runs}


def evaluation(argv: list[str]) -> None:
    """Throughput of PGD-EOT on the base defended model ``f(g(t(x)))`` and on the bare
    classifier (random weights; image-steps/s, forward-backward passes/s, forward passes/s of
    the fresh-draw judging), and the projected evaluation time of the ``--profiles``'
    protocols (their typed ``evaluation`` parameters) on this machine."""
    p = parser("evaluation", evaluation.__doc__)
    p.add_argument("--images", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=2)
    p.add_argument("--eot-iter", type=positive_int, default=2)
    p.add_argument("--gx-seconds", type=float, default=1.0, help="per GX suite")
    p.add_argument("--profiles", default="base,paper", help="protocols to project")
    add_common(p)
    args = p.parse_args(argv)
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
        typed = profile_parameters(env)
        params = typed["evaluation"]
        n = params.images or typed.raw_block("data_ingestion")["eval_subset"]["images"]
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

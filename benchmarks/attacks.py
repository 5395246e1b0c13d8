"""The evaluation's attacks against references, on a trained purified defense: AutoAttack-rand
vs Croce & Hein's code (``autoattack-check``) and packed vs sequential EOT passes
(``eot-packing``)."""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

from atop.data import random_subset, to_unit
from atop.training import autocast, seed_everything
from benchmarks.common import (
    N_CLASSES,
    add_common,
    cifar10,
    parser,
    percent,
    positive_float,
    positive_int,
    require_files,
    setup_device,
    verdict,
)


def add_defense_args(parser: argparse.ArgumentParser, images: int) -> None:
    """``--classifier``/``--purifier`` checkpoints, ``--images`` (default ``images``),
    ``--draws`` and the common options of a sub-command on a trained purified defense."""
    parser.add_argument("--classifier", required=True, help="classifier checkpoint (.pt)")
    parser.add_argument("--purifier", required=True, help="purifier checkpoint (.pt)")
    parser.add_argument("--images", type=positive_int, default=images)
    parser.add_argument("--draws", type=positive_int, default=10)
    add_common(parser)


def defense_slice(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor, torch.device]:
    """The trained defense of ``args`` (``--classifier`` + ``--purifier``) and the first
    ``--images`` of the evaluation subset (float32 in ``[0, 1]``, int64 labels) on the
    chosen device."""
    from atop.checkpoint import load_safe
    from atop.evaluation import load_defense

    device = setup_device(args)
    require_files(args.classifier, args.purifier, why="give trained checkpoints (make run)")
    model = load_defense(load_safe(args.classifier), load_safe(args.purifier), device=device)
    images, labels = cifar10(10_000, train=False)
    index = random_subset(10_000, 512, 0)[: args.images]
    return model, to_unit(images[index]).to(device), labels[index].to(device), device


def autoattack_check(argv: list[str]) -> None:
    """The project's AutoAttack-rand against the reference implementation (``pyautoattack``,
    Croce & Hein's code, version ``rand``) on a slice.

    Both attack the same trained purified defense (``--classifier`` + ``--purifier``) on the
    first ``--images`` of the fixed evaluation subset with the same budget (APGD-CE +
    APGD-DLR, ``--steps`` iterations, EOT ``--eot``); every output is judged by the project's
    N-evaluation (``--draws`` fresh draws). The reference stops on images one draw gets
    wrong and returns their clean image; the project's attacks every image and keeps its
    highest-loss iterate (:class:`atop.attacks.EveryImageAPGD`).
    """
    from pyautoattack import AutoAttack

    from atop.attacks import build_attack, draw_correct, run_attack

    p = parser("autoattack-check", autoattack_check.__doc__)
    add_defense_args(p, images=32)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--eot", type=positive_int, default=4)
    args = p.parse_args(argv)
    model, x, y, device = defense_slice(args)
    eps = 8 / 255
    outputs = {"clean": x}
    seed_everything(0)
    spec = {"name": "autoattack", "version": "rand", "norm": "Linf", "eps": eps,
            "steps": args.steps, "eot_iter": args.eot, "seed": 0, "draws": args.draws}  # fmt: skip
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
            f"  {name:22s} single-draw {percent(verdicts.float().mean())} | worst-of-N "
            f"{percent(verdicts.all(1).float().mean())} | images returned unperturbed "
            f"{percent(unchanged, 1)}"
        )


def eot_packing(argv: list[str]) -> None:
    """EOT draws of a small batch packed into one pass (:class:`atop.attacks.PackedEOT`, as
    the survivors attack runs) against torchattacks' sequential passes, on a trained purified
    defense (``--classifier`` + ``--purifier``).

    The first ``--images`` of the evaluation subset are attacked in chunks of ``--chunk``
    (the survivors' batch sizes) by PGD l-inf ``--steps`` x EOT ``--eot`` at ``--eps``
    (default 2/255, where accuracy is mid-range and a weaker attack would show), bf16
    gradients as the evaluation; each chunk from the same seed both ways. Both outputs are
    judged in float32 with ``--draws`` fresh draws (same seed); the packed attack must not be
    weaker: the two-sided exact McNemar test on the first-draw and worst-of-N verdicts.
    """
    from atop.attacks import build_attack, draw_correct
    from atop.evaluation.stats import mcnemar

    p = parser("eot-packing", eot_packing.__doc__)
    add_defense_args(p, images=64)
    p.add_argument("--chunk", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--eot", type=positive_int, default=16)
    p.add_argument("--eps", type=positive_float, default=2 / 255, help="e.g. 2/255")
    p.add_argument("--eot-batch", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0, help="chunk k's attack seed: seed + k")
    args = p.parse_args(argv)
    model, x, y, device = defense_slice(args)
    spec = {"name": "pgd", "norm": "Linf", "eps": args.eps, "alpha": args.eps / 4,
            "steps": args.steps, "eot_iter": args.eot}  # fmt: skip
    results = {}
    for name, eot_batch in (("sequential", None), ("packed", args.eot_batch)):
        attack = build_attack(model, spec, N_CLASSES, eot_batch)
        pieces, began = [], time.perf_counter()
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
        print(f"  {name:10s} {seconds:6.1f} s | single-draw {percent(verdicts.float().mean())} "
              f"| worst-of-N {percent(verdicts.all(1).float().mean())}")  # fmt: skip
    tests = {
        rule: mcnemar(verdict(packed, rule), verdict(seq, rule)) for rule in ("first", "worst_of_n")
    }
    text = ", ".join(f"{r} +{t.only_a}/-{t.only_b} p = {t.p_value:.3g}" for r, t in tests.items())
    print(f"  speed-up {t_seq / t_packed:.2f}x; packed vs sequential (two-sided McNemar): {text}")

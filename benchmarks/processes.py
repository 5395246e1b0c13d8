"""How to spend the 2 cores on the attacks: processes vs threads vs wider passes
(``processes``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from atop.data import to_unit
from benchmarks.common import (
    N_CLASSES,
    PROJECT_ROOT,
    add_common,
    base_models,
    cifar10,
    parser,
    positive_int,
    setup_device,
)


def processes(argv: list[str]) -> None:
    """One process with 2 threads vs two processes with 1 thread each, for PGD-EOT.

    PGD l-inf ``--steps`` x EOT ``--eot`` (bf16 gradients, as the evaluation) on the base
    defended model (random weights) and ``--images`` real test images, batch 64, as (a) one
    process with 2 torch threads (what every stage does), (b) two processes with 1 thread each
    running the same attack at once (what a parallel runner of independent nodes would do;
    throughput summed), (c) one process with 2 threads whose EOT draws fill passes of 128 rows
    (:class:`atop.attacks.PackedEOT`, ``eot_batch`` 128) instead of 64. Each run is a fresh
    process (``--worker``); image-passes/s and ratios to (a).
    """
    p = parser("processes", processes.__doc__)
    p.add_argument("--images", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--eot", type=positive_int, default=4)
    p.add_argument("--eot-batch", type=positive_int, default=None, help="(worker only)")
    p.add_argument("--worker", action="store_true", help="(internal) one timed run")
    add_common(p)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps({"passes_per_s": worker(args)}))
        return

    def launch(threads: int, eot_batch: int | None = None) -> subprocess.Popen:
        command = [sys.executable, "-m", "benchmarks", "processes", "--worker"]
        command += ["--threads", str(threads), "--images", str(args.images)]
        command += ["--steps", str(args.steps), "--eot", str(args.eot)]
        command += ["--eot-batch", str(eot_batch)] if eot_batch else []
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)

    def rate(*workers: subprocess.Popen) -> float:
        total = 0.0
        for w in workers:
            out = w.communicate()[0].strip().splitlines()
            if w.returncode or not out:
                sys.exit(f"a worker failed (exit {w.returncode}): {' '.join(w.args)}")
            total += json.loads(out[-1])["passes_per_s"]
        return total

    one = rate(launch(2))
    two = rate(launch(1), launch(1))
    packed = rate(launch(2, eot_batch=128))
    print(
        f"PGD-{args.steps} x EOT-{args.eot}, {args.images} images, batch 64, bf16 (image-passes/s)"
    )
    for name, value in (("1 process x 2 threads", one), ("2 processes x 1 thread", two),
                        ("1 process x 2 threads, eot_batch 128", packed)):  # fmt: skip
        print(f"  {name:38s} {value:7.1f}  ({value / one:.2f}x)")


def worker(args) -> float:
    """One timed attack in this process (after a PGD-1 warm-up): image-passes/s."""
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
    return len(x) * args.steps * args.eot / (time.perf_counter() - began)

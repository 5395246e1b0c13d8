"""The project's benchmarks: one entry point, one module per topic.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks <sub-command> [options]
    .venv/bin/python -m benchmarks <sub-command> --help
    .venv/bin/python -m benchmarks              # lists the sub-commands

Every sub-command times or checks the project's own code on real CIFAR-10 images
(``$ATOP_DATA_ROOT`` or ``../shared/datasets``, never downloaded); the figures they gave
are in docs/benchmarks.md with their exact commands. :mod:`benchmarks.common` holds what
they share. ``benchmarks/benchmark.py <sub-command>`` still works (a shim).

On a CPU shared with other processes set ``OMP_WAIT_POLICY=PASSIVE``: with the default
(active) policy oversubscribed OpenMP threads spin and timings collapse.
"""

#: sub-command -> (module of this package, function taking the argument list, summary)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "classifier": ("throughput", "classifier", "training loop fit vs a bare loop (images/s)"),
    "atop": ("throughput", "atop", "AToP fine-tuning step with FGSM / PGD-10 (images/s)"),
    "purifier": ("purifier", "purifier", "purifier step, native 32 px vs 256-px upsampling"),
    "purifier-quality": ("purifier", "purifier_quality", "purifiers at equal CPU time"),
    "precision": ("sidebyside", "precision", "float32 vs bf16 autocast, side by side"),
    "layout": ("sidebyside", "layout", "classifier NCHW vs channels-last, side by side"),
    "compile": ("compiled", "compile_wins", "torch.compile / channels_last vs eager"),
    "autoattack-check": ("attacks", "autoattack_check", "AutoAttack-rand vs pyautoattack"),
    "eot-packing": ("attacks", "eot_packing", "packed vs sequential EOT passes"),
    "processes": ("processes", "processes", "1 process x 2 threads vs 2 x 1"),
    "evaluation": ("evaluation", "evaluation", "attack throughput, projected protocol time"),
    "stages": ("records", "stages", "training images/s of each stage of the last run"),
    "runs": ("records", "runs", "one defense in two runs, paired (McNemar)"),
    "paper-projection": ("projection", "paper_projection", "paper profile GPU hours"),
    "parity": (
        "parity",
        "parity",
        "accuracy under bf16 vs float32 (classifier, purifier, attacks)",
    ),
    "flops": ("flops", "flops", "FLOPs, time and share of the matmul peak of each training step"),
    "crosscheck": ("crosscheck", "crosscheck", "independent EOT-PGD on held-out test images"),
    "train-attack-amp": (
        "train_attack_amp",
        "train_attack_amp",
        "the arms' training attack under bf16 vs float32: strength and time",
    ),
}

"""The cheap wins the speed issue named: ``torch.compile`` and ``channels_last`` for f and g
together against eager (``compile``). The classifier alone in NHWC: ``layout``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (
    N_CLASSES,
    add_common,
    alternate,
    choices,
    parser,
    positive_int,
    setup_device,
    training_batch,
)

VARIANTS = ("eager", "channels_last", "compile")


def compile_wins(argv: list[str]) -> None:
    """torch.compile and channels_last against eager, side by side (bf16 autocast).

    PGD-5 x EOT-2 on the defended model ``f(g(t(.)))`` eager, with ``channels_last`` models
    and inputs, and with ``f`` and ``g`` under ``torch.compile`` (t stays eager: its draws
    keep eager's random stream); and the purifier's training step eager vs
    ``channels_last``. Prints the first call (compile included), the steady image-passes/s
    (median of ``--repeats``) and, for compile, the forward-backward passes per image after
    which it pays; ``--profile``: torch.profiler's top operators of one eager call of each.
    ``--variants`` leaves some out (compiling takes about 15 s).
    """
    from atop.attacks import build_attack, run_attack
    from atop.defense import PurifiedClassifier
    from atop.models import build_classifier
    from atop.models.purifier import build_purifier
    from atop.trainers.purifier import PurifierStep
    from atop.training import autocast
    from atop.transforms import RandomTransform

    p = parser("compile", compile_wins.__doc__)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="eager is always run")
    p.add_argument("--profile", action="store_true", help="torch.profiler's top operators")
    add_common(p)
    args = p.parse_args(argv)
    wanted = {"eager", *choices(args.variants, VARIANTS, "variants")}
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
        variants = [v for v in variants if v in wanted]
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

"""How close each training step comes to the machine's matmul peak (``flops``).

For each stage's step, built with the project's own step builders (``atop.trainers.*``) and
the base profile's parameters and batch sizes, on real CIFAR-10 training images: the FLOPs
of one step (:func:`benchmarks.common.count_flops`: matmuls and convolutions, forward and
backward, the attacks included), its time (bf16 autocast as the stage runs it; the stages
alternating), and the achieved GFLOP/s against the bf16 and float32 matmul peaks measured
in the same run. A stage below ``--explain-below`` of the bf16 peak gets a torch.profiler
breakdown of one step: the share of op time in convolutions / matmuls against the rest.
``--clock cpu`` times the steps and the peaks by the process's CPU seconds per thread
instead of the wall clock: on a CPU shared with other processes (with
``OMP_WAIT_POLICY=PASSIVE``) that is the time the work itself took.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from benchmarks.common import (
    N_CLASSES,
    add_common,
    alternate_clocks,
    choices,
    count_flops,
    markdown_table,
    parser,
    percent,
    positive_float,
    positive_int,
    profile_parameters,
    setup_device,
    training_batch,
)

#: stage -> what one step does (the base profile's).
STAGES = {
    "classifier": "classifier_pretraining: one SGD step (resnet-fast, label smoothing)",
    "purifier": "purifier_pretraining: one D + one g step (Eq. 8)",
    "atop_no_attack": "atop_finetuning, ap_classifier_aware: GAN step + CE, x' = x",
    "atop_fgsm": "atop_finetuning, atop: FGSM on f(g(t(.))) + GAN step + CE (Eq. 9)",
    "atop_pgd": "atop_finetuning, atop_pgd: PGD-5 on f(g(t(.))) + GAN step + CE",
    "pgd_at": "adversarial_training: PGD-10 + one SGD step",
    "rvs": "rvs: one generator step + one classifier step (OT by POT)",
}
DEFAULT_STAGES = "classifier,purifier,atop_no_attack,atop_fgsm,pgd_at,rvs"
#: The shares of a profiled step, in print order.
CATEGORIES = ("conv/matmul", "elementwise/pooling/reductions", "casts/copies/layout",
              "batch/group norm", "random transform", "optimizer")  # fmt: skip
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot", "einsum"}
COPIES = {"copy_", "_to_copy", "to", "contiguous", "clone", "cat", "stack", "empty", "empty_like",
          "zeros", "zeros_like", "zero_", "fill_", "ones_like", "as_strided", "view", "reshape",
          "permute", "expand", "slice", "select", "index", "index_select", "pad",
          "constant_pad_nd", "transpose", "t", "unsqueeze", "squeeze", "flatten", "repeat",
          "reflection_pad2d", "gather", "scatter", "split", "chunk", "narrow", "detach"}  # fmt: skip


def stage_steps(
    stages: list[str], x: Tensor, y: Tensor, batch: int | None, device: torch.device
) -> dict[str, tuple[Callable[[], Any], int]]:
    """stage -> (one training step on the first images of ``x``, ``y``; its batch size), each
    built as its stage builds it from the base parameters (random weights, seed 0)."""
    from atop.attacks import build_attack
    from atop.defense import PurifiedClassifier
    from atop.models import build_classifier
    from atop.models.purifier import build_purifier
    from atop.models.rvs import RvSGenerator
    from atop.ot import entropic_ot
    from atop.trainers import atop as atop_trainer
    from atop.trainers.classifier import classifier_step
    from atop.trainers.common import classifier_sgd
    from atop.trainers.pgd_at import pgd_at_step, pgd_attack
    from atop.trainers.purifier import PurifierStep
    from atop.trainers.rvs import rvs_step
    from atop.transforms import build_transform

    base = profile_parameters("base")

    def nhwc(p: Any) -> bool:
        """The stage's ``channels_last`` (null: on CUDA only)."""
        return (device.type == "cuda") if p.channels_last is None else bool(p.channels_last)

    def classifier(p: Any, frozen: bool = False) -> torch.nn.Module:
        """The stage's classifier; ``frozen``: as the fine-tuning arms load it (NHWC)."""
        torch.manual_seed(0)
        f = build_classifier(p.arch, N_CLASSES, **dict(p.arch_kwargs)).to(device)
        if frozen:
            return f.to(memory_format=torch.channels_last).eval().requires_grad_(False)
        return f.to(memory_format=torch.channels_last) if nhwc(p) else f

    def images(n: int, last: bool = False) -> tuple[Tensor, Tensor]:
        layout = torch.channels_last if last else torch.contiguous_format
        return x[:n].contiguous(memory_format=layout), y[:n]

    def gan_step(p: Any) -> PurifierStep:
        """The GAN update with ``p``'s optimizer and loss settings, on the base purifier."""
        pur = base["purifier_pretraining"]
        torch.manual_seed(0)
        g, d = build_purifier(dict(pur.purifier))
        transform = build_transform(pur.transform.to_dict())
        return PurifierStep.with_adam(g.to(device), d.to(device), transform, p, device)

    steps: dict[str, tuple[Callable[[], Any], int]] = {}
    for stage in stages:
        if stage == "classifier":
            p = base["classifier_pretraining"]
            f = classifier(p).train()
            step = classifier_step(f, classifier_sgd(f, p.optimizer, True), device, p.amp,
                                   p.label_smoothing)  # fmt: skip
            xb, yb = images(batch or p.batch_size, nhwc(p))
            steps[stage] = (functools.partial(step, xb, yb), len(xb))
        elif stage == "purifier":
            p = base["purifier_pretraining"]
            step = gan_step(p)
            xb, _ = images(batch or p.batch_size)
            steps[stage] = (functools.partial(step, xb, xb), len(xb))
        elif stage.startswith("atop"):
            p = base["atop_finetuning"]
            frozen = classifier(base["classifier_pretraining"], frozen=True)
            step = gan_step(p)
            arm = {"atop_no_attack": "ap_classifier_aware", "atop_fgsm": "atop"}.get(
                stage, "atop_pgd"
            )
            settings = p.arms[arm]
            attack = None
            if settings.attack is not None:
                model = PurifiedClassifier(frozen, step.generator, step.transform)
                attack = build_attack(model, settings.attack, N_CLASSES)
                if hasattr(atop_trainer, "amp_attack"):  # bf16 training attack (attack_amp)
                    attack = atop_trainer.amp_attack(attack, device, settings.attack_amp)
            run = atop_trainer.atop_train_step(
                frozen, step, attack, lambda_cls=settings.lambda_cls,
                reconstruction_target=p.reconstruction_target,
            )  # fmt: skip
            xb, yb = images(batch or p.batch_size)
            steps[stage] = (functools.partial(run, xb, yb), len(xb))
        elif stage == "pgd_at":
            p = base["adversarial_training"]
            f = classifier(p)
            opt, attack = classifier_sgd(f, p.optimizer), pgd_attack(f, p.attack, N_CLASSES)
            xb, yb = images(batch or p.batch_size, nhwc(p))
            steps[stage] = (
                functools.partial(pgd_at_step, f, opt, xb, yb, attack=attack, amp=p.amp),
                len(xb),
            )
        elif stage == "rvs":
            p = base["rvs"]
            f, gp = classifier(p).train(), p.generator
            gen = RvSGenerator(eps=gp.eps, z_dim=gp.z_dim, image_size=32, channels=3).to(device)
            opt_g = torch.optim.SGD(gen.parameters(), lr=gp.lr, momentum=gp.momentum)
            ot_fn = functools.partial(entropic_ot, reg=p.ot.reg, num_iter=p.ot.num_iter)
            xb, yb = images(batch or p.batch_size, nhwc(p))
            steps[stage] = (
                functools.partial(rvs_step, f, gen, classifier_sgd(f, p.optimizer), opt_g, xb, yb,
                                  ot_fn=ot_fn, label_smoothing=p.label_smoothing,
                                  ot_weight=p.ot.weight, amp=p.amp),
                len(xb),
            )  # fmt: skip
    return steps


def matmul_peak(
    dtype: torch.dtype, n: int, repeats: int, device: torch.device, cpu_clock: bool = False
) -> float:
    """FLOP/s of the best of ``repeats`` ``n x n`` matmuls in ``dtype`` (after a warm-up);
    ``cpu_clock``: timed in CPU seconds per thread (:func:`benchmarks.common.alternate_clocks`)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.mm(a, b)  # warm-up
    run = {0: lambda: torch.mm(a, b, out=out)}
    best = min(alternate_clocks(run, 1, 1, device)[0][cpu_clock] for _ in range(repeats))
    return 2 * n**3 / best


def category(name: str, scopes: set[str]) -> str:
    """The :data:`CATEGORIES` entry of a profiled op (``scopes``: its enclosing ranges)."""
    if any(s.startswith("Optimizer.") for s in scopes) or "_foreach_" in name:
        return "optimizer"
    if "benchmarks::random_transform" in scopes:
        return "random transform"
    op = name.split("::")[-1]
    if "conv" in op or op in MATMULS or op.endswith("_mm"):
        return "conv/matmul"
    if any(k in op for k in ("batch_norm", "group_norm", "layer_norm", "instance_norm")):
        return "batch/group norm"
    if op.rstrip("_") in COPIES or op in COPIES or "reorder" in op:
        return "casts/copies/layout"
    return "elementwise/pooling/reductions"


def time_shares(step: Callable[[], Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Shares of one profiled call of ``step``'s op time (self CPU time) by :func:`category`
    (the random transform's calls are marked with a ``record_function`` range), and the
    five largest shares of single ops outside convolutions and matmuls."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from atop.transforms import RandomTransform

    forward = RandomTransform.forward

    def marked(self, *args, **kwargs):
        with record_function("benchmarks::random_transform"):
            return forward(self, *args, **kwargs)

    with mock.patch.object(RandomTransform, "forward", marked):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    totals = dict.fromkeys(CATEGORIES, 0.0)
    ops: dict[str, float] = {}
    for event in prof.events():
        scopes, parent = set(), event.cpu_parent
        while parent is not None:
            scopes.add(parent.name)
            parent = parent.cpu_parent
        kind = category(event.name, scopes | {event.name})
        totals[kind] += event.self_cpu_time_total
        if kind != "conv/matmul":
            ops[event.name] = ops.get(event.name, 0.0) + event.self_cpu_time_total
    total = sum(totals.values()) or 1.0
    top = sorted(ops.items(), key=lambda item: -item[1])[:5]
    return {k: v / total for k, v in totals.items()}, {k: v / total for k, v in top}


def flops(argv: list[str]) -> None:
    """FLOPs, seconds and GFLOP/s of each stage's step against the matmul peaks (prints a
    Markdown table; see the module docstring)."""
    p = parser("flops", __doc__)
    p.add_argument("--stages", default=DEFAULT_STAGES, help=f"some of {','.join(STAGES)}")
    p.add_argument(
        "--batch-size", type=positive_int, help="one batch for all (default: each stage's)"
    )
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per run")
    p.add_argument("--repeats", type=positive_int, default=3, help="runs, stages alternating")
    p.add_argument("--peak-size", type=positive_int, default=4096, help="side of the peak matmuls")
    p.add_argument("--peak-repeats", type=positive_int, default=5)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="see above")
    p.add_argument("--explain-below", type=positive_float, default=0.5,
                   help="profile the stages below this fraction of the bf16 peak")  # fmt: skip
    add_common(p)
    p.set_defaults(threads=2)
    args = p.parse_args(argv)
    stages = choices(args.stages, list(STAGES), "stages")
    device = setup_device(args)
    cpu_clock = args.clock == "cpu"
    peaks = {
        name: matmul_peak(dtype, args.peak_size, args.peak_repeats, device, cpu_clock)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    }
    largest = max([args.batch_size or 0, 128])
    steps = stage_steps(stages, *training_batch(largest, device), args.batch_size, device)
    counts = {}
    for stage, (step, _) in steps.items():
        step()  # warm-up (allocations, kernel selection)
        counts[stage] = count_flops(step)
    clocks = alternate_clocks({k: v[0] for k, v in steps.items()}, args.repeats, args.steps, device)
    seconds = {stage: clocks[stage][cpu_clock] for stage in clocks}
    print(
        f"device {device}, {torch.get_num_threads()} threads, {args.clock} clock"
        f"{' (CPU seconds per thread)' if cpu_clock else ''}; matmul peak ({args.peak_size}^2, "
        f"best of {args.peak_repeats}): bf16 {peaks['bf16'] / 1e9:,.1f} GFLOP/s, fp32 "
        f"{peaks['fp32'] / 1e9:,.1f} GFLOP/s; steps: median of {args.repeats} runs of "
        f"{args.steps}, real CIFAR-10 training images, base parameters, random weights"
    )
    rows, achieved = [], {}
    for stage, (_, batch) in steps.items():
        per_step = seconds[stage] / args.steps
        achieved[stage] = counts[stage] / per_step
        rows.append((stage, batch, f"{counts[stage] / 1e9:,.2f}", f"{per_step:.3f}",
                     f"{achieved[stage] / 1e9:,.1f}", percent(achieved[stage] / peaks["bf16"], 1),
                     percent(achieved[stage] / peaks["fp32"], 1)))  # fmt: skip
    headers = ("stage", "batch", "GFLOP per step", "s per step", "GFLOP/s", "% of bf16 peak",
               "% of fp32 peak")  # fmt: skip
    print(markdown_table(headers, rows))
    for stage in steps:
        print(f"  {stage}: {STAGES[stage]}")
    for stage, rate in achieved.items():
        if rate < args.explain_below * peaks["bf16"]:
            shares, top = time_shares(steps[stage][0])
            text = ", ".join(f"{k} {percent(v, 0)}" for k, v in shares.items())
            ops = ", ".join(f"{k} {percent(v, 0)}" for k, v in top.items())
            # the convolutions' own rate: the step's FLOPs over their share of its time
            own = rate / max(shares["conv/matmul"], 1e-9)
            print(f"  {stage} at {percent(rate / peaks['bf16'], 0)} of the bf16 peak; op time "
                  f"(torch.profiler, one step): {text}; largest other ops: {ops}; the "
                  f"convolutions / matmuls alone at about {own / 1e9:,.0f} GFLOP/s "
                  f"({percent(own / peaks['bf16'], 0)} of the bf16 peak)")  # fmt: skip

"""Two variants of every training step and attack, side by side on the same batch:
float32 vs bf16 autocast (``precision``) and the classifier in NCHW vs channels-last
(``layout``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

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

#: The workloads; the attacks count image-passes (PGD-5 x EOT-2 = 10 per image).
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
    name: str,
    doc: str | None,
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
    p = parser(name, doc)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--batches", type=positive_int, default=3, help="timed batches per run")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--workloads", default=WORKLOADS, help=f"some of {WORKLOADS}")
    add_common(p)
    args = p.parse_args(argv)
    workloads = choices(args.workloads, WORKLOADS.split(","), "workloads")
    device = setup_device(args)
    make = workload_factory(*training_batch(args.batch_size, device), device)
    title = (doc or name).strip().splitlines()[0].rstrip(".")
    print(
        f"{title}: device {device}, {torch.get_num_threads()} threads, batch "
        f"{args.batch_size}, {args.batches} batches per run, median of {args.repeats}"
    )
    for workload in workloads:
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
    """float32 vs bf16 autocast, side by side, for every training step and attack.

    The workloads of :func:`workload_factory` on one batch of real training images, the two
    precisions alternating (:func:`benchmarks.common.alternate`)."""
    side_by_side(
        argv, "precision", precision.__doc__, ("fp32", "bf16"),
        lambda make, workload, amp: make(workload, amp),
    )  # fmt: skip


def layout(argv: list[str]) -> None:
    """classifier NCHW vs NHWC (channels-last), side by side under bf16 autocast.

    The workloads of :func:`workload_factory` as the base profile runs them; for the attacks
    it also checks that both layouts return the same adversarial images from the same seed."""
    side_by_side(
        argv, "layout", layout.__doc__, ("NCHW", "NHWC"),
        lambda make, workload, nhwc: make(workload, True, nhwc), compare_outputs=True,
    )  # fmt: skip

"""The paper profile's compute, from FLOPs counted on CPU, and its projected GPU time
(``paper-projection``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    N_CLASSES,
    add_common,
    count_flops,
    parser,
    positive_float,
    positive_int,
    profile_parameters,
    setup_device,
    training_batch,
)
from benchmarks.evaluation import sanity_references


def paper_projection(argv: list[str]) -> None:
    """Each paper-profile stage's compute, from FLOPs counted on CPU, and its projected GPU
    time at an assumed sustained rate.

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

    from atop.defense import PurifiedClassifier
    from atop.models import build_classifier
    from atop.models.purifier import build_purifier
    from atop.models.rvs import RvSGenerator
    from atop.ot import entropic_ot
    from atop.trainers.atop import atop_train_step
    from atop.trainers.classifier import classifier_step
    from atop.trainers.purifier import PurifierStep
    from atop.trainers.rvs import rvs_step
    from atop.transforms import build_transform

    p = parser("paper-projection", paper_projection.__doc__)
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument("--tflops", type=positive_float, default=100.0, help="sustained TFLOP/s")
    p.add_argument("--skip-upsample", action="store_true", help="skip the 256 px route")
    add_common(p)
    args = p.parse_args(argv)
    device = setup_device(args)
    paper = profile_parameters("paper")
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
        return count_flops(fn) / b

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
    no_attack = flops[f"AToP step, no attack ({variant})"]

    def arm_steps(arm: str) -> int:
        """Forward-backward passes of the arm's training attack per image (0: none)."""
        attack = fin_p.arms[arm].attack
        return 0 if attack is None else int(dict(attack).get("steps", 1))

    main_arms = [arm for arm in fin_p.arms if arm != "atop_pgd"]
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
    sanity_fb = sum(
        len(extra) * ref.spec["steps"] * ref.spec["eot_iter"]
        + sanity.stronger["steps"] * sanity.stronger["eot_iter"]
        for ref, extra in sanity_references(ev_p)
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
        f"atop_finetuning ({len(main_arms)} arms)": fin_p.epochs
        * n_train
        * sum(no_attack + arm_steps(arm) * dfb for arm in main_arms),
        "adversarial_training": at_p.epochs * n_train * flops["PGD-AT step"],
        "rvs": rvs_p.epochs * n_train * flops["RvS step"],
        f"evaluation ({len(stochastic)} random + 3 deterministic)": evaluation,
        "convergence": convergence,
    }
    if "atop_pgd" in fin_p.arms:
        steps = arm_steps("atop_pgd")
        stages[f"atop_pgd (PGD-{steps})"] = fin_p.epochs * n_train * (no_attack + steps * dfb)
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
    total = sum(stages.values())
    print(f"| **total** | **{total / 1e15:,.0f}** | **{total / rate / 3600:,.1f}** |")

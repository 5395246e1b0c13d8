"""The fine-tuning arms' training attack under bf16 autocast against float32: its strength,
paired, and its time (``train-attack-amp``).

The attack is built as :mod:`atop.trainers.atop` builds it (the arm's spec of the base
``atop_finetuning`` block against the whole defended model f(g(t(.))) with the classifier in
NHWC, the purifier's own transform), on the PRETRAINED classifier and purifier (the
checkpoints, not random weights: a random model's gradients say nothing about strength), on
the first ``--images`` of the arms' training subset. Each batch is crafted both ways from the
same seed (the same draws of t), then every x' is judged against f(g(t(.))) in float32 with
``--draws`` fresh draws: the single-draw accuracy left (1 - success) and worst-of-N, and a
paired test of the per-image single-draw scores (bf16 - float32; positive = bf16 weaker).
Then one attack call and one whole AToP step (attack + GAN update + CE) are timed both ways,
alternating (median of ``--repeats`` runs of ``--batches`` batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from atop.data import random_subset, to_unit
from atop.training import autocast, bf16_available, seed_everything
from benchmarks.common import (
    BASE_MODELS,
    N_CLASSES,
    add_common,
    alternate,
    cifar10,
    markdown_table,
    parser,
    percent,
    positive_int,
    profile_parameters,
    require_files,
    setup_device,
)


def with_precision(attack: Callable, device: torch.device, amp: bool) -> Callable:
    """The attack under bf16 autocast (``amp``) or in float32, as the arms wrap it
    (``atop.trainers.atop.amp_attack`` where it exists)."""
    from atop.trainers import atop as trainer

    if hasattr(trainer, "amp_attack"):
        return trainer.amp_attack(attack, device, amp)

    def run(x: Tensor, y: Tensor) -> Tensor:
        with autocast(device, amp):
            return attack(x, y)

    return run


def training_models(args: Any, params: Any, device: torch.device) -> dict[str, Any]:
    """The arm's models, built from the checkpoints as the fine-tuning stage builds them:
    ``classifier``, ``generator``, ``discriminator``, ``transform``, ``defense``, ``attack``."""
    from atop.attacks import build_attack
    from atop.checkpoint import load_safe
    from atop.defense import PurifiedClassifier
    from atop.models import load_classifier
    from atop.models.purifier import load_purifier
    from atop.transforms import build_transform

    purifier = load_safe(args.purifier)
    transform_config = purifier.get("meta", {}).get("transform")
    if transform_config is None:
        raise SystemExit(f"{args.purifier} has no meta.transform: not a pretrained purifier")
    f = load_classifier(load_safe(args.classifier), device, channels_last=True)
    f.requires_grad_(False)
    g, d = load_purifier(purifier, device)
    transform = build_transform(transform_config)
    defense = PurifiedClassifier(f, g, transform).to(device)
    target = defense if params.attack_target == "defense" else f
    attack = build_attack(target, params.arms[args.arm].attack, N_CLASSES)
    return {"classifier": f, "generator": g, "discriminator": d, "transform": transform,
            "defense": defense, "attack": attack}  # fmt: skip


def paired(a: Tensor, b: Tensor) -> str:
    """The paired test of per-image scores ``a`` vs ``b``: ``atop.evaluation.stats.
    paired_test`` where it exists, else the Wilcoxon signed-rank test (Pratt's zeros)."""
    from atop.evaluation import stats

    if hasattr(stats, "paired_test"):
        t = stats.paired_test(a, b)
        low, high = t.ci
        return (f"delta {100 * t.delta:+.2f} points, 95 % CI [{100 * low:+.2f}, "
                f"{100 * high:+.2f}], p = {t.p_value:.3g} (paired_test: sign-flip test, "
                f"{t.n_nonzero} of {t.n} images differ)")  # fmt: skip
    from scipy.stats import wilcoxon

    diff = (a - b).double()
    p = 1.0 if not diff.any() else float(wilcoxon(diff.numpy(), zero_method="pratt").pvalue)
    return (f"delta {100 * float(diff.mean()):+.2f} points, p = {p:.3g} (Wilcoxon signed-rank, "
            f"zero_method='pratt'; {int((diff != 0).sum())} of {len(diff)} images differ)")  # fmt: skip


def train_attack_amp(argv: list[str]) -> None:
    """The training attack of an arm in bf16 vs float32: paired strength on the pretrained
    models, and time per attack and per AToP step (see the module docstring)."""
    from atop.attacks import draw_correct

    p = parser("train-attack-amp", __doc__)
    p.add_argument("--classifier", default=str(BASE_MODELS / "classifier.pt"))
    p.add_argument("--purifier", default=str(BASE_MODELS / "purifier.pt"), help="pretrained")
    p.add_argument("--arm", default="atop", help="an atop_finetuning arm with an attack")
    p.add_argument("--images", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, help="default: the arms' batch size")
    p.add_argument("--draws", type=positive_int, default=10)
    p.add_argument("--seed", type=int, default=0, help="batch k crafted from seed + k")
    p.add_argument("--batches", type=positive_int, default=3, help="timed batches per run")
    p.add_argument("--repeats", type=positive_int, default=3)
    add_common(p)
    args = p.parse_args(argv)
    require_files(args.classifier, args.purifier, why=(
        "the strength check needs the PRETRAINED classifier and purifier (`make run` writes "
        f"them to {BASE_MODELS}); random weights would say nothing about strength"))  # fmt: skip
    params = profile_parameters("base")["atop_finetuning"]
    attacked = [name for name, arm in params.arms.items() if arm.attack is not None]
    if args.arm not in attacked:
        p.error(f"--arm {args.arm!r}: choose an arm with a training attack: {attacked}")
    device = setup_device(args)
    batch = args.batch_size or params.batch_size
    subset_seed = getattr(params, "subset_seed", params.seed)
    keep = random_subset(50_000, params.train_images, subset_seed)[: args.images]
    images, labels = cifar10(50_000, train=True)
    x, y = to_unit(images[keep]).to(device), labels[keep].to(device)
    models = training_models(args, params, device)
    crafts = {amp: with_precision(models["attack"], device, amp) for amp in (False, True)}
    adversarial: dict[bool, list[Tensor]] = {False: [], True: []}
    for k, start in enumerate(range(0, len(x), batch)):
        xb, yb = x[start : start + batch], y[start : start + batch]
        for amp, craft in crafts.items():
            seed_everything(args.seed + k)  # the same draws of t both ways
            adversarial[amp].append(craft(xb, yb).detach())
    outputs = {"clean": x, "float32": torch.cat(adversarial[False]),
               "bf16 autocast": torch.cat(adversarial[True])}  # fmt: skip
    verdicts = {}
    for name, images_ in outputs.items():
        seed_everything(args.seed)  # the same judging draws for each
        verdicts[name] = draw_correct(models["defense"], images_, y, args.draws, batch)
    spec = dict(params.arms[args.arm].attack)
    print(
        f"train-attack-amp: arm {args.arm}'s training attack {spec} against "
        f"{'f(g(t(.)))' if params.attack_target == 'defense' else 'f'}; {args.classifier} + "
        f"{args.purifier}; the first {len(x)} images of the arms' training subset "
        f"(subset seed {subset_seed}), batch {batch}; judged with N = {args.draws} fresh fp32 "
        f"draws; {torch.get_num_threads()} threads"
    )
    if not bf16_available(device.type):
        print(f"  note: bf16 autocast is a no-op on {device}: both runs are float32")
    rows = []
    for name, v in verdicts.items():
        single = v.float().mean()
        success = "-" if name == "clean" else percent(1 - single)
        rows.append((name, percent(single), success, percent(v.all(dim=1).float().mean())))
    headers = ("x' crafted in", "single-draw accuracy", "success (1 - accuracy)",
               f"worst-of-{args.draws}")  # fmt: skip
    print(markdown_table(headers, rows))
    x32, x16 = outputs["float32"], outputs["bf16 autocast"]
    same = (x32 == x16).float().mean()
    print(f"  x' identical in {percent(same)} of the pixels; largest |bf16 - fp32| "
          f"{(x32 - x16).abs().max():.4f}")  # fmt: skip
    scores = {name: verdicts[name].float().mean(dim=1) for name in ("bf16 autocast", "float32")}
    print(f"  paired, bf16 - float32 single-draw accuracy per image (positive: bf16 weaker): "
          f"{paired(scores['bf16 autocast'], scores['float32'])}")  # fmt: skip
    time_both(args, params, device, x[:batch], y[:batch])


def time_both(args: Any, params: Any, device: torch.device, x: Tensor, y: Tensor) -> None:
    """One attack call and one whole AToP step per batch in float32 and bf16, alternating
    (each precision its own freshly loaded models, since the step updates g and D)."""
    from atop.trainers.atop import atop_train_step
    from atop.trainers.purifier import PurifierStep

    runs = {}
    for amp in (False, True):
        m = training_models(args, params, device)
        craft = with_precision(m["attack"], device, amp)
        step = PurifierStep.with_adam(
            m["generator"], m["discriminator"], m["transform"], params, device
        )
        train = atop_train_step(
            m["classifier"], step, craft, lambda_cls=params.arms[args.arm].lambda_cls,
            reconstruction_target=params.reconstruction_target,
        )  # fmt: skip
        runs[("attack", amp)] = lambda craft=craft: craft(x, y)
        runs[("AToP step", amp)] = lambda train=train: train(x, y)
    for run in runs.values():
        run()  # warm-up
    seconds = alternate(runs, args.repeats, args.batches, device)
    parts = []
    for what in ("attack", "AToP step"):
        fp32, bf16 = (seconds[(what, amp)] / args.batches for amp in (False, True))
        parts.append(f"{what} fp32 {fp32:.3f} s, bf16 {bf16:.3f} s ({fp32 / bf16:.2f}x)")
    print(f"  time per batch of {len(x)} (median of {args.repeats} runs of {args.batches}, "
          f"alternating): " + "; ".join(parts))  # fmt: skip

"""Evaluate YOUR defense with the project's protocol (docs/evaluate-your-defense.md).

::

    .venv/bin/python -m examples.evaluate_your_defense            # 128 images (~3 CPU-minutes)
    .venv/bin/python -m examples.evaluate_your_defense --quick    # 32 images (~20 s)

On real CIFAR-10 test images (the first of the fixed evaluation subset that ``atop evaluate``
uses) it evaluates the toy defense of :mod:`examples.toy_defense` (put yours in
:func:`build_model`): every verdict judged with N fresh draws; EOT-PGD with exact gradients
(ℓ∞ 8/255, ℓ2 0.5); AutoAttack-rand with its steps set (APGD-CE + APGD-DLR on the EOT-mean
loss, success re-judged with fresh draws); FGSM; one torchattacks attack object; the
gradient-masking sanity checks; the fixed-randomness diagnostic. It prints the report and
writes the per-image, per-draw verdicts as CSV.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchattacks
from torch import Tensor, nn

from atop.data import random_subset
from atop.evaluation import Defense, EvalResult, EvalSettings, evaluate
from atop.evaluation.protocol import EvalData, format_eps, per_image, plugin_worst, worst_case
from atop.evaluation.sanity import SanityParams, sanity_checks, sanity_runs
from atop.evaluation.stats import accuracy_ci, paired_test
from atop.evaluation.suite import fixed_randomness_run
from examples import toy_defense

OUT = Path(__file__).resolve().parent / "output" / "toy_verdicts.csv"
LINF, L2 = 8 / 255, 0.5
NORMS = ("Linf", "L2")
#: The project's fixed evaluation subset (data_ingestion.eval_subset: 512 images, seed 0).
SUBSET, SUBSET_SEED = 512, 0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much to run: images, fresh draws per verdict, PGD and AutoAttack steps, EOT
    samples per step, the sanity checks' ε sweeps and stronger attack, the batch size."""

    images: int = 128
    draws: int = 10
    steps: int = 20
    eot: int = 8
    autoattack_steps: int = 20
    sweep_linf: tuple[float, ...] = (0, 8 / 255, 16 / 255, 64 / 255)
    sweep_l2: tuple[float, ...] = (0, 0.5, 1.0, 4.0)
    stronger_steps: int = 40
    stronger_eot: int = 8
    batch_size: int = 64


QUICK = Sizes(
    images=32, steps=10, eot=4, autoattack_steps=10, sweep_linf=(0, 8 / 255, 64 / 255),
    sweep_l2=(0, 0.5, 4.0), stronger_steps=20, stronger_eot=8, batch_size=32,
)  # fmt: skip


def build_model(root: str | None = None) -> nn.Module:
    """YOUR model: float32 ``[N, 3, H, W]`` in ``[0, 1]`` -> logits, random or not (the toy
    trains on the CIFAR-10 found in ``root``)."""
    return toy_defense.build(root)


def attack_specs(model: nn.Module, sizes: Sizes) -> dict[str, Any]:
    """Label -> a :func:`atop.attacks.build_attack` spec (its ``eps`` and ``norm`` set the
    threat model) or a torchattacks attack object on ``model`` (any works)."""
    steps, eot, aa = sizes.steps, sizes.eot, sizes.autoattack_steps
    return {
        "fgsm": {"name": "fgsm", "eps": LINF},
        "pgd_linf": {"name": "pgd", "norm": "Linf", "eps": LINF, "alpha": 2 / 255, "steps": steps, "eot_iter": eot},
        "autoattack_rand": {"name": "autoattack", "version": "rand", "norm": "Linf", "eps": LINF, "steps": aa, "eot_iter": eot},
        "mifgsm": torchattacks.MIFGSM(model, eps=LINF, alpha=2 / 255, steps=steps),  # no EOT
        "pgd_l2": {"name": "pgd", "norm": "L2", "eps": L2, "alpha": 0.1, "steps": steps, "eot_iter": eot},
        "autoattack_rand_l2": {"name": "autoattack", "version": "rand", "norm": "L2", "eps": L2, "steps": aa, "eot_iter": eot},
    }  # fmt: skip


def evaluation_images(n: int, root: str | None = None) -> tuple[Tensor, Tensor, list[int]]:
    """The first ``n`` images of the fixed evaluation subset of the CIFAR-10 test set (as
    ``atop evaluate``): float32 in ``[0, 1]``, int64 labels, test-set indices."""
    images, labels = toy_defense.load_cifar10("test", root)
    indices = random_subset(len(labels), SUBSET, SUBSET_SEED)[:n]
    return images[indices].float() / 255, labels[indices], indices.tolist()


def run(
    sizes: Sizes = QUICK, out: str | Path | None = OUT, root: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """Evaluate :func:`build_model` on ``sizes`` and print the report.

    Returns:
        ``"single"``, ``"worst_of_n"``: :meth:`EvalResult.accuracy` under each rule;
        ``"fixed"``: ``{norm: {"clean", "attack", "worst_case", "fresh", "p_value"}}``, the
        fixed-randomness diagnostic (``fresh``: the same attack's single-draw accuracy,
        ``p_value``: their paired test); ``"plugin_worst"``: ``{norm: accuracy}``;
        ``"sanity"``: the checks; ``"verdicts"``: the CSV path (or ``None``).
    """
    began = time.perf_counter()
    model = build_model(root)
    stochastic = getattr(model, "stochastic", True)  # fresh draws of a deterministic model agree
    images, labels, indices = evaluation_images(sizes.images, root)
    print(f"Model: {describe(model)} (built in {time.perf_counter() - began:.1f} s)")

    began = time.perf_counter()
    settings = EvalSettings(batch_size=sizes.batch_size, draws=sizes.draws, seed=seed)
    result = evaluate(model, images, labels, attack_specs(model, sizes), settings, stochastic=stochastic)  # fmt: skip
    draws = result.clean.shape[1]
    print(
        f"{len(labels)} CIFAR-10 test images (the first of the fixed evaluation subset), "
        f"N = {draws} fresh draw(s) per verdict; attacks and judging {time.perf_counter() - began:.0f} s"
    )  # fmt: skip

    began = time.perf_counter()
    defense = Defense(getattr(model, "name", "model"), model, stochastic)
    with torch.no_grad():
        classes = model(images[:1]).shape[1]
    data = EvalData(images, labels, indices, classes)
    references = [e for e in result.entries if e.label in ("pgd_linf", "pgd_l2")]
    checks = run_sanity_checks(defense, result, references, data, settings, sizes)
    fixed = {}
    if stochastic:  # the reference attacks on one fixed draw, judged with that draw
        fixed = {r.norm: fixed_randomness_run(defense, r, data, settings) for r in references}
    seconds = time.perf_counter() - began

    single, worst = result.accuracy("single"), result.accuracy("worst_of_n")
    print_table(result, single, worst, fixed, draws)
    plugin = {
        norm: plugin_worst([result.clean, *norm_draws(result, norm)]).mean().item()
        for norm in NORMS
    }
    print(
        f"\nPlug-in minimum of the single-draw fractions (biased low, method.md §6.2; not the "
        f"headline): Linf {100 * plugin['Linf']:.1f} %, L2 {100 * plugin['L2']:.1f} %"
    )
    fixed_numbers = print_fixed(result, fixed)
    print(f"\nSanity checks (one-sided paired tests at level 0.05; {seconds:.0f} s with the diagnostic):")  # fmt: skip
    for name, check in checks.items():
        print(f"  {check['status']:7s} {name}: {check['detail']}")
    path = None
    if out is not None:
        path = write_verdicts(out, result, fixed, labels, indices)
        print(
            f"\nPer-image verdicts (a row per image and attack; `draws`: 1 = right, one digit "
            f"per fresh draw): {path}"
        )
    return {
        "single": single,
        "worst_of_n": worst,
        "fixed": fixed_numbers,
        "plugin_worst": plugin,
        "sanity": checks,
        "verdicts": path,
    }


def norm_draws(result: EvalResult, norm: str) -> list[Tensor]:
    """The verdicts of every attack of threat model ``norm``."""
    return [result.runs[e.label].draws for e in result.entries if e.norm == norm]


def run_sanity_checks(
    defense: Defense,
    result: EvalResult,
    references: Sequence,
    data: EvalData,
    settings: EvalSettings,
    sizes: Sizes,
) -> dict[str, dict[str, Any]]:
    """The gradient-masking sanity checks: for each reference PGD, its ε sweep and a
    stronger run (:func:`sanity_runs`), then every check that applies
    (:func:`sanity_checks`: BPDA vs exact needs a model with a ``bpda`` switch)."""
    params = SanityParams(
        references=[r.label for r in references],
        defenses=None,
        eps_sweep={"Linf": list(sizes.sweep_linf), "L2": list(sizes.sweep_l2)},
        stronger={"steps": sizes.stronger_steps, "eot_iter": sizes.stronger_eot},
        images=None,
        large_eps_max_acc=0.05,
        alpha=0.05,
    )
    runs = [
        sanity_runs(
            defense, r, result.runs[r.label].draws, result.clean,
            [float(eps) for eps in params.eps_sweep[r.norm]], data, params, settings,
        )
        for r in references
    ]  # fmt: skip
    verdicts = {label: run.draws for label, run in result.runs.items()}
    return sanity_checks(result.clean, verdicts, result.entries, runs, params)


def describe(model: nn.Module) -> str:
    """One line about the toy defense (the type name of another model)."""
    if isinstance(model, toy_defense.NoisyDefense):
        info = model.classifier.fit_info
        return (
            f"Gaussian noise (sigma {model.sigma}) in front of a random-patch classifier fitted "
            f"in {info['seconds']:.1f} s on {info['images']} noisy CIFAR-10 training images"
        )
    return type(model).__name__


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def print_table(
    result: EvalResult,
    single: Mapping[str, float],
    worst: Mapping[str, float],
    fixed: Mapping[str, Mapping[str, Any]],
    draws: int,
) -> None:
    """The report: clean, each attack and the worst case per threat model, as single-draw
    accuracy (95 % CI), worst-of-N, and (reference attacks) the fixed-randomness diagnostic."""
    fixed_by_attack = {f["attack"]: f for f in fixed.values()}
    header = (
        f"{'':22s} {'threat model':13s} {'single-draw [95% CI]':>22s} "
        f"{f'worst-of-{draws}':>12s} {'fixed draw':>11s}"
    )
    print("\n" + header + "\n" + "-" * len(header))

    def row(name: str, model: str, scores: Tensor, wor: float, fix: Tensor | None) -> None:
        acc, low, high = accuracy_ci(scores)
        ci = f"{_pct(acc)} [{_pct(low)}, {_pct(high)}]"
        fix_text = "-" if fix is None else _pct(fix.float().mean().item())
        print(f"{name:22s} {model:13s} {ci:>22s} {_pct(wor):>12s} {fix_text:>11s}")

    first = next(iter(fixed.values()), None)
    row("clean", "-", per_image(result.clean, "single"), worst["clean"], first and first["clean"])
    for entry in result.entries:
        f = fixed_by_attack.get(entry.label)
        model = f"{entry.norm} {format_eps(entry.eps, entry.norm)}"
        scores = per_image(result.runs[entry.label].draws, "single")
        row(entry.label, model, scores, worst[entry.label], f and f["draws"])
    for norm in NORMS:
        sets = [result.clean, *norm_draws(result, norm)]
        f = fixed.get(norm)
        both = None if f is None else f["clean"] & f["draws"]
        key = f"worst_case_{norm}"
        row(f"worst case {norm}", "cross-fitted", worst_case(sets, "single"), worst[key], both)


def print_fixed(
    result: EvalResult, fixed: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """Print the fixed-randomness diagnostic (fresh draws vs one fixed draw, paired per
    image) and return its numbers per norm (see :func:`run`)."""
    out: dict[str, dict[str, float]] = {}
    if not fixed:
        print("\nFixed-randomness diagnostic: not run (a deterministic model).")
        return out
    print(
        "\nFixed-randomness diagnostic (the reference PGD, EOT 1, attacks ONE fixed draw of the "
        "randomness and is judged with it):"
    )
    for norm, f in fixed.items():
        fresh = per_image(result.runs[f["attack"]].draws, "single")
        held = f["draws"][:, 0].float()
        test = paired_test(held, fresh)
        print(
            f"  {f['attack']:9s} fresh draws {_pct(fresh.mean().item()):>5s} % single-draw -> "
            f"fixed draw {_pct(held.mean().item()):>5s} % ({100 * test.delta:+.1f} points, "
            f"95 % CI [{100 * test.ci[0]:+.1f}, {100 * test.ci[1]:+.1f}], p = {test.p_value:.2g})"
        )
        out[norm] = {
            "clean": f["clean"].float().mean().item(),
            "attack": held.mean().item(),
            "worst_case": (f["clean"] & f["draws"]).float().mean().item(),
            "fresh": fresh.mean().item(),
            "p_value": test.p_value,
        }
    return out


def write_verdicts(
    out: str | Path,
    result: EvalResult,
    fixed: Mapping[str, Mapping[str, Any]],
    labels: Tensor,
    indices: Sequence[int],
) -> Path:
    """Write a CSV row per image and verdict set: ``image`` (test-set index), ``label``,
    ``attack`` (``clean``, a label, or ``<label>@fixed`` / ``clean@fixed`` for the
    fixed-randomness runs), ``draws`` (a 1/0 digit per fresh draw), ``single_draw``,
    ``worst_of_n``."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sets = {"clean": result.clean, **{k: r.draws for k, r in result.runs.items()}}
    for f in fixed.values():
        sets.setdefault("clean@fixed", f["clean"])
        sets[f"{f['attack']}@fixed"] = f["draws"]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "attack", "draws", "single_draw", "worst_of_n"])
        for name, verdicts in sets.items():
            for i, row in enumerate(verdicts.tolist()):
                bits = "".join("1" if v else "0" for v in row)
                score = sum(row) / len(row)
                writer.writerow([indices[i], int(labels[i]), name, bits, f"{score:.3f}", int(all(row))])  # fmt: skip
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``--quick`` (small sizes), ``--images``, ``--draws``, ``--out``, ``--data-root``."""
    parser = argparse.ArgumentParser(description="Evaluate a defense with the atop protocol.")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--images", type=int, help="evaluation images (default 128; quick 32)")
    parser.add_argument("--draws", type=int, help="fresh draws per verdict (default 10)")
    parser.add_argument("--out", default=str(OUT), help="the per-image verdicts CSV")
    parser.add_argument("--data-root", help="the folder holding cifar-10-batches-py")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    for key in ("images", "draws"):
        if getattr(args, key) is not None:
            sizes = dataclasses.replace(sizes, **{key: getattr(args, key)})
    run(sizes, args.out, args.data_root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

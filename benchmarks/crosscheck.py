"""An attack written independently of the project's attack and protocol code, to check its
headline numbers (``crosscheck``).

EOT-PGD in plain torch: exact gradients through the whole stochastic defense f(g(t(x)))
(no BPDA), each step's gradient the mean of the input gradients of ``--eot`` fresh draws
(the draws of a batch stacked as copies in one forward pass, up to ``--batch-size`` rows);
l-inf (random start uniform in the box, sign steps, projection onto the box) and l2
(random start uniform in the ball, steps along the normalized gradient, projection onto the
ball); the last iterate is kept. Every adversarial example is judged in float32 with
``--draws`` fresh draws: single-draw accuracy (mean over draws) and worst-of-N (right on
every draw), each with its exact 95 % Clopper-Pearson interval over images (the
single-draw one on the summed per-image fractions: conservative). The images are test
images outside both the evaluation subset and the monitor subset (never evaluated, never
used to monitor training). Nothing here imports ``atop.attacks`` or
``atop.evaluation.protocol``: only :func:`atop.load_defense` builds the model.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atop.data import random_subset
from benchmarks.common import (
    PROJECT_ROOT,
    add_common,
    cifar10,
    markdown_table,
    parser,
    percent,
    positive_float,
    positive_int,
    profile_parameters,
    require_files,
    setup_device,
)


def _norms(t: Tensor) -> Tensor:
    """Per-image l2 norms of ``[B, ...]``, shaped ``[B, 1, 1, 1]`` for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _precision(x: Tensor, amp: bool):
    """bf16 autocast for the attack's passes when ``amp``, else float32."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else nullcontext()


def eot_gradient(
    model: nn.Module, x: Tensor, y: Tensor, eot: int, rows: int, amp: bool = False
) -> Tensor:
    """The mean over ``eot`` fresh draws of the input gradient of the cross-entropy of
    ``model`` at ``x`` (``[B, C, H, W]``); the draws run as copies of the batch, up to
    ``rows`` rows per forward pass (each row of a pass draws its own randomness)."""
    n = len(x)
    copies = max(1, min(eot, rows // n))
    total = torch.zeros_like(x)
    done = 0
    while done < eot:
        k = min(copies, eot - done)
        batch = x.detach().repeat(k, 1, 1, 1).requires_grad_(True)
        with _precision(x, amp):
            logits = model(batch)
        loss = F.cross_entropy(logits.float(), y.repeat(k), reduction="sum")
        (grad,) = torch.autograd.grad(loss, batch)
        total += grad.view(k, *x.shape).sum(dim=0)
        done += k
    return total / eot


def pgd_linf(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, eot: int,
    rows: int, amp: bool = False,
) -> Tensor:  # fmt: skip
    """l-inf EOT-PGD: a uniform random start in the eps-box, ``steps`` sign steps of size
    ``alpha``, each followed by the projection onto the box and [0, 1]."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        grad = eot_gradient(model, x_adv, y, eot, rows, amp)
        x_adv = x_adv + alpha * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def pgd_l2(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, eot: int,
    rows: int, amp: bool = False,
) -> Tensor:  # fmt: skip
    """l2 EOT-PGD: a random start uniform in the eps-ball (direction uniform on the sphere,
    radius ``eps * u ** (1 / d)``), ``steps`` steps of length ``alpha`` along the
    normalized gradient, each followed by the projection onto the ball and [0, 1]
    (clipping to [0, 1] only shortens the perturbation)."""
    direction = torch.randn_like(x)
    direction = direction / _norms(direction).clamp_min(1e-12)
    radius = eps * torch.rand(len(x), *([1] * (x.dim() - 1)), device=x.device) ** (1 / x[0].numel())
    x_adv = (x + radius * direction).clamp(0, 1)
    for _ in range(steps):
        grad = eot_gradient(model, x_adv, y, eot, rows, amp)
        x_adv = x_adv + alpha * grad / _norms(grad).clamp_min(1e-12)
        delta = x_adv - x
        delta = delta * (eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)
        x_adv = (x + delta).clamp(0, 1)
    return x_adv.detach()


@torch.no_grad()
def judge(model: nn.Module, x: Tensor, y: Tensor, draws: int, rows: int) -> Tensor:
    """bool ``[B, draws]``: whether each of ``draws`` fresh float32 passes classifies each
    image right (the draws as copies of the batch, up to ``rows`` rows per pass)."""
    copies = max(1, min(draws, rows // len(x)))
    verdicts, done = [], 0
    with torch.autocast(x.device.type, enabled=False):
        while done < draws:
            k = min(copies, draws - done)
            logits = model(x.repeat(k, 1, 1, 1)).float()
            verdicts.append((logits.argmax(dim=1) == y.repeat(k)).view(k, len(x)))
            done += k
    return torch.cat(verdicts).T.cpu()


def clopper_pearson(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval of a proportion (``successes`` may be fractional)."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = 0.0 if successes <= 0 else float(beta.ppf(tail, successes, n - successes + 1))
    high = 1.0 if successes >= n else float(beta.ppf(1 - tail, successes + 1, n - successes))
    return low, high


def summary(verdicts: Tensor) -> list[str]:
    """Table cells: single-draw accuracy and its interval, worst-of-N and its interval."""
    n = len(verdicts)
    single = float(verdicts.float().mean(dim=1).sum())
    worst = float(verdicts.all(dim=1).sum())
    cells = []
    for count in (single, worst):
        low, high = clopper_pearson(count, n)
        cells += [percent(count / n), f"[{100 * low:.2f}, {100 * high:.2f}]"]
    return cells


def split_subsets(run: str | os.PathLike = PROJECT_ROOT) -> tuple[list[int], list[int], str]:
    """The base profile's evaluation and monitor subsets of the test split (indices), and
    where they came from: ``data/05_model_input/cifar10/base/{eval,monitor}_indices.json``
    of the project folder ``run`` when present, else drawn as data_ingestion draws them
    (:func:`atop.data.random_subset`, the base ``eval_subset`` / ``monitor_subset``)."""
    folder = Path(run) / "data" / "05_model_input" / "cifar10" / "base"
    files = folder / "eval_indices.json", folder / "monitor_indices.json"
    if all(f.is_file() for f in files):
        return (*(json.loads(f.read_text()) for f in files), str(folder))
    ingestion = profile_parameters("base").raw_block("data_ingestion")
    subset, held = ingestion["eval_subset"], ingestion["monitor_subset"]
    evals = random_subset(10_000, subset["images"], subset["seed"])
    monitor = random_subset(10_000, held["images"], held["seed"], exclude=evals)
    return evals.tolist(), monitor.tolist(), "drawn as data_ingestion (base) draws them"


def held_out_images(n: int, run: str) -> tuple[list[int], str]:
    """The first ``n`` test indices outside both the evaluation and the monitor subset, and
    where those subsets came from (:func:`split_subsets`)."""
    evals, monitor, source = split_subsets(run)
    taken = set(evals) | set(monitor)
    free = [i for i in range(10_000) if i not in taken]
    if n > len(free):
        raise SystemExit(f"--images {n}: only {len(free)} test images lie outside both subsets")
    return free[:n], source


def crosscheck(argv: list[str]) -> None:
    """Independent EOT-PGD (l-inf and l2) on held-out test images against a trained defense
    (see the module docstring); prints a Markdown table, ``--out`` writes every verdict."""
    from atop import load_defense
    from atop.data import to_unit

    p = parser("crosscheck", __doc__)
    p.add_argument("--classifier", required=True, help="classifier checkpoint (.pt)")
    p.add_argument("--purifier", required=True, help="purifier checkpoint (.pt)")
    p.add_argument("--images", type=positive_int, default=128)
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--eot", type=positive_int, default=16, help="fresh draws per gradient")
    p.add_argument("--norm", default="both", choices=("Linf", "L2", "both"))
    p.add_argument("--draws", type=positive_int, default=10, help="judging draws per image")
    p.add_argument("--batch-size", type=positive_int, default=256, help="rows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="attack gradients under bf16 autocast")
    p.add_argument("--eps-linf", type=positive_float, default=8 / 255, help="e.g. 8/255")
    p.add_argument("--alpha-linf", type=positive_float, default=2 / 255)
    p.add_argument("--eps-l2", type=positive_float, default=0.5)
    p.add_argument("--alpha-l2", type=positive_float, default=0.1)
    p.add_argument("--run", default=str(PROJECT_ROOT), help="project folder of the subsets")
    p.add_argument("--out", help="write the per-image, per-draw verdicts here (JSON)")
    add_common(p)
    args = p.parse_args(argv)
    require_files(args.classifier, args.purifier, why="give trained checkpoints (make run)")
    device = setup_device(args)
    model = load_defense(args.classifier, args.purifier, device=device).eval()
    indices, source = held_out_images(args.images, args.run)
    images, labels = cifar10(10_000, train=False)
    x, y = to_unit(images[indices]).to(device), labels[indices].to(device)
    chunk = min(len(x), args.batch_size)
    attacks = {
        "Linf": (pgd_linf, args.eps_linf, args.alpha_linf),
        "L2": (pgd_l2, args.eps_l2, args.alpha_l2),
    }
    norms = list(attacks) if args.norm == "both" else [args.norm]
    torch.manual_seed(args.seed)
    results = {"clean": (judge_all(model, x, y, args.draws, args.batch_size, chunk), 0.0, 0.0)}
    for k, norm in enumerate(norms, start=1):
        attack, eps, alpha = attacks[norm]
        torch.manual_seed(args.seed + k)
        began, pieces = time.perf_counter(), []
        for start in range(0, len(x), chunk):
            xs, ys = x[start : start + chunk], y[start : start + chunk]
            pieces.append(attack(model, xs, ys, eps, alpha, args.steps, args.eot,
                                 args.batch_size, args.amp))  # fmt: skip
        x_adv, seconds = torch.cat(pieces), time.perf_counter() - began
        delta = (x_adv - x).flatten(1)
        largest = float(delta.abs().amax() if norm == "Linf" else delta.norm(dim=1).amax())
        verdicts = judge_all(model, x_adv, y, args.draws, args.batch_size, chunk)
        results[norm] = (verdicts, seconds, largest)
    print(
        f"crosscheck (benchmarks/crosscheck.py, plain torch EOT-PGD, exact gradients): "
        f"{args.classifier} + {args.purifier}; {len(x)} test images outside the evaluation "
        f"and monitor subsets ({source}), the first from index {indices[0]}; PGD-{args.steps} "
        f"x EOT-{args.eot}, gradients in {'bf16' if args.amp else 'fp32'}, seed {args.seed}; "
        f"judged with N = {args.draws} fresh fp32 draws; {torch.get_num_threads()} threads"
    )
    rows = []
    for name, (verdicts, seconds, largest) in results.items():
        if name == "clean":
            label, budget = "clean", "-"
        else:
            _, eps, alpha = attacks[name]
            label = f"{name} eps {describe(eps, name)}, alpha {describe(alpha, name)}"
            budget = f"{largest:.4f} (eps {eps:.4f})"
        rows.append((label, *summary(verdicts), budget, f"{seconds:.0f}"))
    headers = ("attack", "single-draw", "95 % CI", f"worst-of-{args.draws}", "95 % CI",
               "largest perturbation", "s")  # fmt: skip
    print(markdown_table(headers, rows))
    if args.out:
        record = {"indices": indices, "labels": y.tolist(), "args": vars(args),
                  "verdicts": {k: v[0].int().tolist() for k, v in results.items()}}  # fmt: skip
        with open(args.out, "w") as fh:
            json.dump(record, fh)


def judge_all(model: nn.Module, x: Tensor, y: Tensor, draws: int, rows: int, chunk: int):
    """:func:`judge` over chunks of ``chunk`` images: bool ``[N, draws]``."""
    parts = [
        judge(model, x[s : s + chunk], y[s : s + chunk], draws, rows)
        for s in range(0, len(x), chunk)
    ]
    return torch.cat(parts)


def describe(value: float, norm: str) -> str:
    """``8/255`` for an l-inf budget that is a whole number of 255ths, else the number."""
    steps = value * 255
    if norm == "Linf" and abs(steps - round(steps)) < 1e-6:
        return f"{round(steps)}/255"
    return f"{value:g}"

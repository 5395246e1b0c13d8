"""The robust-evaluation protocol as a library: attack a model, judge it honestly.

:func:`evaluate` is the entry point (RobustBench's ``benchmark`` is the model)::

    from atop import evaluate, load_defense
    model = load_defense("classifier.pt", "purifier_atop.pt")
    result = evaluate(model, images, labels, {"pgd": torchattacks.EOTPGD(model, ...)})
    result.accuracy()            # {"clean": 0.48, "pgd": 0.16}

The rules that keep the numbers honest (method.md §4):

* Attacks hit the WHOLE model with exact gradients (through ``t`` and ``g`` for a purified
  defense), with EOT for stochastic models (``eot_iter`` of each spec); deterministic models
  get ``eot_iter = 1`` (:func:`defense_spec`).
* **N-evaluation** (DiffHammer, method.md §5.2): every adversarial example and every clean
  image of a stochastic model is judged with ``draws`` fresh forward passes
  (:func:`atop.attacks.draw_correct`), never with the pass an attack used. Two rules come
  from the same verdicts: **single-draw** accuracy (the mean over draws: what one query sees,
  the paper's convention and the headline) and **worst-of-N** (an image counts only if every
  draw is right: an attacker who can resubmit). Deterministic models need one pass.
* **Independent random streams.** Every batch of every attack run and of every judging
  pass is seeded on its own, from ``(seed, defense, run label, "attack" | "judge", batch
  index)`` (:func:`stream_seed`), so no two verdict sets of a run share a draw, a model's
  numbers do not depend on what ran before, and a sharded evaluation (the batches dealt to
  the ranks of a ``torch.distributed`` group, :mod:`atop.distributed`) gives the verdicts of
  one process.
* The headline is the per-image worst case over clean and every ε-bounded attack of one
  threat model (ℓ∞ and ℓ2 separately; :func:`worst_cases`). Single-draw, it is
  **cross-fitted** (:func:`crossfit_worst`): each image's worst attack is chosen on one half
  of the draws and scored on the other half (and the reverse, averaged), because the plain
  minimum of several noisy single-draw fractions is biased low (method.md §6.2).
  Worst-of-N, it is "right on all N draws of every attack".

Attack entries (the evaluation stage's ``attacks`` list) are :func:`atop.attacks.build_attack`
specs plus a ``label``. C&W ℓ2 is unbounded: with an ``eps`` in its entry, successes with a
larger ℓ2 perturbation are discarded (:func:`bound_l2`); without one it stays out of the worst
cases.

Core module: torch, torchattacks and the project's core modules only.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchattacks.attack import Attack

from atop import distributed
from atop.attacks import build_attack, draw_correct, run_attack
from atop.data import to_unit
from atop.evaluation.defenses import Defense, describe
from atop.params import fraction
from atop.progress import progress
from atop.training import autocast, autocast_copy, seed_everything

log = logging.getLogger(__name__)

#: Keys an attack entry may have besides its ``build_attack`` spec.
ENTRY_ONLY_KEYS = ("label", "applies_to", "defenses", "survivors")
#: ``applies_to`` values: which defenses an entry runs on.
APPLIES_TO = ("all", "deterministic", "stochastic")
#: Keys set by the evaluation itself (one home: the settings' ``seed`` and ``draws``).
INJECTED_AUTOATTACK_KEYS = ("seed", "draws")
#: ``validate(clean, adversarial, labels, eps, norm, name, indices)``: an extra check of an
#: attack's output before it is judged (the pipeline passes its Great Expectations suite).
Validator = Callable[[Tensor, Tensor, Tensor, float | None, str, str, Sequence[int]], None]


def format_eps(eps: float | None, norm: str | None = "Linf") -> str:
    """``8/255`` for ℓ∞ budgets that are whole multiples of 1/255, else ``0.5``; ``-`` for None."""
    if eps is None:
        return "-"
    if norm == "Linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


@dataclass(frozen=True)
class AttackEntry:
    """One attack of the evaluation.

    Attributes:
        label: unique name in the report (letters, digits, ``_``, ``-``).
        spec: the :func:`atop.attacks.build_attack` spec (numbers parsed, no label).
        norm: threat model, ``"Linf"`` or ``"L2"`` (C&W: ``"L2"``).
        eps: perturbation bound on the ``[0, 1]`` scale, or ``None`` (unbounded C&W).
        applies_to: ``all``, ``deterministic`` or ``stochastic`` defenses (e.g.
            AutoAttack-standard, ~10x the cost of -rand per image, on the deterministic ones).
        defenses: the names of the defenses it runs on (``None``: every defense), e.g. BPDA
            on AP and AToP only where the budget is tight.
        survivors: attack only the images that clean and the earlier entries of the same
            threat model left with a right draw (:func:`run_on_survivors`): a stronger attack
            at the cost of the few images still standing.
    """

    label: str
    spec: dict[str, Any]
    norm: str
    eps: float | None
    applies_to: str = "all"
    defenses: tuple[str, ...] | None = None
    survivors: bool = False

    @property
    def name(self) -> str:
        return self.spec["name"]


def parse_attacks(entries: Sequence[Mapping[str, Any]]) -> list[AttackEntry]:
    """Parse an ``attacks`` list: labels, budgets (``"8/255"`` accepted), threat models.

    The spec itself is checked by :func:`atop.attacks.build_attack`. ``autoattack`` entries
    must not set ``seed`` or ``draws``: they come from the settings.

    Raises:
        ValueError: empty list, an entry without ``label``/``name``, duplicate labels,
            ``seed``/``draws`` in an autoattack entry, a non-numeric ``eps``/``alpha``, or
            ``survivors`` not a bool or on an entry without ``eps``.
    """
    if not entries:
        raise ValueError("evaluation.attacks is empty: list at least one attack.")
    parsed: list[AttackEntry] = []
    for entry in entries:
        if not isinstance(entry, Mapping) or "label" not in entry or "name" not in entry:
            raise ValueError(
                f"Each evaluation.attacks entry needs a 'label' and a 'name' (a build_attack "
                f"spec), got {entry!r}"
            )
        label = str(entry["label"])
        if not label.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"Attack label {label!r}: use letters, digits, '_' or '-' only.")
        if label in {e.label for e in parsed} or label in ("clean", "worst_case"):
            raise ValueError(f"Attack label {label!r} is used twice (or reserved): rename it.")
        spec = {k: v for k, v in entry.items() if k not in ENTRY_ONLY_KEYS}
        spec["name"] = str(spec["name"]).lower()
        for key in ("eps", "alpha"):
            if key in spec:
                try:
                    spec[key] = fraction(spec[key])
                except ValueError as exc:
                    raise ValueError(f"Attack {label!r}: {key} {exc}") from None
        eps = spec.get("eps")
        if spec["name"] == "cw":
            norm = "L2"
            spec.pop("eps", None)
        else:
            norm = spec.get("norm", "Linf")
        given = [k for k in INJECTED_AUTOATTACK_KEYS if k in spec]
        if spec["name"] == "autoattack" and given:
            raise ValueError(
                f"Attack {label!r}: remove {given}; AutoAttack's seed and success-judge "
                "draws come from evaluation.seed and evaluation.draws."
            )
        applies_to = str(entry.get("applies_to", "all"))
        if applies_to not in APPLIES_TO:
            raise ValueError(f"Attack {label!r}: applies_to must be one of {APPLIES_TO}.")
        names = entry.get("defenses")
        if names is not None and (isinstance(names, str) or not isinstance(names, Sequence)):
            raise ValueError(f"Attack {label!r}: defenses must be a list of names or null.")
        names = None if names is None else tuple(str(n) for n in names)
        survivors = entry.get("survivors", False)
        if not isinstance(survivors, bool) or (survivors and eps is None):
            raise ValueError(
                f"Attack {label!r}: survivors must be true or false, and true needs an eps "
                "(it attacks the images the earlier attacks of its threat model left standing)."
            )
        parsed.append(AttackEntry(label, spec, norm, eps, applies_to, names, survivors))
    return parsed


@dataclass(frozen=True)
class EvalSettings:
    """How attacks run and verdicts are judged.

    Attributes:
        batch_size: images per attack call and per judging pass.
        draws: fresh forward passes judging each image of a stochastic model (N >= 10 is the
            N-evaluation of DiffHammer; 1 pass for deterministic models).
        seed: the root of every random stream (:func:`stream_seed`).
        progress: tqdm bars.
        attack_amp: compute the attacks' gradients under bf16 autocast
            (:func:`atop.training.autocast`) where checked (:func:`uses_amp`); judging is
            always float32.
    """

    batch_size: int = 64
    draws: int = 10
    seed: int = 0
    progress: bool = False
    attack_amp: bool = False


def stream_seed(seed: int, *names: str) -> int:
    """The seed of one random stream, derived from ``seed`` and the names that identify it
    (e.g. ``("ap", "pgd_linf", "judge", "3")``) with NumPy's ``SeedSequence``
    (:func:`atop.distributed.batch_seed`): the same on every rank and process, unrelated for
    different names."""
    return distributed.batch_seed(seed, zlib.crc32("\x1f".join(names).encode()))


def uses_amp(spec: Mapping[str, Any], settings: EvalSettings) -> bool:
    """Whether an attack runs its gradients under bf16 autocast: ``settings.attack_amp`` and
    an attack whose bf16 strength was checked against float32 (FGSM, PGD, BPDA,
    AutoAttack-rand and -standard; docs/benchmarks.md). C&W stays float32 (not checked)."""
    name = spec.get("name")
    checked = name in ("fgsm", "pgd", "bpda", "autoattack")
    return settings.attack_amp and checked


@dataclass
class EvalData:
    """Evaluation images: float32 ``[N, 3, H, W]`` in ``[0, 1]`` and int64 labels on the
    evaluation device, their test-set ``indices`` and the number of classes."""

    images: Tensor
    labels: Tensor
    indices: list[int]
    n_classes: int

    def head(self, n: int) -> EvalData:
        """The first ``n`` images."""
        return EvalData(self.images[:n], self.labels[:n], self.indices[:n], self.n_classes)

    def take(self, rows: Tensor) -> EvalData:
        """The images at positions ``rows`` (int64 ``[M]``), in that order."""
        indices = [self.indices[i] for i in rows.tolist()]
        labels = self.labels[rows.to(self.labels.device)]
        return EvalData(self.images[rows.to(self.images.device)], labels, indices, self.n_classes)


def select_images(
    test_set: Mapping[str, Tensor],
    eval_indices: Sequence[int],
    n_images: int | None,
    n_classes: int,
    device: torch.device,
) -> EvalData:
    """The first ``n_images`` of the fixed subset ``eval_indices`` (``None`` = all).

    Raises:
        ValueError: ``n_images`` < 1 or larger than the subset, indices out of range, or
            labels outside the class range.
    """
    available = len(eval_indices)
    n = available if n_images is None else int(n_images)
    if not 1 <= n <= available:
        raise ValueError(
            f"evaluation.images={n_images} but eval_indices holds {available} images: "
            f"choose 1..{available} (or null for all), or enlarge data_ingestion.eval_subset."
        )
    indices = [int(i) for i in eval_indices[:n]]
    n_test = len(test_set["labels"])
    if min(indices) < 0 or max(indices) >= n_test:
        raise ValueError(
            f"eval_indices point outside the test set ({n_test} images): rerun data_ingestion."
        )
    images = to_unit(test_set["images"][indices]).contiguous().to(device)
    labels = test_set["labels"][indices].to(torch.int64).to(device)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"Labels span [{labels.min().item()}, {labels.max().item()}] but there are "
            f"{n_classes} class names: rerun data_ingestion."
        )
    return EvalData(images, labels, indices, n_classes)


#: The judging rules, from the same per-draw verdicts: ``single`` (mean over draws, the
#: headline) and ``worst_of_n`` (every draw right: an attacker who may resubmit).
RULES = ("single", "worst_of_n")


def per_image(draws: Tensor, rule: str) -> Tensor:
    """Per-image score of bool ``[N, D]`` per-draw verdicts under ``rule`` (:data:`RULES`):
    float ``[N]`` in ``[0, 1]`` for ``single``, bool ``[N]`` for ``worst_of_n``."""
    if rule == "single":
        return draws.float().mean(dim=1)
    if rule == "worst_of_n":
        return draws.all(dim=1)
    raise ValueError(f"Unknown rule {rule!r}: use one of {RULES}.")


def plugin_worst(per_attack: Sequence[Tensor]) -> Tensor:
    """The plain per-image minimum of the single-draw fractions of several bool ``[N, D]``
    verdict sets: float ``[N]``. Biased low when the sets are noisy (E[min p̂] < min p;
    method.md §6.2): reported beside :func:`crossfit_worst` to show the bias, never as the
    headline."""
    return torch.stack([per_image(d, "single") for d in per_attack]).min(dim=0).values


def crossfit_worst(per_attack: Sequence[Tensor]) -> Tensor:
    """The cross-fitted per-image worst case of ``K`` bool ``[N, D]`` verdict sets (the same
    images, each set judged with its own ``D`` fresh draws): float ``[N]`` in ``[0, 1]``.

    The draws are split into halves (even and odd columns). Each image's worst set is chosen
    on half A (lowest single-draw fraction; ties go to the set with the lowest mean over all
    images on that half, then to list order) and scored on half B, and the reverse; the two
    scores are averaged. The choice never sees the draws that score it, so for sets of equal
    strength the estimate is unbiased (the plain minimum, :func:`plugin_worst`, is not); it
    may pick a weaker set by chance, which errs on the defense's side by at most the gap
    between the sets. With one draw per set (a deterministic defense) it is the exact
    minimum of the 0/1 verdicts.

    Raises:
        ValueError: no set, or sets of different shapes.
    """
    if not per_attack or len({tuple(d.shape) for d in per_attack}) != 1:
        raise ValueError("crossfit_worst needs one or more verdict sets of the same [N, D] shape.")
    draws = torch.stack([d.bool() for d in per_attack])  # [K, N, D]
    if draws.shape[-1] < 2:
        return draws.float().amin(dim=(0, 2))
    halves = (draws[..., 0::2].float().mean(-1), draws[..., 1::2].float().mean(-1))  # [K, N]

    def pick_and_score(choose: Tensor, score: Tensor) -> Tensor:
        order = choose.mean(dim=1).argsort(stable=True)  # the strongest sets first on ties
        chosen = order[choose[order].argmin(dim=0)]  # first minimum in that order, [N]
        return score.gather(0, chosen[None])[0]

    return (pick_and_score(halves[0], halves[1]) + pick_and_score(halves[1], halves[0])) / 2


def worst_case(per_attack: Sequence[Tensor], rule: str) -> Tensor:
    """Per-image worst case over several bool ``[N, D]`` verdict sets of the same images:
    ``single`` = :func:`crossfit_worst` (float ``[N]``), ``worst_of_n`` = right on every draw
    of every set (bool ``[N]``)."""
    if rule == "single":
        return crossfit_worst(per_attack)
    return torch.stack([per_image(d, rule) for d in per_attack]).all(dim=0)


@dataclass
class AttackRun:
    """The outcome of one attack on one model.

    Attributes:
        draws: bool ``[N, D]`` (CPU): image ``i`` judged right by fresh draw ``d``.
        adversarial: float32 ``[N, 3, H, W]`` in ``[0, 1]``.
        seconds: wall-clock time of the attack (without judging).
        max_perturbation: the largest perturbation in the entry's norm.
        spec: the spec that ran.
        attacked: bool ``[N]`` (CPU), the images the attack ran on (a ``survivors`` entry;
            the others kept the example of the earlier run that beat them); ``None``: all.
        iterates: ``{k: bool [N, D]}``, the verdicts of the iterates after ``k`` steps (a
            ``pgd`` run with snapshots, e.g. the convergence study's steps sweep).
    """

    draws: Tensor
    adversarial: Tensor
    seconds: float
    max_perturbation: float | None
    spec: dict[str, Any] = field(default_factory=dict)
    attacked: Tensor | None = None
    iterates: dict[int, Tensor] = field(default_factory=dict)

    def accuracy(self, rule: str = "single") -> float:
        """Accuracy in ``[0, 1]`` under ``rule``."""
        return per_image(self.draws, rule).float().mean().item()


def max_perturbation(clean: Tensor, adversarial: Tensor, norm: str) -> float:
    """The largest per-image perturbation (ℓ∞ or ℓ2 over C, H, W; float64), ``[0, 1]`` scale."""
    delta = (adversarial.detach().cpu().double() - clean.detach().cpu().double()).flatten(1)
    per_image = delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(p=2, dim=1)
    return float(per_image.max()) if len(per_image) else 0.0


def bound_l2(clean: Tensor, adversarial: Tensor, eps: float) -> Tensor:
    """Keep the adversarial images whose ℓ2 perturbation is ≤ ``eps``, else the clean image
    (turns the unbounded C&W ℓ2 attack into one of the ℓ2-``eps`` threat model)."""
    norms = (adversarial - clean).flatten(1).norm(p=2, dim=1)
    keep = (norms <= eps).view(-1, 1, 1, 1)
    return torch.where(keep, adversarial, clean)


def defense_spec(entry: AttackEntry, defense: Defense, draws: int, seed: int) -> dict | None:
    """The entry's spec adapted to ``defense``; ``None`` = not applicable.

    ``bpda`` needs a model with a ``bpda`` switch; deterministic defenses get ``eot_iter``
    1; ``autoattack`` gets ``seed`` and ``draws`` (its success judge; 1 when deterministic).
    """
    if entry.name == "bpda" and not hasattr(defense.model, "bpda"):
        return None
    if entry.applies_to != "all" and (entry.applies_to == "stochastic") != defense.stochastic:
        return None
    if entry.defenses is not None and defense.name not in entry.defenses:
        return None
    spec = dict(entry.spec)
    if not defense.stochastic and "eot_iter" in spec:
        spec["eot_iter"] = 1
    if entry.name == "autoattack":
        spec["seed"] = int(seed)
        spec["draws"] = int(draws) if defense.stochastic else 1
        if not defense.stochastic:
            spec["eot_iter"] = 1
    return spec


def judge(
    defense: Defense,
    images: Tensor,
    labels: Tensor,
    settings: EvalSettings,
    stream: str = "clean",
) -> Tensor:
    """Per-image, per-draw verdicts (bool ``[N, D]``, CPU, float32): ``settings.draws``
    fresh passes of a stochastic defense, one pass of a deterministic one.

    Each batch is judged after seeding from :func:`stream_seed` ``(defense, stream, "judge",
    batch)`` (``stream``: the run's label), on the rank it is dealt to; the verdicts are
    gathered in image order."""
    draws = settings.draws if defense.stochastic else 1
    size = settings.batch_size

    def verdicts(k: int, rows: slice) -> Tensor:
        seed_everything(stream_seed(settings.seed, defense.name, stream, "judge", str(k)))
        return draw_correct(defense.model, images[rows], labels[rows], draws, size)

    pieces = _gather_batches(_by_batch(len(labels), size, verdicts), len(labels), size)
    return torch.cat(pieces) if pieces else torch.zeros(0, draws, dtype=torch.bool)


def _by_batch(
    n: int, size: int, work: Callable[[int, slice], Any], bar: str | None = None
) -> dict[int, Any]:
    """``work(k, rows)`` for the batches of ``n`` images dealt to this rank (a tqdm bar
    named ``bar`` when given)."""
    mine = distributed.shard(_batches(n, size))
    return {
        k: work(k, slice(k * size, (k + 1) * size))
        for k in progress(mine, bar is not None, desc=bar, unit="batch", leave=False)
    }


def _batches(n: int, size: int) -> int:
    return math.ceil(n / size)


def _gather_batches(mine: dict[int, Any], n: int, size: int) -> list[Any]:
    """Every rank's per-batch results, in batch order (CPU tensors travel)."""
    merged: dict[int, Any] = {}
    for part in distributed.all_gather_objects(mine):
        merged.update(part)
    return [merged[k] for k in range(_batches(n, size))]


def _attack_by_batch(
    attack: Attack,
    spec: Mapping[str, Any],
    eps: float | None,
    data: EvalData,
    settings: EvalSettings,
    stream: tuple[str, str],
    check: Callable[[Sequence[int], Tensor], None] | None,
) -> tuple[Tensor, dict[int, Tensor], float]:
    """The attack on this rank's batches, each from :func:`stream_seed` ``(*stream,
    "attack", batch)``, C&W cut to ``eps``, ``check(rows, adversarial)`` on this rank's
    share; gathered in image order. Returns the adversarial images (on the images' device),
    the snapshot iterates of an attack that keeps them (``{step: images}``) and the slowest
    rank's attack seconds."""
    size, n = settings.batch_size, len(data.labels)
    spent = 0.0

    def attack_batch(k: int, rows: slice) -> tuple[Tensor, dict[int, Tensor]]:
        nonlocal spent
        seed_everything(stream_seed(settings.seed, *stream, "attack", str(k)))
        began = time.perf_counter()
        with autocast(data.images.device, uses_amp(spec, settings)):
            adversarial = run_attack(attack, data.images[rows], data.labels[rows], size, False)
        spent += time.perf_counter() - began
        if spec["name"] == "cw" and eps is not None:
            adversarial = bound_l2(data.images[rows], adversarial, eps)
        iterates = {step: x.cpu() for step, x in getattr(attack, "iterates", {}).items()}
        return adversarial.cpu(), iterates

    bar = f"{stream[0]} {stream[1]}" if settings.progress else None
    mine = _by_batch(n, size, attack_batch, bar)
    if check is not None and mine:
        rows = [i for k in mine for i in range(k * size, min((k + 1) * size, n))]
        check(rows, torch.cat([adversarial for adversarial, _ in mine.values()]))
    pieces = _gather_batches(mine, n, size)
    device = data.images.device
    adversarial = torch.cat([a for a, _ in pieces]).to(device) if pieces else data.images.clone()
    steps = pieces[0][1].keys() if pieces else ()
    iterates = {k: torch.cat([its[k] for _, its in pieces]).to(device) for k in steps}
    return adversarial, iterates, distributed.all_reduce_max(spent)


def attack_images(
    defense: Defense,
    label: str,
    attack: Mapping[str, Any] | Attack,
    norm: str,
    eps: float | None,
    data: EvalData,
    settings: EvalSettings,
    validate: Validator | None = None,
    snapshots: tuple[int, ...] = (),
) -> tuple[Tensor, dict[int, Tensor], float, dict[str, Any]]:
    """The attack half of :func:`run_one`: ``(adversarial images, {step: iterate},
    attack seconds, the spec that ran)``, checked by ``validate`` but not judged."""
    spec = dict(attack) if isinstance(attack, Mapping) else {"name": type(attack).__name__}
    if isinstance(attack, Mapping):
        # under bf16 autocast, a copy with the conv / linear weights cast once (same numbers)
        model = autocast_copy(defense.model) if uses_amp(spec, settings) else defense.model
        attack = build_attack(
            model, spec, data.n_classes, settings.batch_size, snapshots, judge=defense.model
        )
    name = f"{defense.name}_{label}"

    def check(rows: Sequence[int], adversarial: Tensor) -> None:
        if validate is not None:  # each rank checks its share
            clean, labels = data.images[list(rows)], data.labels[list(rows)]
            indices = [data.indices[i] for i in rows]
            validate(clean, adversarial.to(clean.device), labels, eps, norm, name, indices)

    stream = (defense.name, label)
    adversarial, iterates, seconds = _attack_by_batch(
        attack, spec, eps, data, settings, stream, check
    )
    return adversarial, iterates, seconds, spec


def judged_run(
    defense: Defense,
    label: str,
    adversarial: Tensor,
    iterates: Mapping[int, Tensor],
    seconds: float,
    spec: Mapping[str, Any],
    norm: str,
    data: EvalData,
    settings: EvalSettings,
    attacked: Tensor | None = None,
) -> AttackRun:
    """The :class:`AttackRun` of ``adversarial`` (and its snapshot ``iterates``), each set
    judged with fresh draws of its own stream (``label``, ``label@k``)."""
    largest = max_perturbation(data.images, adversarial, norm)
    verdicts = judge(defense, adversarial, data.labels, settings, stream=label)
    run = AttackRun(verdicts, adversarial, seconds, largest, dict(spec), attacked)
    run.iterates = {
        k: judge(defense, x, data.labels, settings, stream=f"{label}@{k}")
        for k, x in iterates.items()
    }
    log.info(
        "%s / %s: robust accuracy %.4f single-draw, %.4f worst-of-%d (%.1f s, max perturbation %.4g)",
        defense.name,
        label,
        run.accuracy("single"),
        run.accuracy("worst_of_n"),
        run.draws.shape[1],
        seconds,
        largest,
    )
    return run


def run_one(
    defense: Defense,
    label: str,
    attack: Mapping[str, Any] | Attack,
    norm: str,
    eps: float | None,
    data: EvalData,
    settings: EvalSettings,
    validate: Validator | None = None,
    snapshots: tuple[int, ...] = (),
) -> AttackRun:
    """Attack ``defense`` (a spec or a ready torchattacks attack), check, judge.

    The attack's batches and the judging passes draw from their own streams
    (:func:`stream_seed` of ``defense.name`` and ``label``); a C&W output is first cut to
    ``eps`` (:func:`bound_l2`); ``validate`` (e.g. the Great Expectations suite) may raise.
    ``snapshots``: step counts of a ``pgd`` spec whose iterates are judged too
    (:attr:`AttackRun.iterates`).
    """
    adversarial, iterates, seconds, spec = attack_images(
        defense, label, attack, norm, eps, data, settings, validate, snapshots
    )
    return judged_run(defense, label, adversarial, iterates, seconds, spec, norm, data, settings)


def attack_defense(
    defense: Defense,
    entries: Sequence[AttackEntry],
    data: EvalData,
    settings: EvalSettings,
    validate: Validator | None = None,
) -> dict[str, AttackRun]:
    """Judge ``defense`` on the clean images, then run every applicable entry.

    Returns:
        ``{"clean": run with the clean verdicts, label: AttackRun, ...}``.
    """
    clean = judge(defense, data.images, data.labels, settings)
    runs = {"clean": AttackRun(clean, data.images, 0.0, 0.0, {"name": "clean"})}
    done: list[tuple[AttackEntry, AttackRun]] = []
    for entry in progress(
        entries, settings.progress, desc=f"{defense.name} attacks", unit="attack"
    ):
        spec = defense_spec(entry, defense, settings.draws, settings.seed)
        if spec is not None:
            run = run_entry(defense, entry, spec, data, settings, done, runs["clean"], validate)
            runs[entry.label] = run
            done.append((entry, run))
    return runs


def run_entry(
    defense: Defense,
    entry: AttackEntry,
    spec: Mapping[str, Any],
    data: EvalData,
    settings: EvalSettings,
    earlier: Sequence[tuple[AttackEntry, AttackRun]],
    clean: AttackRun,
    validate: Validator | None = None,
) -> AttackRun:
    """:func:`run_one` of an entry (``spec``: its :func:`defense_spec`), or, for a
    ``survivors`` entry, :func:`run_on_survivors` against ``clean`` and the ``earlier`` runs
    of its threat model and budget (same norm and ``eps``)."""
    if not entry.survivors:
        return run_one(defense, entry.label, spec, entry.norm, entry.eps, data, settings, validate)
    same = [r for e, r in earlier if e.norm == entry.norm and _same_eps(e.eps, entry.eps)]
    standing = [clean, *same]
    return run_on_survivors(defense, entry, spec, data, settings, standing, validate)


def _same_eps(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def run_on_survivors(
    defense: Defense,
    entry: AttackEntry,
    spec: Mapping[str, Any],
    data: EvalData,
    settings: EvalSettings,
    earlier: Sequence[AttackRun],
    validate: Validator | None = None,
    snapshots: tuple[int, ...] = (),
) -> AttackRun:
    """AutoAttack's cascade: attack only the images still standing, those whose lowest
    single-draw score over the ``earlier`` runs (clean first) is above 0.

    An image that every draw of some earlier set got wrong keeps the example of the earlier
    run (among those that hold their images) with its lowest score; the survivors are attacked afresh from the clean image (their
    EOT draws packed into passes of ``batch_size`` images: :class:`atop.attacks.PackedEOT`).
    Then the WHOLE merged set is judged with fresh draws of this entry's own stream, so its
    verdicts never reuse the draws that chose the survivors (reusing them would score the
    kept examples 0 by selection). ``validate`` checks the merged set (on the main rank).
    This is how an attack at the strength the convergence study calls flat (method.md §5.2)
    runs at the cost of the few survivors.

    Returns:
        :class:`AttackRun` over all images, ``attacked`` = the survivors' mask.
    """
    scores = torch.stack([per_image(run.draws, "single") for run in earlier])  # [R, N]
    lowest = scores.min(dim=0).values
    # the kept example: the lowest-scoring one among the runs that hold their images
    held = torch.tensor([r for r, run in enumerate(earlier) if run.adversarial.numel()])
    beaten_by = held[scores[held].argmin(dim=0)]
    survivors = (lowest > 0).nonzero().flatten()
    adversarial = torch.stack([earlier[r].adversarial[i] for i, r in enumerate(beaten_by.tolist())])
    iterates = {k: adversarial.clone() for k in snapshots}
    seconds = 0.0
    if len(survivors):
        part = data.take(survivors)
        found, steps, seconds, _ = attack_images(
            defense, entry.label, spec, entry.norm, entry.eps, part, settings, None, snapshots
        )
        rows = survivors.to(adversarial.device)
        adversarial[rows] = found
        for k, x in steps.items():
            iterates[k][rows] = x
    if validate is not None and distributed.is_main():  # the whole set, as for any attack
        name = f"{defense.name}_{entry.label}"
        validate(data.images, adversarial, data.labels, entry.eps, entry.norm, name, data.indices)
    log.info(
        "%s / %s: ran on the %d of %d images still standing (%.1f s)",
        defense.name, entry.label, len(survivors), len(lowest), seconds,
    )  # fmt: skip
    return judged_run(
        defense, entry.label, adversarial, iterates, seconds, spec, entry.norm, data, settings,
        attacked=lowest > 0,
    )  # fmt: skip


def worst_cases(
    clean: Tensor, runs: Mapping[str, AttackRun], entries: Sequence[AttackEntry], rule: str
) -> dict[str, Tensor]:
    """Per-image worst case (:func:`worst_case` under ``rule``) over clean and the
    ε-bounded attacks of each threat model: ``Linf``, ``L2``, and ``all`` (both)."""
    bounded = [e for e in entries if e.label in runs and e.eps is not None]
    out = {"all": worst_case([clean, *(runs[e.label].draws for e in bounded)], rule)}
    for norm in ("Linf", "L2"):
        draws = [runs[e.label].draws for e in bounded if e.norm == norm]
        if draws:
            out[norm] = worst_case([clean, *draws], rule)
    return out


@dataclass
class EvalResult:
    """Per-image, per-draw verdicts of :func:`evaluate` (bool ``[N, D]`` tensors, CPU)."""

    clean: Tensor
    runs: dict[str, AttackRun]
    entries: list[AttackEntry]

    def accuracy(self, rule: str = "single") -> dict[str, float]:
        """Clean, per-attack and per-threat-model worst-case accuracy under ``rule``
        (``single``: single-draw, the headline; ``worst_of_n``), in ``[0, 1]``."""
        out = {"clean": per_image(self.clean, rule).float().mean().item()}
        out.update({label: run.accuracy(rule) for label, run in self.runs.items()})
        worst = worst_cases(self.clean, self.runs, self.entries, rule)
        out.update({f"worst_case_{k}": v.float().mean().item() for k, v in worst.items()})
        return out


def evaluate(
    model: nn.Module | Defense,
    images: Tensor,
    labels: Tensor,
    attacks: Mapping[str, Attack | Mapping[str, Any]],
    settings: EvalSettings | None = None,
    *,
    stochastic: bool | None = None,
) -> EvalResult:
    """Attack ``model`` with every attack and judge each output with fresh draws.

    Args:
        model: float32 ``[N, 3, H, W]`` in ``[0, 1]`` -> logits (e.g. :func:`load_defense`),
            or a :class:`Defense`.
        images: float32 ``[N, 3, H, W]`` in ``[0, 1]``; labels: int64 ``[N]``.
        attacks: label -> a torchattacks attack on ``model``, or a
            :func:`atop.attacks.build_attack` spec (``eps`` bounds the threat model;
            ``survivors: true`` runs it on the images the attacks before it left standing).
        settings: batch size, draws, seed (defaults: 64, 10, 0).
        stochastic: judge with ``settings.draws`` passes; default: ``model`` has a random
            transform (:class:`atop.defense.PurifiedClassifier`).

    Returns:
        :class:`EvalResult` (per-draw verdicts; ``.accuracy()`` single-draw,
        ``.accuracy("worst_of_n")``).

    Raises:
        ValueError: bad images or labels, or a bad spec.
    """
    settings = settings or EvalSettings()
    if not isinstance(model, Defense):
        random = hasattr(model, "transform") if stochastic is None else stochastic
        model = Defense(getattr(model, "name", "model"), model, random)
    n_classes = int(labels.max()) + 1
    with torch.no_grad():
        n_classes = max(n_classes, model.model(images[:1]).shape[1])
    data = EvalData(images, labels, list(range(len(labels))), n_classes)
    clean = judge(model, images, labels, settings)
    unattacked = AttackRun(clean, images, 0.0, 0.0, {"name": "clean"})
    runs, entries = {}, []
    for label, attack in attacks.items():
        if isinstance(attack, Mapping):
            (entry,) = parse_attacks([{**attack, "label": label}])
            spec = defense_spec(entry, model, settings.draws, settings.seed)
            if spec is None:
                continue
            done = [(e, runs[e.label]) for e in entries]
            runs[label] = run_entry(model, entry, spec, data, settings, done, unattacked)
        else:
            norm = getattr(attack, "norm", "L2" if "L2" in type(attack).__name__ else "Linf")
            entry = AttackEntry(
                label, {"name": type(attack).__name__}, norm, getattr(attack, "eps", None)
            )
            runs[label] = run_one(model, label, attack, entry.norm, entry.eps, data, settings)
        entries.append(entry)
    return EvalResult(clean, runs, entries)


def defense_results(
    defense: Defense,
    clean: Tensor,
    runs: Mapping[str, AttackRun],
    sweep: Mapping[str, Sequence[tuple[float, Tensor]]],
    checks: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything the report needs about one defense, as tensors and primitives (a torch
    file): the per-draw verdicts of clean and every attack (bool ``[N, D]``), the ε sweeps'
    (``{norm: [(eps, verdicts)]}``), the sanity checks and the bookkeeping."""
    return {
        "description": describe(defense.name),
        "stochastic": defense.stochastic,
        "transform": defense.transform,
        "train_seconds": dict(defense.train_seconds),
        "total_train_seconds": defense.total_train_seconds,
        "clean": clean,
        "attacks": {
            label: {
                "draws": run.draws,
                "seconds": round(run.seconds, 3),
                "max_perturbation": run.max_perturbation,
                "eot_iter": run.spec.get("eot_iter"),
                "steps": run.spec.get("steps"),
                "attacked": run.attacked,  # bool [N] or None (every image)
            }
            for label, run in runs.items()
        },
        "sweep": {
            norm: [{"eps": eps, "draws": draws} for eps, draws in points]
            for norm, points in sweep.items()
        },
        "sanity": dict(checks),
    }

"""Robust evaluation of every defense on one fixed subset (method.md §4, issue 6).

:func:`evaluate_defenses` is the pipeline's one heavy node. For every available defense

* ``standard``: the bare classifier ``f``;
* ``ap``: ``f(g(t(x)))`` with the pretrained purifier (no AToP);
* ``atop``: ``f(g(t(x)))`` with the AToP fine-tuned purifier (paper Eq. 9);
* ``pgd_at``, ``rvs``: the baselines' robust classifiers, when their checkpoints exist

it runs every attack of ``parameters_evaluation.yml`` on the same images (the first
``n_images`` of ``eval_indices``) and records per image whether the defense is still right.
The rules that keep the numbers honest:

* Attacks hit the WHOLE defended model with exact gradients through ``t`` and ``g``, with
  EOT for the stochastic defenses (``eot_iter`` of each entry); ``bpda`` entries (identity
  backward through ``g``) run on the purified defenses only, as an extra attack. The bare
  classifiers are deterministic: EOT is pointless there, so every ``eot_iter`` is set to 1 for
  them (and AutoAttack's success judge uses one pass).
* A stochastic defense is judged with ``draws`` fresh forward passes and a strict majority
  vote (:func:`atop.attacks.robust_correct`), never with the single pass an attack used; the
  clean accuracy is judged the same way. The headline is the per-image worst case over
  clean and every ε-bounded attack (also per threat model, ℓ∞ and ℓ2).
* Every attack's output goes through the Great Expectations suite
  (:func:`atop.validation.adversarial.validate_adversarial`: ε + tolerance, ``[0, 1]``,
  shape and count) BEFORE it is scored: a violation raises ``DataValidationError`` and the
  run stops, so no report is written.
* Gradient-masking sanity checks (Carlini et al. 2019), see :func:`sanity_checks`.
* Every (defense, attack) run starts from ``seed_everything(seed)``: a defense's numbers do
  not depend on which other defenses were evaluated before it.

Attack entries are ``atop.attacks.build_attack`` specs plus a ``label``; ``eps`` and
``alpha`` may be written as fractions (``"8/255"``). C&W ℓ2 is unbounded: with an ``eps``
in its entry, perturbations larger than ``eps`` (ℓ2) are discarded (the clean image is kept),
which turns it into an attack of the ℓ2-``eps`` threat model; without ``eps`` it stays
unbounded and is left out of the worst cases. Plain functions, no Kedro imports.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from atop.attacks import build_attack, robust_correct, run_attack, worst_case_correct
from atop.defense import PurifiedClassifier, purify_draw
from atop.models import load_classifier
from atop.models.purifier import load_purifier
from atop.training import resolve_device, seed_everything
from atop.transforms import build_transform
from atop.validation.adversarial import validate_adversarial

log = logging.getLogger(__name__)

#: Every defense the evaluation knows, in report order.
DEFENSES = ("standard", "ap", "atop", "pgd_at", "rvs")
#: Defenses made of ``f(g(t(.)))`` (stochastic, with a ``bpda`` switch).
PURIFIED = ("ap", "atop")
DESCRIPTIONS = {
    "standard": "bare classifier f (no defense)",
    "ap": "f(g(t(x))), pretrained purifier (no AToP)",
    "atop": "f(g(t(x))), AToP fine-tuned purifier",
    "pgd_at": "PGD adversarial training (Madry et al.)",
    "rvs": "Robustness via Synthesis (Baytas & Deb)",
}
#: Keys an attack entry may have besides its ``build_attack`` spec.
ENTRY_ONLY_KEYS = ("label",)
#: Keys set by the evaluation itself (one home: ``seed`` and ``draws`` of the evaluation).
INJECTED_AUTOATTACK_KEYS = ("seed", "draws")


# --------------------------------------------------------------------------- parameters


def parse_number(value: Any, key: str) -> float:
    """A number from the parameters: an int/float or a fraction string such as ``"8/255"``.

    Raises:
        ValueError: anything else (the message names ``key``).
    """
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number or a fraction like '8/255', got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    raise ValueError(f"{key} must be a number or a fraction like '8/255', got {value!r}")


def format_eps(eps: float | None, norm: str | None = "Linf") -> str:
    """``8/255`` for ℓ∞ budgets that are whole multiples of 1/255, else ``0.5``; ``-`` for None."""
    if eps is None:
        return "-"
    if norm == "Linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


@dataclass(frozen=True)
class AttackEntry:
    """One attack of the evaluation, parsed from ``parameters_evaluation.yml``.

    Attributes:
        label: unique name in the report (letters, digits, ``_``, ``-``).
        spec: the :func:`atop.attacks.build_attack` spec (numbers parsed, no label).
        norm: threat model, ``"Linf"`` or ``"L2"`` (C&W: ``"L2"``).
        eps: perturbation bound on the ``[0, 1]`` scale, or ``None`` (unbounded C&W).
    """

    label: str
    spec: dict[str, Any]
    norm: str
    eps: float | None

    @property
    def name(self) -> str:
        return self.spec["name"]


def parse_attacks(entries: Sequence[Mapping[str, Any]]) -> list[AttackEntry]:
    """Parse the ``attacks`` list: labels, fractions, threat model of each entry.

    The full spec is checked later by :func:`atop.attacks.build_attack` (before any attack
    runs). ``autoattack`` entries must not set ``seed`` or ``draws``: they come from the
    evaluation's ``seed`` and ``draws`` (1 for deterministic defenses).

    Raises:
        ValueError: empty list, an entry without ``label``/``name``, duplicate labels,
            ``seed``/``draws`` in an autoattack entry, or a non-numeric ``eps``/``alpha``.
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
                spec[key] = parse_number(spec[key], f"{label}.{key}")
        eps = spec.get("eps")
        if spec["name"] == "cw":
            norm = "L2"
            spec.pop("eps", None)
        else:
            norm = spec.get("norm", "Linf")
        if spec["name"] == "autoattack":
            given = [k for k in INJECTED_AUTOATTACK_KEYS if k in spec]
            if given:
                raise ValueError(
                    f"Attack {label!r}: remove {given}; AutoAttack's seed and success-judge "
                    "draws come from evaluation.seed and evaluation.draws."
                )
        parsed.append(AttackEntry(label, spec, norm, eps))
    return parsed


# --------------------------------------------------------------------------- defenses


@dataclass
class Defense:
    """A model under evaluation.

    Attributes:
        name: one of :data:`DEFENSES`.
        model: maps float32 ``[N, 3, H, W]`` in ``[0, 1]`` to logits; eval mode, frozen.
        stochastic: random at inference (purified defenses): EOT and fresh-draw judging.
        train_seconds: training time of each stage needed to obtain the defense (from the
            checkpoints' ``meta``; ``None`` where a checkpoint does not record it).
        transform: the random transform's parameters (purified defenses).
    """

    name: str
    model: nn.Module
    stochastic: bool
    train_seconds: dict[str, float | None] = field(default_factory=dict)
    transform: dict[str, Any] | None = None

    @property
    def total_train_seconds(self) -> float | None:
        """Sum over the stages, ``None`` when any stage's time is unknown."""
        values = list(self.train_seconds.values())
        return None if not values or None in values else float(sum(values))


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    return model.to(device).eval().requires_grad_(False)


def build_defenses(
    checkpoints: Mapping[str, dict[str, Any] | None],
    names: Sequence[str],
    device: torch.device,
) -> tuple[dict[str, Defense], dict[str, str]]:
    """Rebuild the requested defenses from their checkpoints.

    Args:
        checkpoints: ``classifier``, ``purifier``, ``atop_purifier``, ``pgd_at_classifier``,
            ``rvs_classifier`` (checkpoint dicts; ``None`` = not available).
        names: defenses to evaluate (subset of :data:`DEFENSES`, report order kept).
        device: where the models go.

    Returns:
        ``(defenses, skipped)``: the built defenses by name, and ``{name: reason}`` for the
        requested defenses whose checkpoints are missing.

    Raises:
        ValueError: an unknown defense name, or a purifier checkpoint without
            ``meta.transform``.
        atop.checkpoint.CheckpointError: a malformed checkpoint.
    """
    unknown = sorted(set(names) - set(DEFENSES))
    if unknown:
        raise ValueError(f"Unknown defense(s) {unknown} in evaluation.defenses: use {DEFENSES}.")
    needs = {
        "standard": ("classifier",),
        "ap": ("classifier", "purifier"),
        "atop": ("classifier", "atop_purifier"),
        "pgd_at": ("pgd_at_classifier",),
        "rvs": ("rvs_classifier",),
    }
    defenses: dict[str, Defense] = {}
    skipped: dict[str, str] = {}
    for name in (n for n in DEFENSES if n in names):
        missing = [key for key in needs[name] if checkpoints.get(key) is None]
        if missing:
            skipped[name] = f"checkpoint {', '.join(missing)} not found (stage not run)"
            log.warning("Skipping defense %r: %s", name, skipped[name])
            continue
        if name in ("standard", "pgd_at", "rvs"):
            key = needs[name][0]
            ckpt = checkpoints[key]
            model = _frozen(load_classifier(ckpt, device), device)
            seconds = {key: _seconds(ckpt.get("meta", {}).get("train_seconds"))}
            defenses[name] = Defense(name, model, stochastic=False, train_seconds=seconds)
            continue
        purifier_key = needs[name][1]
        ckpt = checkpoints[purifier_key]
        meta = ckpt.get("meta", {})
        if meta.get("transform") is None:
            raise ValueError(
                f"The {purifier_key} checkpoint has no meta.transform (the random transform t "
                "it was trained with): rerun the stage that wrote it."
            )
        generator, _ = load_purifier(ckpt, device)
        classifier = load_classifier(checkpoints["classifier"], device)
        model = PurifiedClassifier(classifier, generator, build_transform(meta["transform"]))
        seconds = {
            "classifier": _seconds(checkpoints["classifier"].get("meta", {}).get("train_seconds")),
            "purifier": _seconds(checkpoints["purifier"].get("meta", {}).get("train_seconds"))
            if checkpoints.get("purifier") is not None
            else None,
        }
        if name == "atop":
            seconds["atop_purifier"] = _seconds(meta.get("atop", {}).get("train_seconds"))
        defenses[name] = Defense(
            name,
            _frozen(model, device),
            stochastic=True,
            train_seconds=seconds,
            transform=model.transform.config.to_dict(),
        )
    transforms = {name: d.transform for name, d in defenses.items() if d.transform is not None}
    if len({tuple(sorted(t.items())) for t in transforms.values()}) > 1:
        log.warning(
            "The purified defenses use different random transforms %s: AP and AToP are "
            "normally compared with the same t (the purifier checkpoints' meta.transform).",
            transforms,
        )
    return defenses, skipped


def defense_spec(entry: AttackEntry, defense: Defense, draws: int, seed: int) -> dict | None:
    """The entry's ``build_attack`` spec adapted to ``defense``; ``None`` = not applicable.

    * ``bpda`` needs a model with a ``bpda`` switch (the purified defenses).
    * Deterministic defenses: ``eot_iter`` = 1 (EOT averages identical gradients there).
    * ``autoattack``: ``seed`` from the evaluation; ``draws`` (the success judge) from the
      evaluation for stochastic defenses, 1 for deterministic ones.
    """
    if entry.name == "bpda" and not hasattr(defense.model, "bpda"):
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


# --------------------------------------------------------------------------- running attacks


@dataclass
class AttackRun:
    """The outcome of one attack on one defense.

    Attributes:
        correct: bool ``[N]`` (CPU), the defense's verdict with fresh draws.
        adversarial: float32 ``[N, 3, H, W]`` in ``[0, 1]`` (on the evaluation device).
        seconds: wall-clock time of the attack (without judging and validation).
        max_perturbation: the largest perturbation in the entry's norm.
        spec: the spec that ran.
    """

    correct: Tensor
    adversarial: Tensor
    seconds: float
    max_perturbation: float | None
    spec: dict[str, Any]


def bound_l2(clean: Tensor, adversarial: Tensor, eps: float) -> Tensor:
    """Keep the adversarial images whose ℓ2 perturbation is ≤ ``eps``, else the clean image.

    Turns the unbounded C&W ℓ2 attack into an attack of the ℓ2-``eps`` threat model (a
    success with a larger perturbation does not count). Shapes ``[N, C, H, W]``, ``[0, 1]``.
    """
    norms = (adversarial - clean).flatten(1).norm(p=2, dim=1)
    keep = (norms <= eps).view(-1, 1, 1, 1)
    return torch.where(keep, adversarial, clean)


def run_one(
    defense: Defense,
    label: str,
    spec: dict[str, Any],
    norm: str,
    eps: float | None,
    data: EvalData,
    settings: Mapping[str, Any],
) -> AttackRun:
    """Attack ``defense`` with ``spec``, validate the adversarial examples, judge them.

    Args:
        defense: the model under attack.
        label: the attack's name in logs and in the GX suite (``<defense>_<label>``).
        spec: a :func:`atop.attacks.build_attack` spec (from :func:`defense_spec`).
        norm, eps: the threat model the output is validated against (``eps`` None:
            unbounded; a C&W output is first cut to ``eps`` by :func:`bound_l2`).
        data: the images (float32 ``[N, 3, H, W]`` in ``[0, 1]``), labels and indices.
        settings: ``seed`` (reseeded first), ``batch_size``, ``draws``, ``tolerance``,
            ``progress``.

    Returns:
        The :class:`AttackRun` (verdicts judged with fresh draws).

    Raises:
        atop.validation.DataValidationError: the adversarial examples break the suite
            (perturbation > eps + tolerance, pixels outside [0, 1], wrong shape or count).
    """
    seed_everything(int(settings["seed"]))
    attack = build_attack(defense.model, spec, data.n_classes)
    began = time.perf_counter()
    adversarial = run_attack(
        attack, data.images, data.labels, int(settings["batch_size"]), settings["progress"]
    )
    seconds = time.perf_counter() - began
    if spec["name"] == "cw" and eps is not None:
        adversarial = bound_l2(data.images, adversarial, eps)
    summary = validate_adversarial(
        data.images,
        adversarial,
        data.labels,
        eps,
        norm,
        attack_name=f"{defense.name}_{label}",
        tolerance=float(settings["tolerance"]),
        indices=data.indices,
    )
    correct = judge(defense, adversarial, data, settings)
    log.info(
        "%s / %s: robust accuracy %.4f (%.1f s, max perturbation %s)",
        defense.name,
        label,
        correct.float().mean().item(),
        seconds,
        summary["max_perturbation"],
    )
    return AttackRun(correct, adversarial, seconds, summary["max_perturbation"], spec)


def judge(defense: Defense, images: Tensor, data: EvalData, settings: Mapping[str, Any]) -> Tensor:
    """Per-image correctness: ``draws`` fresh passes (stochastic) or one pass (deterministic)."""
    draws = int(settings["draws"]) if defense.stochastic else 1
    return robust_correct(
        defense.model, images, data.labels, draws, int(settings["batch_size"]), progress=False
    )


def attack_defense(
    defense: Defense,
    entries: Sequence[AttackEntry],
    plan: Mapping[str, dict[str, Any] | None],
    data: EvalData,
    settings: Mapping[str, Any],
) -> dict[str, AttackRun]:
    """Judge ``defense`` on the clean images, then run every applicable attack on them.

    Args:
        plan: attack label -> the spec for this defense (:func:`defense_spec`; ``None`` =
            not applicable, skipped).

    Returns:
        ``{"clean": run with the clean verdicts, label: AttackRun, ...}``.
    """
    seed_everything(int(settings["seed"]))
    clean = judge(defense, data.images, data, settings)
    runs = {"clean": AttackRun(clean, data.images, 0.0, 0.0, {"name": "clean"})}
    for entry in tqdm(
        entries, desc=f"{defense.name} attacks", unit="attack", disable=not settings["progress"]
    ):
        spec = plan[entry.label]
        if spec is not None:
            runs[entry.label] = run_one(
                defense, entry.label, spec, entry.norm, entry.eps, data, settings
            )
    return runs


@dataclass
class EvalData:
    """The evaluation images: float32 ``[N, 3, H, W]`` in ``[0, 1]`` and int64 labels on the
    evaluation device, their ``eval_indices`` (test-set indices) and the number of classes."""

    images: Tensor
    labels: Tensor
    indices: list[int]
    n_classes: int

    def head(self, n: int) -> EvalData:
        """The first ``n`` images."""
        return EvalData(self.images[:n], self.labels[:n], self.indices[:n], self.n_classes)


def select_images(
    test_set: Mapping[str, Tensor],
    eval_indices: Sequence[int],
    n_images: int | None,
    n_classes: int,
    device: torch.device,
) -> EvalData:
    """The first ``n_images`` of the fixed subset ``eval_indices`` (``None`` = all of them).

    Args:
        test_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        eval_indices: indices into the test set (data_ingestion's fixed subset).
        n_images: how many of them to use.
        n_classes: number of classes (labels must lie in ``[0, n_classes)``).
        device: where the images go.

    Raises:
        ValueError: ``n_images`` < 1 or larger than the subset, indices out of range, or
            labels outside the class range.
    """
    available = len(eval_indices)
    n = available if n_images is None else int(n_images)
    if not 1 <= n <= available:
        raise ValueError(
            f"evaluation.n_images={n_images} but eval_indices holds {available} images: "
            f"choose 1..{available} (or null for all), or enlarge data_ingestion.eval_subset."
        )
    indices = [int(i) for i in eval_indices[:n]]
    n_test = len(test_set["labels"])
    if min(indices) < 0 or max(indices) >= n_test:
        raise ValueError(
            f"eval_indices point outside the test set ({n_test} images): rerun data_ingestion."
        )
    images = test_set["images"][indices].float().div(255.0).contiguous().to(device)
    labels = test_set["labels"][indices].to(torch.int64).to(device)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"Labels span [{labels.min().item()}, {labels.max().item()}] but there are "
            f"{n_classes} class names: rerun data_ingestion."
        )
    return EvalData(images, labels, indices, n_classes)


# --------------------------------------------------------------------------- sanity checks


def paired_rise(before: Tensor, after: Tensor, z: float, min_images: int) -> dict[str, Any]:
    """How many more images are correct in ``after`` than in ``before``, against sampling noise.

    Paired comparison on the same images (McNemar): ``c`` = images correct only in
    ``after``, ``b`` = correct only in ``before``; the rise ``c - b`` is within noise when
    ``c - b <= max(min_images, z * sqrt(b + c))`` (under "no real change" the discordant
    images split like fair coin flips: ``c - b`` has standard deviation ``sqrt(b + c)``).

    Args:
        before, after: bool ``[N]`` per-image correctness on the same images.
        z: how many standard deviations of noise are tolerated (2: a rise that large
            happens by chance in about 2 % of comparisons).
        min_images: the rise always tolerated (1 image: a single lucky draw).

    Returns:
        ``{"rise_images": int, "allowed_images": float, "within_noise": bool}``.
    """
    c = int((after & ~before).sum())
    b = int((before & ~after).sum())
    allowed = max(float(min_images), z * math.sqrt(b + c))
    return {
        "rise_images": c - b,
        "allowed_images": round(allowed, 3),
        "within_noise": c - b <= allowed,
    }


def _acc(correct: Tensor) -> float:
    return correct.float().mean().item()


def sanity_checks(
    clean: Tensor,
    runs: Mapping[str, AttackRun],
    entries: Sequence[AttackEntry],
    sweep: Sequence[tuple[float, Tensor]],
    stronger: Tensor | None,
    reference: AttackEntry,
    params: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """Gradient-masking sanity checks for one defense (Carlini et al. 2019; method.md §4).

    All comparisons are paired (same images) with the noise margin of :func:`paired_rise`
    (``params["z"]``, ``params["min_images"]``). Checks (``status``: ``"pass"``, ``"fail"`` or
    ``"not run"``):

    * ``eps_monotonic``: robust accuracy under the reference PGD-EOT never rises (beyond
      noise) from one ε of the sweep to the next larger one (ε = 0 is clean accuracy).
    * ``large_eps_near_zero``: at the largest ε of the sweep the robust accuracy is at most
      ``params["large_eps_max_acc"]`` (an unbounded-ish attack must win; if not, gradients
      are masked or the attack is too weak).
    * ``stronger_attack``: the reference PGD with more steps and EOT samples
      (``params["stronger"]``) does not raise robust accuracy beyond noise.
    * ``iterative_beats_single_step``: PGD (reference) is not weaker than FGSM at the same ε.
    * ``bpda_vs_exact``: for each BPDA entry, the exact-gradient PGD entry of the same norm
      and ε is not weaker than BPDA beyond noise (a stronger BPDA means the exact gradients
      through ``g`` are obfuscated); reports which one is stronger.

    Args:
        clean: bool ``[N]`` clean correctness (first ``N`` images of the evaluation).
        runs: attack label -> run on the full evaluation set (the first ``N`` are used).
        entries: the attack entries.
        sweep: ``(eps, correct [N])`` for the reference attack, sorted by ε (incl. 0).
        stronger: correctness under the stronger reference attack, or ``None``.
        reference: the reference (PGD) entry.
        params: the ``sanity`` parameters.

    Returns:
        ``{check: {"status": ..., "detail": str, ...}}``.
    """
    z, min_images = float(params["z"]), int(params["min_images"])
    n = len(clean)
    checks: dict[str, dict[str, Any]] = {}

    rises = []
    for (eps_a, a), (eps_b, b) in zip(sweep, sweep[1:], strict=False):
        rise = paired_rise(a, b, z, min_images)
        rises.append((format_eps(eps_a, reference.norm), format_eps(eps_b, reference.norm), rise))
    if len(sweep) >= 2:
        bad = [r for r in rises if not r[2]["within_noise"]]
        checks["eps_monotonic"] = {
            "status": "fail" if bad else "pass",
            "detail": "; ".join(
                f"{lo}->{hi}: {r['rise_images']:+d} img (allowed +{r['allowed_images']:g})"
                for lo, hi, r in rises
            ),
        }
        eps_max, at_max = sweep[-1]
        limit = float(params["large_eps_max_acc"])
        checks["large_eps_near_zero"] = {
            "status": "pass" if _acc(at_max) <= limit else "fail",
            "detail": f"robust acc {_acc(at_max):.3f} at eps {format_eps(eps_max, reference.norm)} "
            f"(limit {limit:g})",
        }
    else:
        checks["eps_monotonic"] = {"status": "not run", "detail": "eps_sweep has < 2 points"}
        checks["large_eps_near_zero"] = {"status": "not run", "detail": "no eps sweep"}

    ref = runs[reference.label].correct[:n]
    if stronger is not None:
        rise = paired_rise(ref, stronger, z, min_images)
        checks["stronger_attack"] = {
            "status": "pass" if rise["within_noise"] else "fail",
            "detail": f"{reference.label} {_acc(ref):.3f} -> stronger {_acc(stronger):.3f} "
            f"({rise['rise_images']:+d} img, allowed +{rise['allowed_images']:g})",
        }
    else:
        checks["stronger_attack"] = {"status": "not run", "detail": "no stronger attack set"}

    fgsm = next(
        (e for e in entries if e.name == "fgsm" and e.label in runs and e.eps == reference.eps),
        None,
    )
    if fgsm is not None and reference.norm == "Linf":
        single = runs[fgsm.label].correct[:n]
        rise = paired_rise(single, ref, z, min_images)
        checks["iterative_beats_single_step"] = {
            "status": "pass" if rise["within_noise"] else "fail",
            "detail": f"{fgsm.label} {_acc(single):.3f} vs {reference.label} {_acc(ref):.3f} "
            f"({rise['rise_images']:+d} img, allowed +{rise['allowed_images']:g})",
        }
    else:
        checks["iterative_beats_single_step"] = {
            "status": "not run",
            "detail": "no FGSM entry at the reference eps",
        }

    pairs = []
    for bpda in (e for e in entries if e.name == "bpda" and e.label in runs):
        exact = next(
            (
                e
                for e in entries
                if e.name == "pgd" and e.norm == bpda.norm and e.eps == bpda.eps and e.label in runs
            ),
            None,
        )
        if exact is not None:
            pairs.append((bpda, exact))
    if pairs:
        details, statuses, stronger_names = [], [], []
        for bpda, exact in pairs:
            b_acc = runs[bpda.label].correct[:n]
            e_acc = runs[exact.label].correct[:n]
            rise = paired_rise(b_acc, e_acc, z, min_images)
            statuses.append(rise["within_noise"])
            if _acc(e_acc) < _acc(b_acc):
                winner = "exact"
            elif _acc(e_acc) > _acc(b_acc):
                winner = "bpda"
            else:
                winner = "tie"
            stronger_names.append(winner)
            details.append(
                f"exact {exact.label} {_acc(e_acc):.3f} vs BPDA {bpda.label} {_acc(b_acc):.3f}: "
                f"stronger = {winner}"
            )
        checks["bpda_vs_exact"] = {
            "status": "pass" if all(statuses) else "fail",
            "detail": "; ".join(details),
            "stronger": stronger_names[0] if len(set(stronger_names)) == 1 else "mixed",
        }
    else:
        checks["bpda_vs_exact"] = {
            "status": "not run",
            "detail": "no BPDA entry (deterministic defense) or no matching PGD entry",
        }
    for check in checks.values():
        check["n_images"] = n
    return checks


def sweep_spec(spec: Mapping[str, Any], eps: float) -> dict[str, Any]:
    """A PGD spec at another ε, with the step size ``alpha`` scaled in proportion."""
    return {**spec, "eps": eps, "alpha": spec["alpha"] * eps / spec["eps"]}


# --------------------------------------------------------------------------- the node


def _check_settings(params: Mapping[str, Any]) -> None:
    for key in ("batch_size", "draws"):
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"evaluation.{key} must be a positive integer, got {value!r}")


def _reference(entries: Sequence[AttackEntry], label: str) -> AttackEntry:
    reference = next((e for e in entries if e.label == label), None)
    if reference is None or reference.name != "pgd":
        raise ValueError(
            f"evaluation.sanity.reference={label!r} must be the label of a 'pgd' attack entry "
            f"(have {[e.label for e in entries]})."
        )
    return reference


def evaluate_defenses(
    test_set: dict[str, Tensor],
    eval_indices: list[int],
    class_names: list[str],
    classifier: dict[str, Any],
    purifier: dict[str, Any] | None,
    atop_purifier: dict[str, Any] | None,
    pgd_at_classifier: dict[str, Any] | None,
    rvs_classifier: dict[str, Any] | None,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Attack every available defense with every attack and judge it honestly.

    Args:
        test_set: ``{"images": uint8 [N, 3, H, W], "labels": int64 [N]}``.
        eval_indices: the fixed evaluation subset (indices into ``test_set``).
        class_names: the classes (their number is AutoAttack's ``n_classes``).
        classifier: checkpoint of ``f`` (``standard``, and inside ``ap``/``atop``).
        purifier: pretrained purifier checkpoint (``ap``); ``meta.transform`` is ``t``.
        atop_purifier: AToP purifier checkpoint (``atop``); ``meta.atop.attack`` is the
            attack it was fine-tuned with (the "seen" attack).
        pgd_at_classifier, rvs_classifier: the baselines' checkpoints, ``None`` when their
            stages have not run (catalog entries with ``optional: true``): skipped.
        params: ``params:evaluation`` (see ``conf/base/parameters_evaluation.yml``).

    Returns:
        An in-memory results dict for the report nodes: ``settings``, ``attacks`` (entries),
        ``defenses`` (per defense: per-image ``clean`` / per-attack correctness, worst cases,
        seconds, eps sweep, sanity checks, training time), ``skipped``, ``unseen`` and
        ``grid`` (images for the adversarial grid).

    Raises:
        atop.validation.DataValidationError: an attack's adversarial examples fail the
            suite (ε, [0, 1], shape, count); nothing is returned, so nothing is written.
        ValueError: bad parameters (unknown attack keys, labels, defenses, subset size).
    """
    _check_settings(params)
    device = resolve_device(params["device"])
    seed_everything(int(params["seed"]))
    entries = parse_attacks(params["attacks"])
    sanity_params = params["sanity"]
    reference = _reference(entries, sanity_params["reference"])
    data = select_images(test_set, eval_indices, params["n_images"], len(class_names), device)
    checkpoints = {
        "classifier": classifier,
        "purifier": purifier,
        "atop_purifier": atop_purifier,
        "pgd_at_classifier": pgd_at_classifier,
        "rvs_classifier": rvs_classifier,
    }
    defenses, skipped = build_defenses(checkpoints, params["defenses"], device)
    if not defenses:
        raise ValueError("No defense could be built: check evaluation.defenses and the inputs.")
    settings = {
        "seed": int(params["seed"]),
        "batch_size": int(params["batch_size"]),
        "draws": int(params["draws"]),
        "tolerance": float(params["tolerance"]),
        "progress": bool(params.get("progress", True)),
    }
    # Check every spec on every defense before the first (long) attack runs.
    plans = {
        name: {e.label: defense_spec(e, d, settings["draws"], settings["seed"]) for e in entries}
        for name, d in defenses.items()
    }
    for name, plan in plans.items():
        for spec in plan.values():
            if spec is not None:
                build_attack(defenses[name].model, spec, data.n_classes)
    sweep_eps = sorted({parse_number(e, "sanity.eps_sweep") for e in sanity_params["eps_sweep"]})
    n_sanity = sanity_params.get("n_images") or len(data.labels)
    sanity_data = data.head(min(int(n_sanity), len(data.labels)))

    results_by_defense: dict[str, dict[str, Any]] = {}
    grid_params = params["grid"]
    grid: dict[str, Any] | None = None
    for name, defense in tqdm(
        defenses.items(), desc="defenses", unit="defense", disable=not settings["progress"]
    ):
        runs = attack_defense(defense, entries, plans[name], data, settings)
        clean = runs.pop("clean").correct
        sweep, stronger = _sanity_runs(
            defense, reference, runs, clean, sweep_eps, sanity_data, sanity_params, settings
        )
        n_sanity = len(sanity_data.labels)
        checks = sanity_checks(
            clean[:n_sanity], runs, entries, sweep, stronger, reference, sanity_params
        )
        results_by_defense[name] = _defense_results(defense, clean, runs, entries, sweep, checks)
        if name == grid_params["defense"] and grid_params["attack"] in runs:
            run = runs[grid_params["attack"]]
            grid = grid_images(defense, data, run, int(grid_params["n_images"]))
            grid["attack"] = grid_params["attack"]
    if grid is None:
        log.warning(
            "No adversarial grid: defense %r or attack %r was not evaluated.",
            grid_params["defense"],
            grid_params["attack"],
        )
    return {
        "settings": {
            "dataset_classes": len(class_names),
            "n_images": len(data.labels),
            "n_eval_indices": len(eval_indices),
            "n_sanity_images": len(sanity_data.labels),
            "seed": settings["seed"],
            "draws": settings["draws"],
            "batch_size": settings["batch_size"],
            "tolerance": settings["tolerance"],
            "device": str(device),
            "profile_note": str(params.get("profile_note", "")),
            "sanity": {
                "reference": reference.label,
                "eps_sweep": sweep_eps,
                "stronger": dict(sanity_params.get("stronger") or {}),
                "z": float(sanity_params["z"]),
                "min_images": int(sanity_params["min_images"]),
                "large_eps_max_acc": float(sanity_params["large_eps_max_acc"]),
            },
        },
        "attacks": [
            {"label": e.label, "name": e.name, "norm": e.norm, "eps": e.eps, "spec": dict(e.spec)}
            for e in entries
        ],
        "defenses": results_by_defense,
        "skipped": skipped,
        "unseen": unseen_attacks(atop_purifier, entries),
        "grid": grid,
        "class_names": list(class_names),
    }


def _sanity_runs(
    defense: Defense,
    reference: AttackEntry,
    runs: Mapping[str, AttackRun],
    clean: Tensor,
    sweep_eps: Sequence[float],
    data: EvalData,
    sanity_params: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> tuple[list[tuple[float, Tensor]], Tensor | None]:
    """Run the ε sweep and the stronger attack of the reference PGD on ``data``.

    ε = 0 reuses the clean verdicts and the reference ε the reference run (first ``n``
    images); the others run the reference spec with ε (and α in proportion) changed.
    """
    n = len(data.labels)
    base = defense_spec(reference, defense, settings["draws"], settings["seed"])
    ref_run = runs[reference.label]
    sweep: list[tuple[float, Tensor]] = []
    for eps in sweep_eps:
        if eps == 0:
            sweep.append((0.0, clean[:n]))
        elif math.isclose(eps, reference.eps):
            sweep.append((eps, ref_run.correct[:n]))
        else:
            spec = sweep_spec(base, eps)
            label = f"{reference.label}_eps_{format_eps(eps, reference.norm)}".replace("/", "_")
            run = run_one(defense, label, spec, reference.norm, eps, data, settings)
            sweep.append((eps, run.correct))
    stronger = None
    overrides = dict(sanity_params.get("stronger") or {})
    if overrides:
        spec = {**base, **overrides}
        if not defense.stochastic:
            spec["eot_iter"] = 1
        run = run_one(
            defense,
            f"{reference.label}_stronger",
            spec,
            reference.norm,
            reference.eps,
            data,
            settings,
        )
        stronger = run.correct
    return sweep, stronger


def _defense_results(
    defense: Defense,
    clean: Tensor,
    runs: Mapping[str, AttackRun],
    entries: Sequence[AttackEntry],
    sweep: Sequence[tuple[float, Tensor]],
    checks: Mapping[str, Any],
) -> dict[str, Any]:
    """Per-image verdicts, worst cases (all / ℓ∞ / ℓ2) and bookkeeping of one defense."""
    bounded = [e for e in entries if e.label in runs and e.eps is not None]
    worst = {
        "all": worst_case_correct(
            {"clean": clean, **{e.label: runs[e.label].correct for e in bounded}}
        )
    }
    for norm in ("Linf", "L2"):
        labels = [e.label for e in bounded if e.norm == norm]
        if labels:
            worst[norm] = worst_case_correct(
                {"clean": clean, **{label: runs[label].correct for label in labels}}
            )
    return {
        "description": DESCRIPTIONS[defense.name],
        "stochastic": defense.stochastic,
        "transform": defense.transform,
        "train_seconds": dict(defense.train_seconds),
        "total_train_seconds": defense.total_train_seconds,
        "clean": clean.tolist(),
        "attacks": {
            label: {
                "correct": run.correct.tolist(),
                "seconds": round(run.seconds, 3),
                "max_perturbation": run.max_perturbation,
                "eot_iter": run.spec.get("eot_iter"),
                "steps": run.spec.get("steps"),
            }
            for label, run in runs.items()
        },
        "worst_case": {key: value.tolist() for key, value in worst.items()},
        "sweep": [{"eps": eps, "acc": _acc(correct)} for eps, correct in sweep],
        "sanity": dict(checks),
    }


def unseen_attacks(
    atop_purifier: Mapping[str, Any] | None, entries: Sequence[AttackEntry]
) -> dict[str, Any]:
    """Which evaluation attacks the AToP purifier saw in fine-tuning (paper: "unseen attacks").

    An attack counts as *seen* when it is the fine-tuning attack's algorithm (same
    ``name``) in the same norm (ε may differ); everything else is *unseen*. The fine-tuning
    attack is ``atop_purifier.meta.atop.attack`` (written by the atop_finetuning stage).

    Returns:
        ``{"training_attack": spec or None, "seen": {label: bool}}`` (``seen`` empty when the
        training attack is unknown).
    """
    meta = (atop_purifier or {}).get("meta", {})
    train = meta.get("atop", {}).get("attack")
    if not train:
        return {"training_attack": None, "seen": {}}
    train_name = str(train.get("name", "")).lower()
    train_norm = train.get("norm", "Linf")
    seen = {e.label: e.name == train_name and e.norm == train_norm for e in entries}
    return {"training_attack": dict(train), "seen": seen}


@torch.no_grad()
def grid_images(defense: Defense, data: EvalData, run: AttackRun, n: int) -> dict[str, Any]:
    """Images for the adversarial grid: clean, adversarial, transformed, purified rows.

    For a purified defense the transform is drawn once on the adversarial images; the
    "transformed" row shows ``t(x')`` with the holes black, the "purified" row
    ``g(t(x'))`` of that same draw, and ``prediction`` is ``f`` on it. For a bare
    classifier the last two rows are ``None``.

    Returns:
        ``{"clean", "adversarial", "transformed", "purified"}`` float ``[n, 3, H, W]`` CPU
        tensors in ``[0, 1]`` (or ``None``), ``labels`` and ``prediction`` (lists of int),
        ``defense`` name.
    """
    n = min(n, len(data.labels))
    clean, adversarial = data.images[:n], run.adversarial[:n]
    out: dict[str, Any] = {
        "defense": defense.name,
        "clean": clean.cpu(),
        "adversarial": adversarial.cpu(),
        "labels": data.labels[:n].tolist(),
        "transformed": None,
        "purified": None,
    }
    model = defense.model
    if isinstance(model, PurifiedClassifier):
        draw = model.transform(adversarial)
        _, purified = purify_draw(model.purifier, draw, model.transform.config)
        out["transformed"] = (draw.image * (1 - draw.masks[0])).cpu()
        out["purified"] = purified.cpu()
        out["prediction"] = model.classifier(purified).argmax(1).tolist()
    else:
        out["prediction"] = model(adversarial).argmax(1).tolist()
    return out

"""The defenses under evaluation, rebuilt from checkpoint files in a few lines.

:data:`DESCRIPTIONS` says what each is: the bare classifier ``f`` (``standard``),
``f(g(t(x)))`` with the pretrained purifier (``ap``) or with a fine-tuned one (the arms,
``atop`` = paper Eq. 9), the baselines' robust classifiers (``pgd_at``, ``rvs``) and the
sigma ablation.

:func:`load_defense` is the user-facing entry (paths or checkpoint dicts in, a model out);
:func:`build_defenses` is what the evaluation stage does for each defense it is asked for.

Core module: torch and the project's core modules only.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from atop.checkpoint import CheckpointError, load_safe, state_hash
from atop.defense import PurifiedClassifier
from atop.models import load_classifier
from atop.models.purifier import load_purifier
from atop.training import resolve_device
from atop.transforms import build_transform

log = logging.getLogger(__name__)

#: The main job's defenses (``kedro run --pipelines atop``): the standard classifier, the
#: pretrained purifier (AP) and the 2 x 2 of compute-matched fine-tuning arms (Eq. 9's two
#: terms: reconstruction from t(x') and CE on x', each on or off).
MAIN = (
    "standard",
    "ap",
    "ap_continued",
    "ap_classifier_aware",
    "adversarial_reconstruction",
    "atop",
)
#: The 2 x 2 of arms: ``(reconstruct from t(x'), CE on x')`` -> arm.
FACTORIAL = {
    (False, False): "ap_continued",
    (False, True): "ap_classifier_aware",
    (True, False): "adversarial_reconstruction",
    (True, True): "atop",
}
#: The noise ablations (``noise_ablation``): AP and AToP pretrained and fine-tuned with
#: another reading of the authors' noise than the default ``box`` route: sigma 0.25 at 32 px
#: and the authors' 256-px ``upsample`` route (``ap_<name>``, ``atop_<name>``).
NOISE_ABLATIONS = ("sigma025", "upsample")
#: Added by the full comparison: AToP with PGD, the robust-training baselines, and the
#: noise ablations.
EXTRA = (
    "atop_pgd",
    "pgd_at",
    "rvs",
    "ap_sigma025",
    "atop_sigma025",
    "ap_upsample",
    "atop_upsample",
)
#: Every defense the evaluation knows, in report order.
DEFENSES = MAIN + EXTRA
DESCRIPTIONS = {
    "standard": "bare classifier f (no defense)",
    "ap": "f(g(t(x))), pretrained purifier (no fine-tuning)",
    "ap_continued": "f(g(t(x))), purifier fine-tuned with L_org only (lambda 0, no adversary)",
    "ap_classifier_aware": "f(g(t(x))), fine-tuned with L_org + lambda CE on clean images",
    "adversarial_reconstruction": "f(g(t(x))), fine-tuned with L_org restoring x from t(x'), "
    "FGSM x' against f(g(t(.))), lambda 0",
    "atop": "f(g(t(x))), AToP: L_org(x') + lambda CE on FGSM x' against f(g(t(.)))",
    "atop_pgd": "f(g(t(x))), AToP with PGD x' against f(g(t(.)))",
    "pgd_at": "PGD adversarial training (Madry et al.)",
    "rvs": "Robustness via Synthesis (Baytas & Deb)",
    "ap_sigma025": "AP with sigma 0.25 at 32 px (ablation: 8x the authors' effective noise)",
    "atop_sigma025": "AToP with sigma 0.25 at 32 px (ablation)",
    "ap_upsample": "AP with the authors' 256-px noise route (bilinear up, noise, clip, area "
    "down; ablation)",
    "atop_upsample": "AToP with the authors' 256-px noise route (ablation)",
}
#: The checkpoints each defense is built from (catalog names); a second entry is a purifier.
NEEDS = {
    "standard": ("classifier",),
    "ap": ("classifier", "purifier"),
    "ap_continued": ("classifier", "purifier_ap_continued"),
    "ap_classifier_aware": ("classifier", "purifier_ap_classifier_aware"),
    "adversarial_reconstruction": ("classifier", "purifier_adversarial_reconstruction"),
    "atop": ("classifier", "purifier_atop"),
    "atop_pgd": ("classifier", "purifier_atop_pgd"),
    "pgd_at": ("pgd_at_classifier",),
    "rvs": ("rvs_classifier",),
    "ap_sigma025": ("classifier", "purifier_sigma025"),
    "atop_sigma025": ("classifier", "purifier_atop_sigma025"),
    "ap_upsample": ("classifier", "purifier_upsample"),
    "atop_upsample": ("classifier", "purifier_atop_upsample"),
}
#: The training histories (catalog names) whose epochs add up to each defense's training
#: time: the classifier's, the purifier's pretraining, the arm's fine-tuning.
HISTORIES = {
    "standard": ("classifier_history",),
    "ap": ("classifier_history", "purifier_history"),
    **{
        arm: ("classifier_history", "purifier_history", f"finetuning_history_{arm}")
        for arm in ("ap_continued", "ap_classifier_aware", "adversarial_reconstruction")
        + ("atop", "atop_pgd")
    },
    "pgd_at": ("adversarial_training_history",),
    "rvs": ("rvs_history",),
    **{
        f"ap_{name}": ("classifier_history", f"purifier_history_{name}") for name in NOISE_ABLATIONS
    },
    **{
        f"atop_{name}": (
            "classifier_history",
            f"purifier_history_{name}",
            f"finetuning_history_atop_{name}",
        )
        for name in NOISE_ABLATIONS
    },
}
#: Defenses made of ``f(g(t(.)))`` (stochastic, with a ``bpda`` switch).
PURIFIED = tuple(name for name, needs in NEEDS.items() if len(needs) == 2)
#: The defenses the convergence study runs on (the main job's purified defenses: AP and the
#: four arms); the full comparison's sanity checks read their stronger attack from it.
STUDIED = tuple(name for name in MAIN if name in PURIFIED)
#: A fine-tuned arm trained again with another seed or budget (the ``seeds`` and ``scaling``
#: studies): ``<arm>_seed<k>`` / ``<arm>_steps<k>``, built like ``<arm>``.
VARIANT = re.compile(r"^(?P<arm>[a-z_]+?)_(?P<kind>seed|steps)(?P<value>\d+)$")


def variant(arm: str, kind: str, value: int) -> str:
    """The name of arm ``arm`` retrained with seed / budget ``value`` (``kind``: ``seed`` |
    ``steps``), e.g. ``atop_seed3``."""
    return f"{arm}_{kind}{value}"


def base_name(name: str) -> str:
    """The defense a name is a variant of (``atop_seed3`` -> ``atop``), else the name."""
    match = VARIANT.match(name)
    return match["arm"] if match and match["arm"] in NEEDS else name


def needs(name: str) -> tuple[str, ...]:
    """The checkpoints (catalog names) of defense ``name`` or of a :data:`VARIANT`."""
    base = base_name(name)
    if base == name:
        return NEEDS[name]
    return ("classifier", f"purifier_{name}")


def histories(name: str) -> tuple[str, ...]:
    """The training histories (catalog names) whose epochs add up to ``name``'s training."""
    base = base_name(name)
    if base == name:
        return HISTORIES[name]
    return (*HISTORIES[base][:-1], f"finetuning_history_{name}")


def describe(name: str) -> str:
    """What defense ``name`` is (a variant: its arm's description and the seed / budget)."""
    match = VARIANT.match(name)
    if match and match["arm"] in DESCRIPTIONS:
        return f"{DESCRIPTIONS[match['arm']]}; {match['kind']} {match['value']}"
    return DESCRIPTIONS.get(name, name)


Checkpoint = Mapping[str, Any] | str | os.PathLike


@dataclass
class Defense:
    """A model under evaluation.

    Attributes:
        name: one of :data:`DEFENSES` (or any label for a user's model).
        model: float32 ``[N, 3, H, W]`` in ``[0, 1]`` -> logits; eval mode, frozen.
        stochastic: random at inference (purified defenses): EOT and fresh-draw judging.
        train_seconds: training time of each stage needed to obtain the defense (history
            name -> seconds, :data:`HISTORIES`; the evaluation fills it in).
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


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    return model.to(device).eval().requires_grad_(False)


def build_defense(
    name: str, checkpoints: Mapping[str, Mapping[str, Any] | None], device: torch.device
) -> Defense:
    """Rebuild defense ``name`` from its checkpoint dicts (:func:`needs`; frozen, eval mode).

    Raises:
        ValueError: unknown name, a missing checkpoint, or a purifier checkpoint without
            ``meta.transform``.
        atop.checkpoint.CheckpointError: a malformed checkpoint.
    """
    if base_name(name) not in NEEDS:
        raise ValueError(f"Unknown defense {name!r}: use one of {DEFENSES} (or <arm>_seed<k>).")
    keys = needs(name)
    missing = [key for key in keys if checkpoints.get(key) is None]
    if missing:
        raise ValueError(f"Defense {name!r} needs the checkpoint(s) {missing}.")
    if base_name(name) not in PURIFIED:
        model = _frozen(load_classifier(checkpoints[keys[0]], device, channels_last=True), device)
        return Defense(name, model, False)
    purifier_key = keys[1]
    purifier = checkpoints[purifier_key]
    transform = purifier.get("meta", {}).get("transform")
    if transform is None:
        raise ValueError(
            f"The {purifier_key} checkpoint has no meta.transform (the random transform t "
            "it was trained with): rerun the stage that wrote it."
        )
    expected = purifier.get("meta", {}).get("atop", {}).get("classifier_hash")
    if expected is not None:
        actual = state_hash(checkpoints["classifier"]["state_dict"])
        if actual != expected:
            raise CheckpointError(
                f"The {purifier_key} checkpoint was fine-tuned against classifier "
                f"{expected[:12]}, but the given classifier is {actual[:12]}: a fine-tuned "
                "purifier only defends the classifier it was trained with. Load that one."
            )
    generator, _ = load_purifier(purifier, device)
    classifier = load_classifier(checkpoints["classifier"], device, channels_last=True)
    model = PurifiedClassifier(classifier, generator, build_transform(transform))
    return Defense(name, _frozen(model, device), True, {}, model.transform.config.to_dict())


def build_defenses(
    checkpoints: Mapping[str, Mapping[str, Any] | None],
    names: Sequence[str],
    device: torch.device,
) -> tuple[dict[str, Defense], dict[str, str]]:
    """Rebuild the requested defenses (report order) from their checkpoint dicts.

    Returns:
        ``(defenses, skipped)``: the built defenses by name, and ``{name: reason}`` for
        those whose checkpoints are missing (``None``).

    Raises:
        ValueError: an unknown defense name, or a purifier checkpoint without
            ``meta.transform``.
        atop.checkpoint.CheckpointError: a malformed checkpoint.
    """
    unknown = sorted(set(names) - set(DEFENSES))
    if unknown:
        raise ValueError(f"Unknown defense(s) {unknown}: use {DEFENSES}.")
    defenses: dict[str, Defense] = {}
    skipped: dict[str, str] = {}
    for name in (n for n in DEFENSES if n in names):
        missing = [key for key in NEEDS[name] if checkpoints.get(key) is None]
        if missing:
            skipped[name] = f"checkpoint {', '.join(missing)} not found (stage not run)"
            log.warning("Skipping defense %r: %s", name, skipped[name])
            continue
        defenses[name] = build_defense(name, checkpoints, device)
    return defenses, skipped


def _load(checkpoint: Checkpoint | None) -> Mapping[str, Any] | None:
    if checkpoint is None or isinstance(checkpoint, Mapping):
        return checkpoint
    return load_safe(checkpoint)


def load_defense(
    classifier: Checkpoint,
    purifier: Checkpoint | None = None,
    *,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The defended model from checkpoint files: ``f`` alone, or ``f(g(t(x)))``.

    Args:
        classifier: the classifier checkpoint (``data/06_models/<dataset>/<profile>/classifier.pt``,
            or a baseline's ``pgd_at_classifier.pt`` / ``rvs_classifier.pt``), a path or the
            loaded dict; or a folder written by ``atop export`` (then ``purifier`` is the
            export's own).
        purifier: a purifier checkpoint (``purifier.pt`` for AP, ``purifier_atop.pt`` for
            AToP, ``purifier_<arm>.pt``); its ``meta.transform`` is the random transform
            ``t``. ``None``: ``f`` alone.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
        An ``nn.Module`` in eval mode with frozen weights, mapping float32
        ``[B, 3, H, W]`` images in ``[0, 1]`` to logits ``[B, n_classes]``; with a purifier
        it is a :class:`atop.defense.PurifiedClassifier` (a fresh draw of ``t`` per call).

    Raises:
        atop.checkpoint.CheckpointError: a missing, unsafe or malformed file, NaN weights,
            or a fine-tuned purifier given another classifier than its own.
        ValueError: a purifier checkpoint without ``meta.transform``.
    """
    from atop.export import is_export, load_export

    device = resolve_device(str(device))
    if not isinstance(classifier, Mapping) and is_export(classifier):
        classifier, purifier = load_export(classifier)
    checkpoints = {"classifier": _load(classifier), "purifier": _load(purifier)}
    name = "standard" if purifier is None else "ap"
    return build_defense(name, checkpoints, device).model


def unseen_attacks(
    atop_purifier: Mapping[str, Any] | None, attacks: Sequence[tuple[str, str, str]]
) -> dict[str, Any]:
    """Which evaluation attacks the AToP purifier saw in fine-tuning (paper: "unseen").

    An attack is *seen* when it is the fine-tuning attack's algorithm (same ``name``) in the
    same norm (ε may differ). ``attacks`` lists ``(label, name, norm)``.

    Returns:
        ``{"training_attack": spec or None, "seen": {label: bool}}`` (``seen`` empty when
        the training attack is unknown).
    """
    meta = (atop_purifier or {}).get("meta", {})
    train = meta.get("atop", {}).get("attack")
    if not train:
        return {"training_attack": None, "seen": {}}
    train_name = str(train.get("name", "")).lower()
    train_norm = train.get("norm", "Linf")
    seen = {label: name == train_name and norm == train_norm for label, name, norm in attacks}
    return {"training_attack": dict(train), "seen": seen}

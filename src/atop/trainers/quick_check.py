"""The robust baselines' quick check after training: clean accuracy on the full test set,
clean and PGD accuracy on held-out images. The full evaluation is the evaluation stage's.

Core module: torch, torchattacks and the project's core modules only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from atop.attacks import build_attack, draw_correct, run_attack
from atop.data import to_unit
from atop.models import load_classifier
from atop.params import Params, spec
from atop.trainers.common import PIXEL_SCALE, ClassifierTrainingParams, training_summary
from atop.training import accuracy, resolve_device

log = logging.getLogger(__name__)


@dataclass(init=False, frozen=True)
class RobustEvalParams(Params):
    """The quick check: PGD-``steps`` (ℓ∞, step ``alpha``) on ``images`` held-out images."""

    images: int = spec(ge=1, weights=False)
    eps: float = spec(gt=0, le=1, unit=PIXEL_SCALE, weights=False)
    alpha: float = spec(gt=0, le=1, unit=PIXEL_SCALE, weights=False)
    steps: int = spec(ge=1, weights=False)


def robust_quick_check(
    classifier: dict[str, Any],
    test_set: dict[str, torch.Tensor],
    monitor_indices: Sequence[int],
    params: ClassifierTrainingParams,
    check: RobustEvalParams,
    train_seconds: float | None = None,
) -> dict[str, Any]:
    """Clean accuracy on the full test set, clean and PGD-``steps`` accuracy on the first
    ``check.images`` of ``monitor_indices`` (accuracies in ``[0, 1]``): the baselines' quick
    check after training. PGD is :func:`atop.attacks.build_attack` ``pgd`` (ℓ∞, random start,
    one EOT sample), seeded with ``params.seed``; the full evaluation is the evaluation stage.

    Raises:
        atop.checkpoint.CheckpointError: the checkpoint is malformed.
    """
    device = resolve_device(params.device)
    model = load_classifier(classifier, device=device, channels_last=True)
    cuda = device.type == "cuda"
    batch = params.eval_batch_size
    clean = accuracy(model, test_set["images"], test_set["labels"], batch, device, cuda)
    index = torch.as_tensor(list(monitor_indices)[: check.images], dtype=torch.int64)
    images = to_unit(test_set["images"][index]).to(device)
    labels = test_set["labels"][index].to(device)
    pgd = {"name": "pgd", "norm": "Linf", "eps": check.eps, "alpha": check.alpha}
    attack = build_attack(
        model,
        {**pgd, "steps": check.steps, "eot_iter": 1},
        n_classes=classifier["config"]["num_classes"],
    )
    torch.manual_seed(params.seed)
    adversarial = run_attack(attack, images, labels, batch, progress=params.progress)
    subset_clean = draw_correct(model, images, labels, 1, batch)
    robust = draw_correct(model, adversarial, labels, 1, batch)
    metrics = {
        "clean_test_acc": clean,
        "subset_clean_acc": subset_clean.float().mean().item(),
        "pgd_robust_acc": robust.float().mean().item(),
        "pgd_steps": check.steps,
        "robust_images": len(index),
        "eps": check.eps,
        **training_summary(classifier, train_seconds, len(test_set["labels"])),
    }
    log.info(
        "%s: clean %.4f, PGD-%d robust %.4f on %d images, trained in %.0f s",
        classifier["arch"],
        clean,
        check.steps,
        metrics["pgd_robust_acc"],
        len(index),
        metrics["train_seconds"],
    )
    return metrics

"""Nodes of the Robustness-via-Synthesis baseline (Baytaş & Deb, Neurocomputing 2023).

A classifier is trained from scratch together with a noise-to-perturbation generator
(:class:`atop.models.rvs.RvSGenerator`): per batch one generator step ascends the entropic OT
distance between the clean and synthesized penultimate features, then one classifier step
descends ``CE(f(x_adv), y smoothed 0.5) + 1.0 * OT`` (:func:`atop.baselines.rvs_step`, OT by
POT in :func:`atop.ot.entropic_ot`), through the shared loop :func:`atop.training.fit`.
The classifier is then scored as the PGD-AT one
(:func:`atop.pipelines.adversarial_training.nodes.evaluate_robust_classifier`). Label
smoothing inflates PGD accuracy (method.md §2): judge RvS with the evaluation stage's
AutoAttack. Plain functions, no Kedro imports.
"""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd
import torch

from atop.baselines import rvs_step
from atop.classifier_training import prepare_training, training_loop, training_meta
from atop.models import classifier_checkpoint
from atop.models.rvs import RvSGenerator
from atop.ot import entropic_ot

#: ``arch`` of the generator checkpoint (``{"arch", "config", "state_dict", "meta"}``).
GENERATOR_ARCH = "rvs-generator"


def train_rvs(
    train_set: dict[str, torch.Tensor],
    test_set: dict[str, torch.Tensor],
    class_names: list[str],
    eval_indices: list[int],
    params: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame]:
    """RvS training of a classifier and its perturbation generator from scratch.

    Args:
        train_set, test_set, class_names, eval_indices: see
            :func:`atop.pipelines.adversarial_training.nodes.train_pgd_at`.
        params: ``params:rvs`` (conf/base/parameters_rvs.yml): the classifier, SGD and
            schedule as the classifier stage, plus ``generator`` (``eps``, ``z_dim``, ``lr``,
            ``momentum``), ``label_smoothing``, ``ot`` (``weight``, ``reg``, ``num_iter``).

    Returns:
        ``(classifier_checkpoint, generator_checkpoint, history)``: the classifier as
        :func:`atop.models.classifier_checkpoint` (meta: class names, epochs,
        ``train_seconds``, device, n_train, the RvS settings); the generator as
        ``{"arch": "rvs-generator", "config": RvSGenerator kwargs, "state_dict", "meta"}``;
        the per-epoch DataFrame (``epoch, loss, ce, ot, adv_acc, generator_ot, test_acc,
        lr, seconds``).

    Raises:
        ValueError: the generator's image size does not match the images (it must be a
            multiple of 4) or a bad setting.
        atop.training.NonFiniteLossError: a term diverged (lower ``optimizer.lr``).
    """
    setup = prepare_training(
        train_set, test_set, class_names, params, monitor_indices=eval_indices, desc="rvs"
    )
    model, opt_classifier = setup.classifier, setup.optimizer
    spec = params["generator"]
    generator = RvSGenerator(
        eps=spec["eps"],
        z_dim=spec["z_dim"],
        image_size=train_set["images"].shape[-1],
        channels=train_set["images"].shape[1],
    ).to(setup.device)
    opt_generator = torch.optim.SGD(
        generator.parameters(), lr=spec["lr"], momentum=spec["momentum"]
    )
    ot = params["ot"]
    ot_fn = functools.partial(entropic_ot, reg=ot["reg"], num_iter=ot["num_iter"])

    def train_step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return rvs_step(
            model,
            generator,
            opt_classifier,
            opt_generator,
            x,
            y,
            ot_fn=ot_fn,
            label_smoothing=params["label_smoothing"],
            ot_weight=ot["weight"],
            amp=params["amp"],
        )

    history = training_loop(
        setup,
        {"classifier": model, "generator": generator},
        {"classifier": opt_classifier, "generator": opt_generator},
        train_step,
        params,
    )
    meta = {
        **training_meta(setup, history, class_names),
        "generator": dict(spec),
        "label_smoothing": params["label_smoothing"],
        "ot": dict(ot),
    }
    classifier = classifier_checkpoint(model, params["arch"], setup.config, meta)
    generator_checkpoint = {
        "arch": GENERATOR_ARCH,
        "config": generator.config(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()},
        "meta": meta,
    }
    return classifier, generator_checkpoint, pd.DataFrame(history)

"""Accuracy parity of bf16 autocast against float32, the same seeds and data: a training
stage retrained both ways, or the evaluation's attacks both ways (``parity``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from atop.data import to_unit
from benchmarks.common import (
    PROJECT_ROOT,
    add_common,
    parser,
    positive_int,
    profile_parameters,
    setup_device,
    verdict,
)

#: ``parity attacks --defenses``: name -> (classifier file, purifier file or None) of a run.
PARITY_MODELS = {
    "ap": ("classifier.pt", "purifier.pt"),
    "atop": ("classifier.pt", "purifier_atop.pt"),
    "standard": ("classifier.pt", None),
    "pgd_at": ("pgd_at_classifier.pt", None),
    "rvs": ("rvs_classifier.pt", None),
}


def parity(argv: list[str]) -> None:
    """The accuracy of a training stage (or of the attacks) under bf16 autocast vs float32,
    the same seeds and data (the base profile's parameters).

    ``classifier``: the classifier stage retrained with ``amp: false`` and scored on the
    full test set, against the bf16 run's ``classifier_metrics.json``. ``purifier``: the
    purifier stage for ``--purifier-steps`` steps in each precision, then PSNR and AP clean
    accuracy (:func:`atop.trainers.purifier.evaluate_purifier`). ``attacks``:
    :func:`attack_parity`. Reads the splits, indices and checkpoints of a finished run
    (``--run``: the project folder of a ``make run``).
    """
    from atop.checkpoint import load_safe
    from atop.trainers.classifier import evaluate_classifier, train_classifier
    from atop.trainers.purifier import evaluate_purifier, train_purifier
    from atop.training import training_seconds

    p = parser("parity", parity.__doc__)
    p.add_argument("stage", choices=("classifier", "purifier", "attacks"))
    p.add_argument("--run", default=str(PROJECT_ROOT), help="project folder of a run")
    p.add_argument("--purifier-steps", type=positive_int, default=150)
    p.add_argument("--seeds", help="train both precisions with each of these seeds (e.g. 1,2)")
    p.add_argument("--attacks", default="pgd_linf,pgd_l2", help="labels of evaluation.attacks")
    p.add_argument("--defenses", default="ap,atop", help=f"among {sorted(PARITY_MODELS)}")
    add_common(p)
    args = p.parse_args(argv)
    setup_device(args)
    data = Path(args.run) / "data"
    split = data / "02_intermediate" / "cifar10" / "base"
    indices = data / "05_model_input" / "cifar10" / "base"
    needed = [split / "train.pt", split / "test.pt", indices / "monitor_indices.json"]
    if missing := [str(f) for f in needed if not f.is_file()]:
        sys.exit(f"{', '.join(missing)} missing: --run must be the folder of a finished run")
    train = torch.load(split / "train.pt", weights_only=True)
    test = torch.load(split / "test.pt", weights_only=True)
    monitor = json.loads((indices / "monitor_indices.json").read_text())
    params = profile_parameters("base")
    if args.stage == "classifier":
        names = json.loads((split / "class_names.json").read_text())
        if not args.seeds:  # fp32 against the run's own bf16 classifier
            stage = params["classifier_pretraining"].replace(
                amp=False, progress=False, resume_path=None
            )
            checkpoint, history = train_classifier(train, test, names, monitor, stage)
            fp32 = evaluate_classifier(checkpoint, test, stage, training_seconds(history))
            bf16 = json.loads(
                (data / "08_reporting/cifar10/base/classifier_metrics.json").read_text()
            )
            print(f"classifier clean test accuracy: fp32 {fp32['clean_test_acc']:.4f}, "
                  f"bf16 {bf16['clean_test_acc']:.4f}")  # fmt: skip
            return
        for seed in (int(s) for s in args.seeds.split(",")):
            acc = {}
            for amp in (True, False):
                stage = params["classifier_pretraining"].replace(
                    amp=amp, seed=seed, progress=False, resume_path=None
                )
                checkpoint, history = train_classifier(train, test, names, monitor, stage)
                metrics = evaluate_classifier(checkpoint, test, stage, training_seconds(history))
                acc[amp] = 100 * metrics["clean_test_acc"]
            print(f"classifier seed {seed}: clean test accuracy bf16 {acc[True]:.2f} %, "
                  f"fp32 {acc[False]:.2f} % (bf16 - fp32 {acc[True] - acc[False]:+.2f})",
                  flush=True)  # fmt: skip
        return
    evals = json.loads((indices / "eval_indices.json").read_text())
    if args.stage == "attacks":
        attack_parity(
            data, test, evals, params["evaluation"], args.attacks.split(","),
            args.defenses.split(","),
        )  # fmt: skip
        return
    classifier = load_safe(data / "06_models/cifar10/base/classifier.pt")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    for seed, amp in ((seed, amp) for seed in seeds for amp in (True, False)):
        stage = params["purifier_pretraining"].replace(
            amp=amp, progress=False, resume_path=None, epochs=1,
            max_batches_per_epoch=args.purifier_steps,
        )  # fmt: skip
        stage = stage if seed is None else stage.replace(seed=seed)
        checkpoint, history = train_purifier(train, test, monitor, stage)
        m = evaluate_purifier(checkpoint, classifier, test, evals, stage).metrics
        print(f"purifier seed {stage.seed} {'bf16' if amp else 'fp32'}, {args.purifier_steps} steps "
              f"({training_seconds(history):.0f} s): PSNR {m['psnr']:.3f} dB, "
              f"AP clean accuracy {m['ap_clean_acc']:.4f}", flush=True)  # fmt: skip


def attack_parity(
    data: Path, test: Any, evals: list[int], params: Any, labels: list[str], defenses: list[str]
) -> None:
    """``parity attacks``: the base profile's attacks ``labels`` (its steps and EOT; default
    PGD l-inf and l2) with bf16 vs float32 gradients on ``defenses`` (default AP and AToP),
    the same images and seeds, both judged in float32 (N fresh draws on a purified defense).
    The bf16 run puts every listed attack under bf16 autocast, also those the evaluation
    keeps in float32 (:func:`atop.evaluation.protocol.uses_amp`), which is how such an
    attack gets checked. bf16 is acceptable only where its robust accuracy is not higher: a
    one-sided exact McNemar test (bf16 right more often than fp32) on the first-draw and the
    worst-of-N verdicts, and the single-draw difference."""
    from unittest import mock

    from atop.checkpoint import load_safe
    from atop.evaluation import Defense, EvalSettings, evaluate, load_defense, protocol
    from atop.evaluation.stats import mcnemar

    rows = evals[: params.images]
    x, y = to_unit(test["images"][rows]), test["labels"][rows]
    attacks = {e.label: e for e in params.entries if e.label in labels}
    if set(labels) - set(attacks):
        sys.exit(f"unknown attacks {sorted(set(labels) - set(attacks))}: see evaluation.attacks")
    models = data / "06_models" / "cifar10" / "base"
    print(f"{len(rows)} evaluation images, N = {params.draws} draws, attacks {list(attacks)}")
    if set(defenses) - set(PARITY_MODELS):
        sys.exit(f"unknown defenses {sorted(set(defenses) - set(PARITY_MODELS))}")
    for name in defenses:
        classifier_file, purifier_file = PARITY_MODELS[name]
        specs = {k: dict(e.spec) for k, e in attacks.items()}
        results = {}
        for amp in (False, True):  # a freshly loaded model each: no state carries over
            purifier = load_safe(models / purifier_file) if purifier_file else None
            model = load_defense(load_safe(models / classifier_file), purifier)
            defense = Defense(name, model, purifier is not None)
            settings = EvalSettings(
                batch_size=params.batch_size, draws=params.draws, seed=params.seed, attack_amp=amp
            )
            with mock.patch.object(protocol, "uses_amp", lambda spec, s: s.attack_amp):
                results[amp] = evaluate(defense, x, y, specs, settings)
        for label in attacks:
            fp32, bf16 = (results[amp].runs[label] for amp in (False, True))
            single = [verdict(r.draws, "single").mean().item() for r in (fp32, bf16)]
            tests = {
                rule: mcnemar(verdict(bf16.draws, rule), verdict(fp32.draws, rule), "greater")
                for rule in ("first", "worst_of_n")
            }
            text = ", ".join(
                f"{rule} +{t.only_a}/-{t.only_b} p = {t.p_value:.3g}" for rule, t in tests.items()
            )
            print(
                f"  {name:5s} {label:9s} fp32 {100 * single[0]:6.2f} % ({fp32.seconds:5.1f} s) | "
                f"bf16 {100 * single[1]:6.2f} % ({bf16.seconds:5.1f} s) | speed-up "
                f"{fp32.seconds / bf16.seconds:4.2f}x | bf16 weaker? {text}",
                flush=True,
            )

"""The ``atop`` command (``[project.scripts]`` in pyproject.toml; not ``atop.cli``, the name Kedro
reserves for a project's own kedro commands).

::

    atop --version
    atop run [kedro run options]        # kedro run --pipelines atop (the main job) by default
    atop evaluate (--classifier C.pt [--purifier P.pt] | --model module:factory)
                  [--stochastic | --deterministic] [--attacks fgsm,pgd_linf] [--images 64]
                  [--draws N] [--profile base] [--out verdicts.csv]
    atop export --classifier C.pt [--purifier P.pt] [--metrics robustness.json --defense atop]
                --out DIR
    atop import DIR [--images 16]       # load an export and check it on a few images
    atop compare RUN_A RUN_B            # do two runs differ beyond numerics? (atop.compare)

``evaluate`` takes its attacks (the profile's ``evaluation.attacks``), draws and the fixed
evaluation subset (``data_ingestion.eval_subset``) from the project's parameters, so its
numbers are the stage's for the same images; it prints the table and writes the per-image,
per-draw verdicts as CSV. ``--model module:factory`` evaluates any ``torch.nn.Module`` that a
zero-argument factory returns (``module`` importable from the current folder or
``sys.path``; float32 ``[N, 3, H, W]`` in ``[0, 1]`` -> logits).

A user error (a bad argument, a missing or broken file, a refused parameter) prints one
line, ``atop: error: <problem and fix>``, and exits with code 2; ``--verbose`` (or
``ATOP_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from atop.errors import UserError, report

DESCRIPTION = "AToP: run the pipeline; evaluate, export, import and compare trained defenses."
EPILOG = "Run `atop <command> --help` for a command's options."
#: The most fresh draws ``--draws`` accepts (as the parameters' limit).
MAX_DRAWS = 10_000


def version() -> str:
    """The installed package's version (``importlib.metadata``; ``"unknown"`` when the
    package is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("atop")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2), like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--images``, ``--draws``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (>= 1), got {value}")
    return value


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    command = [sys.executable, "-m", "kedro", "run"]
    if not any(a.startswith("--pipeline") for a in extra):
        command += ["--pipelines", "atop"]
    return subprocess.call(command + extra)


def _project_params(profile: str) -> dict[str, Any]:
    from atop.dvc_params import typed_parameters

    if not (Path.cwd() / "conf").is_dir():
        raise UserError(
            f"No conf/ folder in {Path.cwd()}: run `atop evaluate` / `atop import --images` from "
            "the project folder (it reads the profile's parameters and evaluation subset)."
        )
    try:
        return typed_parameters(Path.cwd(), profile)
    except ValueError as exc:
        if type(exc).__name__ == "ParameterValidationError":
            raise
        raise UserError(str(exc)) from exc


def _subset_size(params: dict[str, Any]) -> int:
    return int(params["data_ingestion"].eval_subset.images)


def _check_images(n: int, params: dict[str, Any], profile: str, option: str = "--images") -> None:
    size = _subset_size(params)
    if n > size:
        raise UserError(
            f"{option} {n} is more than the {size} images of the {profile} profile's fixed "
            f"evaluation subset (data_ingestion.eval_subset.images): use at most {size}."
        )


def _evaluation_images(params: dict[str, Any], n: int):
    """The first ``n`` images of the profile's fixed evaluation subset (as the pipeline)."""
    import torch

    from atop.data import random_subset, to_unit
    from atop.pipelines.data_ingestion.sources import read_dataset

    ingestion = params["data_ingestion"]
    raw = read_dataset(
        ingestion.dataset,
        root=ingestion.root,
        project_raw=Path(ingestion.raw_dir),
        download=False,
        image_size=ingestion.facts.image_size,
    )
    subset = ingestion.eval_subset
    indices = random_subset(len(raw.test_labels), subset.images, subset.seed)[:n]
    images = to_unit(raw.test_images[indices])
    return images, raw.test_labels[indices].to(torch.int64), [int(i) for i in indices]


def load_user_model(target: str):
    """The model of ``--model module:factory``: ``module`` imported (from the current folder
    or ``sys.path``), ``factory()`` called, its result checked.

    Args:
        target: ``"module:factory"`` (``module`` may be dotted, ``factory`` an attribute path).

    Returns:
        The ``torch.nn.Module``, in eval mode.

    Raises:
        atop.errors.UserError: a malformed target, an import that fails, a missing or
            failing factory, or a result that is not an ``nn.Module`` (one line each).
    """
    from torch import nn

    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise UserError(
            f"--model {target!r}: write module:factory, e.g. --model mymodels:build (a "
            "zero-argument function returning a torch.nn.Module)."
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UserError(
            f"--model {target}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
            f"it must be importable from the current folder ({cwd}) or sys.path."
        ) from exc
    factory: Any = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise UserError(
            f"--model {target}: {module_name} has no callable {attribute!r} (a zero-argument "
            "function returning a torch.nn.Module)."
        )
    try:
        model = factory()
    except Exception as exc:
        raise UserError(
            f"--model {target}: {attribute}() raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise UserError(
            f"--model {target}: {attribute}() returned {type(model).__name__}, not a "
            "torch.nn.Module (one mapping float32 [N, 3, H, W] in [0, 1] to logits)."
        )
    return model.eval()


def _check_logits(model, images, target: str) -> None:
    import torch

    try:
        with torch.no_grad():
            logits = model(images[:1])
    except Exception as exc:
        raise UserError(
            f"--model {target}: one forward pass on a float32 {list(images[:1].shape)} image in "
            f"[0, 1] failed ({type(exc).__name__}: {exc})."
        ) from exc
    if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != 1:
        shape = list(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise UserError(
            f"--model {target}: the model must return logits [N, classes] for N images, got "
            f"{shape} for one image."
        )


def _evaluate(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.classifier is None):
        raise UserError(
            "Give either --classifier (with --purifier for a purified defense) or --model."
        )
    if args.model is not None and args.purifier is not None:
        raise UserError("--purifier goes with --classifier; a --model is evaluated as it is.")
    if args.draws is not None and args.draws > MAX_DRAWS:
        raise UserError(f"--draws {args.draws} is more than {MAX_DRAWS}: use fewer fresh draws.")
    user_model = load_user_model(args.model) if args.model is not None else None
    from atop.evaluation.protocol import EvalSettings, evaluate
    from atop.pipelines.evaluation.metrics import RULES
    from atop.training import resolve_device

    params = _project_params(args.profile)
    _check_images(args.images, params, args.profile)
    evaluation = params["evaluation"]
    wanted = args.attacks.split(",") if args.attacks else None
    entries = [e for e in evaluation.attacks if wanted is None or e["label"] in wanted]
    missing = sorted(set(wanted or []) - {e["label"] for e in entries})
    if missing:
        known = [e["label"] for e in evaluation.attacks]
        raise UserError(
            f"Unknown attack label(s) {missing}; the {args.profile} profile has {known}."
        )
    images, labels, indices = _evaluation_images(params, args.images)
    if args.model is not None:
        device = resolve_device(args.device)
        model = user_model.to(device)
        _check_logits(model, images.to(device), args.model)
        stochastic = args.stochastic
        if stochastic is None and isinstance(getattr(model, "stochastic", None), bool):
            stochastic = model.stochastic
        name = args.name or args.model.partition(":")[2]
    else:
        from atop.evaluation import load_defense

        model = load_defense(args.classifier, args.purifier, device=args.device)
        stochastic = args.stochastic
        name = args.name or "defense"
    draws = args.draws if args.draws is not None else evaluation.draws
    settings = EvalSettings(
        evaluation.batch_size, draws, evaluation.seed, False, evaluation.attack_amp
    )
    attacks = {e["label"]: {k: v for k, v in e.items() if k != "label"} for e in entries}
    result = evaluate(model, images, labels, attacks, settings, stochastic=stochastic)
    judged = draws if result.clean.shape[1] > 1 else 1
    print(
        f"{len(labels)} images of the fixed evaluation subset, {judged} fresh draw(s) per verdict"
    )
    print(f"{'':22s} {'single-draw':>12s} {'worst-of-N':>12s}")
    single, worst = result.accuracy("single"), result.accuracy("worst_of_n")
    for key in single:
        print(f"{key:22s} {100 * single[key]:11.2f}% {100 * worst[key]:11.2f}%")
    if args.out:
        from atop.pipelines.evaluation.metrics import attack_records, verdicts_table

        results = {
            "attacks": attack_records(result.entries),
            "defenses": {
                name: {
                    "clean": result.clean,
                    "attacks": {k: {"draws": r.draws} for k, r in result.runs.items()},
                }
            },
        }
        verdicts_table(results, indices).to_csv(args.out, index=False)
        print(f"per-image verdicts ({', '.join(RULES)} recomputable): {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from atop.checkpoint import load_safe
    from atop.export import export_defense

    classifier = load_safe(args.classifier)
    purifier = load_safe(args.purifier) if args.purifier else None
    evaluation = None
    if args.metrics:
        path = Path(args.metrics)
        if not path.is_file():
            raise UserError(
                f"--metrics {path}: no such file; it is the run's robustness.json "
                "(data/08_reporting/<dataset>/<profile>/robustness.json)."
            )
        try:
            metrics = json.loads(path.read_text())
        except ValueError as exc:
            raise UserError(f"--metrics {path} is not JSON ({exc}).") from None
        if args.defense not in metrics.get("defenses", {}):
            raise UserError(
                f"{path} has no defense {args.defense!r}; it has "
                f"{sorted(metrics.get('defenses', {}))} (--defense)."
            )
        evaluation = {"settings": metrics["settings"], "defense": metrics["defenses"][args.defense]}
    out = export_defense(classifier, purifier, args.out, name=args.defense, evaluation=evaluation)
    print(f"exported to {out}: {', '.join(sorted(os.listdir(out)))}")
    return 0


def _import(args: argparse.Namespace) -> int:
    import torch

    from atop.checkpoint import CheckpointError
    from atop.evaluation import load_defense
    from atop.evaluation.protocol import EvalSettings, evaluate
    from atop.export import is_export, not_an_export

    if not is_export(args.folder):
        raise CheckpointError(not_an_export(args.folder))
    params = None
    if args.images:
        params = _project_params(args.profile)
        _check_images(args.images, params, args.profile)
    model = load_defense(args.folder)
    print(f"loaded {args.folder}: {type(model).__name__} (weights verified against config.json)")
    if args.images:
        images, labels, _ = _evaluation_images(params, args.images)
        with torch.no_grad():
            accuracy = evaluate(model, images, labels, {}, EvalSettings(draws=4)).accuracy()
        print(
            f"clean accuracy on {len(labels)} images (single-draw): {100 * accuracy['clean']:.2f}%"
        )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from atop.compare import main as compare

    return compare(
        args.run_a,
        args.run_b,
        record=args.record,
        level=args.level,
        alpha=args.alpha,
        out=args.json,
    )


def parser() -> argparse.ArgumentParser:
    """The ``atop`` argument parser."""
    main = _Parser(prog="atop", description=DESCRIPTION, epilog=EPILOG)
    main.add_argument("--version", action="version", version=f"atop {version()}")
    main.add_argument(
        "--verbose", action="store_true", help="show the traceback of an error (ATOP_DEBUG=1)"
    )
    commands = main.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "run", help="kedro run (default: --pipelines atop); other options pass through"
    )
    p = commands.add_parser("evaluate", help="attack a defense from checkpoint files or a model")
    p.add_argument("--classifier", help="classifier .pt, or an export folder")
    p.add_argument("--purifier", help="purifier .pt (AP: purifier.pt, AToP: purifier_atop.pt)")
    p.add_argument(
        "--model",
        help="module:factory, a zero-argument function returning a torch.nn.Module "
        "(float32 [N, 3, H, W] in [0, 1] -> logits); module importable from here or sys.path",
    )
    random = p.add_mutually_exclusive_group()
    random.add_argument(
        "--stochastic",
        dest="stochastic",
        action="store_const",
        const=True,
        default=None,
        help="judge every verdict with fresh draws (default: the model's `stochastic` "
        "attribute, else whether it has a random transform)",
    )
    random.add_argument(
        "--deterministic", dest="stochastic", action="store_const", const=False,
        help="judge with one forward pass",
    )  # fmt: skip
    p.add_argument("--attacks", help="labels of the profile's evaluation.attacks (default: all)")
    p.add_argument(
        "--images", type=positive_int, default=64,
        help="first images of the evaluation subset (1 .. its size)",
    )  # fmt: skip
    p.add_argument(
        "--draws", type=positive_int, help="fresh draws per verdict (default: the profile's)"
    )
    p.add_argument("--profile", default="base", help="Kedro profile: base | smoke | paper")
    p.add_argument("--name", help="the defense's name in the verdicts CSV")
    p.add_argument("--out", help="write the per-image, per-draw verdicts to this CSV")
    p.add_argument("--device", default="auto")
    p = commands.add_parser("export", help="a self-contained release of a trained defense")
    p.add_argument("--classifier", required=True)
    p.add_argument("--purifier")
    p.add_argument("--metrics", help="robustness.json, for the model card's evaluation table")
    p.add_argument("--defense", default="atop", help="the defense's name (and its metrics entry)")
    p.add_argument("--out", required=True, help="the folder to write")
    p = commands.add_parser("import", help="load an exported defense (and check it)")
    p.add_argument("folder")
    p.add_argument(
        "--images", type=positive_int, default=None, help="check clean accuracy on this many"
    )
    p.add_argument("--profile", default="base")
    p = commands.add_parser(
        "compare", help="do two runs of one profile differ beyond numerics? (paired tests)"
    )
    p.add_argument("run_a", help="a run's records folder, e.g. data/08_reporting/cifar10/base")
    p.add_argument("run_b", help="another run's records folder (a copy, another machine)")
    p.add_argument(
        "--record", default="robustness", choices=("robustness", "comparison"),
        help="the main job's records (robustness) or the full comparison's",
    )  # fmt: skip
    p.add_argument("--level", type=float, default=0.95, help="level of the bootstrap CIs")
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise level per defense")
    p.add_argument("--json", help="also write the comparison to this JSON file")
    return main


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atop`` command.

    Returns:
        The exit code: 0 done, 1 (``compare``) a defense differs, 2 a user error (one line
        on stderr; the traceback with ``--verbose`` or ``ATOP_DEBUG=1``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "run":
        return _run(argparse.Namespace(), argv[1:])
    args = parser().parse_args(argv)
    verbose = args.verbose
    handlers = {"evaluate": _evaluate, "export": _export, "import": _import, "compare": _compare}
    try:
        return handlers[args.command](args)
    except Exception as exc:
        code = report(exc, "atop", verbose=verbose)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())

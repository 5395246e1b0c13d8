"""The ``atop`` command (``[project.scripts]`` in pyproject.toml; not ``atop.cli``, the name Kedro
reserves for a project's own kedro commands).

::

    atop run [kedro run options]        # kedro run --pipelines atop (the main job) by default
    atop evaluate --classifier C.pt [--purifier P.pt] [--attacks fgsm,pgd_linf] [--images 64]
                  [--profile base] [--out verdicts.csv]
    atop export --classifier C.pt [--purifier P.pt] [--metrics robustness.json --defense atop]
                --out DIR
    atop import DIR [--images 16]       # load an export and check it on a few images

``evaluate`` takes its attacks (the profile's ``evaluation.attacks``), draws and the fixed
evaluation subset (``data_ingestion.eval_subset``) from the project's parameters, so its
numbers are the stage's for the same images; it prints the table and writes the per-image,
per-draw verdicts as CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = "AToP: run the pipeline; evaluate, export and import trained defenses."
EPILOG = "Run `atop <command> --help` for a command's options."


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    command = [sys.executable, "-m", "kedro", "run"]
    if not any(a.startswith("--pipeline") for a in extra):
        command += ["--pipelines", "atop"]
    return subprocess.call(command + extra)


def _project_params(profile: str) -> dict[str, Any]:
    from atop.dvc_params import typed_parameters

    return typed_parameters(Path.cwd(), profile)


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


def _evaluate(args: argparse.Namespace) -> int:
    from atop.evaluation import load_defense
    from atop.evaluation.protocol import EvalSettings, evaluate
    from atop.pipelines.evaluation.metrics import RULES

    params = _project_params(args.profile)
    evaluation = params["evaluation"]
    wanted = args.attacks.split(",") if args.attacks else None
    entries = [e for e in evaluation.attacks if wanted is None or e["label"] in wanted]
    missing = sorted(set(wanted or []) - {e["label"] for e in entries})
    if missing:
        known = [e["label"] for e in evaluation.attacks]
        sys.exit(f"Unknown attack label(s) {missing}; the {args.profile} profile has {known}.")
    model = load_defense(args.classifier, args.purifier, device=args.device)
    images, labels, indices = _evaluation_images(params, args.images)
    draws = args.draws or evaluation.draws
    settings = EvalSettings(
        evaluation.batch_size, draws, evaluation.seed, False, evaluation.attack_amp
    )
    attacks = {e["label"]: {k: v for k, v in e.items() if k != "label"} for e in entries}
    result = evaluate(model, images, labels, attacks, settings)
    print(f"{len(labels)} images of the fixed evaluation subset, {draws} fresh draws per verdict")
    print(f"{'':22s} {'single-draw':>12s} {'worst-of-N':>12s}")
    single, worst = result.accuracy("single"), result.accuracy("worst_of_n")
    for key in single:
        print(f"{key:22s} {100 * single[key]:11.2f}% {100 * worst[key]:11.2f}%")
    if args.out:
        from atop.pipelines.evaluation.metrics import verdicts_table

        results = {
            "attacks": [{"label": e.label, "norm": e.norm, "eps": e.eps} for e in result.entries],
            "defenses": {
                args.name: {
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
        metrics = json.loads(Path(args.metrics).read_text())
        if args.defense not in metrics.get("defenses", {}):
            sys.exit(f"{args.metrics} has no defense {args.defense!r}.")
        evaluation = {"settings": metrics["settings"], "defense": metrics["defenses"][args.defense]}
    out = export_defense(classifier, purifier, args.out, name=args.defense, evaluation=evaluation)
    print(f"exported to {out}: {', '.join(sorted(os.listdir(out)))}")
    return 0


def _import(args: argparse.Namespace) -> int:
    import torch

    from atop.evaluation import load_defense
    from atop.evaluation.protocol import EvalSettings, evaluate

    model = load_defense(args.folder)
    print(f"loaded {args.folder}: {type(model).__name__}")
    if args.images:
        images, labels, _ = _evaluation_images(_project_params(args.profile), args.images)
        with torch.no_grad():
            accuracy = evaluate(model, images, labels, {}, EvalSettings(draws=4)).accuracy()
        print(
            f"clean accuracy on {len(labels)} images (single-draw): {100 * accuracy['clean']:.2f}%"
        )
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``atop`` argument parser."""
    main = argparse.ArgumentParser(prog="atop", description=DESCRIPTION, epilog=EPILOG)
    commands = main.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "run", help="kedro run (default: --pipelines atop); other options pass through"
    )
    p = commands.add_parser("evaluate", help="attack a defense from checkpoint files")
    p.add_argument("--classifier", required=True, help="classifier .pt, or an export folder")
    p.add_argument("--purifier", help="purifier .pt (AP: purifier.pt, AToP: purifier_atop.pt)")
    p.add_argument("--attacks", help="labels of the profile's evaluation.attacks (default: all)")
    p.add_argument("--images", type=int, default=64, help="first images of the evaluation subset")
    p.add_argument("--draws", type=int, help="fresh draws per verdict (default: the profile's)")
    p.add_argument("--profile", default="base", help="Kedro profile: base | smoke | paper")
    p.add_argument("--name", default="defense", help="the defense's name in the verdicts CSV")
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
    p.add_argument("--images", type=int, default=0, help="check clean accuracy on this many")
    p.add_argument("--profile", default="base")
    return main


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atop`` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        return _run(argparse.Namespace(), argv[1:])
    args = parser().parse_args(argv)
    return {"evaluate": _evaluate, "export": _export, "import": _import}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

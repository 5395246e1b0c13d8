"""What finished pipeline runs recorded: training throughput per stage (``stages``) and one
defense in two runs, paired on the same images (``runs``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import PROJECT_ROOT, parser, percent

#: stage -> (metrics file, what one training image costs); the parameter key is the stage name
STAGES = {
    "classifier_pretraining": ("classifier_metrics.json", "one SGD step (clean)"),
    "purifier_pretraining": ("purifier_metrics.json", "one D step + one g step"),
    "atop_finetuning": ("finetuning_atop_metrics.json", "attack + one D step + one g step"),
    "adversarial_training": ("adversarial_training_metrics.json", "PGD-10 + one SGD step"),
    "rvs": ("rvs_metrics.json", "one generator step + one classifier step"),
}


def stages(argv: list[str]) -> None:
    """Training images/s of each stage of the last pipeline run.

    Reads ``<reporting>/<stage>_metrics.json`` (``train_seconds``, ``epochs``, ``n_train``,
    written by the stages) and the resolved parameters of the profile
    (``params/<profile>.yaml``, for the batch sizes): images seen
    (``epochs * floor(n_train / batch_size) * batch_size``, every loop drops the last partial
    batch) over the training seconds (evaluation excluded). A stage run with
    ``max_batches_per_epoch`` set is reported as such (its count would be wrong).
    """
    import yaml

    p = parser("stages", stages.__doc__)
    p.add_argument("--profile", default="base")
    p.add_argument("--reporting", type=Path, help="default: data/08_reporting/cifar10/<profile>")
    args = p.parse_args(argv)
    args.reporting = args.reporting or PROJECT_ROOT / "data/08_reporting/cifar10" / args.profile
    params_file = PROJECT_ROOT / "params" / f"{args.profile}.yaml"
    if not params_file.is_file():
        sys.exit(f"{params_file} missing: unknown profile {args.profile!r}?")
    params = yaml.safe_load(params_file.read_text())
    print(f"profile {args.profile}: training throughput per stage (evaluation excluded)")
    for stage, (metrics_file, cost) in STAGES.items():
        path = args.reporting / metrics_file
        if not path.is_file():
            print(f"  {stage:24s} not run ({path} missing)")
            continue
        metrics = json.loads(path.read_text())
        stage_params = params[stage]
        if stage_params.get("max_batches_per_epoch") is not None:
            print(f"  {stage:24s} max_batches_per_epoch is set: images seen unknown")
            continue
        batch = stage_params["batch_size"]
        images = metrics["epochs"] * (metrics["n_train"] // batch) * batch
        seconds = metrics["train_seconds"]
        print(
            f"  {stage:24s} {images:7d} images in {seconds:7.1f} s = {images / seconds:7.1f} "
            f"images/s on {metrics.get('device', '?')} ({cost})"
        )


def runs(argv: list[str]) -> None:
    """One defense in two runs of the pipeline, paired on the same evaluation images.

    For a defense retrained by a change (``--old`` / ``--new``: the project folders of the
    two runs): per image, the clean verdict and the worst case over the threat model's
    attacks (the eps sweep and the fixed-randomness rows left out), on the first draw and on
    all draws (worst-of-N), from each run's ``<report>_verdicts.csv``; accuracies and a
    two-sided exact McNemar test (:func:`atop.evaluation.stats.mcnemar`; +a/-b: images right
    only in the new / old run).
    """
    import pandas as pd
    import torch

    from atop.evaluation.stats import mcnemar

    p = parser("runs", runs.__doc__)
    p.add_argument("--old", required=True, help="project folder of the first run")
    p.add_argument("--new", required=True, help="project folder of the second run")
    p.add_argument("--defense", default="atop")
    p.add_argument("--report", default="robustness", choices=("robustness", "comparison"))
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--profile", default="base")
    args = p.parse_args(argv)

    def verdicts(run: str) -> pd.DataFrame:
        path = Path(run) / "data/07_model_output" / args.dataset / args.profile
        file = path / f"{args.report}_verdicts.csv"
        if not file.is_file():
            sys.exit(f"{file} missing: is {run} the project folder of a finished run?")
        table = pd.read_csv(file)
        table = table[table.defense == args.defense]
        if table.empty:
            sys.exit(f"{path}: no verdicts of defense {args.defense!r}.")
        draws = [c for c in table.columns if c.startswith("draw_")]
        table = table.assign(
            first=table["draw_0"].astype(bool),
            every=table[draws].fillna(1).astype(bool).all(axis=1),  # right on every draw
        )
        return table[~table.attack.str.contains("_eps_|fixed")]

    def worst(table: pd.DataFrame, norm: str | None) -> pd.DataFrame:
        rows = table[table.attack == "clean"] if norm is None else table[table.norm == norm]
        clean = table[table.attack == "clean"]
        return pd.concat([clean, rows]).groupby("image")[["first", "every"]].min()

    old, new = verdicts(args.old), verdicts(args.new)
    print(f"{args.defense}: {args.old} (old) vs {args.new} (new), {args.report} verdicts")
    for norm in (None, "Linf", "L2"):
        a, b = worst(new, norm), worst(old, norm)
        b = b.reindex(a.index)
        for column, rule in (("first", "first draw"), ("every", "worst-of-N")):
            x = torch.tensor(a[column].to_numpy(dtype=bool))
            y = torch.tensor(b[column].to_numpy(dtype=bool))
            test = mcnemar(x, y)
            print(
                f"  {'clean' if norm is None else 'worst ' + norm:10s} {rule:10s} old "
                f"{percent(y.float().mean())} | new {percent(x.float().mean())} | "
                f"+{test.only_a}/-{test.only_b}, p = {test.p_value:.3g} ({len(x)} images)"
            )

"""Training throughput of each stage of the last pipeline run, from its own records.

Reads ``data/08_reporting/<stage>_metrics.json`` (``train_seconds``, ``epochs``, ``n_train``,
written by the stages) and the resolved parameters of the profile (``params/<profile>.yaml``,
for the batch sizes), and prints images/s of training per stage: images seen
(``epochs * floor(n_train / batch_size) * batch_size``, every loop drops the last partial
batch) over the training seconds (evaluation excluded). A stage run with
``max_batches_per_epoch`` set is reported as such (its count would be wrong).

Usage::

    .venv/bin/python benchmarks/stage_throughput.py [--profile base] [--reporting data/08_reporting]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: stage -> (metrics file, what one training image costs); the parameter key is the stage name
STAGES = {
    "classifier_pretraining": ("classifier_metrics.json", "one SGD step (clean)"),
    "purifier_pretraining": ("purifier_metrics.json", "one D step + one g step"),
    "atop_finetuning": ("atop_metrics.json", "attack + one D step + one g step"),
    "adversarial_training": ("adversarial_training_metrics.json", "PGD-10 + one SGD step"),
    "rvs": ("rvs_metrics.json", "one generator step + one classifier step"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="base")
    parser.add_argument("--reporting", type=Path, default=PROJECT_ROOT / "data/08_reporting")
    args = parser.parse_args()
    params = yaml.safe_load((PROJECT_ROOT / "params" / f"{args.profile}.yaml").read_text())
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


if __name__ == "__main__":
    main()

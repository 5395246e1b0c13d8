"""A self-contained release of a trained defense: weights, config, model card.

:func:`export_defense` writes a folder::

    model.safetensors   the classifier's and the purifier generator's weights
                        ("classifier.<name>", "purifier.<name>"), no pickle at all
    config.json         format, architectures and configs, the random transform, the hash of
                        the classifier the purifier was fine-tuned against, training facts
    README.md           a model card: what the defense is, how it was trained and evaluated
                        (the evaluation table, when given), how to load it

:func:`load_export` reads it back into the checkpoint dicts that
:func:`atop.evaluation.load_defense` builds the model from (``load_defense(folder)`` works).

Core module: torch, safetensors and the standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from atop.checkpoint import CheckpointError, state_hash

FORMAT = "atop-defense/1"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`export_defense`."""
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def _plain(meta: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able items of a checkpoint's meta (tensors and lists of indices left out)."""
    out = {}
    for key, value in meta.items():
        if key.endswith("indices") or torch.is_tensor(value):
            continue
        if isinstance(value, Mapping):
            out[key] = _plain(value)
        elif isinstance(value, str | int | float | bool) or value is None:
            out[key] = value
        elif isinstance(value, list | tuple) and all(
            isinstance(v, str | int | float) for v in value
        ):
            out[key] = list(value)
    return out


def export_defense(
    classifier: Mapping[str, Any],
    purifier: Mapping[str, Any] | None,
    out_dir: str | os.PathLike,
    *,
    name: str = "atop",
    evaluation: Mapping[str, Any] | None = None,
) -> Path:
    """Write the release folder of a defense (atomically: a temporary folder, renamed).

    Args:
        classifier: the classifier checkpoint dict (``arch``, ``config``, ``state_dict``).
        purifier: a purifier checkpoint dict (its generator is exported, not the
            discriminator), or ``None`` for a classifier alone.
        out_dir: the folder to create (replaced if it exists).
        name: the defense's name in the model card.
        evaluation: this defense's entry of ``robustness.json`` (``defenses.<name>``) and the
            settings, ``{"settings": ..., "defense": ...}``, for the card's table.

    Returns:
        The folder.

    Raises:
        CheckpointError: the purifier was fine-tuned against another classifier.
    """
    from safetensors.torch import save_file

    classifier_hash = state_hash(classifier["state_dict"])
    tensors = {f"classifier.{k}": v for k, v in classifier["state_dict"].items()}
    config: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "classifier": {
            "arch": classifier["arch"],
            "config": dict(classifier["config"]),
            "meta": _plain(classifier.get("meta", {})),
        },
        "classifier_hash": classifier_hash,
        "purifier": None,
    }
    if purifier is not None:
        meta = purifier.get("meta", {})
        expected = meta.get("atop", {}).get("classifier_hash")
        if expected is not None and expected != classifier_hash:
            raise CheckpointError(
                f"The purifier was fine-tuned against classifier {expected[:12]}, not "
                f"{classifier_hash[:12]}: export it with the classifier it was trained with."
            )
        tensors.update({f"purifier.{k}": v for k, v in purifier["state_dict"]["generator"].items()})
        config["purifier"] = {
            "arch": purifier["arch"],
            "config": dict(purifier["config"]),
            "transform": dict(meta["transform"]),
            "meta": _plain(meta),
        }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging / WEIGHTS)
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (staging / CARD).write_text(model_card(config, evaluation))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_export(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The classifier and purifier checkpoint dicts of an export folder (weights loaded with
    safetensors: no pickle).

    Raises:
        CheckpointError: not an export of this project, or weights that do not match.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not is_export(path):
        raise CheckpointError(
            f"{path} is not an exported defense (it needs {CONFIG} and {WEIGHTS}): create one "
            "with `atop export`."
        )
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown export format {config.get('format')!r}.")
    tensors = load_file(path / WEIGHTS)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    classifier = {
        "arch": config["classifier"]["arch"],
        "config": config["classifier"]["config"],
        "state_dict": part("classifier."),
        "meta": config["classifier"]["meta"],
    }
    if state_hash(classifier["state_dict"]) != config["classifier_hash"]:
        raise CheckpointError(f"{path}: the classifier's weights do not match config.json's hash.")
    purifier = None
    if config["purifier"] is not None:
        meta = {**config["purifier"]["meta"], "transform": config["purifier"]["transform"]}
        purifier = {
            "arch": config["purifier"]["arch"],
            "config": config["purifier"]["config"],
            "state_dict": {"generator": part("purifier.")},
            "meta": meta,
        }
    return classifier, purifier


def model_card(config: Mapping[str, Any], evaluation: Mapping[str, Any] | None) -> str:
    """The export's README.md: the defense, its training, its evaluation, its use."""
    name = config["name"]
    c = config["classifier"]
    lines = [
        f"# {name}: a defense trained with atop",
        "",
        "Adversarial Training on Purification (AToP, Lin et al., ICLR 2024) and its baselines, "
        "trained by the `atop` pipeline (https://github.com/ -- this repository).",
        "",
        "## Model",
        "",
        f"- classifier `f`: `{c['arch']}` {json.dumps({k: v for k, v in c['config'].items() if k not in ('mean', 'std')})}, "
        f"weights sha256 `{config['classifier_hash'][:16]}`",
    ]
    p = config["purifier"]
    if p is None:
        lines.append("- no purifier: the classifier alone")
    else:
        lines += [
            f"- purifier `g`: {json.dumps(p['config'])}",
            f"- random transform `t`: {json.dumps(p['transform'])}",
            "- inference: `f(g(t(x)))`, stochastic (a fresh draw of `t` per call)",
        ]
        atop = p["meta"].get("atop")
        if atop:
            lines.append(
                f"- fine-tuning arm `{atop.get('arm')}`: lambda {atop.get('lambda_cls')}, attack "
                f"{json.dumps(atop.get('attack'))}, {atop.get('n_train')} images x "
                f"{atop.get('epochs')} epoch(s)"
            )
    lines += ["", "## Evaluation", ""]
    if evaluation:
        entry, settings = evaluation["defense"], evaluation["settings"]
        lines.append(
            f"{settings['n_images']} CIFAR test images of the project's fixed evaluation subset, "
            f"{settings['draws']} fresh draws per verdict; accuracy (%), single-draw / "
            "worst-of-N:"
        )
        lines += ["", "| | single-draw | worst-of-N |", "|---|---:|---:|"]
        lines.append(
            f"| clean | {100 * entry['clean']['single']:.2f} | "
            f"{100 * entry['clean']['worst_of_n']:.2f} |"
        )
        for norm, worst in entry["worst_case"].items():
            lines.append(
                f"| worst case {norm} | {100 * worst['single']:.2f} | {100 * worst['worst_of_n']:.2f} |"
            )
        for label, acc in entry["attacks"].items():
            lines.append(f"| {label} | {100 * acc['single']:.2f} | {100 * acc['worst_of_n']:.2f} |")
    else:
        lines.append("Not given at export time: see the project's robustness report.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from atop import load_defense",
        'model = load_defense("<this folder>")  # float32 [B, 3, H, W] in [0, 1] -> logits',
        "```",
        "",
    ]
    return "\n".join(lines)

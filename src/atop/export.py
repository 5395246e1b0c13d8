"""A self-contained release of a trained defense: weights, config, model card.

:func:`export_defense` writes a folder::

    model.safetensors   the classifier's and the purifier generator's weights
                        ("classifier.<name>", "purifier.<name>"), no pickle at all
    config.json         format, architectures and configs, the random transform, the SHA-256
                        of every weights file (``files``) and of the classifier's and the
                        purifier's weights, training facts
    README.md           a model card: what the defense is, how it was trained and evaluated
                        (the evaluation table, when given), how to load it

The folder is written beside its target (a temporary sibling) and swapped in atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames), so a reader sees the old export
or the new one, never a mix and never none; an existing folder is replaced only if it is an
export itself. Files and folder get the usual permissions (umask).

:func:`load_export` reads it back into the checkpoint dicts that
:func:`atop.evaluation.load_defense` builds the model from (``load_defense(folder)`` works),
after checking every file against its SHA-256 and the weights against their hashes; a broken
file is a :class:`atop.checkpoint.CheckpointError` naming it.

Core module: torch, safetensors and the standard library.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from atop.checkpoint import CheckpointError, state_hash

log = logging.getLogger(__name__)

#: The format written; ``atop-defense/1`` (no file hashes, only the classifier's) is read too.
FORMAT = "atop-defense/2"
FORMATS = ("atop-defense/1", FORMAT)
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`export_defense`."""
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def not_an_export(path: str | os.PathLike) -> str:
    """Why ``path`` is not an export: what an export holds, what the folder holds, and how
    to make one."""
    path = Path(path)
    if not path.exists():
        found = "it does not exist"
    elif not path.is_dir():
        found = "it is a file"
    else:
        names = sorted(p.name for p in path.iterdir())
        found = (
            f"it holds {names[:6]}{' ...' if len(names) > 6 else ''}" if names else "it is empty"
        )
    return (
        f"{path} is not an exported defense ({found}): an export is a folder holding "
        f"{CONFIG} (format {FORMAT}) and {WEIGHTS}, written by `atop export --classifier C.pt "
        "[--purifier P.pt] --out DIR`."
    )


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex, 64 characters)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` when the
    system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(staging: Path, out: Path) -> None:
    """Put the folder ``staging`` at ``out`` atomically; the previous ``out`` (an export or
    an empty folder) is removed after the swap."""
    if not out.exists():
        os.replace(staging, out)
        return
    if not _exchange(staging, out):  # two renames: a moment without `out`, never a mix
        old = staging.with_name(staging.name + ".old")
        os.replace(out, old)
        os.replace(staging, out)
        staging = old
    shutil.rmtree(staging)


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
        out_dir: the folder to create; an existing export (or empty folder) there is
            replaced atomically.
        name: the defense's name in the model card.
        evaluation: this defense's entry of ``robustness.json`` (``defenses.<name>``) and the
            settings, ``{"settings": ..., "defense": ...}``, for the card's table.

    Returns:
        The folder.

    Raises:
        CheckpointError: the purifier was fine-tuned against another classifier, or
            ``out_dir`` exists and is neither an export nor empty.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (is_export(out) or not any(out.iterdir()))):
        raise CheckpointError(
            f"{out} exists and is not an export: `atop export` replaces only a previous export "
            "(or an empty folder). Choose another --out."
        )
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
        "purifier_hash": None,
        "purifier": None,
        "files": {},
    }
    if purifier is not None:
        meta = purifier.get("meta", {})
        expected = meta.get("atop", {}).get("classifier_hash")
        if expected is not None and expected != classifier_hash:
            raise CheckpointError(
                f"The purifier was fine-tuned against classifier {expected[:12]}, not "
                f"{classifier_hash[:12]}: export it with the classifier it was trained with."
            )
        generator = purifier["state_dict"]["generator"]
        tensors.update({f"purifier.{k}": v for k, v in generator.items()})
        config["purifier_hash"] = state_hash(generator)
        config["purifier"] = {
            "arch": purifier["arch"],
            "config": dict(purifier["config"]),
            "transform": dict(meta["transform"]),
            "meta": _plain(meta),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging / WEIGHTS)
        config["files"] = {WEIGHTS: file_sha256(staging / WEIGHTS)}
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (staging / CARD).write_text(model_card(config, evaluation))
        for name in (WEIGHTS, CONFIG, CARD):
            os.chmod(staging / name, 0o666 & ~umask)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_export(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The classifier and purifier checkpoint dicts of an export folder (weights loaded with
    safetensors: no pickle), after checking every file of ``config.json: files`` against its
    SHA-256 and the classifier's and purifier's weights against their hashes.

    Raises:
        CheckpointError: not an export (what one must hold), a ``config.json`` that is not
            valid or lacks keys, a weights file that does not match its SHA-256 or cannot be
            read (truncated, corrupted), or weights that do not match their hash; the message
            names the file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not is_export(path):
        raise CheckpointError(not_an_export(path))
    redo = "export it again with `atop export`"
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG} is not valid JSON ({exc}): {redo}.") from None
    if not isinstance(config, dict) or config.get("format") not in FORMATS:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(
            f"{path / CONFIG}: unknown export format {found!r} (this version reads {FORMATS}): "
            f"{redo}."
        )
    files = config.get("files")
    if config["format"] == FORMAT:
        if not isinstance(files, dict) or WEIGHTS not in files:
            raise CheckpointError(f"{path / CONFIG} lists no SHA-256 of {WEIGHTS}: {redo}.")
        for name, expected in files.items():
            if Path(name).name != name or not (path / name).is_file():
                raise CheckpointError(f"{path}: {name}, listed in {CONFIG}, is missing: {redo}.")
            if file_sha256(path / name) != expected:
                raise CheckpointError(
                    f"{path / name} does not match the SHA-256 in {CONFIG}: the file was altered "
                    f"or truncated; {redo}."
                )
    else:
        log.warning(
            "%s is an %s export: only its classifier's weights are verified (%s).",
            path, config["format"], redo,
        )  # fmt: skip
    try:
        tensors = load_file(path / WEIGHTS)
    except Exception as exc:
        raise CheckpointError(
            f"Cannot read {path / WEIGHTS} ({type(exc).__name__}: {exc}): the file is truncated "
            f"or corrupted; {redo}."
        ) from exc

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        classifier = {
            "arch": config["classifier"]["arch"],
            "config": config["classifier"]["config"],
            "state_dict": part("classifier."),
            "meta": config["classifier"]["meta"],
        }
        if state_hash(classifier["state_dict"]) != config["classifier_hash"]:
            raise CheckpointError(
                f"{path}: the classifier's weights do not match config.json's hash: {redo}."
            )
        purifier = None
        if config["purifier"] is not None:
            meta = {**config["purifier"]["meta"], "transform": config["purifier"]["transform"]}
            generator = part("purifier.")
            expected = config.get("purifier_hash")
            if config["format"] == FORMAT and state_hash(generator) != expected:
                raise CheckpointError(
                    f"{path}: the purifier's weights do not match config.json's hash: {redo}."
                )
            purifier = {
                "arch": config["purifier"]["arch"],
                "config": config["purifier"]["config"],
                "state_dict": {"generator": generator},
                "meta": meta,
            }
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path / CONFIG} lacks or mangles the key {exc} of an export: {redo}."
        ) from None
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

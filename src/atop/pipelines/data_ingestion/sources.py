"""Reading the four datasets with ``torchvision.datasets``, from a configurable root.

Root resolution (first that holds the dataset wins):

1. the ``root`` parameter of ``data_ingestion`` (when not null), else the ``ATOP_DATA_ROOT``
   environment variable (when set);
2. ``data/01_raw`` of the project.

If the dataset is in none of them, it is downloaded into ``data/01_raw`` only when the
``download`` parameter is true; otherwise :class:`DatasetNotFoundError` says what is missing,
where it was looked for and how to supply it. torchvision's md5 checks stay on; before
handing over to torchvision every expected file is checked here too so that the error
names the exact file that is missing or corrupted.

Folder layout expected under a root (the official archives, unpacked):

* ``cifar10``: ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
* ``cifar100``: ``cifar-100-python/`` (``train``, ``test``, ``meta``)
* ``svhn``: ``svhn/`` (``train_32x32.mat``, ``test_32x32.mat``)
* ``imagenette``: ``imagenette2-224/`` (or ``imagenette2-320``, ``imagenette2``) with
  ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets as tvd
from torchvision import transforms as tvt
from torchvision.datasets.utils import check_integrity

logger = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "svhn", "imagenette")

#: Human-readable names of the ten ImageNette classes, by WordNet id.
IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}
IMAGENETTE_FOLDERS = ("imagenette2-224", "imagenette2-320", "imagenette2")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing from every root that was searched."""


class DatasetCorruptedError(RuntimeError):
    """A dataset file exists but fails its md5 check or cannot be parsed."""


@dataclass
class RawSplits:
    """What a source returns: uint8 NCHW images, int64 labels, class names."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    root: Path


def candidate_roots(root: str | None, project_raw: Path) -> list[Path]:
    """The roots to search, in order: parameter or ``ATOP_DATA_ROOT``, then ``data/01_raw``."""
    roots: list[Path] = []
    explicit = root or os.environ.get("ATOP_DATA_ROOT")
    if explicit:
        if not Path(explicit).expanduser().is_dir():
            source = "data_ingestion.root" if root else "ATOP_DATA_ROOT"
            raise DatasetNotFoundError(
                f"{source}={explicit!r} is not a folder (a typo?): point it at the folder that "
                "holds the datasets (on the project machines ../shared/datasets), or unset it "
                "to use data/01_raw."
            )
        roots.append(Path(explicit).expanduser())
    roots.append(Path(project_raw))
    unique: list[Path] = []
    for path in roots:
        if path not in unique:
            unique.append(path)
    return unique


def _required_files(dataset: str, root: Path) -> list[tuple[Path, str | None]]:
    """(path, md5 or None) of every file the dataset needs under ``root``."""
    if dataset == "cifar10":
        cls = tvd.CIFAR10
    elif dataset == "cifar100":
        cls = tvd.CIFAR100
    elif dataset == "svhn":
        return [
            (root / "svhn" / tvd.SVHN.split_list[split][1], tvd.SVHN.split_list[split][2])
            for split in ("train", "test")
        ]
    elif dataset == "imagenette":
        folder = _imagenette_folder(root) or root / IMAGENETTE_FOLDERS[0]
        return [(folder / "train", None), (folder / "val", None)]
    else:
        raise ValueError(f"Unknown dataset '{dataset}'. Choose one of {DATASETS}.")
    base = root / cls.base_folder
    files = [(base / name, md5) for name, md5 in cls.train_list + cls.test_list]
    files.append((base / cls.meta["filename"], cls.meta["md5"]))
    return files


def _imagenette_folder(root: Path) -> Path | None:
    for name in IMAGENETTE_FOLDERS:
        if (root / name / "val").is_dir():
            return root / name
    return None


def _missing(dataset: str, root: Path) -> list[Path]:
    return [path for path, _ in _required_files(dataset, root) if not path.exists()]


def find_root(dataset: str, roots: list[Path]) -> Path | None:
    """The first root in ``roots`` where every file of ``dataset`` exists, else None."""
    for root in roots:
        if not _missing(dataset, root):
            return root
    return None


def check_files(dataset: str, root: Path) -> None:
    """Verify every file's md5 (torchvision's checksums) and raise naming the bad file.

    Raises:
        DatasetCorruptedError: a file's md5 differs from the official one (corrupted,
            truncated or replaced file).
    """
    for path, md5 in _required_files(dataset, root):
        if md5 is not None and not check_integrity(str(path), md5):
            size = path.stat().st_size if path.exists() else 0
            raise DatasetCorruptedError(
                f"{dataset}: '{path}' ({size} bytes) fails its md5 check (expected {md5}): the "
                f"file is corrupted, truncated or not the official release. Replace it with the "
                f"official file (or delete it and rerun with data_ingestion.download=true where "
                f"there is internet)."
            )


def _not_found_message(dataset: str, roots: list[Path], download: bool) -> str:
    lines = [f"Dataset '{dataset}' not found. Looked in:"]
    for root in roots:
        missing = _missing(dataset, root)
        shown = ", ".join(str(p.relative_to(root)) for p in missing[:4])
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        lines.append(f"  - {root}: missing {shown}{more}")
    lines.append(
        "Supply it by one of: (a) set ATOP_DATA_ROOT (or the data_ingestion.root parameter) to "
        "a folder holding the official unpacked files (on the project machines: "
        "../shared/datasets); (b) copy them into data/01_raw; (c) set "
        "data_ingestion.download=true on a machine with internet."
    )
    if download:
        lines.append("Download was enabled but failed (see the error above): no internet?")
    return "\n".join(lines)


def _download(dataset: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s into %s", dataset, target)
    try:
        if dataset == "cifar10":
            tvd.CIFAR10(str(target), train=True, download=True)
        elif dataset == "cifar100":
            tvd.CIFAR100(str(target), train=True, download=True)
        elif dataset == "svhn":
            for split in ("train", "test"):
                tvd.SVHN(str(target / "svhn"), split=split, download=True)
        else:
            tvd.Imagenette(str(target), split="train", size="full", download=True)
    except Exception as exc:  # URLError, HTTPError, socket errors, ...
        raise DatasetNotFoundError(
            f"Downloading '{dataset}' into {target} failed ({type(exc).__name__}: {exc}). "
            f"This machine may have no internet: supply the files by hand (ATOP_DATA_ROOT or "
            f"data/01_raw) and set data_ingestion.download=false."
        ) from exc


def _from_numpy_nhwc(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()


def _labels(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int64)


def _read_cifar(cls, root: Path) -> RawSplits:
    splits = {}
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except Exception as exc:  # unpickling / reshape errors of a malformed file
            raise DatasetCorruptedError(
                f"Cannot parse {cls.__name__} files under '{root / cls.base_folder}' "
                f"({type(exc).__name__}: {exc}). A file is malformed (wrong image shape or "
                f"truncated pickle): replace it with the official file."
            ) from exc
        splits[train] = (_from_numpy_nhwc(ds.data), _labels(ds.targets), list(ds.classes))
    return RawSplits(
        train_images=splits[True][0],
        train_labels=splits[True][1],
        test_images=splits[False][0],
        test_labels=splits[False][1],
        class_names=splits[True][2],
        root=root,
    )


def _read_svhn(root: Path) -> RawSplits:
    out = {}
    for split in ("train", "test"):
        try:
            ds = tvd.SVHN(str(root / "svhn"), split=split, download=False)
        except Exception as exc:
            raise DatasetCorruptedError(
                f"Cannot parse SVHN '{split}' under '{root / 'svhn'}' ({type(exc).__name__}: "
                f"{exc}): replace it with the official file."
            ) from exc
        out[split] = (torch.from_numpy(np.ascontiguousarray(ds.data)), _labels(ds.labels))
    return RawSplits(
        train_images=out["train"][0],
        train_labels=out["train"][1],
        test_images=out["test"][0],
        test_labels=out["test"][1],
        class_names=[str(d) for d in range(10)],
        root=root,
    )


def _read_imagenette(root: Path, image_size: int) -> RawSplits:
    folder = _imagenette_folder(root)
    resize = tvt.Compose([tvt.Resize(image_size), tvt.CenterCrop(image_size), tvt.PILToTensor()])
    out = {}
    class_names: list[str] = []
    for split, sub in (("train", "train"), ("test", "val")):
        ds = tvd.ImageFolder(str(folder / sub), transform=resize)
        images = torch.empty((len(ds), 3, image_size, image_size), dtype=torch.uint8)
        for i in range(len(ds)):
            try:
                images[i] = ds[i][0]
            except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated JPEG)
                raise DatasetCorruptedError(
                    f"Cannot decode ImageNette image '{ds.samples[i][0]}' "
                    f"({type(exc).__name__}: {exc}). Replace or remove the file."
                ) from exc
        out[split] = (images, _labels(ds.targets))
        class_names = [IMAGENETTE_CLASSES.get(wnid, wnid) for wnid in ds.classes]
    return RawSplits(
        train_images=out["train"][0],
        train_labels=out["train"][1],
        test_images=out["test"][0],
        test_labels=out["test"][1],
        class_names=class_names,
        root=root,
    )


READERS: dict[str, Callable[..., RawSplits]] = {
    "cifar10": lambda root, _size: _read_cifar(tvd.CIFAR10, root),
    "cifar100": lambda root, _size: _read_cifar(tvd.CIFAR100, root),
    "svhn": lambda root, _size: _read_svhn(root),
    "imagenette": _read_imagenette,
}


def read_dataset(
    dataset: str,
    root: str | None,
    project_raw: Path,
    download: bool = False,
    image_size: int = 224,
) -> RawSplits:
    """Read both splits of ``dataset`` as uint8 NCHW tensors and int64 labels.

    Args:
        dataset: ``cifar10``, ``cifar100``, ``svhn`` or ``imagenette``.
        root: explicit data root (parameter); None falls back to ``ATOP_DATA_ROOT``.
        project_raw: the project's ``data/01_raw`` folder (searched second, download target).
        download: allow downloading into ``project_raw`` when nothing is found.
        image_size: ImageNette side after resize + center crop (pixels).

    Returns:
        :class:`RawSplits` with images ``uint8 [N, 3, H, W]`` in 0..255 and labels
        ``int64 [N]``.

    Raises:
        ValueError: unknown dataset name.
        DatasetNotFoundError: missing files everywhere and download off (or failed).
        DatasetCorruptedError: md5 mismatch, truncated or malformed file.
    """
    if dataset not in READERS:
        raise ValueError(f"Unknown dataset '{dataset}'. Choose one of {DATASETS}.")
    roots = candidate_roots(root, project_raw)
    found = find_root(dataset, roots)
    if found is None:
        if not download:
            raise DatasetNotFoundError(_not_found_message(dataset, roots, download))
        _download(dataset, Path(project_raw))
        found = find_root(dataset, [Path(project_raw)])
        if found is None:
            raise DatasetNotFoundError(_not_found_message(dataset, roots, download))
    logger.info("Reading %s from %s", dataset, found)
    check_files(dataset, found)
    return READERS[dataset](found, image_size)

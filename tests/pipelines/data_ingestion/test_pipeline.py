"""Data ingestion on real data: CIFAR-10 (full official release), ImageNette (shared sample),
CIFAR-100 and SVHN through small files in the official formats, and every bad-input case."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from torchvision import datasets as tvd

from atop.datasets import TorchDataset
from atop.pipelines.data_ingestion import create_pipeline
from atop.pipelines.data_ingestion.nodes import (
    IngestionParams,
    select_eval_subset,
    select_monitor_subset,
)
from atop.pipelines.data_ingestion.sources import DatasetCorruptedError, DatasetNotFoundError
from atop.validation import DataValidationError
from atop.validation.data import validate_image_split
from tests.conftest import PROJECT_ROOT, KeptMemoryDataset, stage_params


def base_params(dataset: str, root: Path | str, tmp_path: Path) -> dict:
    """The base profile's data_ingestion block as a plain dict (typed in run_ingestion)."""
    params = stage_params("data_ingestion", env="base").to_dict()
    params.update(dataset=dataset, root=str(root), raw_dir=str(tmp_path / "raw"))
    return params


def run_ingestion(params: dict, out: Path | None = None) -> dict:
    """Run the pipeline; with ``out`` the outputs go to real files there (as in a run)."""
    names = (
        "train_set",
        "test_set",
        "class_names",
        "eval_indices",
        "monitor_indices",
        "data_validation",
    )
    catalog = DataCatalog()
    catalog["params:data_ingestion"] = MemoryDataset(IngestionParams.from_dict(params))
    for name in names:
        catalog[name] = KeptMemoryDataset()
    if out is not None:
        catalog["train_set"] = TorchDataset(str(out / "train.pt"))
        catalog["test_set"] = TorchDataset(str(out / "test.pt"))
    SequentialRunner().run(create_pipeline(), catalog)
    return {name: catalog[name].load() for name in names}


# --------------------------------------------------------------------------- CIFAR-10


def test_kedro_run_ingests_real_cifar10(ingested_project):
    """`kedro run --pipelines data_ingestion` on the real CIFAR-10 writes validated outputs."""
    data = ingested_project / "data"
    train = torch.load(data / "02_intermediate/cifar10/smoke/train.pt", weights_only=True)
    test = torch.load(data / "02_intermediate/cifar10/smoke/test.pt", weights_only=True)
    assert train["images"].shape == (50_000, 3, 32, 32) and train["images"].dtype == torch.uint8
    assert test["images"].shape == (10_000, 3, 32, 32)
    assert train["labels"].dtype == torch.int64
    assert torch.bincount(test["labels"]).tolist() == [1000] * 10
    assert torch.bincount(train["labels"]).tolist() == [5000] * 10
    names = json.loads((data / "02_intermediate/cifar10/smoke/class_names.json").read_text())
    assert names[0] == "airplane" and names[-1] == "truck"
    indices = json.loads((data / "05_model_input/cifar10/smoke/eval_indices.json").read_text())
    assert len(indices) == len(set(indices)) == 512
    assert all(0 <= i < 10_000 for i in indices)
    monitor = json.loads((data / "05_model_input/cifar10/smoke/monitor_indices.json").read_text())
    assert len(monitor) == len(set(monitor)) == 2000 and monitor == sorted(monitor)
    assert all(0 <= i < 10_000 for i in monitor)
    assert not set(monitor) & set(indices)  # no evaluated image is monitored during training
    report = json.loads((data / "08_reporting/cifar10/smoke/data_validation.json").read_text())
    assert report["success"] and report["splits"]["train"]["rows"] == 50_000
    assert report["splits"]["test"]["successful"] == report["splits"]["test"]["evaluated"] >= 10
    # The pixels are the official ones: the first test image of CIFAR-10 is a cat (label 3).
    official = tvd.CIFAR10(str(PROJECT_ROOT.parent / "shared" / "datasets"), train=False)
    assert test["labels"][0] == 3
    assert torch.equal(test["images"][0].permute(1, 2, 0), torch.from_numpy(official.data[0]))


def test_eval_subset_is_stable_and_seeded(ingested_project):
    test = torch.load(
        ingested_project / "data/02_intermediate/cifar10/smoke/test.pt", weights_only=True
    )
    params = stage_params("data_ingestion")
    assert params.eval_subset.images == 512 and params.eval_subset.seed == 0
    first = select_eval_subset(test, params)
    assert first == select_eval_subset(test, params)
    stored = json.loads(
        (ingested_project / "data/05_model_input/cifar10/smoke/eval_indices.json").read_text()
    )
    assert stored == first
    assert select_eval_subset(test, params.replace(eval_subset={"images": 512, "seed": 1})) != first
    with pytest.raises(ValueError, match="eval_subset.images"):
        select_eval_subset(test, params.replace(eval_subset={"images": 20_000, "seed": 0}))


def test_monitor_subset_is_disjoint_stable_and_seeded(ingested_project):
    """The monitor subset (held-out test images every stage validates on) never meets the
    evaluation subset: on the real ingested CIFAR-10 and for any other evaluation subset."""
    folder = ingested_project / "data/05_model_input/cifar10/smoke"
    test = torch.load(
        ingested_project / "data/02_intermediate/cifar10/smoke/test.pt", weights_only=True
    )
    eval_indices = json.loads((folder / "eval_indices.json").read_text())
    params = stage_params("data_ingestion")
    assert params.monitor_subset.images == 2000 and params.monitor_subset.seed == 1
    first = select_monitor_subset(test, eval_indices, params)
    assert first == json.loads((folder / "monitor_indices.json").read_text())
    assert first == select_monitor_subset(test, eval_indices, params)
    assert not set(first) & set(eval_indices)
    reseeded = params.replace(monitor_subset={"images": 2000, "seed": 2})
    assert select_monitor_subset(test, eval_indices, reseeded) != first
    # everything outside the evaluation subset, and no more
    everything = params.replace(monitor_subset={"images": 10_000 - 512, "seed": 1})
    rest = select_monitor_subset(test, eval_indices, everything)
    assert sorted(set(rest) | set(eval_indices)) == list(range(10_000))
    too_many = params.replace(monitor_subset={"images": 10_000 - 511, "seed": 1})
    with pytest.raises(ValueError, match="monitor_subset.images=9489 but only 9488"):
        select_monitor_subset(test, eval_indices, too_many)


def test_registry_lists_data_ingestion():
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(PROJECT_ROOT)
    assert "data_ingestion" in pipelines
    assert "atop" in pipelines and "__default__" in pipelines
    assert {n.name for n in pipelines["data_ingestion"].nodes} <= {
        n.name for n in pipelines["atop"].nodes
    }


# --------------------------------------------------------------------------- ImageNette


def test_imagenette_from_shared_sample(data_root, tmp_path):
    params = base_params("imagenette", data_root, tmp_path)
    params["datasets"]["imagenette"]["image_size"] = 64  # resized on ingestion
    out = run_ingestion(params)
    assert out["train_set"]["images"].shape == (1000, 3, 64, 64)
    assert out["test_set"]["images"].shape == (3925, 3, 64, 64)
    assert out["class_names"][0] == "tench" and len(out["class_names"]) == 10
    assert torch.bincount(out["train_set"]["labels"]).tolist() == [100] * 10
    assert out["data_validation"]["success"]
    assert len(out["monitor_indices"]) == 2000
    assert not set(out["monitor_indices"]) & set(out["eval_indices"])


# --------------------------------------------------------------------------- CIFAR-100 / SVHN


def write_cifar100(root: Path, data_root: Path, monkeypatch, *, train_labels=None, row_bytes=3072):
    """Small CIFAR-100 files in the official pickle format with real pixels (the shared sample).

    The official md5s cannot match these files, so the checksum table that torchvision
    checks is pointed at theirs: the check itself stays on.
    """
    sample = np.load(data_root / "cifar-100-sample" / "cifar100_head.npz")
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    shutil.copy(data_root / "cifar-100-sample" / "meta", folder / "meta")
    md5 = {}
    for split in ("train", "test"):
        data = sample[f"{split}_data"][:, :row_bytes]
        n = data.shape[0]
        fine = sample[f"{split}_fine_labels"][:n].tolist()
        if split == "train" and train_labels is not None:
            fine = train_labels(fine)
        entry = {
            "filenames": sample[f"{split}_filenames"][:n].tolist(),
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": sample[f"{split}_coarse_labels"][:n].tolist(),
            "data": data,
        }
        with open(folder / split, "wb") as fh:
            pickle.dump(entry, fh)
        from torchvision.datasets.utils import calculate_md5

        md5[split] = calculate_md5(str(folder / split))
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", md5["test"]]])
    return sample


def cifar100_params(root, tmp_path):
    params = base_params("cifar100", root, tmp_path)
    params["datasets"]["cifar100"].update(
        expected_rows={"train": 486, "test": 916},
        class_share={"train": [0.0, 0.05], "test": [0.0, 0.05]},
        all_classes_present=False,
    )
    params["monitor_subset"]["images"] = 200  # 916 test images: 512 evaluated, 404 left
    return params


def test_cifar100_official_format(data_root, tmp_path, monkeypatch):
    sample = write_cifar100(tmp_path / "root", data_root, monkeypatch)
    out = run_ingestion(cifar100_params(tmp_path / "root", tmp_path))
    assert out["train_set"]["images"].shape == (486, 3, 32, 32)
    assert out["test_set"]["images"].shape == (916, 3, 32, 32)
    assert len(out["class_names"]) == 100 and out["class_names"][0] == "apple"
    # Real pixels in the official (1024 R, 1024 G, 1024 B) layout end up as NCHW.
    first = torch.from_numpy(sample["test_data"][0].reshape(3, 32, 32))
    assert torch.equal(out["test_set"]["images"][0], first)
    assert out["test_set"]["labels"].tolist() == sample["test_fine_labels"][:916].tolist()
    assert len(out["eval_indices"]) == 512 and len(out["monitor_indices"]) == 200
    assert not set(out["monitor_indices"]) & set(out["eval_indices"])


def write_svhn(root: Path, data_root: Path, monkeypatch, n_train=300, n_test=200) -> None:
    """Small SVHN .mat files in the official format (X: 32x32x3xN uint8, y: Nx1 in 1..10)."""
    from scipy.io import savemat
    from torchvision.datasets.utils import calculate_md5

    pixels = np.load(data_root / "cifar-100-sample" / "cifar100_head.npz")["test_data"]
    folder = root / "svhn"
    folder.mkdir(parents=True)
    split_list = dict(tvd.SVHN.split_list)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images = pixels[:n].reshape(n, 3, 32, 32).transpose(2, 3, 1, 0)  # H, W, C, N
        labels = (np.arange(n) % 10 + 1)[rng.permutation(n)].reshape(n, 1)  # 10 means digit 0
        savemat(folder / f"{split}_32x32.mat", {"X": images, "y": labels.astype(np.uint8)})
        url, name, _ = split_list[split]
        split_list[split] = [url, name, calculate_md5(str(folder / name))]
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)


def test_svhn_official_format(data_root, tmp_path, monkeypatch):
    write_svhn(tmp_path / "root", data_root, monkeypatch)
    params = base_params("svhn", tmp_path / "root", tmp_path)
    params["datasets"]["svhn"]["expected_rows"] = {"train": 300, "test": 200}
    params["eval_subset"]["images"] = 100
    params["monitor_subset"]["images"] = 50
    out = run_ingestion(params)
    assert out["train_set"]["images"].shape == (300, 3, 32, 32)
    assert sorted(set(out["test_set"]["labels"].tolist())) == list(range(10))  # 10 -> 0
    assert out["class_names"] == [str(d) for d in range(10)]


# --------------------------------------------------------------------------- bad input


def cifar10_copy(data_root: Path, tmp_path: Path, skip: str | None = None) -> Path:
    """A CIFAR-10 root of symlinks to the real files (optionally one missing)."""
    root = tmp_path / "root"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    for f in (data_root / "cifar-10-batches-py").iterdir():
        if f.name != skip:
            (root / "cifar-10-batches-py" / f.name).symlink_to(f)
    return root


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"partial outputs left in {out}"


def test_missing_root_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("ATOP_DATA_ROOT", raising=False)
    (tmp_path / "empty").mkdir()
    params = base_params("cifar10", tmp_path / "empty", tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        run_ingestion(params, out=tmp_path / "out")
    message = str(err.value)
    assert str(tmp_path / "empty") in message and str(tmp_path / "raw") in message
    assert "data_batch_1" in message and "ATOP_DATA_ROOT" in message and "download" in message
    assert_nothing_written(tmp_path / "out")


def test_root_that_is_not_a_folder_is_named_as_a_typo(tmp_path, monkeypatch):
    monkeypatch.delenv("ATOP_DATA_ROOT", raising=False)
    params = base_params("cifar10", tmp_path / "nowhere", tmp_path)
    with pytest.raises(
        DatasetNotFoundError, match=r"data_ingestion\.root=.*nowhere.* not a folder"
    ):
        run_ingestion(params, out=tmp_path / "out")
    monkeypatch.setenv("ATOP_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=r"ATOP_DATA_ROOT=.*nowhere.* not a folder"):
        run_ingestion({**params, "root": None}, out=tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_missing_file_is_named(data_root, tmp_path):
    root = cifar10_copy(data_root, tmp_path, skip="data_batch_3")
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        run_ingestion(base_params("cifar10", root, tmp_path), out=tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_corrupted_or_truncated_file_fails_md5(data_root, tmp_path, damage):
    root = cifar10_copy(data_root, tmp_path, skip="test_batch")
    content = bytearray((data_root / "cifar-10-batches-py" / "test_batch").read_bytes())
    if damage == "flip_byte":
        content[5000] ^= 0xFF
    else:
        content = content[: len(content) // 2]
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(bytes(content))
    with pytest.raises(DatasetCorruptedError, match="test_batch.*md5"):
        run_ingestion(base_params("cifar10", root, tmp_path), out=tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_truncated_pickle_with_matching_checksum(data_root, tmp_path, monkeypatch):
    """A truncated pickle whose checksum table was updated still fails clearly on parsing."""
    write_cifar100(tmp_path / "root", data_root, monkeypatch)
    path = tmp_path / "root" / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:10_000])
    from torchvision.datasets.utils import calculate_md5

    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", calculate_md5(str(path))]])
    with pytest.raises(DatasetCorruptedError, match="malformed|truncated"):
        run_ingestion(cifar100_params(tmp_path / "root", tmp_path), out=tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_labels_out_of_range_stop_the_run(data_root, tmp_path, monkeypatch):
    write_cifar100(tmp_path / "root", data_root, monkeypatch, train_labels=lambda y: [150] + y[1:])
    with pytest.raises(DataValidationError) as err:
        run_ingestion(cifar100_params(tmp_path / "root", tmp_path), out=tmp_path / "out")
    assert "expect_column_distinct_values_to_be_in_set" in str(err.value)
    assert "150" in str(err.value)
    assert_nothing_written(tmp_path / "out")


def test_wrong_image_shape_in_file(data_root, tmp_path, monkeypatch):
    write_cifar100(tmp_path / "root", data_root, monkeypatch, row_bytes=3000)
    with pytest.raises(DatasetCorruptedError, match="shape"):
        run_ingestion(cifar100_params(tmp_path / "root", tmp_path), out=tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_wrong_image_shape_caught_by_suite(cifar10_test_batch):
    images = (cifar10_test_batch[0][:, :, :30, :30] * 255).to(torch.uint8)
    labels = torch.arange(len(images)) % 10
    with pytest.raises(DataValidationError) as err:
        validate_image_split(
            images,
            labels,
            split_name="wrong_shape",
            num_classes=10,
            image_size=32,
            expected_rows=None,
            class_share=(0.0, 1.0),
        )
    message = str(err.value)
    assert message.count("expect_column_values_to_be_between") == 2  # height and width
    assert "column='height'" in message and "column='width'" in message


def test_unknown_dataset(tmp_path):
    params = base_params("mnist", tmp_path, tmp_path)
    with pytest.raises(ValueError, match="mnist"):
        run_ingestion(params)

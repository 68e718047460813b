"""bench.data against tiny fabricated files in each dataset's real on-disk format."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets

from bench import data
from common.errors import ConfigError, DataNotFoundError
from tests.fabricate import (
    IDX_NAMES,
    N_IDX,
    skip_md5,
    write_cifar10,
    write_cifar100,
    write_idx,
    write_svhn,
)


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fabricated files cannot match torchvision's md5s; check only that they exist."""
    skip_md5(monkeypatch)


def _expect(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(images).float() / 255, torch.from_numpy(labels).long()


def _check_split(
    dataset: data.ImageDataset, train: bool, images: np.ndarray, labels: np.ndarray
) -> None:
    x, y = dataset.train() if train else dataset.test()
    expected_x, expected_y = _expect(images, labels)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (len(labels), *dataset.shape)
    assert x.is_contiguous()
    assert 0.0 <= x.min() and x.max() <= 1.0
    torch.testing.assert_close(x, expected_x, rtol=0, atol=0)
    assert torch.equal(y, expected_y)


# ------------------------------------------------------------------------------- factories


@pytest.mark.parametrize(
    ("factory", "folder", "kwargs"),
    [
        (data.mnist, "MNIST", {}),
        (data.fashion_mnist, "FashionMNIST", {"debian_dir": "no-such-debian-dir"}),
    ],
)
def test_idx_datasets_load_exact_pixels(
    tmp_path: Path, factory: Callable[..., data.ImageDataset], folder: str, kwargs: dict
) -> None:
    written = write_idx(tmp_path / folder / "raw")
    images = {train: arr[:, None] for train, (arr, _) in written.items()}  # add channel axis
    ds = factory(tmp_path, **kwargs)
    assert (ds.name, ds.num_classes, ds.shape) == (factory.__name__, 10, (1, 28, 28))
    for train, (_, labels) in written.items():
        _check_split(ds, train, images[train], labels)
    assert ds.n_test == N_IDX[False]


def test_fashion_mnist_extracts_debian_files(tmp_path: Path) -> None:
    debian_dir = tmp_path / "debian"
    written = write_idx(debian_dir, gz=True)
    root = tmp_path / "data"

    ds = data.fashion_mnist(root, debian_dir=debian_dir)

    raw = root / "FashionMNIST" / "raw"
    # Exactly the four decompressed files, no leftover temp files.
    assert sorted(p.name for p in raw.iterdir()) == sorted(sum(IDX_NAMES.values(), ()))
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in raw.iterdir())
    images, labels = written[False]
    _check_split(ds, False, images[:, None], labels)


def test_split_is_loaded_once_and_cached(tmp_path: Path) -> None:
    write_idx(tmp_path / "MNIST" / "raw")
    ds = data.mnist(tmp_path)
    first = ds.test()
    # Deleting the files proves the second call does not read them again.
    shutil.rmtree(tmp_path / "MNIST")
    assert ds.test() is first


@pytest.mark.usefixtures("no_md5")
@pytest.mark.parametrize(
    ("factory", "writer", "num_classes"),
    [(data.cifar10, write_cifar10, 10), (data.cifar100, write_cifar100, 100)],
)
def test_cifar_loads_chw_images(
    tmp_path: Path, factory: Callable[[Path], data.ImageDataset], writer: Callable, num_classes: int
) -> None:
    written = writer(tmp_path)
    ds = factory(tmp_path)
    assert (ds.name, ds.num_classes, ds.shape) == (factory.__name__, num_classes, (3, 32, 32))
    for train, (images, labels) in written.items():
        _check_split(ds, train, images, labels)


@pytest.mark.usefixtures("no_md5")
def test_cifar10_channel_stays_in_its_plane(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    x, _ = data.cifar10(tmp_path).test()
    assert torch.all(x[0, 1] == 200 / 255)
    assert torch.all(x[0, 0] == 0) and torch.all(x[0, 2] == 0)


@pytest.mark.usefixtures("no_md5")
def test_svhn_loads_and_maps_label_10_to_0(tmp_path: Path) -> None:
    written = write_svhn(tmp_path)
    ds = data.svhn(tmp_path)
    assert (ds.name, ds.num_classes, ds.shape) == ("svhn", 10, (3, 32, 32))
    for train, (images, labels) in written.items():
        _check_split(ds, train, images, labels)
    _, y = ds.train()
    assert y.tolist() == [0, 1, 2, 9, 5]


def test_md5_mismatch_becomes_data_not_found(tmp_path: Path) -> None:
    # Without the md5 patch torchvision rejects the fabricated files: the check is not bypassed.
    write_cifar10(tmp_path)
    ds = data.cifar10(tmp_path)
    with pytest.raises(DataNotFoundError) as info:
        ds.test()
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "purebench data cifar10 --download" in message
    assert "corrupted" in message


@pytest.mark.parametrize(
    ("factory", "expected_dir", "extra"),
    [
        (data.mnist, "MNIST/raw", None),
        (data.cifar10, "cifar-10-batches-py", None),
        (data.cifar100, "cifar-100-python", None),
        (data.svhn, "", None),
        (
            lambda root: data.fashion_mnist(root, debian_dir=root / "no-debian"),
            "FashionMNIST/raw",
            "apt-get install dataset-fashion-mnist",
        ),
    ],
    ids=["mnist", "cifar10", "cifar100", "svhn", "fashion_mnist"],
)
def test_missing_files_raise_data_not_found(
    tmp_path: Path,
    factory: Callable[[Path], data.ImageDataset],
    expected_dir: str,
    extra: str | None,
) -> None:
    with pytest.raises(DataNotFoundError) as info:
        factory(tmp_path)
    message = str(info.value)
    assert f"in {tmp_path / expected_dir}" in message
    assert "--download" in message and "PUREBENCH_DATA_DIR" in message
    if extra is not None:
        assert extra in message
    assert isinstance(info.value, FileNotFoundError)


# --------------------------------------------------------------------------------------- digits


def test_digits_split() -> None:
    ds = data.digits(test_size=300, split_seed=1)
    (x_train, y_train), (x_test, y_test) = ds.train(), ds.test()
    assert (ds.name, ds.num_classes, ds.shape) == ("digits", 10, (1, 8, 8))
    assert x_train.shape == (1497, 1, 8, 8) and x_test.shape == (300, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert x_test.min() == 0.0 and x_test.max() == 1.0
    # Stratified: every class appears in the test set, 30 of each (1797 is nearly balanced).
    assert set(torch.bincount(y_test, minlength=10).tolist()) <= {29, 30, 31}
    # Same seed, same split; another seed, another split.
    again = data.digits(test_size=300, split_seed=1).test()
    assert torch.equal(again[0], x_test) and torch.equal(again[1], y_test)
    assert not torch.equal(data.digits(test_size=300, split_seed=2).test()[0], x_test)


@pytest.mark.parametrize("test_size", [0, 5, 1797])
def test_digits_rejects_bad_test_size(test_size: int) -> None:
    with pytest.raises(ConfigError, match=f"test_size={test_size}"):
        data.digits(test_size=test_size)


# ---------------------------------------------------------------------------------- eval_subset


def test_eval_subset_is_a_seeded_prefix_family() -> None:
    small, large = data.eval_subset(1000, 10, seed=3), data.eval_subset(1000, 200, seed=3)
    assert small.dtype == torch.int64 and small.shape == (10,)
    assert torch.equal(large[:10], small)
    assert torch.equal(data.eval_subset(1000, 10, seed=3), small)
    assert not torch.equal(data.eval_subset(1000, 10, seed=4), small)
    assert len(set(large.tolist())) == 200 and 0 <= large.min() and large.max() < 1000
    assert sorted(data.eval_subset(5, 5, seed=0).tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("n_samples", "match"),
    [(0, "n_samples=0 must be at least 1"), (101, "n_samples=101 exceeds the test set of 100")],
)
def test_eval_subset_rejects_bad_sizes(n_samples: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        data.eval_subset(100, n_samples, seed=0)


# -------------------------------------------------------------------------------------- prepare


def test_prepare_unknown_name_lists_allowed() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet21k'.*fashion_mnist.*digits"):
        data.prepare("imagenet21k", "unused")


def test_prepare_fashion_mnist_from_debian(tmp_path: Path) -> None:
    debian_dir = tmp_path / "debian"
    write_idx(debian_dir, gz=True)
    directory = data.prepare("fashion_mnist", tmp_path / "data", debian_dir=debian_dir)
    assert directory == tmp_path / "data" / "FashionMNIST" / "raw"
    assert data.fashion_mnist(tmp_path / "data", debian_dir=tmp_path / "gone").n_test == 4


def _not_root(monkeypatch: pytest.MonkeyPatch, *, which: str | None, euid: int) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: which)
    monkeypatch.setattr(os, "geteuid", lambda: euid)


@pytest.mark.parametrize(("which", "euid"), [("/usr/bin/apt-get", 1000), (None, 0)])
def test_prepare_fashion_mnist_without_any_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str | None, euid: int
) -> None:
    _not_root(monkeypatch, which=which, euid=euid)

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("apt-get must not run")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    with pytest.raises(DataNotFoundError) as info:
        data.prepare("fashion_mnist", tmp_path, debian_dir=tmp_path / "no-debian")
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "purebench data fashion_mnist --download" in message


def test_prepare_fashion_mnist_runs_apt_get_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _not_root(monkeypatch, which="/usr/bin/apt-get", euid=0)
    debian_dir = tmp_path / "debian"
    calls: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(command)
        # The first install fails (stale index); after `apt-get update` it installs the files.
        if command[1] == "install" and len(calls) > 1:
            write_idx(debian_dir, gz=True)
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.CompletedProcess(command, 100 if command[1] == "install" else 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    directory = data.prepare("fashion_mnist", tmp_path / "data", debian_dir=debian_dir)
    install = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
    assert calls == [install, ["apt-get", "update"], install]
    assert sorted(p.name for p in directory.iterdir()) == sorted(sum(IDX_NAMES.values(), ()))


@pytest.mark.parametrize(
    ("name", "cls", "writer", "directory"),
    [
        ("mnist", datasets.MNIST, lambda root: write_idx(root / "MNIST" / "raw"), "MNIST/raw"),
        ("cifar10", datasets.CIFAR10, write_cifar10, "cifar-10-batches-py"),
        ("cifar100", datasets.CIFAR100, write_cifar100, "cifar-100-python"),
        ("svhn", datasets.SVHN, write_svhn, ""),
    ],
)
@pytest.mark.usefixtures("no_md5")
def test_prepare_downloads_only_when_asked(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    cls: type,
    writer: Callable[[Path], object],
    directory: str,
) -> None:
    downloads: list[str] = []

    def fake_download(self: object) -> None:
        # torchvision skips downloading when the files are there; so do we for the counter.
        if not downloads:
            writer(tmp_path)
        downloads.append(name)

    monkeypatch.setattr(cls, "download", fake_download)
    with pytest.raises(DataNotFoundError, match="--download"):
        data.prepare(name, tmp_path)
    assert downloads == []

    assert data.prepare(name, tmp_path, download=True) == tmp_path / directory
    assert downloads  # torchvision's download=True path was taken
    count = len(downloads)
    assert data.prepare(name, tmp_path, download=True) == tmp_path / directory
    assert len(downloads) == count  # files present: nothing is fetched again


def test_prepare_digits_needs_nothing(tmp_path: Path) -> None:
    assert (data.prepare("digits", tmp_path) / "digits.csv.gz").is_file()
    assert data.DATASET_NAMES == (
        "fashion_mnist",
        "mnist",
        "cifar10",
        "cifar100",
        "svhn",
        "digits",
        "tiny_imagenet",
        "imagenet",
    )

"""Tiny dataset files in each dataset's real on-disk format, for tests without downloads."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets.cifar
import torchvision.datasets.svhn

IDX_NAMES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
N_IDX = {True: 6, False: 4}
N_CIFAR_PER_BATCH, N_CIFAR_TEST = 2, 3
N_SVHN = {True: 5, False: 4}


def _images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _exists_only(path: str, md5: str | None = None) -> bool:
    return os.path.isfile(path)


def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fabricated files cannot match torchvision's md5s; check only that they exist."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", _exists_only)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", _exists_only)


def _idx_bytes(array: np.ndarray) -> bytes:
    if array.ndim == 3:  # images: magic 2051, then N, H, W as big-endian int32
        header = struct.pack(">IIII", 2051, *array.shape)
    else:  # labels: magic 2049, then N
        header = struct.pack(">II", 2049, array.shape[0])
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, *, gz: bool = False) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """Write the four idx files (gzipped with a .gz suffix if `gz`); return what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for train, (image_name, label_name) in IDX_NAMES.items():
        images = _images(N_IDX[train], (28, 28), seed=int(train))
        labels = np.arange(N_IDX[train], dtype=np.uint8) % 10
        for name, array in ((image_name, images), (label_name, labels)):
            payload = _idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
        written[train] = (images, labels)
    return written


def _pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 tree: 5 train batches of 2 images, a test batch of 3; images (n, 3, 32, 32)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = [], []
    for i in range(1, 6):
        images = _images(N_CIFAR_PER_BATCH, (3, 32, 32), seed=i)
        labels = [(2 * i + j) % 10 for j in range(N_CIFAR_PER_BATCH)]
        _pickle(
            folder / f"data_batch_{i}",
            {
                "data": images.reshape(N_CIFAR_PER_BATCH, 3072),
                "labels": labels,
                "batch_label": f"training batch {i} of 5",
                "filenames": [f"img{i}_{j}.png" for j in range(N_CIFAR_PER_BATCH)],
            },
        )
        train_images.append(images)
        train_labels += labels
    test_images = _images(N_CIFAR_TEST, (3, 32, 32), seed=0)
    # A distinct value in one channel only: a wrong HWC/CHW layout would scatter it.
    test_images[0] = 0
    test_images[0, 1] = 200
    test_labels = [7, 3, 9]
    _pickle(
        folder / "test_batch",
        {
            "data": test_images.reshape(N_CIFAR_TEST, 3072),
            "labels": test_labels,
            "batch_label": "testing batch 1 of 1",
            "filenames": [f"test{j}.png" for j in range(N_CIFAR_TEST)],
        },
    )
    _pickle(folder / "batches.meta", {"label_names": [f"class{k}" for k in range(10)]})
    return {
        True: (np.concatenate(train_images), np.array(train_labels)),
        False: (test_images, np.array(test_labels)),
    }


def write_cifar100(root: Path) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-100 tree: train of 4 images, test of 3, labels from 0..99."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for train, name, n in ((True, "train", 4), (False, "test", 3)):
        images = _images(n, (3, 32, 32), seed=10 + n)
        fine = [99 - k for k in range(n)]
        _pickle(
            folder / name,
            {
                "data": images.reshape(n, 3072),
                "fine_labels": fine,
                "coarse_labels": [k % 20 for k in range(n)],
                "batch_label": name,
                "filenames": [f"{name}{k}.png" for k in range(n)],
            },
        )
        written[train] = (images, np.array(fine))
    _pickle(folder / "meta", {"fine_label_names": [f"c{k}" for k in range(100)]})
    return written


def write_svhn(root: Path) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """SVHN .mat files: X (32, 32, 3, N) uint8, y (N, 1) in 1..10 (10 is the digit 0)."""
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for train, name in ((True, "train_32x32.mat"), (False, "test_32x32.mat")):
        n = N_SVHN[train]
        images = _images(n, (3, 32, 32), seed=20 + n)  # NCHW, as we expect to read it back
        y = np.array([10, 1, 2, 9, 5][:n], dtype=np.uint8).reshape(n, 1)
        scipy.io.savemat(root / name, {"X": images.transpose(2, 3, 1, 0), "y": y})
        written[train] = (images, np.where(y[:, 0] == 10, 0, y[:, 0]))
    return written


def write_all(root: Path) -> Path:
    """Fabricate every torchvision dataset the harness loads under ``root``."""
    write_idx(root / "MNIST" / "raw")
    write_idx(root / "FashionMNIST" / "raw")
    write_cifar10(root)
    write_cifar100(root)
    write_svhn(root)
    return root

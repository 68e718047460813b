"""Tiny dataset files in each dataset's real on-disk format, for tests without downloads."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets.cifar
import torchvision.datasets.imagenet
import torchvision.datasets.svhn
from PIL import Image

IDX_NAMES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
N_IDX = {True: 6, False: 4}
N_CIFAR_PER_BATCH, N_CIFAR_TEST = 2, 3
N_SVHN = {True: 5, False: 4}
# wnids.txt order, deliberately unsorted: labels must follow the sorted order.
TINY_WNIDS = ("n09999999", "n01443537", "n04067472")
IMAGENET_WNIDS = ("n02102040", "n01440764", "n01530575")


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


def write_jpeg(path: Path, pixels: np.ndarray) -> None:
    """Save uint8 pixels (H, W, 3) or (H, W) (a greyscale JPEG) as a JPEG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)


def _flat(grey: int, height: int, width: int, colour: bool = True) -> np.ndarray:
    # One grey level per image: it survives JPEG, resizing and cropping, so it names the image.
    return np.full((height, width, 3) if colour else (height, width), grey, dtype=np.uint8)


def write_tiny_imagenet(root: Path) -> dict[bool, list[tuple[int, str]]]:
    """tiny-imagenet-200 tree: 2 train images per wnid, 4 val images, plus the side files.

    Returns:
        Per split (train True/False), ``(grey level, wnid)`` of each image in the order the
        loader lists them: train by sorted wnid then file name, val as in val_annotations.txt.
    """
    top = root / "tiny-imagenet-200"
    top.mkdir(parents=True)
    (top / "wnids.txt").write_text("".join(f"{w}\n" for w in TINY_WNIDS))
    (top / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in TINY_WNIDS))
    train: list[tuple[int, str]] = []
    for k, wnid in enumerate(sorted(TINY_WNIDS)):
        folder = top / "train" / wnid
        boxes = [f"{wnid}_{j}.JPEG\t0\t0\t63\t63\n" for j in range(2)]
        (folder / f"{wnid}_boxes.txt").parent.mkdir(parents=True)
        (folder / f"{wnid}_boxes.txt").write_text("".join(boxes))
        for j in range(2):
            grey = 20 + 40 * k + 20 * j
            # The second image of the first class is a greyscale JPEG, as some real ones are.
            write_jpeg(folder / "images" / f"{wnid}_{j}.JPEG", _flat(grey, 64, 64, k + j > 0))
            train.append((grey, wnid))
    val = [(230, TINY_WNIDS[2]), (200, TINY_WNIDS[0]), (170, TINY_WNIDS[1]), (140, TINY_WNIDS[2])]
    lines = []
    for i, (grey, wnid) in enumerate(val):
        write_jpeg(top / "val" / "images" / f"val_{i}.JPEG", _flat(grey, 64, 64))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t{i}\t60\t62\n")
    (top / "val" / "val_annotations.txt").write_text("".join(lines))
    write_jpeg(top / "test" / "images" / "test_0.JPEG", _flat(99, 64, 64))  # unlabelled: unused
    return {True: train, False: val}


def write_imagenet(root: Path) -> dict[bool, list[tuple[int, str]]]:
    """ImageFolder tree under ``root/imagenet``: train/<wnid>/ 1 image, val/<wnid>/ 2 images.

    The images have other sizes and both orientations, so every one is resized and cropped.

    Returns:
        Per split, ``(grey level, wnid)`` of each image in sorted wnid then file-name order.
    """
    written: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
    sizes = [(300, 260), (260, 400), (256, 256)]
    for train, split, per_class in ((True, "train", 1), (False, "val", 2)):
        for k, wnid in enumerate(sorted(IMAGENET_WNIDS)):
            for j in range(per_class):
                grey = 30 + 60 * k + 25 * j + (5 if train else 0)
                height, width = sizes[(k + j) % len(sizes)]
                name = f"{wnid}_{j}.JPEG" if train else f"ILSVRC2012_val_{k}{j}.JPEG"
                write_jpeg(root / "imagenet" / split / wnid / name, _flat(grey, height, width))
                written[train].append((grey, wnid))
    return written


def _tar(path: Path, members: dict[str, bytes], mode: str) -> None:
    with tarfile.open(path, mode) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_imagenet_archives(folder: Path) -> list[str]:
    """The official val tar (flat JPEGs) and devkit tar.gz (meta.mat, ground truth) in ``folder``.

    The devkit's synsets hold the three leaf classes (ILSVRC2012_ID 1..3) and one parent class.

    Returns:
        The wnid of each validation image, in sorted file-name order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    synsets = np.zeros((len(IMAGENET_WNIDS) + 1,), dtype=[(f, object) for f in fields])
    for i, wnid in enumerate(IMAGENET_WNIDS):
        synsets[i] = (i + 1, wnid, f"thing {i}, object {i}", "a thing", 0)
    synsets[-1] = (len(IMAGENET_WNIDS) + 1, "n00001740", "entity", "everything", 3)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    labels = [2, 1, 3, 2, 3]  # ILSVRC2012_IDs of val images 1..5
    truth = "".join(f"{label}\n" for label in labels).encode()
    data = "ILSVRC2012_devkit_t12/data"
    _tar(
        folder / "ILSVRC2012_devkit_t12.tar.gz",
        {
            f"{data}/meta.mat": meta.getvalue(),
            f"{data}/ILSVRC2012_validation_ground_truth.txt": truth,
        },
        "w:gz",
    )
    images = {
        f"ILSVRC2012_val_{i + 1:08d}.JPEG": _jpeg_bytes(_flat(40 * (i + 1), 280, 300))
        for i in range(len(labels))
    }
    _tar(folder / "ILSVRC2012_img_val.tar", images, "w")
    return [IMAGENET_WNIDS[label - 1] for label in labels]


def skip_imagenet_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fabricated ImageNet archives cannot match torchvision's md5s; check only existence."""
    monkeypatch.setattr(torchvision.datasets.imagenet, "check_integrity", _exists_only)


def write_all(root: Path) -> Path:
    """Fabricate every torchvision dataset the harness loads under ``root``."""
    write_idx(root / "MNIST" / "raw")
    write_idx(root / "FashionMNIST" / "raw")
    write_cifar10(root)
    write_cifar100(root)
    write_svhn(root)
    write_tiny_imagenet(root)
    write_imagenet(root)
    return root

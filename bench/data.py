"""Datasets as preloaded tensors, one factory per dataset (the `_target_`s of `conf/dataset/`).

TinyImageNet and ImageNet, stored as one file per image, live in `bench.folder_data` and read
only the images a run needs (`ImageDataset.subset`).

Every factory is cheap: it only checks that the dataset's files exist (raising
`DataNotFoundError` with the exact path and how to get the files) and returns an `ImageDataset`
that reads a split the first time it is asked for. Images come back as float32 NCHW in [0, 1],
labels as int64, built straight from each torchvision dataset's `.data` / `.targets` arrays:
going image by image through PIL would halve CPU throughput.

`prepare` is the other entry point: `purebench data NAME [--download]` and `make bench` use it to
make a dataset available on disk (Debian package, extraction or download).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets

from common.errors import ConfigError, DataNotFoundError

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's `dataset-fashion-mnist` package installs its gzipped idx files."""

_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

# scikit-learn's bundled digits: 1797 images of 8x8 in 10 classes.
_DIGITS_SIZE = 1797
_DIGITS_CLASSES = 10


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A dataset preloaded as tensors: images float32 in [0, 1], NCHW; labels int64.

    Each split is read on its first request and then cached on the instance, so building one is
    free and a run that only evaluates never reads the training set. The returned tensors are the
    cached ones: treat them as read-only (clone before modifying in place).

    Datasets stored as one file per image (`bench.folder_data`: TinyImageNet, ImageNet) also
    give `_count` and `_take`, so that `n_test` and `subset` read only what they need, never
    the whole split.

    Attributes:
        name: Config name of the dataset (`"fashion_mnist"`, `"cifar10"`, ...).
        num_classes: Number of classes; labels are in `[0, num_classes)`.
        shape: Shape `(C, H, W)` of one image.
        _load: Reads one split: called with `train=True` or `False`, returns `(images, labels)`.
        _take: Optional; reads only the images at some indices of a split: called with `train`
            and an int64 index tensor, returns `(images, labels)` in the order of the indices.
        _count: Optional; the number of images of a split, without reading any image.
        split_args: The arguments that decide which images are train and which test (digits'
            `test_size` and `split_seed`); empty where the dataset's files fix the split.

    Example:
        >>> ds = digits()
        >>> x, y = ds.test()  # x: (500, 1, 8, 8) float32, y: (500,) int64
    """

    name: str
    num_classes: int
    shape: tuple[int, int, int]
    _load: Callable[[bool], tuple[Tensor, Tensor]] = field(repr=False)
    _take: Callable[[bool, Tensor], tuple[Tensor, Tensor]] | None = field(default=None, repr=False)
    _count: Callable[[bool], int] | None = field(default=None, repr=False)
    split_args: dict[str, Any] = field(default_factory=dict)
    _cache: dict[bool, tuple[Tensor, Tensor]] = field(default_factory=dict, init=False, repr=False)

    def identity(self, *, num_classes: bool = False) -> dict[str, Any]:
        """What a network trained on this dataset depends on: the part of a cache key it gives.

        The split arguments are included only where they exist, so that the keys of datasets
        with a fixed split stay as they were; where they exist a network trained on one split is
        never reused on another (its training set would hold test images of the other).
        """
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape)}
        if num_classes:
            out["num_classes"] = self.num_classes
        if self.split_args:
            out["split"] = dict(self.split_args)
        return out

    def _split(self, train: bool) -> tuple[Tensor, Tensor]:
        if train not in self._cache:
            logger.debug("Loading %s %s split", self.name, "train" if train else "test")
            self._cache[train] = self._load(train)
        return self._cache[train]

    def train(self) -> tuple[Tensor, Tensor]:
        """Return the training split.

        Returns:
            `(images, labels)`: images `(N, C, H, W)` float32 in [0, 1], labels `(N,)` int64.
        """
        return self._split(True)

    def test(self) -> tuple[Tensor, Tensor]:
        """Return the test split.

        Returns:
            `(images, labels)`: images `(N, C, H, W)` float32 in [0, 1], labels `(N,)` int64.
        """
        return self._split(False)

    def subset(self, indices: Tensor, *, train: bool = False) -> tuple[Tensor, Tensor]:
        """Return the images and labels at `indices` of a split.

        A dataset with `_take` reads only these images (unless the split is cached already);
        the others index the cached split. Either way the result is a new tensor.

        Args:
            indices: int64 indices into the split, any order, repeats allowed.
            train: Index the training split instead of the test split.

        Returns:
            `(images, labels)`: images `(len(indices), C, H, W)` float32 in [0, 1], labels int64.
        """
        if self._take is not None and train not in self._cache:
            return self._take(train, indices)
        images, labels = self._split(train)
        return images[indices], labels[indices]

    @property
    def n_test(self) -> int:
        """Number of test images (counted without reading images where the dataset can)."""
        if self._count is not None and False not in self._cache:
            return self._count(False)
        return int(self.test()[1].shape[0])


# --------------------------------------------------------------------------- shared helpers


@dataclass(frozen=True)
class _Where:
    """Where a dataset's files are expected and how to obtain them, for error messages."""

    title: str  # human-readable name, e.g. "CIFAR-10"
    directory: Path  # the folder torchvision reads
    ways: tuple[str, ...]  # how to obtain the files, each a short imperative

    def error(self, problem: str) -> DataNotFoundError:
        """Build the error for `problem`, naming the directory and every way to get the data."""
        return DataNotFoundError(
            f"{self.title} not found in {self.directory}: {problem}. "
            f"To get it, {' or '.join(self.ways)}. "
            "If the data lives elsewhere, set PUREBENCH_DATA_DIR=<dir> "
            "or pass paths.data_dir=<dir>."
        )


def _download_way(name: str) -> str:
    return f"run `purebench data {name} --download` (needs internet)"


def _torchvision_where(title: str, name: str, directory: Path) -> _Where:
    return _Where(title=title, directory=directory, ways=(_download_way(name),))


def _fashion_mnist_where(root: Path, debian_dir: Path) -> _Where:
    return _Where(
        title="Fashion-MNIST",
        directory=_idx_dir(datasets.FashionMNIST, root),
        ways=(
            f"run `apt-get install {_FASHION_MNIST_PACKAGE}` as root (its .gz files in "
            f"{debian_dir} are then extracted here automatically)",
            _download_way("fashion_mnist"),
        ),
    )


def _missing(files: list[Path]) -> list[Path]:
    return [f for f in files if not f.is_file()]


def _describe_missing(missing: list[Path]) -> str:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return f"missing {missing[0]}{more}"


def _require(files: list[Path], where: _Where) -> None:
    """Raise `where.error(...)` unless every file exists; a cheap check, no md5."""
    missing = _missing(files)
    if missing:
        raise where.error(_describe_missing(missing))


@contextmanager
def _torchvision_errors(where: _Where) -> Iterator[None]:
    """Turn torchvision's "Dataset not found or corrupted" RuntimeError into DataNotFoundError.

    With `download=False`, a RuntimeError from a torchvision dataset's constructor means missing
    files or an md5 mismatch; either way the fix is to fetch the files again.
    """
    try:
        yield
    except RuntimeError as err:
        raise where.error(f"torchvision could not load it ({err})") from err


def _to_unit_float(images: Tensor) -> Tensor:
    """uint8 NCHW -> contiguous float32 NCHW in [0, 1]."""
    return images.contiguous().to(torch.float32).div_(255)


# ------------------------------------------------------------- MNIST and Fashion-MNIST (idx)


def _idx_dir(cls: type[datasets.MNIST], root: Path) -> Path:
    # Mirrors torchvision's `raw_folder`: <root>/<class name>/raw.
    return root / cls.__name__ / "raw"


def _idx_files(cls: type[datasets.MNIST], root: Path) -> list[Path]:
    # torchvision lists the .gz names it downloads but reads the decompressed files.
    return [_idx_dir(cls, root) / Path(name).stem for name, _ in cls.resources]


def _load_idx(
    cls: type[datasets.MNIST], root: Path, where: _Where, train: bool
) -> tuple[Tensor, Tensor]:
    with _torchvision_errors(where):
        ds = cls(root, train=train, download=False)
    # `.data` is an (N, 28, 28) uint8 tensor: add the channel axis.
    return _to_unit_float(ds.data.unsqueeze(1)), ds.targets.to(torch.int64)


def _gunzip_atomic(src: Path, dst: Path) -> None:
    """Decompress `src` into `dst` through a temp file, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, length=1 << 20)
        # mkstemp creates 0600; a shared data directory needs files others can read.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _complete_from_debian(files: list[Path], debian_dir: Path) -> bool:
    """Extract Debian's `.gz` copies of whichever `files` are missing.

    Returns:
        True when every file exists afterwards; False (extracting nothing) when Debian's
        directory lacks any `.gz` that would be needed.
    """
    missing = _missing(files)
    sources = [debian_dir / f"{f.name}.gz" for f in missing]
    if not all(src.is_file() for src in sources):
        return False
    for src, dst in zip(sources, missing, strict=True):
        dst.parent.mkdir(parents=True, exist_ok=True)
        logger.info("Extracting %s -> %s", src, dst)
        _gunzip_atomic(src, dst)
    return True


def fashion_mnist(
    root: str | Path, debian_dir: str | Path = DEBIAN_FASHION_MNIST_DIR
) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grey images of clothing, 10 classes, 60k/10k.

    torchvision reads decompressed idx files from `<root>/FashionMNIST/raw/`. If they are missing
    but Debian's `dataset-fashion-mnist` package is installed, its gzipped copies in `debian_dir`
    are extracted there first. torchvision's `download=True` is never used here: Debian
    re-gzipped the files, so their md5s differ from torchvision's and it would re-download.

    Args:
        root: Data directory (`paths.data_dir`).
        debian_dir: Where the Debian package put its `*.gz` files.

    Returns:
        The dataset, shape (1, 28, 28); splits load on first use.

    Raises:
        DataNotFoundError: Neither the extracted files nor Debian's copies exist.
    """
    root, debian_dir = Path(root).expanduser(), Path(debian_dir)
    where = _fashion_mnist_where(root, debian_dir)
    files = _idx_files(datasets.FashionMNIST, root)
    if not _complete_from_debian(files, debian_dir):
        raise where.error(_describe_missing(_missing(files)))
    return ImageDataset(
        name="fashion_mnist",
        num_classes=10,
        shape=(1, 28, 28),
        _load=partial(_load_idx, datasets.FashionMNIST, root, where),
    )


def mnist(root: str | Path) -> ImageDataset:
    """MNIST (LeCun et al. 1998): 28x28 grey handwritten digits, 10 classes, 60k/10k.

    Args:
        root: Data directory (`paths.data_dir`); files are read from `<root>/MNIST/raw/`.

    Returns:
        The dataset, shape (1, 28, 28); splits load on first use.

    Raises:
        DataNotFoundError: The decompressed idx files are missing.
    """
    root = Path(root).expanduser()
    where = _torchvision_where("MNIST", "mnist", _idx_dir(datasets.MNIST, root))
    _require(_idx_files(datasets.MNIST, root), where)
    return ImageDataset(
        name="mnist",
        num_classes=10,
        shape=(1, 28, 28),
        _load=partial(_load_idx, datasets.MNIST, root, where),
    )


# ------------------------------------------------------------------------ CIFAR-10 / CIFAR-100


def _cifar_files(cls: type[datasets.CIFAR10], root: Path) -> list[Path]:
    folder = root / cls.base_folder
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [folder / name for name in names]


def _load_cifar(
    cls: type[datasets.CIFAR10], root: Path, where: _Where, train: bool
) -> tuple[Tensor, Tensor]:
    # torchvision checks every file's md5 here; a mismatch surfaces as DataNotFoundError.
    with _torchvision_errors(where):
        ds = cls(root, train=train, download=False)
    # `.data` is (N, 32, 32, 3) uint8 numpy (torchvision turned CHW into HWC); `.targets` a list.
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
    return _to_unit_float(images), torch.as_tensor(ds.targets, dtype=torch.int64)


def cifar10(root: str | Path) -> ImageDataset:
    """CIFAR-10 (Krizhevsky 2009): 32x32 colour images, 10 classes, 50k/10k.

    Args:
        root: Data directory (`paths.data_dir`); files are read from `<root>/cifar-10-batches-py/`.

    Returns:
        The dataset, shape (3, 32, 32); splits load on first use.

    Raises:
        DataNotFoundError: A batch file is missing (at construction) or fails torchvision's md5
            check (when a split is loaded).
    """
    root = Path(root).expanduser()
    where = _torchvision_where("CIFAR-10", "cifar10", root / datasets.CIFAR10.base_folder)
    _require(_cifar_files(datasets.CIFAR10, root), where)
    return ImageDataset(
        name="cifar10",
        num_classes=10,
        shape=(3, 32, 32),
        _load=partial(_load_cifar, datasets.CIFAR10, root, where),
    )


def cifar100(root: str | Path) -> ImageDataset:
    """CIFAR-100 (Krizhevsky 2009): 32x32 colour images, 100 fine classes, 50k/10k.

    Args:
        root: Data directory (`paths.data_dir`); files are read from `<root>/cifar-100-python/`.

    Returns:
        The dataset, shape (3, 32, 32), labels are the fine labels; splits load on first use.

    Raises:
        DataNotFoundError: A file is missing (at construction) or fails torchvision's md5 check
            (when a split is loaded).
    """
    root = Path(root).expanduser()
    where = _torchvision_where("CIFAR-100", "cifar100", root / datasets.CIFAR100.base_folder)
    _require(_cifar_files(datasets.CIFAR100, root), where)
    return ImageDataset(
        name="cifar100",
        num_classes=100,
        shape=(3, 32, 32),
        _load=partial(_load_cifar, datasets.CIFAR100, root, where),
    )


# ----------------------------------------------------------------------------------------- SVHN

_SVHN_SPLITS = {True: "train", False: "test"}


def _svhn_files(root: Path) -> list[Path]:
    return [root / datasets.SVHN.split_list[split][1] for split in _SVHN_SPLITS.values()]


def _load_svhn(root: Path, where: _Where, train: bool) -> tuple[Tensor, Tensor]:
    with _torchvision_errors(where):
        ds = datasets.SVHN(root, split=_SVHN_SPLITS[train], download=False)
    # `.data` is already (N, 3, 32, 32) uint8 numpy, and torchvision already mapped label 10 -> 0.
    images = torch.from_numpy(np.ascontiguousarray(ds.data))
    return _to_unit_float(images), torch.as_tensor(ds.labels, dtype=torch.int64)


def svhn(root: str | Path) -> ImageDataset:
    """SVHN (Netzer et al. 2011): 32x32 colour house-number digits, 10 classes, 73k/26k.

    The `extra` split is not used.

    Args:
        root: Data directory (`paths.data_dir`); reads `<root>/train_32x32.mat` and
            `<root>/test_32x32.mat`.

    Returns:
        The dataset, shape (3, 32, 32), digit 0 labelled 0; splits load on first use.

    Raises:
        DataNotFoundError: A `.mat` file is missing (at construction) or fails torchvision's md5
            check (when a split is loaded).
    """
    root = Path(root).expanduser()
    where = _torchvision_where("SVHN", "svhn", root)
    _require(_svhn_files(root), where)
    return ImageDataset(
        name="svhn", num_classes=10, shape=(3, 32, 32), _load=partial(_load_svhn, root, where)
    )


# --------------------------------------------------------------------------------------- digits


def _load_digits(test_size: int, split_seed: int, train: bool) -> tuple[Tensor, Tensor]:
    # Imported here so that the other datasets never pay for scikit-learn's import.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.images,
        bunch.target,
        test_size=test_size,
        stratify=bunch.target,
        random_state=split_seed,
    )
    x, y = (x_train, y_train) if train else (x_test, y_test)
    # Pixel values are integers 0..16.
    images = torch.from_numpy(x / 16.0).to(torch.float32).unsqueeze(1)
    return images.contiguous(), torch.from_numpy(y).to(torch.int64)


def digits(test_size: int = 500, split_seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), for fast tests.

    It ships inside scikit-learn, so it needs no files and no network. Train and test come from
    one stratified split of the 1797 images, fixed by `split_seed`.

    Args:
        test_size: Number of test images; the rest is the training set.
        split_seed: Seed of the train/test split.

    Returns:
        The dataset, shape (1, 8, 8); splits load on first use.

    Raises:
        ConfigError: `test_size` leaves fewer than one image per class on either side.
    """
    low, high = _DIGITS_CLASSES, _DIGITS_SIZE - _DIGITS_CLASSES
    if not low <= test_size <= high:
        raise ConfigError(
            f"digits: test_size={test_size} is not allowed; use {low}..{high} (the stratified "
            f"split of {_DIGITS_SIZE} images needs one image per class on each side)"
        )
    return ImageDataset(
        name="digits",
        num_classes=_DIGITS_CLASSES,
        shape=(1, 8, 8),
        _load=partial(_load_digits, test_size, split_seed),
        split_args={"test_size": test_size, "split_seed": split_seed},
    )


# ----------------------------------------------------------------------------- evaluation subset


def eval_subset(n_test: int, n_samples: int, seed: int) -> Tensor:
    """Indices of the fixed evaluation subset of a test set.

    The first `n_samples` entries of one seeded permutation, so every defense is scored on the
    same images and a smaller subset is a prefix of a larger one (same seed).

    Args:
        n_test: Size of the test set.
        n_samples: Number of indices wanted, `1..n_test`.
        seed: Seed of the permutation.

    Returns:
        int64 tensor of `n_samples` distinct indices in `[0, n_test)`.

    Raises:
        ConfigError: `n_samples` is below 1 or above `n_test`.
    """
    if n_samples < 1:
        raise ConfigError(f"n_samples={n_samples} must be at least 1 (allowed: 1..{n_test})")
    if n_samples > n_test:
        raise ConfigError(
            f"n_samples={n_samples} exceeds the test set of {n_test} images (allowed: 1..{n_test})"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_test, generator=generator)[:n_samples].to(torch.int64)


# ------------------------------------------------------------------------------------- prepare


def _run_quietly(command: list[str]) -> bool:
    logger.info("Running %s", " ".join(command))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        logger.warning("%s failed (exit %d): %s", command, result.returncode, result.stderr)
    return result.returncode == 0


def _apt_install(package: str) -> bool:
    install = ["apt-get", "install", "-y", package]
    # Skip `apt-get update` when the package index already knows the package; a fresh container
    # often has an empty index, so retry once after updating it.
    return _run_quietly(install) or (_run_quietly(["apt-get", "update"]) and _run_quietly(install))


def _prepare_fashion_mnist(root: Path, download: bool, debian_dir: Path) -> Path:
    where = _fashion_mnist_where(root, debian_dir)
    files = _idx_files(datasets.FashionMNIST, root)
    if _complete_from_debian(files, debian_dir):
        return where.directory
    if shutil.which("apt-get") and os.geteuid() == 0:
        if _apt_install(_FASHION_MNIST_PACKAGE) and _complete_from_debian(files, debian_dir):
            return where.directory
        logger.warning("Installing %s did not provide the files", _FASHION_MNIST_PACKAGE)
    if download:
        logger.info("Downloading Fashion-MNIST into %s", where.directory)
        datasets.FashionMNIST(root, train=True, download=True)
        return where.directory
    raise where.error(_describe_missing(_missing(files)))


def _prepare_by_download(
    files: list[Path], where: _Where, download: bool, fetch: Callable[[], object]
) -> Path:
    """Return `where.directory` if `files` exist, else `fetch()` them if allowed, else raise."""
    if not _missing(files):
        return where.directory
    if not download:
        raise where.error(_describe_missing(_missing(files)))
    logger.info("Downloading %s into %s", where.title, where.directory)
    fetch()
    return where.directory


def _prepare_mnist(root: Path, download: bool, debian_dir: Path) -> Path:
    where = _torchvision_where("MNIST", "mnist", _idx_dir(datasets.MNIST, root))
    fetch = partial(datasets.MNIST, root, train=True, download=True)
    return _prepare_by_download(_idx_files(datasets.MNIST, root), where, download, fetch)


def _prepare_cifar10(root: Path, download: bool, debian_dir: Path) -> Path:
    where = _torchvision_where("CIFAR-10", "cifar10", root / datasets.CIFAR10.base_folder)
    fetch = partial(datasets.CIFAR10, root, train=True, download=True)
    return _prepare_by_download(_cifar_files(datasets.CIFAR10, root), where, download, fetch)


def _prepare_cifar100(root: Path, download: bool, debian_dir: Path) -> Path:
    where = _torchvision_where("CIFAR-100", "cifar100", root / datasets.CIFAR100.base_folder)
    fetch = partial(datasets.CIFAR100, root, train=True, download=True)
    return _prepare_by_download(_cifar_files(datasets.CIFAR100, root), where, download, fetch)


def _fetch_svhn(root: Path) -> None:
    # Unlike CIFAR's single archive, SVHN downloads one .mat file per split.
    for split in _SVHN_SPLITS.values():
        datasets.SVHN(root, split=split, download=True)


def _prepare_svhn(root: Path, download: bool, debian_dir: Path) -> Path:
    where = _torchvision_where("SVHN", "svhn", root)
    return _prepare_by_download(_svhn_files(root), where, download, partial(_fetch_svhn, root))


def _prepare_tiny_imagenet(root: Path, download: bool, debian_dir: Path) -> Path:
    # bench.folder_data imports this module, so it is imported here, not at the top.
    from bench.folder_data import prepare_tiny_imagenet

    return prepare_tiny_imagenet(root, download)


def _prepare_imagenet(root: Path, download: bool, debian_dir: Path) -> Path:
    from bench.folder_data import prepare_imagenet

    return prepare_imagenet(root, download)


def _prepare_digits(root: Path, download: bool, debian_dir: Path) -> Path:
    # Bundled with scikit-learn: nothing to fetch; report where the bundled file lives.
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "data"


# The CLI's table: the only list of dataset names in the code base. Each entry makes its
# dataset available under `root` and returns the directory it is read from.
_PREPARERS: dict[str, Callable[[Path, bool, Path], Path]] = {
    "fashion_mnist": _prepare_fashion_mnist,
    "mnist": _prepare_mnist,
    "cifar10": _prepare_cifar10,
    "cifar100": _prepare_cifar100,
    "svhn": _prepare_svhn,
    "digits": _prepare_digits,
    "tiny_imagenet": _prepare_tiny_imagenet,
    "imagenet": _prepare_imagenet,
}

DATASET_NAMES: tuple[str, ...] = tuple(_PREPARERS)
"""Names `prepare` accepts (for the CLI's `choices`)."""


def prepare(
    name: str,
    root: str | Path,
    *,
    download: bool = False,
    debian_dir: str | Path = DEBIAN_FASHION_MNIST_DIR,
) -> Path:
    """Make dataset `name` available under `root` and return the directory it is read from.

    Used by `purebench data NAME [--download]` and `make bench`. Files already in place are left
    alone. Fashion-MNIST is taken from Debian's `dataset-fashion-mnist` package (installed with
    apt-get when running as root), downloading only as a last resort; the other torchvision
    datasets are downloaded only when `download` is true; digits needs nothing. TinyImageNet
    and ImageNet are unpacked from their official archives (`bench.folder_data`).

    Args:
        name: One of `DATASET_NAMES`.
        root: Data directory (`paths.data_dir`).
        download: Allow downloading from the internet through torchvision.
        debian_dir: Where Debian's Fashion-MNIST package puts its `*.gz` files.

    Returns:
        The directory holding the dataset's files.

    Raises:
        ConfigError: `name` is unknown.
        DataNotFoundError: The files are missing and no allowed way could provide them.
    """
    if name not in _PREPARERS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")
    return _PREPARERS[name](Path(root).expanduser(), download, Path(debian_dir))

"""Datasets stored as one image file each: TinyImageNet-200 and ImageNet (ILSVRC-2012).

Unlike the datasets of `bench.data`, these are never read into one tensor up front: ImageNet's
validation set alone is 28 GiB as float32 at 224x224. A split's files are listed on first use
without decoding anything, `ImageDataset.n_test` counts them, and `ImageDataset.subset` decodes
only the images it is asked for (the harness's fixed evaluation subset). Reading a whole split
(`ImageDataset.train()` / `test()`) is refused when it would exceed `max_preload_gb`.

Images are opened by torchvision's `default_loader` (PIL, converted to RGB: both datasets hold
greyscale JPEGs, and ImageNet a few CMYK ones) and turned into float32 CHW in [0, 1] by
torchvision transforms. Class indices are those of torchvision's `ImageFolder`: class `k` is
the `k`-th wnid in sorted order. Nothing is downloaded at run time; `prepare_tiny_imagenet`
and `prepare_imagenet` (`purebench data NAME`) unpack the official archives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms
from torchvision.datasets import folder
from torchvision.datasets import imagenet as tv_imagenet
from torchvision.datasets.utils import download_and_extract_archive, extract_archive

from bench.data import ImageDataset, _describe_missing, _missing, _torchvision_errors, _Where
from common.errors import ConfigError

logger = logging.getLogger(__name__)

TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
"""Folder under the data directory: the top folder of the official zip."""

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
"""The official archive (Stanford CS231n), fetched only by `purebench data ... --download`."""

IMAGENET_FOLDER = "imagenet"
"""Folder under the data directory: torchvision's `ImageNet` root (`train/`, `val/`)."""

_TINY_LAYOUT = (
    "expected the layout of the official tiny-imagenet-200.zip: wnids.txt, "
    "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
)
_IMAGENET_LAYOUT = (
    "expected torchvision's ImageFolder layout: val/<wnid>/*.JPEG for evaluation, "
    "train/<wnid>/*.JPEG for training"
)
_TINY_CLASSES, _IMAGENET_CLASSES = 200, 1000
_FLOAT32_BYTES = 4
_INTERPOLATIONS = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class _Samples:
    """One split as found on disk: image paths and their labels; nothing decoded."""

    paths: tuple[str, ...]
    labels: Tensor  # int64, one per path


@dataclass(eq=False)
class _ImageFiles:
    """Reads a dataset image by image: the `_load`, `_take` and `_count` of its ImageDataset.

    Attributes:
        where: Where the files are expected, for error messages.
        shape: `(C, H, W)` every image must have after `transform`.
        scan: Lists one split (`train=True` or `False`); called once per split.
        transform: PIL RGB image -> float32 CHW tensor in [0, 1].
        max_preload_gb: The most a whole split may take as float32 in `load`, in GiB.
    """

    where: _Where
    shape: tuple[int, int, int]
    scan: Callable[[bool], _Samples]
    transform: Callable[[Image.Image], Tensor]
    max_preload_gb: float
    _scanned: dict[bool, _Samples] = field(default_factory=dict, init=False, repr=False)

    def samples(self, train: bool) -> _Samples:
        """The split's files and labels, listed on the first call."""
        if train not in self._scanned:
            self._scanned[train] = self.scan(train)
        return self._scanned[train]

    def count(self, train: bool) -> int:
        """Number of images in the split; decodes none."""
        return len(self.samples(train).paths)

    def take(self, train: bool, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Decode only the images at `indices`, in that order."""
        split = self.samples(train)
        picked = [split.paths[i] for i in indices.tolist()]
        return self._read(picked), split.labels[indices]

    def load(self, train: bool) -> tuple[Tensor, Tensor]:
        """Decode the whole split, unless its tensor would pass `max_preload_gb`."""
        split = self.samples(train)
        size_gb = len(split.paths) * math.prod(self.shape) * _FLOAT32_BYTES / 2**30
        if size_gb > self.max_preload_gb:
            name = "train" if train else "test"
            raise ConfigError(
                f"{self.where.title}'s {name} split has {len(split.paths)} images, "
                f"{size_gb:.1f} GiB as float32: above max_preload_gb={self.max_preload_gb:g}, so "
                "it is not read into memory; evaluation reads only its subset "
                "(ImageDataset.subset), and training on it needs a streaming loader; raise "
                "dataset.max_preload_gb (GiB) to read it anyway"
            )
        logger.info("Reading %d images of %s", len(split.paths), self.where.directory)
        return self._read(split.paths), split.labels

    def _read(self, paths: Sequence[str]) -> Tensor:
        # Filled in place: stacking a list would hold every image twice at the peak.
        images = torch.empty((len(paths), *self.shape), dtype=torch.float32)
        for i, path in enumerate(paths):
            images[i] = self._decode(path)
        return images

    def _decode(self, path: str) -> Tensor:
        try:
            image = self.transform(folder.default_loader(path))
        except OSError as err:  # a vanished file, or bytes PIL cannot decode
            raise self.where.error(f"cannot read {path} ({err})") from err
        if tuple(image.shape) != self.shape:
            raise self.where.error(
                f"{path} is an image of shape {tuple(image.shape)}, expected {self.shape}"
            )
        return image


def _dataset(name: str, num_classes: int, files: _ImageFiles) -> ImageDataset:
    return ImageDataset(
        name=name,
        num_classes=num_classes,
        shape=files.shape,
        _load=files.load,
        _take=files.take,
        _count=files.count,
    )


def _check_preload(max_preload_gb: float) -> float:
    if not max_preload_gb > 0:
        raise ConfigError(f"max_preload_gb={max_preload_gb} must be > 0 (GiB of float32)")
    return float(max_preload_gb)


def _folder_samples(
    directory: Path, class_to_idx: dict[str, int], where: _Where, layout: str
) -> _Samples:
    """List `directory/<wnid>/**/*.JPEG` as torchvision's ImageFolder does (`make_dataset`)."""
    if not directory.is_dir():
        raise where.error(f"missing {directory} ({layout})")
    logger.info("Listing the images under %s", directory)
    found = folder.make_dataset(
        directory, class_to_idx, extensions=folder.IMG_EXTENSIONS, allow_empty=True
    )
    present = {label for _, label in found}
    empty = [wnid for wnid, label in class_to_idx.items() if label not in present]
    if empty:
        listed = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise where.error(
            f"no image for {len(empty)} of the {len(class_to_idx)} classes under {directory} "
            f"({listed}; {layout})"
        )
    paths, labels = zip(*found, strict=True)
    return _Samples(paths=paths, labels=torch.tensor(labels, dtype=torch.int64))


# ------------------------------------------------------------------------------ TinyImageNet


def _tiny_where(directory: Path) -> _Where:
    return _Where(
        title="TinyImageNet-200",
        directory=directory,
        ways=(
            f"unzip the official tiny-imagenet-200.zip ({TINY_IMAGENET_URL}) into "
            f"{directory.parent}",
            f"put that zip in {directory.parent} and run `purebench data tiny_imagenet`",
            "run `purebench data tiny_imagenet --download` (needs internet)",
        ),
    )


def _tiny_files(directory: Path) -> list[Path]:
    return [directory / "wnids.txt", directory / "val" / "val_annotations.txt"]


def _tiny_wnids(directory: Path, where: _Where) -> list[str]:
    wnids = sorted(set((directory / "wnids.txt").read_text(encoding="utf-8").split()))
    if not wnids:
        raise where.error(f"{directory / 'wnids.txt'} lists no wnid ({_TINY_LAYOUT})")
    if len(wnids) != _TINY_CLASSES:
        logger.warning(
            "%s lists %d wnids, not %d: labels index these %d sorted wnids",
            directory / "wnids.txt",
            len(wnids),
            _TINY_CLASSES,
            len(wnids),
        )
    return wnids


def _tiny_val(directory: Path, class_to_idx: dict[str, int], where: _Where) -> _Samples:
    """The labelled validation images, in the order of val_annotations.txt."""
    annotations = directory / "val" / "val_annotations.txt"
    paths, labels = [], []
    # Each line: file name, wnid, then the bounding box (x0, y0, x1, y1), tab-separated.
    for number, line in enumerate(annotations.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or fields[1] not in class_to_idx:
            raise where.error(
                f"{annotations} line {number} ({line.strip()!r}) does not name an image and "
                "a wnid of wnids.txt"
            )
        paths.append(str(directory / "val" / "images" / fields[0]))
        labels.append(class_to_idx[fields[1]])
    if not paths:
        raise where.error(f"{annotations} lists no image ({_TINY_LAYOUT})")
    missing = _missing([Path(p) for p in paths])
    if missing:
        raise where.error(f"{_describe_missing(missing)} ({_TINY_LAYOUT})")
    return _Samples(paths=tuple(paths), labels=torch.tensor(labels, dtype=torch.int64))


def _tiny_scan(directory: Path, wnids: list[str], where: _Where, train: bool) -> _Samples:
    class_to_idx = {wnid: i for i, wnid in enumerate(wnids)}
    if train:
        return _folder_samples(directory / "train", class_to_idx, where, _TINY_LAYOUT)
    return _tiny_val(directory, class_to_idx, where)


def tiny_imagenet(root: str | Path, max_preload_gb: float = 8.0) -> ImageDataset:
    """TinyImageNet-200 (Le & Yang 2015): 64x64 colour images, 200 classes, 100k / 10k.

    The dataset of Stanford's CS231n (<http://cs231n.stanford.edu/tiny-imagenet-200.zip>;
    report <http://vision.stanford.edu/teaching/cs231n/reports/2015/pdfs/yle_project.pdf>), on
    which CARSO (Ballarin et al., <https://arxiv.org/abs/2306.06081>) reports. The test split is
    the labelled validation set (val/images/ with val/val_annotations.txt), in the order of the
    annotation file; the official test/ images have no labels and are not used. Labels index the
    wnids of wnids.txt in sorted order, as torchvision's ImageFolder would number the train/
    folders. Images are read as they are (64x64), by PIL, and converted to RGB.

    Args:
        root: Data directory (`paths.data_dir`); files are read from `<root>/tiny-imagenet-200/`.
        max_preload_gb: The most `train()` / `test()` may read into memory (GiB of float32);
            the whole train split takes 4.6 GiB, the test split 0.5 GiB.

    Returns:
        The dataset, shape (3, 64, 64); splits are listed and read on first use.

    Raises:
        DataNotFoundError: wnids.txt or val/val_annotations.txt is missing (at construction);
            an annotated image, train/ or a class's train images are missing (on first use).
        ConfigError: `max_preload_gb` is not positive.
    """
    directory = Path(root).expanduser() / TINY_IMAGENET_FOLDER
    where = _tiny_where(directory)
    missing = _missing(_tiny_files(directory))
    if missing:
        raise where.error(f"{_describe_missing(missing)} ({_TINY_LAYOUT})")
    wnids = _tiny_wnids(directory, where)
    files = _ImageFiles(
        where=where,
        shape=(3, 64, 64),
        scan=partial(_tiny_scan, directory, wnids, where),
        transform=transforms.ToTensor(),
        max_preload_gb=_check_preload(max_preload_gb),
    )
    return _dataset("tiny_imagenet", len(wnids), files)


def prepare_tiny_imagenet(root: Path, download: bool) -> Path:
    """Unpack `<root>/tiny-imagenet-200.zip` (or download it if allowed) unless already there.

    Args:
        root: Data directory.
        download: Allow fetching the zip from `TINY_IMAGENET_URL`.

    Returns:
        `<root>/tiny-imagenet-200`.

    Raises:
        DataNotFoundError: Neither the unpacked files nor the zip are there and `download` is
            false, or the zip did not hold them.
    """
    directory = root / TINY_IMAGENET_FOLDER
    where = _tiny_where(directory)
    if not _missing(_tiny_files(directory)) and (directory / "train").is_dir():
        return directory
    archive = root / f"{TINY_IMAGENET_FOLDER}.zip"
    if archive.is_file():
        logger.info("Extracting %s into %s", archive, root)
        extract_archive(str(archive), str(root))
    elif download:
        logger.info("Downloading %s into %s", TINY_IMAGENET_URL, root)
        download_and_extract_archive(TINY_IMAGENET_URL, download_root=str(root))
    missing = _missing(_tiny_files(directory))
    if missing:
        raise where.error(f"{_describe_missing(missing)} ({_TINY_LAYOUT})")
    return directory


# ---------------------------------------------------------------------------------- ImageNet


def _imagenet_where(directory: Path) -> _Where:
    devkit, val = tv_imagenet.ARCHIVE_META["devkit"][0], tv_imagenet.ARCHIVE_META["val"][0]
    return _Where(
        title="ImageNet (ILSVRC-2012)",
        directory=directory,
        ways=(
            f"download {val} and {devkit} from https://image-net.org (a free account; they "
            f"cannot be downloaded automatically), put them in {directory} and run "
            "`purebench data imagenet`",
            f"sort the validation images into {directory / 'val'}/<wnid>/ yourself",
        ),
    )


def _imagenet_classes(split_dir: Path, where: _Where) -> list[str]:
    """The sorted class folders of `split_dir`, as torchvision's `find_classes`."""
    if not split_dir.is_dir():
        raise where.error(f"missing {split_dir} ({_IMAGENET_LAYOUT})")
    try:
        classes, _ = folder.find_classes(split_dir)
    except FileNotFoundError as err:
        flat = any(p.suffix.lower() in folder.IMG_EXTENSIONS for p in split_dir.iterdir())
        hint = (
            "; its images lie flat, as in the official tar: `purebench data imagenet` sorts "
            "them by the devkit's labels"
            if flat
            else ""
        )
        raise where.error(
            f"{split_dir} holds no <wnid>/ class folder{hint} ({_IMAGENET_LAYOUT})"
        ) from err
    return classes


def _imagenet_scan(directory: Path, wnids: list[str], where: _Where, train: bool) -> _Samples:
    split_dir = directory / ("train" if train else "val")
    if train:
        found = _imagenet_classes(split_dir, where)
        if found != wnids:
            raise where.error(
                f"{split_dir} has {len(found)} class folders and val/ has {len(wnids)}, or "
                f"other wnids: they must be the same, since labels index the sorted wnids "
                f"({_IMAGENET_LAYOUT})"
            )
    class_to_idx = {wnid: i for i, wnid in enumerate(wnids)}
    return _folder_samples(split_dir, class_to_idx, where, _IMAGENET_LAYOUT)


def imagenet(
    root: str | Path,
    resize: int = 256,
    crop: int = 224,
    interpolation: Literal["bilinear", "bicubic"] = "bilinear",
    max_preload_gb: float = 8.0,
) -> ImageDataset:
    """ImageNet (ILSVRC-2012; Russakovsky et al. 2015, <https://arxiv.org/abs/1409.0575>).

    1000 classes, 1.28M train / 50k validation images, in torchvision's ImageFolder layout
    (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`; what `torchvision.datasets.ImageNet` and
    `purebench data imagenet` make of the official tars). The test split is the validation set.
    Preprocessing is RobustBench's `Res256Crop224` and DiffPure's ImageNet evaluation transform:
    PIL resize of the shorter side to `resize`, center crop `crop`, `ToTensor` (no
    normalization: classifiers normalize inside). Labels index the sorted wnids of val/, as
    ImageFolder numbers them, which is the class order of torchvision's and RobustBench's
    ImageNet models. A training split, if present, must hold the same wnids.

    Args:
        root: Data directory (`paths.data_dir`); files are read from `<root>/imagenet/`.
        resize: Shorter side after resizing.
        crop: Side of the center crop; images come out `(3, crop, crop)`.
        interpolation: `"bilinear"` (RobustBench's default) or `"bicubic"` (its
            `BicubicRes256Crop224`).
        max_preload_gb: The most `train()` / `test()` may read into memory (GiB of float32);
            the whole validation set takes 28 GiB, so by default only subsets are read.

    Returns:
        The dataset, shape (3, crop, crop); splits are listed and read on first use.

    Raises:
        DataNotFoundError: val/ is missing or has no class folders (at construction); train/
            or a class's images are missing (on first use).
        ConfigError: `crop` exceeds `resize`, or an argument is out of range.
    """
    if not 0 < crop <= resize:
        raise ConfigError(f"imagenet: crop={crop}, resize={resize}; need 0 < crop <= resize")
    if interpolation not in _INTERPOLATIONS:
        raise ConfigError(
            f"imagenet: interpolation={interpolation!r}; allowed: {', '.join(_INTERPOLATIONS)}"
        )
    directory = Path(root).expanduser() / IMAGENET_FOLDER
    where = _imagenet_where(directory)
    wnids = _imagenet_classes(directory / "val", where)
    if len(wnids) != _IMAGENET_CLASSES:
        logger.warning(
            "%s has %d class folders, not %d: labels index these %d sorted wnids",
            directory / "val",
            len(wnids),
            _IMAGENET_CLASSES,
            len(wnids),
        )
    transform = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=_INTERPOLATIONS[interpolation]),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
        ]
    )
    files = _ImageFiles(
        where=where,
        shape=(3, crop, crop),
        scan=partial(_imagenet_scan, directory, wnids, where),
        transform=transform,
        max_preload_gb=_check_preload(max_preload_gb),
    )
    return _dataset("imagenet", len(wnids), files)


def prepare_imagenet(root: Path, download: bool) -> Path:
    """Sort the official validation tar into `<root>/imagenet/val/<wnid>/` unless done already.

    Uses torchvision's own parsers (`torchvision.datasets.imagenet`), which check the archives'
    md5s: the devkit gives each validation image's wnid. The training tar (138 GiB) is unpacked
    into `train/<wnid>/` too when it lies beside them and `train/` does not exist yet. ImageNet
    cannot be downloaded automatically, so `download` changes nothing.

    Args:
        root: Data directory.
        download: Ignored (ImageNet needs an account at image-net.org).

    Returns:
        `<root>/imagenet`.

    Raises:
        DataNotFoundError: val/ is not sorted and the devkit or validation tar is missing or
            fails its md5 check.
    """
    directory = root / IMAGENET_FOLDER
    where = _imagenet_where(directory)
    names = {split: meta[0] for split, meta in tv_imagenet.ARCHIVE_META.items()}
    if not (directory / "val").is_dir():
        missing = _missing([directory / names["devkit"], directory / names["val"]])
        if missing:
            raise where.error(f"{_describe_missing(missing)} ({_IMAGENET_LAYOUT})")
        with _torchvision_errors(where):
            if not (directory / tv_imagenet.META_FILE).is_file():
                tv_imagenet.parse_devkit_archive(str(directory))
            logger.info("Sorting %s into %s", names["val"], directory / "val")
            tv_imagenet.parse_val_archive(str(directory))
    if (directory / names["train"]).is_file() and not (directory / "train").is_dir():
        with _torchvision_errors(where):
            logger.info("Unpacking %s into %s", names["train"], directory / "train")
            tv_imagenet.parse_train_archive(str(directory))
    _imagenet_classes(directory / "val", where)
    return directory

"""bench.folder_data (TinyImageNet-200, ImageNet) on tiny trees in their real on-disk layouts."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision import datasets

from bench import data, folder_data
from bench.data import ImageDataset
from common.errors import ConfigError, DataNotFoundError
from tests.fabricate import (
    IMAGENET_WNIDS,
    TINY_WNIDS,
    skip_imagenet_md5,
    write_imagenet,
    write_imagenet_archives,
    write_jpeg,
    write_tiny_imagenet,
)
from tests.test_cli import cli, one_error_line

# A flat grey JPEG at quality 95 decodes to within a level or two of its value.
GREY_ATOL = 2 / 255


def _greys(x: torch.Tensor) -> list[int]:
    """The grey level of each flat image, checking that it is flat and grey."""
    assert torch.all((x - x.mean(dim=(1, 2, 3), keepdim=True)).abs() <= GREY_ATOL)
    return (x.mean(dim=(1, 2, 3)) * 255).round().to(torch.int64).tolist()


def _check_images(x: torch.Tensor, y: torch.Tensor, ds: ImageDataset, n: int) -> None:
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (n, *ds.shape) and y.shape == (n,)
    assert x.is_contiguous() and 0.0 <= x.min() and x.max() <= 1.0


def _expected(written: list[tuple[int, str]]) -> tuple[list[int], list[int]]:
    own = TINY_WNIDS if written[0][1] in TINY_WNIDS else IMAGENET_WNIDS
    index = {wnid: k for k, wnid in enumerate(sorted(own))}
    return [grey for grey, _ in written], [index[wnid] for _, wnid in written]


def _assert_greys(x: torch.Tensor, greys: list[int]) -> None:
    assert all(abs(a - b) <= 2 for a, b in zip(_greys(x), greys, strict=True)), (_greys(x), greys)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert isinstance(err.value, FileNotFoundError)
    return message


# ------------------------------------------------------------------------------ TinyImageNet


def test_tiny_imagenet_test_split_follows_the_val_annotations(tmp_path: Path) -> None:
    written = write_tiny_imagenet(tmp_path)
    ds = folder_data.tiny_imagenet(tmp_path)
    assert (ds.name, ds.num_classes, ds.shape) == ("tiny_imagenet", 3, (3, 64, 64))
    assert ds.n_test == 4
    x, y = ds.test()
    _check_images(x, y, ds, 4)
    greys, labels = _expected(written[False])
    _assert_greys(x, greys)
    # val_0 is annotated with the third wnid of wnids.txt, which sorts second: label 1.
    assert y.tolist() == labels == [1, 2, 0, 1]


def test_tiny_imagenet_labels_are_sorted_wnids_as_imagefolder_numbers_train(
    tmp_path: Path,
) -> None:
    written = write_tiny_imagenet(tmp_path)
    ds = folder_data.tiny_imagenet(tmp_path)
    x, y = ds.train()
    _check_images(x, y, ds, 6)
    greys, labels = _expected(written[True])
    _assert_greys(x, greys)  # the greyscale JPEG came back as 3 equal channels
    assert y.tolist() == labels == [0, 0, 1, 1, 2, 2]
    # The same numbering as torchvision's ImageFolder over train/, which wnids.txt's order is not.
    reference = datasets.ImageFolder(tmp_path / "tiny-imagenet-200" / "train")
    assert reference.classes == sorted(TINY_WNIDS) != list(TINY_WNIDS)
    assert y.tolist() == reference.targets


def test_tiny_imagenet_rejects_images_that_are_not_64x64(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path)
    odd = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG"
    write_jpeg(odd, np.zeros((64, 80, 3), dtype=np.uint8))
    ds = folder_data.tiny_imagenet(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"val_2.JPEG is an image of shape \(3, 64, 80\)"):
        ds.test()


def test_tiny_imagenet_annotation_naming_an_unknown_wnid(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines[2] = lines[2].replace(TINY_WNIDS[1], "n00000000")
    annotations.write_text("\n".join(lines) + "\n")
    ds = folder_data.tiny_imagenet(tmp_path)
    with pytest.raises(DataNotFoundError, match="val_annotations.txt line 3 .*wnid of wnids.txt"):
        _ = ds.n_test


def test_tiny_imagenet_missing_annotated_image_fails_before_decoding(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_3.JPEG").unlink()
    ds = folder_data.tiny_imagenet(tmp_path)
    with pytest.raises(DataNotFoundError) as info:
        _ = ds.n_test  # counting already checks that every annotated file exists
    missing = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_3.JPEG"
    assert f"missing {missing} (expected the layout" in _one_line(info)


def test_tiny_imagenet_missing_train_is_reported_when_training_needs_it(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path)
    shutil.rmtree(tmp_path / "tiny-imagenet-200" / "train" / sorted(TINY_WNIDS)[1])
    ds = folder_data.tiny_imagenet(tmp_path)
    assert ds.n_test == 4  # evaluation does not need train/
    with pytest.raises(DataNotFoundError) as info:
        ds.train()
    message = _one_line(info)
    assert "no image for 1 of the 3 classes" in message and sorted(TINY_WNIDS)[1] in message
    shutil.rmtree(tmp_path / "tiny-imagenet-200" / "train")
    with pytest.raises(DataNotFoundError, match="missing .*tiny-imagenet-200/train "):
        folder_data.tiny_imagenet(tmp_path).train()


# ---------------------------------------------------------------------------------- ImageNet


def test_imagenet_val_is_resized_cropped_and_numbered_like_imagefolder(tmp_path: Path) -> None:
    written = write_imagenet(tmp_path)
    ds = folder_data.imagenet(tmp_path)
    assert (ds.name, ds.num_classes, ds.shape) == ("imagenet", 3, (3, 224, 224))
    x, y = ds.test()
    _check_images(x, y, ds, 6)
    greys, labels = _expected(written[False])
    _assert_greys(x, greys)
    assert y.tolist() == labels == [0, 0, 1, 1, 2, 2]
    reference = datasets.ImageFolder(tmp_path / "imagenet" / "val")
    assert reference.classes == sorted(IMAGENET_WNIDS) and y.tolist() == reference.targets
    x_train, y_train = ds.train()
    _check_images(x_train, y_train, ds, 3)
    assert y_train.tolist() == [0, 1, 2]


def _robustbench_reference(path: Path, resize: int, crop: int) -> torch.Tensor:
    """Resize 256 (shorter side, PIL bilinear) + center crop 224 + [0, 1], written out by hand."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(resize * long / short)
    size = (resize, new_long) if width <= height else (new_long, resize)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - crop) / 2)), int(round((size[1] - crop) / 2))
    image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_imagenet_preprocessing_is_robustbench_res256crop224(tmp_path: Path) -> None:
    # 400x300: red left half, blue right half, a green band on top that the crop removes.
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[:, :200, 0] = 255
    pixels[:, 200:, 2] = 255
    pixels[:10] = (0, 255, 0)
    path = tmp_path / "imagenet" / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG"
    write_jpeg(path, pixels)
    write_jpeg(path.with_name("ILSVRC2012_val_00000002.JPEG"), pixels.transpose(1, 0, 2).copy())
    ds = folder_data.imagenet(tmp_path)
    x, y = ds.subset(torch.tensor([0, 1]))
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 0]
    for i, name in enumerate(["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]):
        torch.testing.assert_close(x[i], _robustbench_reference(path.with_name(name), 256, 224))
    # Shorter side 300 -> 256 (341 wide), crop from column 58 and row 16: the band is gone and
    # the red/blue edge sits at column 112 of the crop.
    assert x[0, 1].max() < 0.2
    assert x[0, 0, :, :100].min() > 0.8 and x[0, 2, :, 125:].min() > 0.8
    assert x[1, 1].max() < 0.2 and x[1, 0, :100].min() > 0.8  # the transposed image: rows


def test_imagenet_resize_crop_and_interpolation_are_arguments(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    ds = folder_data.imagenet(tmp_path, resize=64, crop=48, interpolation="bicubic")
    assert ds.shape == (3, 48, 48) and ds.subset(torch.tensor([1]))[0].shape == (1, 3, 48, 48)
    with pytest.raises(ConfigError, match="crop=300, resize=256"):
        folder_data.imagenet(tmp_path, crop=300)
    with pytest.raises(ConfigError, match="interpolation='nearest'; allowed: bilinear, bicubic"):
        folder_data.imagenet(tmp_path, interpolation="nearest")  # type: ignore[arg-type]


def test_imagenet_flat_val_folder_says_how_to_sort_it(tmp_path: Path) -> None:
    write_jpeg(
        tmp_path / "imagenet" / "val" / "ILSVRC2012_val_00000001.JPEG", np.zeros((8, 8), np.uint8)
    )
    with pytest.raises(DataNotFoundError) as info:
        folder_data.imagenet(tmp_path)
    message = _one_line(info)
    assert "holds no <wnid>/ class folder; its images lie flat" in message
    assert "purebench data imagenet" in message and "image-net.org" in message


def test_imagenet_train_must_hold_the_wnids_of_val(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    shutil.rmtree(tmp_path / "imagenet" / "train" / IMAGENET_WNIDS[0])
    ds = folder_data.imagenet(tmp_path)
    assert ds.n_test == 6
    with pytest.raises(DataNotFoundError, match="has 2 class folders and val/ has 3"):
        ds.train()


# ------------------------------------------------------------------- lazy reading (both)


WRITERS = {"tiny_imagenet": write_tiny_imagenet, "imagenet": write_imagenet}
VAL_GLOBS = {"tiny_imagenet": "tiny-imagenet-200/val/images/*.JPEG", "imagenet": "imagenet/val/*/*"}


def _build(name: str, root: Path, **kwargs: float) -> ImageDataset:
    return getattr(folder_data, name)(root, **kwargs)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_subset_decodes_only_the_requested_images(tmp_path: Path, name: str) -> None:
    written = WRITERS[name](tmp_path)
    ds = _build(name, tmp_path)
    n = ds.n_test  # lists the files; decodes nothing
    # Sorted paths are the load order of both trees (val_0..val_3; val/<wnid>/<file>).
    paths = sorted(tmp_path.glob(VAL_GLOBS[name]))
    assert n == len(written[False]) == len(paths)
    greys, labels = _expected(written[False])
    # Every image but the two asked for is garbage now: reading any of them would fail.
    keep = [3, 1]
    for i, path in enumerate(paths):
        if i not in keep:
            path.write_bytes(b"not a jpeg")
    x, y = ds.subset(torch.tensor(keep))
    _check_images(x, y, ds, 2)
    _assert_greys(x, [greys[i] for i in keep])
    assert y.tolist() == [labels[i] for i in keep]
    with pytest.raises(DataNotFoundError, match=f"cannot read {paths[0]} "):
        ds.test()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_subset_equals_indexing_the_whole_split(tmp_path: Path, name: str) -> None:
    WRITERS[name](tmp_path)
    indices = torch.tensor([2, 0, 2])
    lazy = _build(name, tmp_path).subset(indices)
    whole = _build(name, tmp_path)
    x, y = whole.test()
    cached = whole.subset(indices)  # the split is cached: indexed, not read again
    for got in (lazy, cached):
        assert torch.equal(got[0], x[indices]) and torch.equal(got[1], y[indices])


def test_subset_on_a_preloaded_dataset_indexes_its_split() -> None:
    ds = data.digits(test_size=100)
    x, y = ds.test()
    indices = data.eval_subset(ds.n_test, 7, seed=1)
    sub_x, sub_y = ds.subset(indices)
    assert torch.equal(sub_x, x[indices]) and torch.equal(sub_y, y[indices])
    train_x, _ = ds.subset(torch.tensor([0, 1]), train=True)
    assert torch.equal(train_x, ds.train()[0][:2])


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_whole_split_above_the_preload_limit_is_refused(tmp_path: Path, name: str) -> None:
    WRITERS[name](tmp_path)
    ds = _build(name, tmp_path, max_preload_gb=1e-4)  # ~100 KB: less than 4 images
    with pytest.raises(ConfigError, match=r"test split has \d+ images.*ImageDataset.subset"):
        ds.test()
    assert ds.subset(torch.tensor([0]))[0].shape == (1, *ds.shape)
    with pytest.raises(ConfigError, match="max_preload_gb=0 must be > 0"):
        _build(name, tmp_path, max_preload_gb=0)


# ------------------------------------------------------------------------ missing files


@pytest.mark.parametrize(
    ("name", "directory", "layout", "how"),
    [
        (
            "tiny_imagenet",
            "tiny-imagenet-200",
            "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt",
            "purebench data tiny_imagenet --download",
        ),
        ("imagenet", "imagenet", "ImageFolder layout: val/<wnid>/*.JPEG", "ILSVRC2012_img_val.tar"),
    ],
)
def test_missing_files_raise_one_line_naming_directory_and_layout(
    tmp_path: Path, name: str, directory: str, layout: str, how: str
) -> None:
    with pytest.raises(DataNotFoundError) as info:
        _build(name, tmp_path)
    message = _one_line(info)
    assert f"not found in {tmp_path / directory}: missing " in message
    assert layout in message and how in message and "PUREBENCH_DATA_DIR" in message


# ----------------------------------------------------------------------------- prepare


def test_prepare_tiny_imagenet_unzips_the_official_zip(tmp_path: Path) -> None:
    source = tmp_path / "source"
    written = write_tiny_imagenet(source)
    root = tmp_path / "data"
    root.mkdir()
    with zipfile.ZipFile(root / "tiny-imagenet-200.zip", "w") as archive:
        for path in sorted(source.rglob("*")):
            archive.write(path, path.relative_to(source))
    assert data.prepare("tiny_imagenet", root) == root / "tiny-imagenet-200"
    x, y = folder_data.tiny_imagenet(root).test()
    _assert_greys(x, _expected(written[False])[0])


def test_prepare_tiny_imagenet_downloads_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_download(url: str, download_root: str) -> None:
        calls.append(url)
        write_tiny_imagenet(Path(download_root))

    monkeypatch.setattr(folder_data, "download_and_extract_archive", fake_download)
    with pytest.raises(DataNotFoundError, match="tiny-imagenet-200.zip"):
        data.prepare("tiny_imagenet", tmp_path)
    assert calls == []
    assert data.prepare("tiny_imagenet", tmp_path, download=True) == tmp_path / "tiny-imagenet-200"
    assert calls == [folder_data.TINY_IMAGENET_URL]
    data.prepare("tiny_imagenet", tmp_path, download=True)
    assert len(calls) == 1  # already there: nothing fetched again


def test_prepare_imagenet_sorts_the_val_tar_by_the_devkit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wnids = write_imagenet_archives(tmp_path / "imagenet")
    with pytest.raises(DataNotFoundError, match="torchvision could not load it"):
        data.prepare("imagenet", tmp_path)  # the md5 check is not bypassed
    skip_imagenet_md5(monkeypatch)
    assert data.prepare("imagenet", tmp_path) == tmp_path / "imagenet"
    ds = folder_data.imagenet(tmp_path)
    _, y = ds.test()
    # ImageFolder order: by sorted wnid, then by file name within a class.
    by_class = sorted(range(len(wnids)), key=lambda i: (wnids[i], i))
    assert y.tolist() == [sorted(IMAGENET_WNIDS).index(wnids[i]) for i in by_class]
    assert data.prepare("imagenet", tmp_path) == tmp_path / "imagenet"  # idempotent


def test_prepare_imagenet_without_archives_says_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        data.prepare("imagenet", tmp_path, download=True)
    message = _one_line(info)
    assert f"missing {tmp_path / 'imagenet' / 'ILSVRC2012_devkit_t12.tar.gz'}" in message
    assert "image-net.org" in message


# ------------------------------------------------------------------------------ configs, CLI


@pytest.mark.parametrize(
    ("name", "linf", "l2"), [("tiny_imagenet", 8 / 255, 0.5), ("imagenet", 4 / 255, 3.0)]
)
def test_configs_compose_build_and_carry_the_standard_budgets(
    compose_cfg, tmp_path: Path, name: str, linf: float, l2: float
) -> None:
    WRITERS[name](tmp_path)
    cfg = compose_cfg([f"dataset={name}", f"paths.data_dir={tmp_path}"])
    assert cfg.threat.norm == "Linf" and cfg.threat.eps == pytest.approx(linf)
    ds = instantiate(cfg.dataset)
    assert ds.name == name and ds.n_test == len(WRITERS[name](tmp_path / "again")[False])
    l2_cfg = compose_cfg([f"dataset={name}", "threat=l2"])
    assert l2_cfg.threat.norm == "L2" and l2_cfg.threat.eps == l2


@pytest.mark.parametrize("name", ["tiny_imagenet", "imagenet"])
def test_cli_missing_data_is_one_error_line(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    proc = cli([f"dataset={name}", f"paths.data_dir={missing}", "device=cpu"], tmp_path)
    line = one_error_line(proc)
    folder = {"tiny_imagenet": "tiny-imagenet-200", "imagenet": "imagenet"}[name]
    assert f"not found in {missing / folder}: missing " in line
    assert "expected" in line and f"purebench data {name}" in line
    assert not list(tmp_path.rglob("record.json"))


@pytest.mark.slow
def test_cli_runs_on_fabricated_tiny_imagenet(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path / "data")
    proc = cli(
        [
            "dataset=tiny_imagenet",
            f"paths.data_dir={tmp_path / 'data'}",
            "classifier=small_cnn",
            "classifier.recipe.epochs=1",
            "suite=pgd",
            "suite.attacks.pgd.steps=2",
            "n_samples=4",
            "batch_size=4",
            "diagnostics.enabled=false",
            "escalation.enabled=false",
            "device=cpu",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.results_dir={tmp_path / 'results'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "results" / "runs" / "tiny_imagenet").rglob("record.json")
    record = json.loads(path.read_text())
    assert record["status"] == "completed" and record["n_samples"] == 4
    assert record["threat"]["eps"] == pytest.approx(8 / 255)

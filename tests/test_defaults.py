"""Defaults that fit the machine and the dataset: ``threads: auto`` and ``recipe.min_steps``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import bench.devices as devices
from bench.devices import auto_threads, resolve_threads, set_threads, usable_cpus
from bench.engine.plan import check_scalars
from bench.models.training import Recipe
from common.errors import ConfigError


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_auto_threads_rule(cpus: int, threads: int) -> None:
    assert auto_threads(cpus) == threads


def test_auto_and_null_resolve_from_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "usable_cpus", lambda: 8)
    assert resolve_threads("auto") == resolve_threads(None) == auto_threads(8)
    assert resolve_threads(3) == 3  # an explicit count is taken as given, even above the CPUs


@pytest.mark.parametrize("value", [0, -2, "foo", "2", 1.5, True])
def test_bad_threads_name_the_value(value: object) -> None:
    with pytest.raises(ConfigError, match=f"threads={value!r} is not allowed; use auto"):
        resolve_threads(value)


def test_usable_cpus_reads_the_affinity_and_the_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(devices, "CGROUP_CPU_MAX", str(tmp_path / "missing"))
    assert usable_cpus() == 4
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(devices, "CGROUP_CPU_MAX", str(quota))
    for text, cpus in [("max 100000\n", 4), ("250000 100000\n", 2), ("50000 100000\n", 1)]:
        quota.write_text(text)
        assert usable_cpus() == cpus, text


def test_set_threads_sets_torch() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("config_name", ["eval", "train", "train_purifier"])
def test_configs_default_to_auto_threads(compose_cfg, config_name: str) -> None:
    assert compose_cfg([], config_name=config_name).threads == "auto"


@pytest.mark.parametrize(
    ("value", "ok"), [("auto", True), ("null", True), ("3", True), ("foo", False)]
)
def test_run_config_checks_threads(compose_cfg, value: str, ok: bool) -> None:
    cfg = compose_cfg(["dataset=digits", f"threads={value}"])
    if ok:
        check_scalars(cfg)
    else:
        with pytest.raises(ConfigError, match="threads='foo'"):
            check_scalars(cfg)


def test_min_steps_raises_the_epochs_of_a_small_training_set() -> None:
    recipe = Recipe(epochs=6, batch_size=128, min_steps=200)
    assert recipe.epochs_for(1297) == 19  # digits: 11 steps an epoch
    assert recipe.epochs_for(60_000) == 6  # Fashion-MNIST: 469 steps an epoch
    assert Recipe(epochs=6).epochs_for(1297) == 6
    with pytest.raises(ConfigError, match="recipe min_steps=0"):
        Recipe(min_steps=0)


def test_default_digits_classifier_trains_enough_steps(compose_cfg) -> None:
    recipe = instantiate(compose_cfg(["dataset=digits"]).classifier.recipe)
    n_train = 1797 - compose_cfg(["dataset=digits"]).dataset.test_size
    steps = recipe.epochs_for(n_train) * -(-n_train // recipe.batch_size)
    assert steps >= 200, (recipe, steps)


def test_min_steps_keeps_the_cache_key_of_a_training_it_does_not_change() -> None:
    from dataclasses import replace

    from bench.data import digits
    from bench.models.architectures import SmallCNN
    from bench.models.training import classifier_entry

    ds, root = digits(), Path("unused")
    base = Recipe(epochs=6, batch_size=128)

    def key(recipe: Recipe) -> str:
        return classifier_entry(SmallCNN, recipe, 0, ds, root).key

    # 1297 digits images at batch 128: 11 steps an epoch, 66 in 6 epochs.
    assert key(replace(base, min_steps=50)) == key(base)  # inert: the old entry stays valid
    assert key(replace(base, min_steps=200)) == key(replace(base, epochs=19))


def test_a_network_trained_on_one_digits_split_is_never_reused_on_another() -> None:
    """The split's arguments are in the cache key (a network trained on one split has seen test
    images of another); datasets whose files fix the split keep the key they always had."""
    from bench.data import ImageDataset, digits
    from bench.models.architectures import SmallCNN
    from bench.models.training import classifier_entry

    recipe, root = Recipe(epochs=6, batch_size=128), Path("unused")
    keys = {
        (size, seed): classifier_entry(SmallCNN, recipe, 0, digits(size, seed), root).key
        for size, seed in [(500, 0), (400, 0), (500, 1)]
    }
    assert len(set(keys.values())) == 3, keys
    fixed = ImageDataset(name="fixed", num_classes=10, shape=(1, 8, 8), _load=lambda train: None)
    assert fixed.identity(num_classes=True) == {
        "name": "fixed",
        "shape": [1, 8, 8],
        "num_classes": 10,
    }

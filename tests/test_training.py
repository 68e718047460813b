from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import bench.models.training as training
from attacks.pgd import PGD
from bench.data import digits
from bench.models.architectures import SmallCNN
from bench.models.cache import cache_key, canonical
from bench.models.training import Recipe, train_or_load


def test_cache_key_is_the_same_from_yaml_and_from_python(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(["classifier=small_cnn_at", "dataset=digits", f"paths.cache_dir={tmp_path}"])
    source = instantiate(cfg.classifier)
    by_hand = Recipe(
        epochs=cfg.classifier.recipe.epochs,
        batch_size=128,
        lr=0.05,
        momentum=0.9,
        weight_decay=0.0005,
        adversary=functools.partial(
            PGD, norm="Linf", eps=0.1, steps=3, rel_stepsize=None, random_start=True
        ),
    )
    assert canonical(source.recipe) == canonical(by_hand)
    spec = {"arch": functools.partial(SmallCNN), "recipe": by_hand, "seed": 0}
    assert cache_key({**spec, "recipe": source.recipe}) == cache_key(spec)
    assert cache_key({**spec, "seed": 1}) != cache_key(spec)
    eps_changed = Recipe(adversary=functools.partial(PGD, norm="Linf", eps=0.2, steps=5))
    assert cache_key({**spec, "recipe": eps_changed}) != cache_key(spec)


def test_canonical_rejects_what_it_cannot_fingerprint() -> None:
    with pytest.raises(TypeError, match="cannot fingerprint"):
        canonical({"x": object()})


@pytest.fixture(scope="module")
def data():
    return digits()


def test_train_then_reuse_from_cache(data, tmp_path: Path, monkeypatch) -> None:
    arch = functools.partial(SmallCNN, width=8, hidden=32)
    recipe = Recipe(epochs=20, batch_size=64, lr=0.1, n_train=1000)
    cpu = torch.device("cpu")
    model, info = train_or_load(arch, recipe, seed=0, dataset=data, device=cpu, cache_dir=tmp_path)
    entry = Path(info["checkpoint"]).parent
    assert {p.name for p in entry.iterdir()} == {"weights.pt", "spec.json", "metrics.json"}
    metrics = json.loads((entry / "metrics.json").read_text())
    assert metrics["n_train"] == 1000 and len(metrics["epochs"]) == 20
    assert metrics["test_clean_acc"] > 0.8, metrics
    assert "test_robust_acc" not in metrics
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    # A second call must not train: it loads the checkpoint and gives the same logits.
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(training, "train_classifier", no_training)
    again, info2 = train_or_load(arch, recipe, seed=0, dataset=data, device=cpu, cache_dir=tmp_path)
    assert info2 == info
    x = data.test()[0][:32]
    torch.testing.assert_close(again(x), model(x))


def test_adversarial_training_reports_robust_accuracy(data, tmp_path: Path) -> None:
    adversary = functools.partial(PGD, norm="Linf", eps=0.1, steps=3)
    recipe = Recipe(
        epochs=2, batch_size=64, n_train=400, adversary=adversary, eval_steps=5, eval_samples=100
    )
    _, info = train_or_load(
        functools.partial(SmallCNN, width=8, hidden=32),
        recipe,
        seed=0,
        dataset=data,
        device=torch.device("cpu"),
        cache_dir=tmp_path,
    )
    robust = info["training"]["test_robust_acc"]
    assert robust["n"] == 100 and robust["eps"] == 0.1 and robust["attack"] == "PGD-5"
    assert 0 <= robust["acc"] <= info["training"]["test_clean_acc"]

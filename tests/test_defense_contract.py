"""The defense contract, checked on every conf/defense/*.yaml and on planted violators.

A defense maps NCHW images in [0, 1] to images of the same shape, dtype and device in [0, 1];
its randomness comes only from the generator (same generator state, bit-identical output); its
`info.stochastic` matches what it does; if it declares itself differentiable, gradients through
`purify` are finite and not all zero.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from bench.models.parts import prepare_parts
from defenses.base import Defense, DefenseInfo
from tests.planted import Blur, Detach, GaussianNoise, Quantize
from tests.test_configs import options


def check_contract(defense: Defense, x: Tensor) -> None:
    """Raise AssertionError naming the first broken clause of the contract."""
    info = type(defense).info
    assert isinstance(info, DefenseInfo), "info must be a DefenseInfo class attribute"

    def run(seed: int) -> Tensor:
        return defense.purify(x, generator=torch.Generator().manual_seed(seed))

    torch.manual_seed(1)
    out = run(0)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device, "shape"
    assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1, "range [0, 1]"
    # Scramble the global RNG: a defense that draws from it is not reproducible.
    torch.manual_seed(2)
    assert torch.equal(run(0), out), "same generator state must give the same images"
    differs = not torch.equal(run(1), out)
    assert differs == info.stochastic, (
        f"declares stochastic={info.stochastic} but different generators "
        f"{'change' if differs else 'do not change'} the output"
    )
    if info.differentiable:
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            purified = defense.purify(xg, generator=torch.Generator().manual_seed(0))
            assert purified.requires_grad, "declared differentiable but purify cuts the graph"
            (grad,) = torch.autograd.grad(purified.square().sum(), xg)
        assert torch.isfinite(grad).all(), "non-finite gradients"
        assert grad.abs().sum() > 0, "declared differentiable but all gradients are zero"


# Seconds-long versions of the generative parts the harness trains (the contract, not the
# quality, is tested here).
TINY_PARTS = {
    "score": [
        "defense.score.recipe.steps=20",
        "defense.score.recipe.eval_samples=50",
        "defense.score.arch.block_out_channels=[16,32,32]",
    ],
}
TINY_TRAIN_STEPS = 3


def tiny_part_overrides(node: DictConfig, prefix: str = "defense") -> list[str]:
    """Overrides that cut every trainable part's ``train.steps`` (and its stages') to a few."""
    overrides = []
    for key, value in node.items():
        if not isinstance(value, DictConfig):
            continue
        if value.get("_target_") == "bench.models.parts.TrainedPart":
            train = value.get("train")
            if isinstance(train, DictConfig) and "steps" in train:
                overrides.append(f"{prefix}.{key}.train.steps={TINY_TRAIN_STEPS}")
        overrides += tiny_part_overrides(value, f"{prefix}.{key}")
    return overrides


def tiny_classifier(dataset: Any) -> nn.Module:
    """An untrained two-layer CNN: the protected classifier of parts trained against one."""
    c, h, w = dataset.shape
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(c, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * h * w, dataset.num_classes),
    )
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize("name", options("defense"))
def test_every_configured_defense_keeps_the_contract(compose_cfg, cache_dir, name: str) -> None:
    overrides = [f"defense={name}", "dataset=digits", f"paths.cache_dir={cache_dir}"]
    node = compose_cfg(overrides).defense
    for part, tiny in TINY_PARTS.items():
        if part in node:
            overrides += tiny
    overrides += tiny_part_overrides(node)
    cfg = compose_cfg(overrides)
    defense = instantiate(cfg.defense)
    dataset = instantiate(cfg.dataset)
    classifier = tiny_classifier(dataset)
    prepare_parts(
        defense,
        dataset,
        torch.device("cpu"),
        classifier=classifier,
        classifier_info={"key": "tiny"},
    )
    x = torch.rand(4, *dataset.shape, generator=torch.Generator().manual_seed(0))
    check_contract(defense.eval(), x)


@pytest.mark.parametrize("defense", [Blur(), GaussianNoise()], ids=["blur", "noise"])
def test_planted_honest_defenses_pass(defense: Defense) -> None:
    check_contract(defense, torch.rand(4, 1, 8, 8))


class GlobalNoise(GaussianNoise):
    """Draws its noise from torch's global RNG, ignoring the generator."""

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp(0, 1)


class Unclamped(Blur):
    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return x * 2 - 0.5


class SecretlyRandom(Blur):
    """Declares itself deterministic but uses the generator."""

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return (x + 0.01 * torch.rand(x.shape, generator=generator)).clamp(0, 1)


@pytest.mark.parametrize(
    ("defense", "clause"),
    [
        (GlobalNoise(), "same generator state"),
        (Unclamped(), "range"),
        (SecretlyRandom(), "declares stochastic=False"),
        (Quantize(), "all gradients are zero"),
        (Detach(), "cuts the graph"),
    ],
    ids=["global-rng", "unclamped", "secretly-random", "quantize", "detach"],
)
def test_contract_catches_violations(defense: Defense, clause: str) -> None:
    with pytest.raises(AssertionError, match=clause):
        check_contract(defense, torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)))

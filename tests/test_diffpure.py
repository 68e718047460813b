"""DiffPure (defenses/diffpure.py): the contract, the sampler's maths, gradients, the config.

A tiny random-weight UNet on 8x8 images keeps every test to about a second; the sampler's
maths is checked against a score model known in closed form (Gaussian data).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from common.errors import ConfigError
from defenses.diffpure import DiffPure
from defenses.score import VPSDE, ScoreNet, small_unet
from tests.test_defense_contract import check_contract


class Counting(nn.Module):
    """Wraps a noise-prediction network and counts its forward calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        out = self.net(x, t)
        return out.sample if hasattr(out, "sample") else out


class GaussianEps(nn.Module):
    """The exact noise prediction for data ``N(0, s^2 I)`` in [-1, 1] (fed ``t`` unscaled).

    ``p_t = N(0, alpha_bar s^2 + 1 - alpha_bar)``, so ``eps = sqrt(1 - ab) x / (ab s^2 + 1 - ab)``.
    """

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s, self.sde = s, VPSDE()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        ab = self.sde.alpha_bar(t).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * x / (ab * self.s**2 + 1 - ab)


def tiny_score(*, frozen: bool = True, counting: bool = False) -> ScoreNet:
    torch.manual_seed(0)
    net: nn.Module = small_unet(1, 8, block_out_channels=(16, 32, 32))
    if counting:
        net = Counting(net)
    return ScoreNet(net).eval().requires_grad_(not frozen)


def images(n: int = 4, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def purify(defense: DiffPure, x: Tensor, seed: int, *, surrogate: bool = False) -> Tensor:
    fn = defense.surrogate if surrogate else defense.purify
    return fn(x, generator=torch.Generator().manual_seed(seed))


def input_gradient(defense: DiffPure, x: Tensor, seed: int, *, surrogate: bool = False) -> Tensor:
    """Gradient of ``sum(purify(x) * w)`` for a fixed random ``w``, with this generator seed."""
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(123))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((purify(defense, xg, seed, surrogate=surrogate) * w).sum(), xg)
    return grad


def gradient_agreement(a: DiffPure, b: DiffPure, x: Tensor, seed: int) -> Tensor:
    """Per-image cosine similarity of the input gradients of two defenses (same generator)."""
    ga, gb = input_gradient(a, x, seed), input_gradient(b, x, seed)
    return nn.functional.cosine_similarity(ga.flatten(1), gb.flatten(1), dim=1)


# -- the contract ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"method": "ode"}, {"gradient": "adjoint"}, {"checkpoint": True}],
    ids=["sde", "ode", "adjoint", "checkpoint"],
)
def test_keeps_the_defense_contract(kwargs: dict) -> None:
    check_contract(DiffPure(tiny_score(), steps=5, **kwargs), images())


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_output_and_reproducibility(method: str) -> None:
    defense = DiffPure(tiny_score().double(), steps=5, method=method)
    x = images().double()
    out = purify(defense, x, 0)
    assert out.shape == x.shape and out.dtype == torch.float64
    assert 0 <= out.min() and out.max() <= 1
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(purify(defense, x, 0), out)
    assert not torch.equal(purify(defense, x, 1), out)


def test_no_generator_means_fresh_randomness_from_the_default_generator() -> None:
    defense = DiffPure(tiny_score(), steps=3)
    x = images()
    torch.manual_seed(5)
    first, second = defense.purify(x), defense.purify(x)
    assert not torch.equal(first, second)
    torch.manual_seed(5)  # one draw of the default generator seeds the private one
    assert torch.equal(defense.purify(x), first)


def test_ode_uses_only_the_forward_noise_and_differs_from_the_sde() -> None:
    x = images()
    ode = DiffPure(tiny_score(), steps=5, method="ode")
    gen = torch.Generator().manual_seed(0)
    out = ode.purify(x, generator=gen)
    # The ODE draws exactly the forward noise: afterwards the generator is where one draw of
    # x.shape normals leaves it, so its output is a function of that noise alone.
    reference = torch.Generator().manual_seed(0)
    torch.randn(x.shape, generator=reference)
    assert torch.equal(gen.get_state(), reference.get_state())
    assert torch.equal(purify(ode, x, 0), out)
    sde = DiffPure(tiny_score(), steps=5, method="sde")
    assert not torch.allclose(purify(sde, x, 0), out)


# -- the sampler against a score known in closed form ---------------------------------------


def test_reverse_sde_maps_the_data_distribution_to_itself() -> None:
    """Data ``N(0, s^2)``: diffuse-then-denoise keeps it, and pulls a far input to the prior."""
    s = 0.2
    defense = DiffPure(ScoreNet(GaussianEps(s), timestep_scale=1.0), t_star=0.3, steps=20)
    x = 0.5 + s / 2 * torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = 2 * purify(defense, x, 1) - 1
    assert abs(out.mean()) < 0.02 and abs(out.std() - s) < 0.02
    # From x0 = 1 (5 std away), the exact output mean is ab s^2 / (ab s^2 + 1 - ab) = 0.026.
    far = 2 * purify(defense, torch.ones(64, 1, 8, 8), 1) - 1
    assert abs(far.mean()) < 0.06


def test_probability_flow_ode_converges_to_the_gaussian_flow_map() -> None:
    """For Gaussian data the ODE maps ``x_t`` to ``s x_t / sqrt(ab s^2 + 1 - ab)``.

    Euler's error is first order: below 8% at 20 steps, and 4x the steps cut it at least 3x.
    """
    s, x = 0.2, torch.ones(64, 1, 8, 8)
    ab = float(VPSDE().alpha_bar(0.3))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x_t = math.sqrt(ab) + math.sqrt(1 - ab) * z
    exact = s * x_t / math.sqrt(ab * s**2 + 1 - ab)

    def error(steps: int) -> float:
        score = ScoreNet(GaussianEps(s), timestep_scale=1.0)
        out = 2 * purify(DiffPure(score, t_star=0.3, steps=steps, method="ode"), x, 1) - 1
        return float((out - exact).norm() / exact.norm())

    coarse, fine = error(20), error(80)
    assert coarse < 0.08 and fine < coarse / 3


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_exact_gradients_and_checkpointing_agree(method: str) -> None:
    score, x = tiny_score(), images()
    plain = input_gradient(DiffPure(score, steps=6, method=method), x, 3)
    assert torch.isfinite(plain).all() and plain.abs().sum() > 0
    ckpt = input_gradient(DiffPure(score, steps=6, method=method, checkpoint=True), x, 3)
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_adjoint_agrees_with_backprop(frozen: bool) -> None:
    """Same generator, same Brownian path: the forward passes match and the gradients align.

    The adjoint re-solves the 20 coarse Euler steps backwards, so its gradient is approximate:
    the per-image cosine to backprop's must exceed 0.9.
    """
    score, x = tiny_score(frozen=frozen), images()
    backprop = DiffPure(score, steps=20)
    adjoint = DiffPure(score, steps=20, gradient="adjoint")
    torch.testing.assert_close(purify(adjoint, x, 3), purify(backprop, x, 3))
    cosine = gradient_agreement(backprop, adjoint, x, 3)
    assert (cosine > 0.9).all(), f"per-image cosine {cosine.tolist()}"


def test_checkpointing_keeps_only_step_boundaries() -> None:
    """With checkpoint=True a 40-step chain saves a small fraction of the activations."""

    def saved_bytes(checkpoint: bool) -> int:
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        defense = DiffPure(tiny_score(), steps=40, checkpoint=checkpoint)
        xg = images().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = purify(defense, xg, 0)
        (grad,) = torch.autograd.grad(out.sum(), xg)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        return total

    assert saved_bytes(True) < saved_bytes(False) / 10


# -- the attack-only surrogate --------------------------------------------------------------


def test_surrogate_runs_fewer_steps_and_is_differentiable() -> None:
    score = tiny_score(counting=True)
    counter = score.net
    defense = DiffPure(score, steps=8, surrogate_steps=2, gradient="adjoint")
    assert defense.calls_per_purify == 8 and DiffPure.info.purifier_calls == 10
    x = images()
    counter.calls = 0
    purify(defense, x, 0)
    full = counter.calls
    counter.calls = 0
    grad = input_gradient(defense, x, 0, surrogate=True)
    forward_calls = counter.calls  # backprop: the backward pass calls nothing
    assert forward_calls == 2 < full
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_surrogate_is_purify_without_surrogate_steps() -> None:
    defense = DiffPure(tiny_score(), steps=4)
    x = images()
    assert torch.equal(purify(defense, x, 0, surrogate=True), purify(defense, x, 0))


def test_purify_calls_the_network_once_per_step() -> None:
    score = tiny_score(counting=True)
    purify(DiffPure(score, steps=7), images(), 0)
    assert score.net.calls == 7


# -- arguments and configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t_star": 0.0}, "t_star=0.0"),
        ({"t_star": 1.5}, "t_star=1.5"),
        ({"t_star": float("nan")}, "t_star=nan"),
        ({"steps": 0}, "steps=0"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"method": "euler"}, "method='euler'"),
        ({"gradient": "adjoints"}, "gradient='adjoints'"),
        ({"gradient": "adjoint", "method": "ode"}, "method='ode'"),
        ({"checkpoint": "yes"}, "checkpoint='yes'"),
        ({"surrogate_steps": 0}, "surrogate_steps=0"),
        ({"t_end": 0.3}, "t_end=0.3"),
        ({"t_end": -1e-3}, "t_end=-0.001"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        DiffPure(tiny_score(), **kwargs)


def test_config_composes_and_instantiates(compose_cfg) -> None:
    from bench.models.score import TrainedScoreNet

    cfg = compose_cfg(["defense=diffpure"])
    assert cfg.defense._target_ == "defenses.diffpure.DiffPure"
    # The YAML is the constructor's keyword arguments, all of them and nothing else.
    assert set(cfg.defense) - {"_target_"} == set(inspect.signature(DiffPure).parameters)
    defense = instantiate(cfg.defense)
    assert isinstance(defense, DiffPure) and isinstance(defense.score, TrainedScoreNet)
    assert (defense.t_star, defense.steps, defense.method) == (0.1, 10, "sde")
    assert defense.gradient == "backprop" and defense.surrogate_steps is None

"""PurSAMERE: deterministic, exactly differentiable (second order), SAM vs plain descent, config.

A tiny random-weight score model on 8x8 images keeps every test at CPU speed; the properties
checked (determinism, projection, gradient structure, call counts) do not need a trained one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from common.errors import ConfigError
from defenses.pursamere import PurSAMERE
from defenses.score import ScoreNet, small_unet
from tests.test_defense_contract import check_contract


class Counting(nn.Module):
    """Wraps a noise-prediction network and counts the images it is evaluated on."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x: Tensor, t: Tensor):
        self.images += len(x)
        return self.net(x, t)


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    torch.manual_seed(0)
    # Frozen, as the harness's prepare() leaves it: gradients are only ever wanted for images.
    return small_unet(1, 8, block_out_channels=(16, 32, 32)).eval().requires_grad_(False)


@pytest.fixture
def score(unet: nn.Module) -> ScoreNet:
    return ScoreNet(Counting(unet))


def make(score: ScoreNet, **kwargs) -> PurSAMERE:
    # Two noise draws (the default is one), so the tests see the ERE average over K.
    return PurSAMERE(score, **{"steps": 3, "n_noise": 2, **kwargs}).eval()


def images(n: int = 6, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def exact_grad(defense: PurSAMERE, x: Tensor) -> Tensor:
    xg = x.clone().requires_grad_(True)
    out = defense.purify(xg)
    (grad,) = torch.autograd.grad(out.square().sum(), xg)
    return grad


# -- 1. determinism and the contract ----------------------------------------------------------


def test_keeps_the_defense_contract(score: ScoreNet) -> None:
    check_contract(make(score), images(4))


def test_shape_range_dtype_and_bitwise_determinism(score: ScoreNet) -> None:
    defense, x = make(score), images()
    out = defense.purify(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, x), "the purifier did not move the images"
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(defense.purify(x), out)
    # A fresh instance with the same noise_seed is the same defense.
    assert torch.equal(make(score).purify(x), out)
    assert not torch.equal(make(score, noise_seed=1).purify(x), out)


def test_generator_is_ignored(score: ScoreNet) -> None:
    defense, x = make(score), images()
    out = defense.purify(x)
    for seed in (0, 1, 2):
        assert torch.equal(defense.purify(x, generator=torch.Generator().manual_seed(seed)), out)


def test_same_output_under_no_grad_and_inference_mode(score: ScoreNet) -> None:
    defense, x = make(score), images()
    with torch.enable_grad():
        ref = defense.purify(x)
    with torch.no_grad():
        assert torch.equal(defense.purify(x), ref)
    with torch.inference_mode():
        assert torch.equal(defense.purify(x), ref)
        inference_x = x.clone()  # an inference tensor, which autograd refuses
        assert torch.equal(defense.purify(inference_x), ref)
    assert inference_x.is_inference()
    assert torch.equal(defense.purify(inference_x), ref)
    # The noise first drawn under inference_mode is not an inference tensor: the exact path
    # still works after it.
    fresh = make(score)
    with torch.inference_mode():
        fresh.purify(x)
    assert torch.isfinite(exact_grad(fresh, x)).all()
    # The exact (create_graph) path computes the same images up to float rounding.
    torch.testing.assert_close(defense.purify(x.clone().requires_grad_(True)).detach(), ref)


def test_an_image_does_not_depend_on_its_batch(score: ScoreNet) -> None:
    defense, x = make(score), images()
    batched = defense.purify(x)
    for i in range(len(x)):
        torch.testing.assert_close(defense.purify(x[i : i + 1])[0], batched[i])
    torch.testing.assert_close(defense.purify(x.flip(0)), batched.flip(0))


# -- 2. the neighbourhood ---------------------------------------------------------------------


@pytest.mark.parametrize("radius", [0.02, 0.15])
def test_output_stays_within_the_linf_radius_and_in_range(score: ScoreNet, radius: float) -> None:
    # Long steps, so that the projection is active.
    defense, x = make(score, radius=radius, step_size=2.0), images()
    out = defense.purify(x)
    moved = (out - x).abs()
    assert moved.max() <= radius + 1e-6
    assert 0 <= out.min() and out.max() <= 1
    assert (moved > radius - 1e-6).any(), "the projection was never active"


# -- 3. exact, second-order gradients --------------------------------------------------------


def test_exact_gradient_is_second_order_not_bpda(score: ScoreNet) -> None:
    defense, x = make(score), images()
    exact = exact_grad(defense, x)
    assert torch.isfinite(exact).all() and exact.abs().sum() > 0
    # What a detached inner loop would give: the loop's output, identity backward (BPDA).
    xg = x.clone().requires_grad_(True)
    bpda_out = xg + (defense.purify(x) - xg).detach()
    (bpda,) = torch.autograd.grad(bpda_out.square().sum(), xg)
    assert (exact - bpda).abs().max() > 1e-2 * bpda.abs().max()


def test_exact_gradient_matches_finite_differences(unet: nn.Module) -> None:
    # In float64 a central difference along a random direction checks the whole chain rule,
    # second-order terms included (h is far too small to cross the projection's kinks).
    defense = make(ScoreNet(copy.deepcopy(unet).double()))
    x = images(3).double()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    h = 1e-6

    def loss(z: Tensor) -> Tensor:
        return defense.purify(z).square().sum()

    with torch.no_grad():
        numeric = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    analytic = (exact_grad(defense, x) * v).sum()
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-6)


def test_checkpoint_gives_the_same_gradient(score: ScoreNet) -> None:
    x = images()
    plain = exact_grad(make(score), x)
    ckpt = make(score, checkpoint=True)
    torch.testing.assert_close(exact_grad(ckpt, x), plain, rtol=1e-4, atol=1e-4)
    # The forward value of the checkpointed path is the cheap path's, bit for bit.
    with torch.no_grad():
        ref = ckpt.purify(x)
    assert torch.equal(ckpt.purify(x.clone().requires_grad_(True)).detach(), ref)
    # .backward() works as well as autograd.grad.
    xg = x.clone().requires_grad_(True)
    ckpt.purify(xg).square().sum().backward()
    torch.testing.assert_close(xg.grad, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inner_checkpoint", [False, True])
def test_gradient_under_the_views_own_checkpoint(score: ScoreNet, inner_checkpoint: bool) -> None:
    # bench.attack_view may wrap the whole purify in a non-reentrant checkpoint.
    x = images()
    plain = exact_grad(make(score), x)
    defense = make(score, checkpoint=inner_checkpoint)
    xg = x.clone().requires_grad_(True)
    out = checkpoint(defense.purify, xg, use_reentrant=False)
    (grad,) = torch.autograd.grad(out.square().sum(), xg)
    torch.testing.assert_close(grad, plain, rtol=1e-4, atol=1e-4)


# -- 4. SAM on and off -----------------------------------------------------------------------


def test_sam_off_is_plain_descent_with_half_the_calls(score: ScoreNet) -> None:
    x = images()
    sam, plain = make(score), make(score, sam_rho=0.0)
    counter = score.net
    counter.images = 0
    out_sam = sam.purify(x)
    sam_calls, counter.images = counter.images, 0
    out_plain = plain.purify(x)
    plain_calls = counter.images
    assert not torch.allclose(out_sam, out_plain)
    assert sam_calls == 2 * plain_calls
    # The declared count is what is run: 2 K T (K T without SAM) per image.
    assert sam_calls == sam.calls_per_purify * len(x) == 2 * 2 * 3 * len(x)
    assert plain_calls == plain.calls_per_purify * len(x)
    assert PurSAMERE.info.purifier_calls == PurSAMERE(score).calls_per_purify


# -- 5. the objective and the defense-aware term ---------------------------------------------


def test_attack_loss_is_minus_ere_and_differentiable(score: ScoreNet) -> None:
    defense, x = make(score), images()
    xg = x.clone().requires_grad_(True)
    term = defense.attack_loss(xg)
    assert term.shape == (len(x),)
    torch.testing.assert_close(term, -defense.ere(x))
    assert (term < 0).all()
    # Deterministic: the generator the attack view hands over is ignored.
    assert torch.equal(
        defense.attack_loss(x, generator=torch.Generator().manual_seed(3)), -defense.ere(x)
    )
    (grad,) = torch.autograd.grad(term.sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_ere_is_per_image(score: ScoreNet) -> None:
    defense, x = make(score), images()
    batched = defense.ere(x)
    torch.testing.assert_close(defense.ere(x[2:3]), batched[2:3])


def test_purification_lowers_the_reconstruction_error(score: ScoreNet) -> None:
    defense = make(score, steps=5)
    # Noisy inputs, as an adversarial perturbation makes them.
    x = (images(8, seed=3) * 0.5 + 0.25 + 0.1 * torch.randn(8, 1, 8, 8)).clamp(0, 1)
    out = defense.purify(x)
    with torch.no_grad():
        before, after = defense.ere(x), defense.ere(out)
    assert after.mean() < before.mean()
    assert (after <= before).float().mean() >= 0.75


# -- 6. the surrogate ------------------------------------------------------------------------


def test_surrogate_is_the_truncated_purifier(score: ScoreNet) -> None:
    x = images()
    defense = make(score, steps=4, surrogate_steps=1)
    counter = score.net
    counter.images = 0
    cheap = defense.surrogate(x, generator=torch.Generator().manual_seed(0))
    assert counter.images == defense.calls_per_purify * len(x) // 4
    assert torch.equal(cheap, make(score, steps=1).purify(x))
    assert not torch.equal(cheap, defense.purify(x))
    # Unset, the surrogate is the purifier itself.
    assert torch.equal(make(score).surrogate(x), make(score).purify(x))
    # Differentiable, as grad=surrogate needs.
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(defense.surrogate(xg).sum(), xg)
    assert grad.abs().sum() > 0


def test_approx_is_the_identity(score: ScoreNet) -> None:
    x = images()
    assert make(score).approx(x) is x


# -- 7. argument checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"sigma": 0.0}, "sigma=0.0"),
        ({"sigma": float("nan")}, "sigma=nan"),
        ({"n_noise": 0}, "n_noise=0"),
        ({"n_noise": 2.5}, "n_noise=2.5"),
        ({"steps": 0}, "steps=0"),
        ({"steps": True}, "steps=True"),
        ({"step_size": -0.1}, "step_size=-0.1"),
        ({"sam_rho": -1.0}, "sam_rho=-1.0"),
        ({"radius": 0}, "radius=0"),
        ({"noise_seed": -3}, "noise_seed=-3"),
        ({"checkpoint": "yes"}, "checkpoint='yes'"),
        ({"surrogate_steps": 0}, "surrogate_steps=0"),
        ({"steps": 3, "surrogate_steps": 5}, "surrogate_steps=5"),
    ],
)
def test_bad_arguments_are_refused(score: ScoreNet, kwargs: dict, bad: str) -> None:
    with pytest.raises(ConfigError, match=bad.replace("(", r"\(")) as info:
        PurSAMERE(score, **kwargs)
    assert "must be" in str(info.value)


# -- 8. the config ---------------------------------------------------------------------------


def test_config_composes_with_the_shared_score_model(compose_cfg) -> None:
    from bench.models.score import TrainedScoreNet

    cfg = compose_cfg(["defense=pursamere"])
    assert cfg.defense._target_ == "defenses.pursamere.PurSAMERE"
    assert cfg.defense.score._target_ == "bench.models.score.TrainedScoreNet"
    defense = instantiate(cfg.defense)
    assert isinstance(defense, PurSAMERE) and isinstance(defense.score, TrainedScoreNet)
    assert defense.score.net is None, "the score model is trained by prepare(), not at build"
    assert defense.calls_per_purify == PurSAMERE.info.purifier_calls
    assert defense.surrogate_steps is not None and defense.surrogate_steps < defense.steps
    assert defense.radius >= cfg.threat.eps, "the neighbourhood must be able to undo eps"

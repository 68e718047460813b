"""AMRM-Pure with MaskDiT: the network, its training, the reconstructor, purification, configs.

Tiny MaskDiTs on 8x8 images keep every test at CPU speed: random weights for the structure and
the gradients, a few seconds of training on scikit-learn's digits for the rest.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from bench.data import digits
from bench.engine.attack_view import AttackView, ViewOptions
from bench.models.parts import TrainedPart, prepare_parts
from common.errors import ConfigError
from defenses.amrm_pure import AMRMPure
from defenses.base import PartContext
from defenses.maskdit import (
    MaskDiT,
    MaskDiTReconstructor,
    finetune_ramrm_maskdit,
    maskdit_net,
    train_maskdit,
)
from tests.conftest import TinyNet
from tests.test_defense_contract import check_contract, tiny_classifier, tiny_part_overrides

SMALL = {
    "width": 16,
    "depth": 1,
    "heads": 2,
    "decoder_width": 16,
    "decoder_depth": 1,
    "decoder_heads": 2,
}
TRAINED = {
    "width": 32,
    "depth": 2,
    "heads": 2,
    "decoder_width": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 6, seed: int = 0, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(n, 1, 8, 8, generator=gen(seed))


def randomised(net: MaskDiT, seed: int = 0) -> MaskDiT:
    """``net`` with every parameter redrawn: adaLN-Zero starts as the identity, which hides
    how the blocks and the head depend on their inputs."""
    g = gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def tiny_net(seed: int = 0) -> MaskDiT:
    torch.manual_seed(seed)
    net = randomised(MaskDiT(1, (8, 8), patch_size=2, **SMALL), seed)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def net() -> MaskDiT:
    return tiny_net()


def make(net: MaskDiT, sigma: float = 0.1, **kwargs) -> AMRMPure:
    return AMRMPure(MaskDiTReconstructor(net, sigma=sigma), **{"steps": 6, **kwargs}).eval()


def ctx_digits(classifier: nn.Module | None = None) -> PartContext:
    data = digits()
    x, y = data.train()
    x_test, y_test = data.test()
    return PartContext(x, y, x_test, y_test, 10, torch.device("cpu"), 0, classifier)


def grad_of(fn, x: Tensor, weights: Tensor) -> Tensor:
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((fn(xg) * weights).sum(), xg)
    return grad


@pytest.fixture(scope="module")
def trained() -> tuple[MaskDiT, dict]:
    """A tiny MaskDiT trained for a few seconds on digits (patch 2: 16 tokens)."""
    ctx = ctx_digits()
    torch.manual_seed(0)
    net = maskdit_net(ctx, patch_size=2, **TRAINED)
    metrics = train_maskdit(net, ctx, steps=200, batch_size=64, lr=3e-3, log_every=50)
    return net.eval().requires_grad_(False), metrics


# -- 1. the network -----------------------------------------------------------------------------


def test_starts_as_the_identity_denoiser_and_masks_have_the_ratio() -> None:
    torch.manual_seed(0)
    fresh = MaskDiT(1, (8, 8), patch_size=2, **SMALL)
    noisy, sigma = images() * 2 - 1, torch.full((6,), 0.3)
    pred, mask = fresh(noisy, sigma, torch.rand(6, 16, generator=gen()), 0.5)
    assert pred.shape == (6, 16, 4) and (mask.sum(1) == 8).all()
    c_skip = fresh.precondition(sigma)[0][0]
    masked = mask.bool()
    # adaLN-Zero and the zero head: D = c_skip y~ on visible tokens, 0 on masked ones.
    torch.testing.assert_close(pred[~masked], c_skip * fresh.patchify(noisy)[~masked])
    assert (pred[masked] == 0).all()
    assert torch.equal(fresh.unpatchify(fresh.patchify(noisy)), noisy)


def test_masked_tokens_are_dropped_in_the_encoder(net: MaskDiT) -> None:
    noisy, sigma = images() * 2 - 1, torch.full((6,), 0.2)
    ranks = torch.rand(6, 16, generator=gen(1))
    pred, mask = net(noisy, sigma, ranks, 0.5)
    # Rewrite the pixels of every masked patch: nothing the network returns may change.
    patches = net.patchify(noisy)
    patches[mask.bool()] = torch.randn(int(mask.sum()), 4, generator=gen(2))
    again, _ = net(net.unpatchify(patches), sigma, ranks, 0.5)
    assert torch.equal(again, pred)
    # A visible patch's pixels do reach the masked predictions, through attention.
    patches = net.patchify(noisy)
    patches[~mask.bool()] += 0.5
    other, _ = net(net.unpatchify(patches), sigma, ranks, 0.5)
    assert not torch.allclose(other[mask.bool()], pred[mask.bool()])


def test_the_noise_level_conditions_every_prediction(net: MaskDiT) -> None:
    noisy, ranks = images() * 2 - 1, torch.rand(6, 16, generator=gen(3))
    low, mask = net(noisy, torch.full((6,), 0.05), ranks, 0.5)
    high, _ = net(noisy, torch.full((6,), 1.0), ranks, 0.5)
    assert not torch.allclose(low[mask.bool()], high[mask.bool()]), "masked tokens see sigma"


def test_bad_shapes_and_ratios_are_refused(net: MaskDiT) -> None:
    with pytest.raises(ConfigError, match="patch_size=3 must divide the image size 8x8"):
        MaskDiT(1, (8, 8), patch_size=3, **SMALL)
    with pytest.raises(ConfigError, match="mask_ratio=0.01 leaves 16 of 16 patches visible"):
        net.visible_count(0.01)
    with pytest.raises(ConfigError, match="sigma=0"):
        MaskDiTReconstructor(net, sigma=0)
    with pytest.raises(ConfigError, match="mae_loss_coef=-1"):
        MaskDiTReconstructor(net, mae_loss_coef=-1)


# -- 2. training --------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_reports_held_out_losses(trained) -> None:
    _, metrics = trained
    curve = metrics["loss_curve"]
    assert len(curve) == 4
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"]
    assert curve[-1]["mae"] < curve[0]["mae"] and curve[-1]["dsm"] < curve[0]["dsm"]
    held_out = metrics["test_loss_by_sigma"]
    assert set(held_out) == {"0.05", "0.1", "0.2", "0.5"}
    assert all(v["dsm"] > 0 and v["mae"] > 0 for v in held_out.values())
    assert metrics["train_s"] > 0


def test_trained_network_beats_its_untrained_start(trained) -> None:
    net, _ = trained
    torch.manual_seed(0)
    fresh = maskdit_net(ctx_digits(), patch_size=2, **TRAINED).eval()
    x = ctx_digits().x_test[:64]
    noise = MaskDiTReconstructor(net).draw(len(x), gen(4), x.device)
    with torch.no_grad():
        after = MaskDiTReconstructor(net).loss(x, noise, 0.5).mean()
        before = MaskDiTReconstructor(fresh).loss(x, noise, 0.5).mean()
    assert after < 0.8 * before


def test_bad_training_arguments_are_refused() -> None:
    ctx = ctx_digits()
    net = maskdit_net(ctx, patch_size=2, **SMALL)
    with pytest.raises(ConfigError, match="final_lr=0.1"):
        train_maskdit(net, ctx, steps=1, lr=1e-3, final_lr=0.1)
    with pytest.raises(ConfigError, match="mask_ratio=0.99"):
        train_maskdit(net, ctx, steps=1, mask_ratio=0.99)
    with pytest.raises(ConfigError, match="p_std=-1"):
        train_maskdit(net, ctx, steps=1, p_std=-1)


# -- 3. the reconstructor: draws and loss -------------------------------------------------------


def test_draws_hold_mask_ranks_then_diffusion_noise(net: MaskDiT) -> None:
    rec = MaskDiTReconstructor(net, sigma=0.2, mae_loss_coef=0.5)
    noise = rec.draw(5, gen(0), torch.device("cpu"))
    assert noise.shape == (5, 16 + 64) and rec.num_patches == 16
    assert torch.equal(noise, rec.draw(5, gen(0), torch.device("cpu")))
    assert ((noise[:, :16] >= 0) & (noise[:, :16] < 1)).all()
    assert noise[:, 16:].min() < 0, "Gaussian diffusion noise after the ranks"
    x = images(5)
    dsm, mae = net.loss_terms(
        2 * x - 1, noise[:, 16:].view(5, 1, 8, 8), noise[:, :16], torch.full((5,), 0.2), 0.5
    )
    torch.testing.assert_close(rec.loss(x, noise, 0.5), dsm + 0.5 * mae)
    recon = rec.reconstruct(x, noise, 0.5)
    assert recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1


# -- 4. purification: the contract, determinism, the ball ----------------------------------------


def test_keeps_the_defense_contract(net: MaskDiT) -> None:
    check_contract(make(net), images(4))


def test_shape_range_eta_ball_and_reproducibility(net: MaskDiT) -> None:
    defense, x = make(net, step_size=0.05, eta=0.1, mask_ratio=0.5), images()
    out = defense.purify(x, generator=gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    moved = (out - x).abs()
    assert moved.max() <= 0.1 + 1e-6 and (moved > 0.1 - 1e-6).any(), "the ball was never active"
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(defense.purify(x, generator=gen(0)), out)
    assert not torch.equal(defense.purify(x, generator=gen(1)), out)
    with torch.no_grad():
        assert torch.equal(defense.purify(x, generator=gen(0)), out)
    exact = defense.purify(x.clone().requires_grad_(True), generator=gen(0))
    assert exact.requires_grad
    torch.testing.assert_close(exact.detach(), out)


def test_the_loss_uses_the_diffusion_noise_of_its_draw(net: MaskDiT) -> None:
    defense, x = make(net, steps=1), images(2)
    noise = defense.mae.draw(2, gen(0), x.device)
    other = noise.clone()
    other[:, 16:] = torch.randn(2, 64, generator=gen(9))  # same masks, other diffusion noise
    assert not torch.equal(
        defense.reconstruction_loss(x, noise), defense.reconstruction_loss(x, other)
    )


def test_purification_lowers_the_maskdit_loss(trained) -> None:
    net, _ = trained
    x = ctx_digits().x_test[:32]
    noisy = (x + 0.1 * torch.randn(x.shape, generator=gen(3))).clamp(0, 1)
    defense = make(net, steps=20, step_size=0.01, eta=0.1, mask_ratio=0.5)
    out = defense.purify(noisy, generator=gen())
    with torch.no_grad():
        before, after = -defense.attack_loss(noisy), -defense.attack_loss(out)
    # Part of the loss is the irreducible denoising error at sigma: a drop of a tenth is large.
    assert after.mean() < 0.95 * before.mean()
    assert (after < before).float().mean() >= 0.9


# -- 5. gradients -------------------------------------------------------------------------------


def test_the_loss_gradient_reaches_the_input(net: MaskDiT) -> None:
    rec, x = MaskDiTReconstructor(net), images()
    noise = rec.draw(len(x), gen(), x.device)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(rec.loss(xg, noise, 0.5).sum(), xg)
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.9


@pytest.mark.parametrize("second_order", [True, False])
def test_exact_gradient_flows_and_is_the_identity_away_from_the_clips(
    net: MaskDiT, second_order: bool
) -> None:
    defense = make(net, step_size=0.05, second_order=second_order)
    x = images(low=0.2, high=0.8)
    w = torch.randn(x.shape, generator=gen(5))
    exact = grad_of(lambda z: defense.purify(z, generator=gen()), x, w)
    assert torch.equal(exact, w), "d sign / dx = 0: the chain is the identity"
    surrogate = grad_of(lambda z: defense.surrogate(z, generator=gen()), x, w)
    assert torch.isfinite(surrogate).all()
    assert (surrogate - w).abs().max() > 1e-2 * w.abs().max(), "smooth steps are second order"


def test_exact_equals_bpda_through_the_attack_view(net: MaskDiT) -> None:
    defense, x = make(net), images(low=0.2, high=0.8)
    classifier, y = TinyNet().eval(), torch.arange(len(x)) % 10
    grads = {}
    for mode in ("exact", "bpda", "surrogate"):
        view = AttackView(classifier, defense, ViewOptions(grad=mode, eot_samples=2), seed=7)
        xg = x.clone().requires_grad_(True)
        (grads[mode],) = torch.autograd.grad(nn.functional.cross_entropy(view(xg), y), xg)
        assert torch.isfinite(grads[mode]).all() and grads[mode].abs().sum() > 0
    torch.testing.assert_close(grads["exact"], grads["bpda"], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(grads["surrogate"], grads["exact"], rtol=1e-2, atol=1e-6)


# -- 6. RAMRM fine-tuning -----------------------------------------------------------------------


def test_finetune_ramrm_maskdit_runs_against_the_classifier(trained) -> None:
    data = digits()
    classifier = tiny_classifier(data)
    ctx = ctx_digits(classifier)
    net = MaskDiT(1, (8, 8), patch_size=2, **TRAINED)
    net.load_state_dict(trained[0].state_dict())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    metrics = finetune_ramrm_maskdit(
        net,
        ctx,
        sigma=0.1,
        steps=6,
        batch_size=16,
        eps=0.1,
        attack_steps=1,
        n_train=200,
        log_every=3,
        eval_samples=50,
    )
    assert len(metrics["loss_curve"]) == 2 and set(metrics["recon_acc_after"]) == {"clean", "adv"}
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(p.requires_grad for p in classifier.parameters()), "the classifier is frozen"
    with pytest.raises(ConfigError, match="needs the protected classifier"):
        finetune_ramrm_maskdit(net, ctx_digits(), steps=1)


# -- 7. configs: training on first use, the cache on the second ---------------------------------


def _build(compose_cfg, name: str, cache_dir) -> tuple[AMRMPure, list[dict]]:
    overrides = [f"defense={name}", "dataset=digits", f"paths.cache_dir={cache_dir}"]
    overrides += tiny_part_overrides(compose_cfg(overrides).defense)
    cfg = compose_cfg([*overrides, "defense.steps=4"])
    defense = instantiate(cfg.defense)
    assert isinstance(defense.mae, MaskDiTReconstructor)
    assert isinstance(defense.mae.net, TrainedPart)
    dataset = instantiate(cfg.dataset)
    described = prepare_parts(
        defense,
        dataset,
        torch.device("cpu"),
        classifier=tiny_classifier(dataset),
        classifier_info={"key": "tiny"},
    )
    assert isinstance(defense.mae.net, MaskDiT) and not defense.mae.net.training
    return defense.eval(), described


def test_configs_train_once_share_the_pretraining_and_hit_the_cache(
    compose_cfg, tmp_path, monkeypatch
) -> None:
    amrm, (a_info,) = _build(compose_cfg, "amrm_pure_maskdit", tmp_path)
    ramrm, (r_info,) = _build(compose_cfg, "ramrm_pure_maskdit", tmp_path)
    check_contract(amrm, torch.rand(4, 1, 8, 8, generator=gen()))
    check_contract(ramrm, torch.rand(4, 1, 8, 8, generator=gen()))
    assert (a_info["part"], r_info["part"]) == ("amrm_maskdit", "ramrm_maskdit")
    assert a_info["init"]["part"] == "amrm_maskdit_pretrain"
    assert a_info["init"]["cache_key"] == r_info["init"]["cache_key"], "one pre-training"
    assert "recon_acc_after" in r_info["training"]
    assert (amrm.mae.sigma, amrm.mae.mae_loss_coef) == (0.1, 1.0)

    # The second build loads every part from the cache: training now fails loudly.
    def refuse(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(TrainedPart, "_train", refuse)
    for name, first, info in (
        ("amrm_pure_maskdit", amrm, a_info),
        ("ramrm_pure_maskdit", ramrm, r_info),
    ):
        again, (again_info,) = _build(compose_cfg, name, tmp_path)
        assert again_info["cache_key"] == info["cache_key"]
        for (k, v), w in zip(
            first.mae.net.state_dict().items(), again.mae.net.state_dict().values(), strict=True
        ):
            assert torch.equal(v, w), k


def test_cache_entries_are_named_apart_from_the_mae(compose_cfg) -> None:
    names = {}
    for name in ("amrm_pure", "ramrm_pure", "amrm_pure_maskdit", "ramrm_pure_maskdit"):
        defense = instantiate(compose_cfg([f"defense={name}"]).defense)
        part = defense.mae if isinstance(defense.mae, TrainedPart) else defense.mae.net
        names[name] = (part.name, part.init.name)
    assert names["amrm_pure"] == ("amrm_mae", "amrm_mae_pretrain")
    assert names["amrm_pure_maskdit"] == ("amrm_maskdit", "amrm_maskdit_pretrain")
    assert names["ramrm_pure_maskdit"] == ("ramrm_maskdit", "amrm_maskdit_pretrain")
    mae_names = {n for k, v in names.items() if "maskdit" not in k for n in v}
    assert not mae_names & {n for k, v in names.items() if "maskdit" in k for n in v}


def test_configs_follow_the_paper_and_the_threat(compose_cfg) -> None:
    cfg = compose_cfg(["defense=ramrm_pure_maskdit"])
    amrm = compose_cfg(["defense=amrm_pure_maskdit"]).defense
    assert amrm.mask_ratio == 0.5 and amrm.mae.net.init.train.mask_ratio == 0.5
    assert cfg.defense.steps < amrm.steps, "the R-variant runs fewer steps"
    train = cfg.defense.mae.net.train
    assert train.eps == cfg.threat.eps and train.sigma == cfg.defense.mae.sigma
    assert train.mask_ratio == cfg.defense.mask_ratio
    assert amrm.eta >= cfg.threat.eps

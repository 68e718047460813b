"""AMRM-Pure / RAMRM-Pure: the MAE, the signed descent, its gradients, training, configs.

Tiny MAEs on 8x8 images keep every test at CPU speed. Random weights suffice for the contract
and the gradient structure; a few dozen training steps on scikit-learn's digits for the rest.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bench.data import digits
from bench.engine.attack_view import AttackView, ViewOptions
from bench.engine.plan import declared_view
from bench.models.parts import TrainedPart, prepare_parts
from common.errors import ConfigError
from defenses.amrm_pure import MAE, AMRMPure, finetune_ramrm, mae_vit, train_mae
from defenses.base import PartContext
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
# The size of the `trained` fixture's MAE; RAMRM fine-tuning starts from its weights.
TRAINED = {
    "width": 32,
    "depth": 2,
    "heads": 2,
    "decoder_width": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}


def tiny_mae(patch_size: int = 2, seed: int = 0) -> MAE:
    torch.manual_seed(seed)
    # Frozen, as the harness's prepare_parts leaves it: gradients only ever go to the images.
    return MAE(1, (8, 8), patch_size=patch_size, **SMALL).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def mae() -> MAE:
    return tiny_mae()


def make(mae: MAE, **kwargs) -> AMRMPure:
    return AMRMPure(mae, **{"steps": 6, **kwargs}).eval()


def images(n: int = 6, seed: int = 0, low: float = 0.0, high: float = 1.0) -> Tensor:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return low + (high - low) * x


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grad_of(fn, x: Tensor, weights: Tensor) -> Tensor:
    """Gradient of ``sum(weights * fn(x))`` with respect to ``x``."""
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((fn(xg) * weights).sum(), xg)
    return grad


def ctx_digits(classifier: nn.Module | None = None) -> PartContext:
    data = digits()
    x, y = data.train()
    x_test, y_test = data.test()
    return PartContext(x, y, x_test, y_test, 10, torch.device("cpu"), 0, classifier)


@pytest.fixture(scope="module")
def trained() -> MAE:
    """A tiny MAE trained for a few seconds on digits (patch 2: 16 tokens)."""
    ctx = ctx_digits()
    torch.manual_seed(0)
    net = mae_vit(ctx, patch_size=2, **TRAINED)
    train_mae(net, ctx, steps=150, batch_size=64, lr=3e-3, log_every=50, eval_samples=200)
    return net.eval().requires_grad_(False)


# -- 1. the masked autoencoder ------------------------------------------------------------------


def test_patchify_round_trips_and_masks_have_the_ratio(mae: MAE) -> None:
    x = images()
    patches = mae.patchify(x)
    assert patches.shape == (6, 16, 4)
    assert torch.equal(mae.unpatchify(patches), x)
    pred, mask = mae(x, torch.rand(6, 16, generator=gen()), 0.25)
    assert pred.shape == patches.shape
    assert (mask.sum(1) == 4).all(), "a quarter of the 16 patches is masked"
    # The reconstruction keeps the visible patches and fills the masked ones.
    noise = torch.rand(6, 16, generator=gen(1))
    recon = mae.patchify(mae.reconstruct(x, noise, 0.5))
    visible = mae(x, noise, 0.5)[1] == 0
    torch.testing.assert_close(recon[visible], patches[visible])


def test_patch_size_must_divide_the_image_and_leave_masked_and_visible_patches() -> None:
    with pytest.raises(ConfigError, match="patch_size=3 must divide the image size 8x8"):
        MAE(1, (8, 8), patch_size=3, **SMALL)
    ctx = ctx_digits()
    assert mae_vit(ctx, patch_size=4).num_patches == 4
    with pytest.raises(ConfigError, match="mask_ratio=0.1 leaves 4 of 4 patches visible"):
        AMRMPure(tiny_mae(patch_size=4), mask_ratio=0.1).purify(images())


# -- 2. the defense contract, determinism, the neighbourhood ------------------------------------


def test_keeps_the_defense_contract(mae: MAE) -> None:
    check_contract(make(mae), images(4))
    assert AMRMPure.info.stochastic and AMRMPure.info.differentiable and AMRMPure.info.iterative


def test_shape_range_eta_ball_and_reproducibility(mae: MAE) -> None:
    defense, x = make(mae, step_size=0.05, eta=0.1), images()
    out = defense.purify(x, generator=gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    moved = (out - x).abs()
    assert moved.max() <= 0.1 + 1e-6 and (moved > 0.1 - 1e-6).any(), "the ball was never active"
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(defense.purify(x, generator=gen(0)), out)
    assert not torch.equal(defense.purify(x, generator=gen(1)), out), "fresh masks per seed"
    # Without a generator the randomness is fresh, but still drawn from a private generator.
    assert not torch.equal(defense.purify(x), defense.purify(x))


def test_same_output_under_no_grad_inference_mode_and_the_exact_path(mae: MAE) -> None:
    defense, x = make(mae), images()
    ref = defense.purify(x, generator=gen())
    with torch.no_grad():
        assert torch.equal(defense.purify(x, generator=gen()), ref)
    with torch.inference_mode():
        inference_x = x.clone()
        assert torch.equal(defense.purify(inference_x, generator=gen()), ref)
    exact = defense.purify(x.clone().requires_grad_(True), generator=gen())
    assert exact.requires_grad
    torch.testing.assert_close(exact.detach(), ref)


def test_step_schedule_and_cost(mae: MAE) -> None:
    defense = make(mae, steps=5, step_size=0.02)
    assert defense.step_sizes() == [0.02, 0.02, 0.01, 0.01, 0.01]
    assert make(mae, steps=3, step_size=0.5, halve_step=False).step_sizes() == [0.5] * 3
    assert defense.calls_per_purify == 5
    assert AMRMPure(mae).calls_per_purify == AMRMPure.info.purifier_calls


def test_purification_lowers_the_reconstruction_loss(trained: MAE) -> None:
    ctx = ctx_digits()
    x = ctx.x_test[:32]
    noisy = (x + 0.1 * torch.randn(x.shape, generator=gen(3))).clamp(0, 1)
    defense = AMRMPure(trained, steps=20, step_size=0.01, eta=0.1)
    out = defense.purify(noisy, generator=gen())
    with torch.no_grad():
        before, after = -defense.attack_loss(noisy), -defense.attack_loss(out)
    assert after.mean() < 0.8 * before.mean()
    assert (after < before).float().mean() >= 0.8


# -- 3. gradients: exact equals BPDA-identity, the surrogate does not ---------------------------


def test_exact_gradient_is_the_identity_away_from_the_clips(mae: MAE) -> None:
    # Inputs in [0.2, 0.8] with eta = 0.1: the [0, 1] clip can never act; the Linf ball's can,
    # but then the gradient flows to x0 through the bound, so the total is still 1.
    defense, x = make(mae, step_size=0.05), images(low=0.2, high=0.8)
    w = torch.randn(x.shape, generator=gen(5))
    exact = grad_of(lambda z: defense.purify(z, generator=gen()), x, w)
    assert torch.equal(exact, w), "d sign / dx = 0: the chain is the identity"
    surrogate = grad_of(lambda z: defense.surrogate(z, generator=gen()), x, w)
    assert torch.isfinite(surrogate).all()
    assert (surrogate - w).abs().max() > 1e-2 * w.abs().max(), "smooth steps are second order"


def test_exact_gradient_near_the_pixel_range_is_a_zero_one_mask(mae: MAE) -> None:
    defense, x = make(mae, step_size=0.05), images()
    x[:, :, :2] = 0.0  # pixels pinned at 0 by the [0, 1] clip
    w = torch.randn(x.shape, generator=gen(6))
    exact = grad_of(lambda z: defense.purify(z, generator=gen()), x, w)
    # Per pixel, the chain is a product of clip derivatives: 1 inside, 0 where [0, 1] clips, and
    # 1/2 at exact ties of the Linf bound (torch.maximum splits the gradient).
    factor = exact / w
    assert ((factor >= 0) & (factor <= 1 + 1e-6)).all(), "the clips only damp the identity"
    assert (factor == 0).any() and (exact == w).float().mean() > 0.5


def test_exact_equals_bpda_through_the_attack_view(mae: MAE) -> None:
    defense, x = make(mae), images(low=0.2, high=0.8)
    classifier = TinyNet().eval()
    y = torch.arange(len(x)) % 10
    grads = {}
    for mode in ("exact", "bpda", "surrogate"):
        view = AttackView(classifier, defense, ViewOptions(grad=mode, eot_samples=2), seed=7)
        xg = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(view(xg), y)
        (grads[mode],) = torch.autograd.grad(loss, xg)
        assert torch.isfinite(grads[mode]).all() and grads[mode].abs().sum() > 0
    torch.testing.assert_close(grads["exact"], grads["bpda"], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(grads["surrogate"], grads["exact"], rtol=1e-2, atol=1e-6)


def test_second_order_off_gives_the_same_exact_gradient(mae: MAE) -> None:
    x, w = images(), torch.randn(6, 1, 8, 8, generator=gen(8))
    full = grad_of(lambda z: make(mae).purify(z, generator=gen()), x, w)
    cheap = grad_of(lambda z: make(mae, second_order=False).purify(z, generator=gen()), x, w)
    assert torch.equal(full, cheap)


@pytest.mark.parametrize("method", ["purify", "surrogate"])
def test_checkpoint_gives_the_same_gradient(mae: MAE, method: str) -> None:
    x, w = images(), torch.randn(6, 1, 8, 8, generator=gen(9))
    plain = grad_of(lambda z: getattr(make(mae), method)(z, generator=gen()), x, w)
    ckpt = make(mae, checkpoint=True)
    torch.testing.assert_close(
        grad_of(lambda z: getattr(ckpt, method)(z, generator=gen()), x, w),
        plain,
        rtol=1e-5,
        atol=1e-7,
    )
    # The forward value of the checkpointed path is the detached path's, bit for bit.
    assert torch.equal(
        getattr(ckpt, method)(x.clone().requires_grad_(True), generator=gen()).detach(),
        getattr(ckpt, method)(x, generator=gen()),
    )
    # The view's own non-reentrant checkpoint around purify changes nothing either.
    xg = x.clone().requires_grad_(True)
    out = checkpoint(lambda z: getattr(ckpt, method)(z, generator=gen()), xg, use_reentrant=False)
    (grad,) = torch.autograd.grad((out * w).sum(), xg)
    torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("smoothing", ["tanh", "l2"])
def test_surrogate_follows_the_same_masks(mae: MAE, smoothing: str) -> None:
    x = images()
    sharp = make(mae, smoothing_k=1e6, step_size=0.01)
    # A very sharp tanh is sign (up to components within 1e-6 mean|g| of zero): same masks,
    # same path.
    torch.testing.assert_close(
        sharp.surrogate(x, generator=gen(2)), sharp.purify(x, generator=gen(2)), atol=1e-3, rtol=0
    )
    smooth = make(mae, smoothing=smoothing)
    out = smooth.surrogate(x, generator=gen(2))
    assert torch.equal(out, smooth.surrogate(x, generator=gen(2)))
    assert 0 <= out.min() and out.max() <= 1 and (out - x).abs().max() <= smooth.eta + 1e-6
    assert make(mae).approx(x) is x, "BPDA's stand-in is the identity"


def test_attack_loss_is_minus_the_masked_reconstruction_loss(mae: MAE) -> None:
    defense, x = make(mae, attack_masks=3), images()
    xg = x.clone().requires_grad_(True)
    term = defense.attack_loss(xg)
    assert term.shape == (len(x),) and (term < 0).all()
    assert torch.equal(term.detach(), defense.attack_loss(x)), "a fixed set of masks"
    assert torch.equal(defense.attack_loss(x, generator=gen(9)), defense.attack_loss(x))
    noise = torch.rand(3, len(x), 16, generator=gen(defense.attack_seed))
    expected = -torch.stack([mae.loss(x, noise[k], 0.25) for k in range(3)]).mean(0)
    torch.testing.assert_close(term.detach(), expected)
    (grad,) = torch.autograd.grad(term.sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- 4. training ----------------------------------------------------------------------------


def test_train_mae_lowers_the_loss_and_reports_metrics() -> None:
    ctx = ctx_digits()
    torch.manual_seed(0)
    net = mae_vit(ctx, patch_size=2, **SMALL)
    metrics = train_mae(
        net,
        ctx,
        steps=40,
        batch_size=32,
        lr=3e-3,
        mask_ratio_spread=0.25,
        log_every=10,
        eval_samples=100,
    )
    curve = [p["loss"] for p in metrics["loss_curve"]]
    assert len(curve) == 4 and curve[-1] < curve[0]
    assert metrics["test_masked_mse"] > 0 and metrics["train_s"] > 0
    assert set(metrics["test_masked_mse_by_ratio"]) == {"0.25", "0.5", "0.75"}
    assert not net.training


def test_finetune_ramrm_runs_against_the_classifier(trained: MAE) -> None:
    data = digits()
    classifier = tiny_classifier(data)
    ctx = ctx_digits(classifier)
    net = MAE(1, (8, 8), patch_size=2, **TRAINED)
    net.load_state_dict(trained.state_dict())
    net.requires_grad_(True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    metrics = finetune_ramrm(
        net,
        ctx,
        steps=6,
        batch_size=16,
        eps=0.1,
        attack_steps=1,
        n_train=200,
        log_every=3,
        eval_samples=50,
    )
    assert len(metrics["loss_curve"]) == 2
    assert set(metrics["recon_acc_after"]) == {"clean", "adv"}
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(p.requires_grad for p in classifier.parameters()), "the classifier is frozen"
    with pytest.raises(ConfigError, match="needs the protected classifier"):
        finetune_ramrm(net, ctx_digits(), steps=1)


# -- 5. argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"steps": 0}, "steps=0"),
        ({"steps": 2.0}, "steps=2.0"),
        ({"step_size": 0}, "step_size=0"),
        ({"eta": 0}, "eta=0"),
        ({"eta": 1.5}, "eta=1.5"),
        ({"mask_ratio": 1.0}, "mask_ratio=1.0"),
        ({"mask_ratio": float("nan")}, "mask_ratio=nan"),
        ({"halve_step": "yes"}, "halve_step='yes'"),
        ({"checkpoint": 1}, "checkpoint=1"),
        ({"second_order": None}, "second_order=None"),
        ({"smoothing": "sigmoid"}, "smoothing='sigmoid'"),
        ({"smoothing_k": -1.0}, "smoothing_k=-1.0"),
        ({"attack_masks": 0}, "attack_masks=0"),
        ({"attack_seed": -1}, "attack_seed=-1"),
    ],
)
def test_bad_arguments_are_refused(mae: MAE, kwargs: dict, bad: str) -> None:
    with pytest.raises(ConfigError, match=bad) as info:
        AMRMPure(mae, **kwargs)
    assert "must be" in str(info.value)


def test_bad_training_arguments_are_refused() -> None:
    ctx = ctx_digits()
    net = mae_vit(ctx, patch_size=2, **SMALL)
    with pytest.raises(ConfigError, match="final_lr=0.1"):
        train_mae(net, ctx, steps=1, lr=1e-3, final_lr=0.1)
    with pytest.raises(ConfigError, match="mask_ratio=0.99"):
        train_mae(net, ctx, steps=1, mask_ratio=0.99)
    # The spread's extremes must leave masked and visible patches too (16 patches here).
    with pytest.raises(ConfigError, match="mask_ratio=0.0 leaves 16 of 16"):
        train_mae(net, ctx, steps=1, mask_ratio=0.5, mask_ratio_spread=0.5)
    with pytest.raises(ConfigError, match="mask_ratio_spread=-0.1"):
        train_mae(net, ctx, steps=1, mask_ratio_spread=-0.1)


# -- 6. configs ---------------------------------------------------------------------------------


def _tiny_overrides(compose_cfg, name: str, cache_dir) -> list[str]:
    overrides = [f"defense={name}", "dataset=digits", f"paths.cache_dir={cache_dir}"]
    overrides += tiny_part_overrides(compose_cfg(overrides).defense)
    return [*overrides, "defense.steps=4"]


def test_configs_train_share_the_pretraining_and_keep_the_contract(compose_cfg, tmp_path) -> None:
    parts = {}
    for name in ("amrm_pure", "ramrm_pure"):
        cfg = compose_cfg(_tiny_overrides(compose_cfg, name, tmp_path))
        defense = instantiate(cfg.defense)
        assert isinstance(defense, AMRMPure) and isinstance(defense.mae, TrainedPart)
        dataset = instantiate(cfg.dataset)
        described = prepare_parts(
            defense,
            dataset,
            torch.device("cpu"),
            classifier=tiny_classifier(dataset),
            classifier_info={"key": "tiny"},
        )
        assert isinstance(defense.mae, MAE)
        check_contract(defense.eval(), torch.rand(4, *dataset.shape, generator=gen()))
        parts[name] = described[0]
    amrm, ramrm = parts["amrm_pure"], parts["ramrm_pure"]
    assert amrm["part"] == "amrm_mae" and ramrm["part"] == "ramrm_mae"
    # One pre-training stage for both: the fine-tuning starts from the same cache entry.
    assert amrm["init"]["cache_key"] == ramrm["init"]["cache_key"]
    assert "recon_acc_after" in ramrm["training"]
    cfg = compose_cfg(["defense=ramrm_pure"])
    assert cfg.defense.mae.uses_classifier and cfg.defense.steps < cfg.defense.mae.init.train.steps
    assert cfg.defense.mae.train.eps == cfg.threat.eps
    assert compose_cfg(["defense=amrm_pure"]).defense.eta >= cfg.threat.eps


def test_compare_suite_sets_the_views(compose_cfg) -> None:
    cfg = compose_cfg(["defense=amrm_pure", "suite=compare_amrm"])
    suite = OmegaConf.to_container(cfg.suite, resolve=True)
    assert suite["cascade"] is False
    grads = {name: declared_view(cfg, name)["grad"] for name in suite["attacks"]}
    assert grads["pgd"] == "exact" and grads["bpda_eot"] == "bpda"
    assert grads["surrogate"] == "surrogate" and grads["transfer"] == "transfer"
    assert suite["attacks"]["defense_aware"]["defense_loss_weight"] > 0
    assert suite["attacks"]["autoattack_rand"]["eot_iter"] > 1


def test_paper_experiment_composes(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=dou2026_amrm_pure_cifar10"])
    assert cfg.dataset._target_ == "bench.data.cifar10" and cfg.n_samples == 512
    assert cfg.threat.norm == "Linf" and cfg.threat.eps == pytest.approx(8 / 255)
    assert cfg.classifier.arch.depth == 28 and cfg.classifier.arch.widen_factor == 10
    d = OmegaConf.to_container(cfg.defense, resolve=True)
    assert (d["steps"], d["mask_ratio"], d["eta"]) == (150, 0.25, pytest.approx(8 / 255))
    assert d["step_size"] == pytest.approx(1 / 255) and d["halve_step"] and d["checkpoint"]
    assert d["mae"]["arch"]["patch_size"] == 4 and d["mae"]["arch"]["width"] == 768
    suite = OmegaConf.to_container(cfg.suite, resolve=True)
    assert suite["attacks"]["pgd"]["steps"] == 200
    assert suite["views"]["pgd"] == {"grad": "exact", "eot_samples": 20}
    for node in suite["attacks"].values():
        assert node["eps"] == pytest.approx(8 / 255)
    # The 32x32 patch grid composes into a network (narrowed: MAE-Base is 0.1 G parameters).
    ctx = PartContext(
        torch.zeros(1, 3, 32, 32),
        torch.zeros(1),
        torch.zeros(1, 3, 32, 32),
        torch.zeros(1),
        10,
        torch.device("cpu"),
    )
    assert instantiate(cfg.defense.mae.arch, **SMALL)(ctx).num_patches == 64

"""CARSO: the aggregations, the CVAE built from a probe of the classifier, the defenses, training
and the configs.

Random-weight CVAEs over an untrained tiny classifier on 8x8 images keep the aggregation,
contract and gradient tests at CPU speed; the training tests run a few steps on scikit-learn's
digits with a temporary cache.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from bench.engine.attack_view import AttackView, ViewOptions
from bench.engine.plan import declared_view
from bench.models.architectures import SmallCNN, WideResNet
from bench.models.parts import TrainedPart, prepare_parts
from common.errors import ConfigError
from defenses.base import PartContext
from defenses.carso import (
    AGGREGATIONS,
    CARSO,
    CVAE,
    CARSOZero,
    aggregate,
    arch,
    beta_at,
    craft,
    lexsemble,
    select_modules,
    train,
)
from tests.test_defense_contract import check_contract, tiny_classifier

DIGITS = SimpleNamespace(shape=(1, 8, 8), num_classes=10)


def images(n: int = 6, size: int = 8, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ctx_for(classifier: nn.Module | None, size: int = 8, n: int = 64) -> PartContext:
    x = images(n, size, seed=1)
    y = torch.arange(n) % 10
    return PartContext(x, y, x[:16], y[:16], 10, torch.device("cpu"), 0, classifier)


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    return tiny_classifier(DIGITS)


@pytest.fixture(scope="module")
def cvae(classifier: nn.Module) -> CVAE:
    torch.manual_seed(0)
    return arch(ctx_for(classifier)).eval().requires_grad_(False)


def carso(cvae: CVAE, classifier: nn.Module, cls: type[CARSO] = CARSO, **kwargs) -> CARSO:
    defense = cls(cvae, **kwargs)
    defense.bind(classifier)
    return defense


# -- 1. aggregation -----------------------------------------------------------------------------


def naive_lexsemble(logits: Tensor) -> Tensor:
    """The textbook formula in float64: overflows to +-inf once p saturates."""
    p = logits.double().exp().sum(0).softmax(-1)
    return (p / (1 - p)).log()


def test_lexsemble_matches_the_naive_float64_formula() -> None:
    logits = torch.randn(8, 32, 10, generator=gen()) * 0.7
    torch.testing.assert_close(
        lexsemble(logits).double(), naive_lexsemble(logits), rtol=1e-5, atol=1e-5
    )
    # K = 1 and two classes too.
    for shape in [(1, 5, 10), (3, 4, 2)]:
        small = torch.randn(*shape, generator=gen(1))
        torch.testing.assert_close(
            lexsemble(small).double(), naive_lexsemble(small), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("scale", [12.0, 40.0, 500.0])
def test_lexsemble_stays_finite_and_ordered_when_saturated(scale: float) -> None:
    logits = torch.randn(8, 6, 10, generator=gen())
    logits[:, torch.arange(6), torch.arange(6)] += scale  # class i dominates image i
    assert not torch.isfinite(naive_lexsemble(logits)).all(), "the naive formula overflows"
    x = logits.clone().requires_grad_(True)
    out = lexsemble(x)
    assert torch.isfinite(out).all() and out.dtype == logits.dtype
    assert torch.equal(out.argmax(1), torch.arange(6))
    loss = F.cross_entropy(out, (torch.arange(6) + 1) % 10)  # the wrong class: large, finite
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if scale < 80:  # beyond the clamp the dominant logits have no gradient
        assert grad.abs().sum() > 0


def test_aggregations() -> None:
    logits = torch.randn(5, 4, 3, generator=gen())
    torch.testing.assert_close(aggregate(logits, "mean_logits"), logits.mean(0))
    torch.testing.assert_close(aggregate(logits, "lexsemble"), lexsemble(logits))
    # Vote: 3 of 5 samples say class 2, although class 0 has the larger mean logit.
    votes = torch.tensor([[9.0, 0, 1], [9, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]).unsqueeze(1)
    assert aggregate(votes, "vote").argmax(1).item() == 2
    assert aggregate(votes, "mean_logits").argmax(1).item() == 0
    # A tie (2 - 2 - 1) is broken by the mean probability.
    tie = torch.tensor([[5.0, 0, 0], [5, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]).unsqueeze(1)
    assert aggregate(tie, "vote").argmax(1).item() == 0
    out = aggregate(tie, "vote")
    assert out.floor().squeeze().tolist() == [2, 2, 1]


# -- 2. the CVAE and its probe ------------------------------------------------------------------


def test_probe_reads_the_selected_modules_of_any_classifier() -> None:
    net = SmallCNN(1, 10, 28).eval()
    ctx = ctx_for(net, size=28)
    cvae = arch(ctx)
    assert cvae.activation_shapes == [(32, 28, 28), (64, 14, 14), (128,)]  # every ReLU
    assert arch(ctx, layer_types=["Conv2d"]).activation_shapes == [(32, 28, 28), (64, 14, 14)]
    by_name = arch(ctx, layer_types=[], layers=["classifier.2"])
    assert by_name.activation_shapes == [(128,)]
    x = images(3, 28)
    assert cvae.decode(torch.zeros(3, 16), cvae.eval().code(net, x)).shape == x.shape
    # ~0.4 M parameters at 28x28: the small variant of docs/defenses/carso.md.
    assert 0.3e6 < sum(p.numel() for p in cvae.parameters()) < 0.6e6


def test_paper_sized_cvae_on_a_small_wide_resnet() -> None:
    wrn = WideResNet(3, 10, 32, depth=10, widen_factor=1).eval()
    x = torch.rand(2, 3, 32, 32, generator=gen())
    ctx = PartContext(x, torch.arange(2), x, torch.arange(2), 10, torch.device("cpu"), 0, wrn)
    cvae = arch(
        ctx,
        layer_types=["Conv2d"],
        compressor_depth=3,
        compressor_stride=1,
        compressor_min_channels=1,
        code_dim=32,
        encoder_channels=[6, 12],
        hidden=16,
        latent_dim=8,
        decoder_channels=[16, 16, 8, 8, 4],
    ).eval()
    # Stem, stage 1 (16 -> 16: no projection shortcut), stages 2 and 3 with a shortcut.
    assert len(cvae.activation_shapes) == 1 + 2 + 3 + 3
    out = cvae.decode(torch.zeros(2, 8), cvae.code(wrn, x))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


def test_activations_of_another_classifier_are_refused(cvae: CVAE) -> None:
    other = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(192, 10), nn.ReLU()
    )
    with pytest.raises(RuntimeError, match="conditions on another classifier"):
        cvae.code(other, images(2))


def test_module_selection_errors_are_clear(classifier: nn.Module) -> None:
    with pytest.raises(ConfigError, match="no module of the classifier matches"):
        select_modules(classifier, ["GELU"], [])
    with pytest.raises(ConfigError, match=r"layers=\['head'\] are not modules"):
        select_modules(classifier, ["ReLU"], ["head"])
    with pytest.raises(ConfigError, match="uses_classifier: true"):
        arch(ctx_for(None))


# -- 3. the defenses ----------------------------------------------------------------------------


def test_keeps_the_defense_contract(cvae: CVAE, classifier: nn.Module) -> None:
    check_contract(carso(cvae, classifier), images(4))  # stochastic, detected as such
    check_contract(carso(cvae, classifier, CARSOZero), images(4))  # deterministic
    assert CARSO.info.stochastic and not CARSOZero.info.stochastic
    assert CARSO.info.differentiable and CARSOZero.info.differentiable


def test_shapes_range_and_reproducibility(cvae: CVAE, classifier: nn.Module) -> None:
    defense, x = carso(cvae, classifier), images(5)
    out = defense.purify(x, generator=gen(3))
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    logits = defense.predict(classifier, x, generator=gen(3))
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(defense.predict(classifier, x, generator=gen(3)), logits)
    assert torch.equal(defense.purify(x, generator=gen(3)), out)
    assert not torch.equal(defense.predict(classifier, x, generator=gen(4)), logits)
    with torch.inference_mode():
        assert torch.equal(defense.predict(classifier, x, generator=gen(3)), logits)
    # K decodings per decision: the same as aggregating sample_logits by hand.
    samples = defense.sample_logits(classifier, x, generator=gen(3))
    assert samples.shape == (8, 5, 10)
    torch.testing.assert_close(lexsemble(samples), logits)
    assert defense.calls_per_purify == 17 and CARSO(cvae, samples=2).calls_per_purify == 5


def test_zero_latent_variant_ignores_the_generator(cvae: CVAE, classifier: nn.Module) -> None:
    defense, x = carso(cvae, classifier, CARSOZero), images(4)
    a = defense.predict(classifier, x, generator=gen(0))
    assert torch.equal(a, defense.predict(classifier, x, generator=gen(1)))
    assert torch.equal(a, defense.predict(classifier, x))
    z0 = cvae.decode(torch.zeros(4, cvae.latent_dim), cvae.code(classifier, x))
    torch.testing.assert_close(defense.purify(x), z0)
    assert defense.calls_per_purify == 3


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradients_flow_end_to_end_through_predict(
    cvae: CVAE, classifier: nn.Module, aggregation: str
) -> None:
    defense = carso(cvae, classifier, aggregation=aggregation)
    x = images(4).requires_grad_(True)
    scores = defense.predict(classifier, x, generator=gen())
    y = torch.arange(4)
    loss = scores.gather(1, y[:, None]).sum() - scores.logsumexp(1).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and (grad != 0).any()


@pytest.mark.parametrize("grad", ["exact", "bpda", "surrogate"])
def test_attack_view_differentiates_the_ensemble(
    cvae: CVAE, classifier: nn.Module, grad: str
) -> None:
    defense = carso(cvae, classifier)
    view = AttackView(classifier, defense, ViewOptions(grad=grad, eot_samples=2), seed=0)
    x = images(3).requires_grad_(True)
    logits = view(x)
    # The forward value is always the real decision, whatever the backward.
    assert logits.shape == (3, 10)
    loss = (logits[:, 1] - logits[:, 0]).sum()  # a margin: no saturation
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and (g != 0).any()


def test_unbound_defense_says_what_to_do(cvae: CVAE) -> None:
    with pytest.raises(RuntimeError, match="bind"):
        CARSO(cvae).purify(images(2))


def test_attack_loss_bypasses_the_aggregator(cvae: CVAE, classifier: nn.Module) -> None:
    x = images(4)
    defense = carso(cvae, classifier)
    term = defense.attack_loss(x.clone().requires_grad_(True), generator=gen(0))
    assert term.shape == (4,) and torch.isfinite(term).all()
    # The mean over K samples of CE to the current decision, latents from the generator.
    z = torch.randn(8, 4, cvae.latent_dim, generator=gen(0))
    logits = cvae.decode(z.view(32, -1), cvae.code(classifier, x).repeat(8, 1))
    logits = classifier(logits).view(8, 4, 10)
    y_hat = lexsemble(logits).argmax(1)
    expected = F.cross_entropy(logits.reshape(32, 10), y_hat.repeat(8), reduction="none")
    torch.testing.assert_close(term.detach(), expected.view(8, 4).mean(0))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(defense.attack_loss(xg, generator=gen(1)).sum(), xg)
    assert torch.isfinite(g).all() and (g != 0).any()
    rep = carso(cvae, classifier, attack_term="representation").attack_loss(xg, generator=gen(1))
    assert rep.shape == (4,) and rep.requires_grad
    assert carso(cvae, classifier, attack_term="none").attack_loss(x, generator=gen()) is None


@pytest.mark.parametrize("attack_term", ["ensemble_ce", "representation"])
def test_attack_loss_draws_only_from_its_generator(
    cvae: CVAE, classifier: nn.Module, attack_term: str
) -> None:
    defense, x = carso(cvae, classifier, attack_term=attack_term), images(4)
    state = torch.get_rng_state()
    term = defense.attack_loss(x.clone().requires_grad_(True), generator=gen(5))
    assert torch.equal(torch.get_rng_state(), state), "torch's global RNG is untouched"
    torch.manual_seed(123)  # the global RNG plays no part
    again = defense.attack_loss(x.clone().requires_grad_(True), generator=gen(5))
    assert torch.equal(again, term), "the same generator seed gives the same term"
    with torch.inference_mode():
        assert torch.equal(defense.attack_loss(x, generator=gen(5)), term.detach())
    if attack_term == "ensemble_ce":  # the latents enter the term itself, not only y_hat
        assert not torch.equal(defense.attack_loss(x, generator=gen(6)), term.detach())


# -- 4. bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 0}, "CARSOZero"),
        ({"samples": -2}, "samples=-2"),
        ({"samples": 2.5}, "samples=2.5"),
        ({"aggregation": "max"}, "aggregation='max'"),
        ({"attack_term": "pixels"}, "attack_term='pixels'"),
    ],
)
def test_bad_defense_arguments_name_the_value(cvae: CVAE, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CARSO(cvae, **kwargs)


def test_other_bad_arguments_name_the_value(cvae: CVAE, classifier: nn.Module) -> None:
    with pytest.raises(ConfigError, match="cvae='vae'"):
        CARSO("vae")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="samples=2 must be 1"):
        CARSOZero(cvae, samples=2)
    with pytest.raises(ValueError, match=r"logits of shape \(4, 10\)"):
        lexsemble(torch.zeros(4, 10))
    with pytest.raises(ConfigError, match="aggregation='sum'"):
        aggregate(torch.zeros(2, 4, 10), "sum")
    ctx = ctx_for(classifier)
    with pytest.raises(ConfigError, match="compressor_stride=3"):
        arch(ctx, compressor_stride=3)
    with pytest.raises(ConfigError, match="decoder_channels"):
        arch(ctx, decoder_channels=[])
    with pytest.raises(ConfigError, match="steps=0"):
        train(arch(ctx), ctx, steps=0, eps=0.1)
    with pytest.raises(ConfigError, match="eps=0"):
        train(arch(ctx), ctx, steps=1, eps=0)
    with pytest.raises(ConfigError, match="adv_attacks"):
        train(arch(ctx), ctx, steps=1, eps=0.1, adv_attacks=["cw"])
    with pytest.raises(ConfigError, match="protected classifier"):
        train(arch(ctx), ctx_for(None), steps=1, eps=0.1)


# -- 5. training --------------------------------------------------------------------------------


def test_craft_stays_in_the_ball_and_raises_the_loss(classifier: nn.Module) -> None:
    x, y = images(16), torch.arange(16) % 10
    base = F.cross_entropy(classifier(x), y)
    for kind in ("fgsm", "pgd"):
        adv = craft(classifier, x, y, kind=kind, eps=0.1, steps=3, generator=gen())
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= adv.min() and adv.max() <= 1
        assert F.cross_entropy(classifier(adv), y) > base


def test_beta_schedule() -> None:
    got = [beta_at(s, 100, 1.0, 0.1, 0.2) for s in (0, 10, 20, 30, 90)]
    assert got == pytest.approx([0, 0, 0.5, 1, 1])
    assert beta_at(0, 10, 2.0, 0.0, 0.0) == 2.0


def test_a_short_training_run_lowers_the_loss(classifier: nn.Module) -> None:
    from bench.data import digits

    data = digits()
    x, y = data.train()
    xt, yt = data.test()
    ctx = PartContext(x, y, xt, yt, 10, torch.device("cpu"), 0, classifier)
    torch.manual_seed(0)
    net = arch(ctx)
    metrics = train(
        net,
        ctx,
        steps=30,
        eps=0.1,
        batch_size=32,
        lr=3e-3,
        beta_warmup=0.0,
        log_every=10,
        eval_samples=64,
        samples=2,
    )
    curve = metrics["loss_curve"]
    assert [p["step"] for p in curve] == [10, 20, 30] and all(p["beta"] == 1 for p in curve)
    assert curve[-1]["loss"] < curve[0]["loss"]
    for key in ("test_bce", "test_kl", "test_acc", "bare_acc", "test_acc_pgd", "bare_acc_pgd"):
        assert math.isfinite(metrics[key])
    assert metrics["train_s"] > 0 and not net.training
    assert net.class_codes.abs().sum() > 0, "class codes filled for the representation term"


def test_prepare_parts_trains_one_cvae_for_every_variant(compose_cfg, tmp_path: Path) -> None:
    shared = [
        "dataset=digits",
        f"paths.cache_dir={tmp_path}",
        "defense.cvae.train.steps=4",
        "defense.cvae.train.batch_size=16",
        "defense.cvae.train.eval_samples=32",
    ]
    described, defenses = [], []
    for name in ("carso", "carso_z0", "carso_mean"):
        cfg = compose_cfg([f"defense={name}", *shared])
        defense = instantiate(cfg.defense)
        assert isinstance(defense.cvae, TrainedPart)
        dataset = instantiate(cfg.dataset)
        described += prepare_parts(
            defense,
            dataset,
            torch.device("cpu"),
            classifier=tiny_classifier(dataset),
            classifier_info={"key": "tiny"},
        )
        defenses.append(defense.eval())
    assert len({d["cache_key"] for d in described}) == 1, "deployment options do not retrain"
    assert described[0]["training"]["loss_curve"][-1]["step"] == 4
    x = images(4)
    for defense in defenses:
        assert isinstance(defense.cvae, CVAE)
        check_contract(defense, x)


# -- 6. configs ---------------------------------------------------------------------------------


def test_config_is_the_constructor_and_variants_compose(compose_cfg) -> None:
    cfg = compose_cfg(["defense=carso"])
    assert set(cfg.defense) - {"_target_"} == set(inspect.signature(CARSO).parameters)
    assert cfg.defense.cvae.uses_classifier is True
    assert cfg.defense.cvae.train.eps == cfg.threat.eps == 0.1
    defense = instantiate(cfg.defense)
    assert (defense.samples, defense.aggregation) == (8, "lexsemble")
    z0 = instantiate(compose_cfg(["defense=carso_z0"]).defense)
    assert type(z0) is CARSOZero and z0.samples == 1
    assert instantiate(compose_cfg(["defense=carso_mean"]).defense).aggregation == "mean_logits"
    assert instantiate(compose_cfg(["defense=carso_vote"]).defense).aggregation == "vote"


def test_paper_experiment_composes(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=ballarin2025_carso_cifar10"])
    choices = cfg.hydra.runtime.choices
    assert (choices.dataset, choices.classifier, choices.defense) == (
        "cifar10",
        "wrn_28_10_at",
        "carso",
    )
    assert cfg.n_samples == 512 and cfg.threat.eps == pytest.approx(8 / 255)
    aa = cfg.suite.attacks.autoattack
    assert aa.version == "rand" and aa.eps == pytest.approx(8 / 255), "AutoAttack rand, full"
    assert cfg.suite.attacks.pgd.steps == 200 and cfg.suite.views.pgd.eot_samples == 20
    defense = instantiate(cfg.defense)
    assert defense.samples == 8 and defense.aggregation == "lexsemble"
    arch_args = defense.cvae.arch.keywords
    assert list(arch_args["layer_types"]) == ["Conv2d"] and arch_args["code_dim"] == 512
    assert arch_args["latent_dim"] == 128 and arch_args["compressor_stride"] == 1
    assert list(arch_args["decoder_channels"]) == [256, 256, 128, 64, 32]
    train_args = defense.cvae.train_fn.keywords
    assert train_args["eps"] == pytest.approx(8 / 255) and train_args["pgd_steps"] == 40
    assert train_args["adv_fraction"] == 0.5
    # A CVAE trained on a GPU loads through the part's checkpoint option.
    assert "checkpoint" in inspect.signature(TrainedPart).parameters


def test_compare_suite_composes(compose_cfg) -> None:
    cfg = compose_cfg(["suite=compare_carso"])
    suite = cfg.suite
    views = {name: declared_view(cfg, name) for name in suite.attacks}
    assert suite.cascade is False
    assert set(suite.attacks) == {
        "autoattack_rand",
        "pgd_eot",
        "bpda_eot",
        "pgd_bypass",
        "pgd_known",
        "transfer",
    }
    assert views["pgd_eot"]["grad"] == "exact" and views["bpda_eot"]["grad"] == "bpda"
    assert suite.attacks.pgd_bypass.defense_loss_weight > 0
    assert views["transfer"]["grad"] == "transfer" and views["pgd_known"]["randomness"] == "known"

"""The attack view: gradient modes, EOT, known randomness, checkpointing, loud failures.

Broken components (NaN images or logits) fail loudly; gradient failures are counted instead.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.pgd import PGD
from attacks.pgd_eot import PGDEOT
from bench.engine.attack_view import AttackView, ViewOptions
from common.errors import ConfigError, NonFiniteError
from defenses.base import Defense, DefenseInfo
from defenses.none import NoDefense
from tests.conftest import TinyNet
from tests.planted import Blur, Detach, GaussianNoise, NaNDefense, Quantize


def grad_of(view: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(view(x), y).backward()
    return x.grad


@pytest.mark.parametrize("grad", ["exact", "bpda", "surrogate", "transfer"])
def test_identity_every_mode_is_the_bare_classifier(tiny_model, batch, grad) -> None:
    x, y = batch
    view = AttackView(tiny_model, NoDefense(), ViewOptions(grad=grad, eot_samples=1))
    torch.testing.assert_close(view(x), tiny_model(x))
    torch.testing.assert_close(grad_of(view, x, y), grad_of(tiny_model, x, y))


def test_identity_attacks_agree_with_attacking_the_classifier(tiny_model, batch) -> None:
    x, y = batch
    for grad in ("exact", "bpda", "surrogate", "transfer"):
        view = AttackView(tiny_model, NoDefense(), ViewOptions(grad=grad, eot_samples=1))
        on_view = PGDEOT(view, norm="Linf", eps=0.1, steps=5, seed=3)(x, y)
        on_bare = PGDEOT(tiny_model, norm="Linf", eps=0.1, steps=5, seed=3)(x, y)
        torch.testing.assert_close(on_view, on_bare)


def test_quantize_masks_exact_gradients_and_bpda_recovers_them(tiny_model, batch) -> None:
    x, y = batch
    defense = Quantize(levels=8)
    exact = AttackView(tiny_model, defense, ViewOptions(grad="exact", eot_samples=1))
    assert grad_of(exact, x, y).abs().max() == 0
    bpda = AttackView(tiny_model, defense, ViewOptions(grad="bpda", eot_samples=1))
    # BPDA: the classifier's gradient at the purified point, passed straight through.
    torch.testing.assert_close(grad_of(bpda, x, y), grad_of(tiny_model, defense.purify(x), y))
    torch.testing.assert_close(bpda(x), exact(x))  # the forward is always the real defense


def test_surrogate_takes_gradients_from_the_defense_surrogate(tiny_model, batch) -> None:
    class Cheap(Blur):
        def surrogate(self, x, *, generator=None):
            return x * 0.5

    x, y = batch
    view = AttackView(tiny_model, Cheap(), ViewOptions(grad="surrogate", eot_samples=1))
    torch.testing.assert_close(view(x), tiny_model(Cheap().purify(x)))
    # d/dx f(s(x) + const) with s(x) = x / 2, evaluated at the real purified point.
    expected = grad_of(tiny_model, Cheap().purify(x), y) * 0.5
    torch.testing.assert_close(grad_of(view, x, y), expected)


def test_exact_on_a_declared_non_differentiable_defense_is_refused(tiny_model) -> None:
    class Jpeg(NoDefense):
        info = DefenseInfo(stochastic=False, differentiable=False)

    with pytest.raises(ConfigError, match="grad=exact"):
        AttackView(tiny_model, Jpeg(), ViewOptions(grad="exact"))
    AttackView(tiny_model, Jpeg(), ViewOptions(grad="exact", allow_masked=True))
    AttackView(tiny_model, Jpeg(), ViewOptions(grad="bpda"))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (ViewOptions(grad="magic"), "grad='magic'"),
        (ViewOptions(eot_reduce="median"), "eot_reduce='median'"),
        (ViewOptions(randomness="psychic"), "randomness='psychic'"),
        (ViewOptions(eot_samples=0), "eot_samples=0"),
        (ViewOptions(chunk=-1), "chunk=-1"),
    ],
)
def test_bad_view_options_name_the_value(options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        options.validate()


def test_eot_averages_logits_over_fresh_purifications(tiny_model, batch) -> None:
    x, _ = batch
    view = AttackView(tiny_model, GaussianNoise(0.3), ViewOptions(eot_samples=4), seed=1)
    samples = view.sample_logits(x)
    assert samples.shape == (4, len(x), 10)
    assert not torch.allclose(samples[0], samples[1]), "EOT samples must differ"
    assert view.counter.forward == 4 * len(x) and view.counter.purify == 4 * len(x)
    # Chunking (several samples per purifier call) changes the draws, not the estimator.
    chunked = AttackView(
        tiny_model, GaussianNoise(0.3), ViewOptions(eot_samples=4, chunk=2), seed=1
    )
    assert chunked.sample_logits(x).shape == (4, len(x), 10)


def test_fresh_randomness_differs_and_known_randomness_is_locked(tiny_model, batch) -> None:
    x, _ = batch
    fresh = AttackView(tiny_model, GaussianNoise(), ViewOptions(eot_samples=2), seed=0)
    assert not torch.allclose(fresh(x), fresh(x))
    known = AttackView(
        tiny_model, GaussianNoise(), ViewOptions(eot_samples=2, randomness="known"), seed=0
    )
    torch.testing.assert_close(known(x), known(x))
    again = AttackView(
        tiny_model, GaussianNoise(), ViewOptions(eot_samples=2, randomness="known"), seed=0
    )
    assert known.known_seeds == again.known_seeds
    torch.testing.assert_close(known(x), again(x))


def test_checkpointing_gives_the_same_gradient(tiny_model, batch) -> None:
    x, y = batch
    opts = ViewOptions(eot_samples=3, randomness="known")
    plain = AttackView(tiny_model, GaussianNoise(), opts, seed=5)
    ckpt_opts = ViewOptions(**{**opts.to_dict(), "checkpoint": True})
    ckpt = AttackView(tiny_model, GaussianNoise(), ckpt_opts, seed=5)
    torch.testing.assert_close(grad_of(ckpt, x, y), grad_of(plain, x, y))


def test_nan_in_purified_images_names_the_defense_and_stage(tiny_model, batch) -> None:
    x, _ = batch
    view = AttackView(tiny_model, NaNDefense(), ViewOptions(eot_samples=1), name="nandef")
    view.stage = "attack 'pgd'"
    with pytest.raises(NonFiniteError, match=r"'nandef'.*purified images.*attack 'pgd'"):
        view(x)


def test_nan_in_the_gradient_is_zeroed_and_counted(tiny_model, batch) -> None:
    class Kink(Defense):
        info = DefenseInfo(stochastic=False, differentiable=True)

        def purify(self, x, *, generator=None):
            return x + torch.sqrt((x - x.detach()).abs())  # value x, gradient inf at 0

    x, y = batch
    view = AttackView(tiny_model, Kink(), ViewOptions(eot_samples=1), name="kink")
    # A gradient failure, not a broken component: the attack gets a finite (zero) step.
    grad = grad_of(view, x, y)
    assert torch.isfinite(grad).all() and grad.abs().max() == 0
    assert view.counter.grad_nonfinite == len(x) and view.counter.grad_missing == 0


def test_detached_purifier_gives_zero_gradients_and_counts_them(tiny_model, batch) -> None:
    x, y = batch
    view = AttackView(tiny_model, Detach(), ViewOptions(eot_samples=1))
    xg = x.clone().requires_grad_(True)
    logits = view(xg)
    # The logits are the defense's, bit for bit; only a zero-gradient path to x was added.
    assert torch.equal(logits, tiny_model(x))
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), xg)
    assert grad.abs().max() == 0
    assert view.counter.grad_missing == len(x) and view.counter.grad_zero == 0


def test_torchattacks_runs_on_a_parameter_free_view(batch) -> None:
    class Fixed(nn.Module):  # no parameters at all: torchattacks cannot find a device
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", TinyNet().fc.weight.detach().clone())

        def forward(self, x):
            return x.flatten(1) @ self.w.T

    x, y = batch
    view = AttackView(Fixed(), Blur(), ViewOptions(eot_samples=1))
    assert not list(view.parameters())
    x_adv = PGD(view, norm="Linf", eps=0.1, steps=3)(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_counts_backward_passes(tiny_model, batch) -> None:
    x, y = batch
    view = AttackView(tiny_model, GaussianNoise(), ViewOptions(eot_samples=3))
    grad_of(view, x, y)
    assert view.counter.snapshot() == {
        "forward": 3 * len(x),
        "backward": 3 * len(x),
        "purify": 3 * len(x),
        "gradients": len(x),  # one input gradient per image, whatever the EOT samples
        "grad_missing": 0,
        "grad_zero": 0,
        "grad_nonfinite": 0,
    }


def test_known_randomness_judges_each_draw_with_one_known_seed(tiny_model, batch) -> None:
    from bench.engine.decision import locked_predictions

    x, _ = batch
    defense = GaussianNoise(sigma=0.5)
    view = AttackView(tiny_model, defense, ViewOptions(eot_samples=3, randomness="known"), seed=4)
    preds = locked_predictions(view, x, draws=7)
    for d in range(7):
        seed = view.known_seeds[d % 3]
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            expected = tiny_model(defense.purify(x, generator=g)).argmax(1)
        assert torch.equal(preds[d], expected), f"draw {d} is one purification with its seed"
    assert torch.equal(preds[0], preds[3]) and not torch.equal(preds[0], preds[1])


def test_autoattack_takes_one_gradient_sample_on_a_deterministic_view(
    tiny_model, batch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EOT over a deterministic view averages identical gradients: one sample is the same attack.
    from attacks import autoattack

    seen: list[int] = []

    def run(self, x, y, batch_size=None):  # noqa: ANN001, ANN202 - pyautoattack's signature
        seen.append(self.apgd.eot_iter)
        return x, None

    monkeypatch.setattr(autoattack._PyAutoAttack, "run_standard_evaluation", run)
    x, y = batch
    for defense, version, samples in (
        (Blur(), "custom", 1),
        (Blur(), "rand", 1),
        (GaussianNoise(0.1), "custom", 4),
        (GaussianNoise(0.1), "rand", 20),
    ):
        view = AttackView(tiny_model, defense, ViewOptions(eot_samples=1))
        custom = {"attacks": ["apgd-ce"], "eot_iter": 4} if version == "custom" else {}
        attack = autoattack.AutoAttack(view, norm="Linf", eps=0.05, version=version, **custom)
        assert attack.internal_eot == samples
        attack(x[:4], y[:4])
        assert seen.pop() == samples

"""PGDEOT: never weaker than torchattacks, best iterate, EOT, defense loss, robustness to cut
graphs, reproducibility, argument checks."""

from __future__ import annotations

import math
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torchattacks
from torch import Tensor, nn

from attacks.pgd_eot import PGDEOT
from bench.data import digits
from common.errors import ConfigError
from tests.conftest import TinyNet

EPS = {"Linf": 0.05, "L2": 0.5}
TORCHATTACKS = {"Linf": torchattacks.PGD, "L2": torchattacks.PGDL2}


def distance(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)


def assert_in_threat_model(x_adv: Tensor, x: Tensor, norm: str, eps: float) -> None:
    assert x_adv.shape == x.shape
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert distance(x_adv, x, norm).max() <= eps + 1e-6


def fooled(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1) != y


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, Tensor, Tensor]:
    """A small ReLU network trained briefly on scikit-learn's digits, and 200 test images.

    Nonlinear, so that PGD's iterates can overshoot.
    """
    data = digits()
    x_train, y_train = data.train()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    model.eval()
    x, y = data.test()
    return model, x[:200], y[:200]


# -- 1. never weaker than torchattacks ----------------------------------------------------------


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("rel_stepsize", [0.25, 1.0])
def test_never_weaker_than_torchattacks(digits_mlp, norm: str, rel_stepsize: float) -> None:
    model, x, y = digits_mlp
    eps, steps = EPS[norm], 10
    theirs = TORCHATTACKS[norm](
        model, eps=eps, alpha=rel_stepsize * eps, steps=steps, random_start=False
    )(x, y)
    attack = PGDEOT(
        model, norm=norm, eps=eps, steps=steps, rel_stepsize=rel_stepsize, random_start=False
    )
    ours = attack(x, y)
    fooled_theirs, fooled_ours = fooled(model, theirs, y), fooled(model, ours, y)
    assert fooled_theirs.any(), "the budget should fool some points"
    assert not (fooled_theirs & ~fooled_ours).any()
    assert fooled_ours.float().mean() >= fooled_theirs.float().mean()
    assert torch.equal(attack.fooled_any, fooled_ours)
    assert_in_threat_model(ours, x, norm, eps)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_never_weaker_than_torchattacks_random_start(digits_mlp, norm: str) -> None:
    model, x, y = digits_mlp
    eps, steps = EPS[norm], 10
    torch.manual_seed(0)
    theirs = TORCHATTACKS[norm](model, eps=eps, alpha=eps / 4, steps=steps)(x, y)
    ours = PGDEOT(model, norm=norm, eps=eps, steps=steps, rel_stepsize=0.25)(x, y)
    assert fooled(model, ours, y).float().mean() >= fooled(model, theirs, y).float().mean()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_trajectory_matches_torchattacks(digits_mlp, norm: str) -> None:
    """Without early stopping the last iterate is torchattacks' output (Linf: bit for bit)."""
    model, x, y = digits_mlp
    eps, steps = EPS[norm], 5
    theirs = TORCHATTACKS[norm](model, eps=eps, alpha=eps / 2, steps=steps, random_start=False)(
        x, y
    )
    attack = PGDEOT(
        model,
        norm=norm,
        eps=eps,
        steps=steps,
        rel_stepsize=0.5,
        random_start=False,
        early_stop=False,
    )
    attack(x, y)
    with torch.no_grad():
        their_loss = nn.functional.cross_entropy(model(theirs), y, reduction="none")
    tol = 0.0 if norm == "Linf" else 1e-3
    torch.testing.assert_close(attack.loss_history[-1], their_loss, atol=tol, rtol=tol)


# -- 2. threat model ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("loss", ["ce", "margin", "dlr", ["ce", "margin", "dlr"]])
def test_threat_model_respected(tiny_model, batch, norm: str, loss: str | list[str]) -> None:
    x, y = batch
    eps = {"Linf": 0.1, "L2": 0.5}[norm]
    # A step twice the budget makes every step hit the projection.
    attack = PGDEOT(
        tiny_model, norm=norm, eps=eps, steps=5, rel_stepsize=2.0, restarts=3, loss=loss
    )
    assert_in_threat_model(attack(x, y), x, norm, eps)
    assert attack.loss_history.shape == (6, len(x))
    assert attack.fooled_history.shape == (6, len(x))
    assert attack.fooled_any.shape == (len(x),) and attack.fooled_any.device.type == "cpu"


def test_restarts_only_attack_points_not_yet_fooled(tiny_model, batch) -> None:
    x, y = batch
    sizes: list[int] = []

    class Spy(nn.Module):
        def forward(self, inp: Tensor) -> Tensor:
            sizes.append(len(inp))
            return tiny_model(inp)

    one = PGDEOT(Spy(), norm="Linf", eps=0.02, steps=2, restarts=1)
    one(x, y)
    first_run = list(sizes)
    left = int((~one.fooled_any).sum())
    assert 0 < left < len(x), "the budget should fool some points but not all"
    sizes.clear()
    two = PGDEOT(Spy(), norm="Linf", eps=0.02, steps=2, restarts=2)
    two(x, y)
    assert sizes[: len(first_run)] == first_run
    assert sizes[len(first_run)] == left
    assert (two.fooled_any >= one.fooled_any).all()


# -- 3. best iterate ----------------------------------------------------------------------------


class Cliff(nn.Module):
    """Two classes on one-pixel images; class 1 wins on (0.7, 0.92), and the gradient of class 1's
    logit points up everywhere below 0.9, so a long step overshoots past the cliff."""

    def __init__(self, top: float = 0.9, peak: float = 0.2) -> None:
        super().__init__()
        self.top, self.peak = top, peak

    def forward(self, x: Tensor) -> Tensor:
        v = x.flatten(1).mean(1)
        z1 = torch.where(v <= self.top, v - self.top + self.peak, self.peak - 10 * (v - self.top))
        return torch.stack([torch.zeros_like(z1), z1], 1)


@pytest.mark.parametrize("early_stop", [False, True])
def test_returns_best_iterate_not_last(early_stop: bool) -> None:
    model = Cliff()
    x, y = torch.full((4, 1, 1, 1), 0.5), torch.zeros(4, dtype=torch.long)
    kwargs = {"eps": 0.5, "steps": 2, "random_start": False}
    # Trajectory 0.5 (clean) -> 0.8 (fooled) -> 1.0 (past the cliff: clean again).
    last = torchattacks.PGD(model, alpha=0.3, **kwargs)(x, y)
    torch.testing.assert_close(last, torch.ones_like(x))
    assert not fooled(model, last, y).any()

    attack = PGDEOT(model, norm="Linf", step_size=0.3, early_stop=early_stop, **kwargs)
    best = attack(x, y)
    torch.testing.assert_close(best, torch.full_like(x, 0.8))
    assert fooled(model, best, y).all()
    assert attack.fooled_any.all()
    assert attack.fooled_history[:, 0].tolist() == [False, True, early_stop]
    assert PGDEOT.returns_best


def test_best_iterate_by_loss_when_never_fooled() -> None:
    # The logit of class 1 peaks at -0.1 at 0.6: never fooled, CE highest at the second iterate.
    model = Cliff(top=0.6, peak=-0.1)
    x, y = torch.full((3, 1, 1, 1), 0.3), torch.zeros(3, dtype=torch.long)
    attack = PGDEOT(model, norm="Linf", eps=0.5, steps=3, step_size=0.3, random_start=False)
    best = attack(x, y)
    assert not attack.fooled_any.any()
    assert attack.loss_history[:, 0].argmax().item() == 1
    torch.testing.assert_close(best, torch.full_like(x, 0.6))


# -- 4. EOT on the loss -------------------------------------------------------------------------


class EOTModel(nn.Module):
    """K deterministic 'purifications': the tiny net's logits scaled by 1..K."""

    def __init__(self, eot_reduce: str | None, k: int = 3) -> None:
        super().__init__()
        self.net = TinyNet()
        self.eot_samples = k
        if eot_reduce is not None:
            self.options = SimpleNamespace(eot_reduce=eot_reduce)
        self.calls: Counter[str] = Counter()

    def _samples(self, x: Tensor) -> Tensor:
        z = self.net(x)
        return torch.stack([z * (i + 1) for i in range(self.eot_samples)])

    def sample_logits(self, x: Tensor) -> Tensor:
        self.calls["sample_logits"] += 1
        return self._samples(x)

    def forward(self, x: Tensor) -> Tensor:
        self.calls["forward"] += 1
        return self._samples(x).mean(0)


def _start_losses(model: EOTModel, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(loss-averaged, logit-averaged) cross-entropy at ``x``."""
    with torch.no_grad():
        samples = model._samples(x)
        per_sample = torch.stack(
            [nn.functional.cross_entropy(s, y, reduction="none") for s in samples]
        )
        return per_sample.mean(0), nn.functional.cross_entropy(samples.mean(0), y, reduction="none")


@pytest.mark.parametrize(
    ("view_reduce", "attack_reduce", "expected"),
    [
        ("loss", None, "sample_logits"),
        ("logits", None, "forward"),
        (None, None, "forward"),
        ("loss", "logits", "forward"),
        ("logits", "loss", "sample_logits"),
    ],
)
def test_eot_reduction_picks_the_method(batch, view_reduce, attack_reduce, expected) -> None:
    x, y = batch
    model = EOTModel(view_reduce)
    attack = PGDEOT(
        model, norm="Linf", eps=0.01, steps=2, random_start=False, eot_reduce=attack_reduce
    )
    attack(x, y)
    other = "forward" if expected == "sample_logits" else "sample_logits"
    assert model.calls[expected] == 3  # steps + 1 iterates
    assert model.calls[other] == 0
    loss_avg, logit_avg = _start_losses(model, x, y)
    want = loss_avg if expected == "sample_logits" else logit_avg
    torch.testing.assert_close(attack.loss_history[0], want)
    # The two estimators really differ: choosing one is not cosmetic.
    assert not torch.allclose(loss_avg, logit_avg)


# -- 5. defense loss ----------------------------------------------------------------------------


class FlatWithTerm(nn.Module):
    """Logits that do not move with x (zero CE gradient) and a defense term: the pixel sum."""

    def __init__(self) -> None:
        super().__init__()
        self.term_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        # Connected to x, so autograd works, but with a zero gradient; class 0 always wins.
        z = 0 * x.flatten(1)[:, :1]
        return torch.cat([z + 10, z.expand(-1, 9)], 1)

    def defense_loss(self, x: Tensor) -> Tensor:
        self.term_calls += 1
        return x.flatten(1).sum(1)


def test_defense_loss_changes_the_attack(batch) -> None:
    x, _ = batch
    y = torch.zeros(len(x), dtype=torch.long)
    kwargs = {"norm": "Linf", "eps": 0.1, "steps": 4, "random_start": False}

    model = FlatWithTerm()
    without = PGDEOT(model, defense_loss_weight=0.0, **kwargs)
    assert torch.equal(without(x, y), x)
    assert model.term_calls == 0
    assert any("zero gradient" in w for w in without.warnings)

    with_term = PGDEOT(model, defense_loss_weight=2.0, **kwargs)
    x_adv = with_term(x, y)
    assert model.term_calls == 5  # every iterate
    # Ascent on the pixel sum: every pixel pushed up to the budget (or to 1).
    torch.testing.assert_close(x_adv, (x + 0.1).clamp(max=1))
    assert with_term.loss_history[-1].mean() > with_term.loss_history[0].mean()
    assert not with_term.warnings


def test_defense_loss_none_is_ignored(tiny_model, batch) -> None:
    x, y = batch

    class NoTerm(nn.Module):
        def forward(self, inp: Tensor) -> Tensor:
            return tiny_model(inp)

        def defense_loss(self, inp: Tensor) -> None:
            return None

    kwargs = {"norm": "Linf", "eps": 0.05, "steps": 3}
    plain = PGDEOT(tiny_model, **kwargs)(x, y)
    torch.testing.assert_close(PGDEOT(NoTerm(), defense_loss_weight=1.0, **kwargs)(x, y), plain)


# -- 6. cut graphs ------------------------------------------------------------------------------


class DetachedOutput(TinyNet):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).detach()


class DetachedInput(TinyNet):
    """The output still needs grad (through the weights), but not through the input."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.detach())


@pytest.mark.parametrize("cls", [DetachedOutput, DetachedInput])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_cut_graph_does_not_crash(batch, cls: type[nn.Module], norm: str) -> None:
    x, y = batch
    eps = EPS[norm]
    attack = PGDEOT(cls(), norm=norm, eps=eps, steps=3, restarts=2)
    assert_in_threat_model(attack(x, y), x, norm, eps)
    assert len(attack.warnings) == 1
    assert "gradients unavailable" in attack.warnings[0]


def test_works_inside_no_grad(tiny_model, batch) -> None:
    x, y = batch
    attack = PGDEOT(tiny_model, norm="Linf", eps=0.05, steps=3, random_start=False)
    with torch.no_grad():
        inside = attack(x, y)
    assert not attack.warnings
    torch.testing.assert_close(inside, attack(x, y))


# -- 7. reproducibility -------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_seed_reproducible(tiny_model, batch, norm: str) -> None:
    x, y = batch
    eps = EPS[norm]
    torch.manual_seed(123)
    a = PGDEOT(tiny_model, norm=norm, eps=eps, steps=3, restarts=2, seed=7)(x, y)
    torch.manual_seed(456)  # the global RNG must not matter
    b = PGDEOT(tiny_model, norm=norm, eps=eps, steps=3, restarts=2, seed=7)(x, y)
    c = PGDEOT(tiny_model, norm=norm, eps=eps, steps=3, restarts=2, seed=8)(x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -- 8. argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"norm": "L1"}, "'L1'"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"eps": -0.1}, "eps=-0.1"),
        ({"eps": math.inf}, "eps=inf"),
        ({"steps": 0}, "steps=0"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"restarts": 0}, "restarts=0"),
        ({"rel_stepsize": 0.0}, "rel_stepsize=0.0"),
        ({"step_size": -1.0}, "step_size=-1.0"),
        ({"loss": "xent"}, "'xent'"),
        ({"loss": ["ce", "hinge"]}, "'hinge'"),
        ({"loss": []}, "loss=[]"),
        ({"loss": ["ce", "margin"]}, "restarts=1"),  # margin would never run
        ({"eot_reduce": "mean"}, "'mean'"),
        ({"defense_loss_weight": -0.5}, "defense_loss_weight=-0.5"),
        ({"check_reps": -1}, "check_reps=-1"),
        # Steps that cannot travel eps (profile quick's old BPDA+EOT: 10 steps of 2/255).
        (
            {"steps": 10, "step_size": 2 / 255},
            "PGDEOT: 10 steps of step_size=0.007843 travel at most 0.07843 < eps=0.1: the attack "
            "cannot reach the threat's boundary; use rel_stepsize (a fraction of eps, re-derived "
            "per budget) or at least 13 steps",
        ),
        (
            {"steps": 10, "rel_stepsize": 0.05},
            "PGDEOT: 10 steps of rel_stepsize=0.05 travel at most 0.5 eps < eps: the attack cannot "
            "reach the threat's boundary; use rel_stepsize >= 0.1 (1 / steps), null (2.5 / steps) "
            "or at least 20 steps",
        ),
        # The absolute step wins over the relative one, as in the schedule itself.
        ({"steps": 4, "rel_stepsize": 0.5, "step_size": 0.02}, "step_size=0.02"),
        ({"norm": "L2", "eps": 0.5, "steps": 3, "rel_stepsize": 0.25}, "3 steps of rel"),
    ],
)
def test_bad_arguments_raise(tiny_model, kwargs: dict, shown: str) -> None:
    args = {"norm": "Linf", "eps": 0.1} | kwargs
    with pytest.raises(ConfigError, match=re.escape(shown)):
        PGDEOT(tiny_model, **args)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 3, "rel_stepsize": 1 / 3},  # exactly eps, despite rounding
        {"steps": 3, "step_size": 0.1 / 3},
        {"steps": 13, "step_size": 2 / 255},
        {"steps": 1, "rel_stepsize": None},  # Madry's 2.5 / steps always reaches
        {"steps": 4, "rel_stepsize": 0.01, "step_size": 0.03},  # the absolute step decides
    ],
)
def test_steps_that_reach_eps_are_allowed(tiny_model, kwargs: dict) -> None:
    attack = PGDEOT(tiny_model, norm="Linf", eps=0.1, **kwargs)
    assert attack.steps * attack.alpha >= 0.1 * (1 - 1e-9)


def test_library_attacks_refuse_steps_that_cannot_reach_eps(tiny_model) -> None:
    from attacks.fgsm_rs import FGSMRS
    from attacks.pgd import PGD

    with pytest.raises(ConfigError, match=re.escape("PGD: 4 steps of rel_stepsize=0.2")):
        PGD(tiny_model, norm="L2", eps=0.5, steps=4, rel_stepsize=0.2)
    PGD(tiny_model, norm="L2", eps=0.5, steps=5, rel_stepsize=0.2)
    with pytest.raises(ConfigError, match=re.escape("rel_stepsize=0.5 is not allowed")):
        FGSMRS(tiny_model, norm="Linf", eps=0.1, rel_stepsize=0.5)
    FGSMRS(tiny_model, norm="Linf", eps=0.1, rel_stepsize=1.0)


def test_dlr_needs_three_classes() -> None:
    x, y = torch.full((2, 1, 1, 1), 0.5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError, match="3 classes"):
        PGDEOT(Cliff(), norm="Linf", eps=0.1, steps=1, loss="dlr")(x, y)


# -- 9. success re-checks -----------------------------------------------------------------------


class Counting(nn.Module):
    """The tiny net with class 0 far ahead (never fooled), counting forward calls."""

    eot_samples = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x) + torch.tensor([100.0] + [0.0] * 9)


@pytest.mark.parametrize(("check_reps", "per_iterate"), [(0, 1), (10, 1 + 3), (4, 1 + 1)])
def test_check_reps_adds_forward_calls(batch, check_reps: int, per_iterate: int) -> None:
    x, _ = batch
    y = torch.zeros(len(x), dtype=torch.long)
    model = Counting()
    steps = 3
    attack = PGDEOT(model, norm="Linf", eps=0.01, steps=steps, check_reps=check_reps)
    attack(x, y)
    assert not attack.fooled_any.any()
    assert model.calls == (steps + 1) * per_iterate


def test_check_reps_skip_a_deterministic_model(batch) -> None:
    # A deterministic model's extra passes would repeat the logits at hand: none are made.
    x, _ = batch
    model = Counting()
    model.stochastic = False  # type: ignore[attr-defined]
    attack = PGDEOT(model, norm="Linf", eps=0.01, steps=3, check_reps=10)
    attack(x, torch.zeros(len(x), dtype=torch.long))
    assert model.calls == 3 + 1


def test_auto_early_stop_keeps_attacking_points_of_a_stochastic_view() -> None:
    class Flagged(torch.nn.Linear):
        stochastic = False

    model = Flagged(4, 3)
    assert PGDEOT(model, norm="Linf", eps=0.1).freezes_fooled_points
    model.stochastic = True
    # One EOT estimate fooled is not fresh noise fooled: keep optimising those points.
    assert not PGDEOT(model, norm="Linf", eps=0.1).freezes_fooled_points
    # Re-checked on many purifications, a success is trusted and the point can stop.
    assert PGDEOT(model, norm="Linf", eps=0.1, check_reps=8).freezes_fooled_points
    assert PGDEOT(model, norm="Linf", eps=0.1, early_stop=True).freezes_fooled_points
    with pytest.raises(ConfigError, match="early_stop='sometimes'"):
        PGDEOT(model, norm="Linf", eps=0.1, early_stop="sometimes")


# -- 10. declared traits ------------------------------------------------------------------------


def test_attacks_declare_what_they_return(tiny_model) -> None:
    from attacks.autoattack import AutoAttack
    from attacks.base import Traits, traits
    from attacks.fgsm_rs import FGSMRS
    from attacks.pgd import PGD

    # The harness's PGD and AutoAttack keep the best iterate; torchattacks returns the last.
    assert traits(PGDEOT(tiny_model, norm="Linf", eps=0.1)) == Traits("white-box", True, 1)
    assert traits(PGD(tiny_model, norm="Linf", eps=0.1)) == Traits("white-box", False, 1)
    assert traits(FGSMRS(tiny_model, norm="Linf", eps=0.1)) == Traits("white-box", False, 1)
    rand = AutoAttack(tiny_model, norm="Linf", eps=0.1, version="rand")
    assert traits(rand) == Traits("white-box", True, 20)
    square = AutoAttack(tiny_model, norm="Linf", eps=0.1, version="custom", attacks=["square"])
    assert traits(square) == Traits("black-box", True, 1)
    for cls in (PGDEOT, PGD, FGSMRS, AutoAttack):
        assert "returns_best" in vars(cls), f"{cls.__name__} declares returns_best itself"
        assert "kind" in vars(cls), f"{cls.__name__} declares kind itself"

"""Convergence-driven budgets: the escalation's levels, its decision, and planted weaknesses.

The acceptance of the escalation is on planted defenses whose truth is known: a purifier that is
the identity in its forward pass has the bare classifier's robustness, however it bends its
gradients. Each is evaluated at ``profile=quick`` (the default bench's budgets, on digits) and
must end within 5 points of that truth, measured by a strong independent attack on the bare
classifier on the same images, or be ``failed`` with the check that names its trick. A
quantizer (not the identity) and a purifier with NaN gradients must be named.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import Tensor

from attacks.pgd_eot import PGDEOT
from bench.engine.attack_view import AttackView, ViewOptions
from bench.engine.escalation import (
    Budget,
    Escalation,
    EscalationConfig,
    Level,
    estimate,
    level_budget,
    probe_sample,
    projection,
    state,
    tolerance,
)
from bench.reporting.records import RunRecord
from bench.run import evaluate
from common.errors import ConfigError
from defenses.base import Defense, DefenseInfo
from defenses.none import NoDefense
from tests.conftest import fast_overrides

log = logging.getLogger(__name__)

# -- planted defenses: the identity forward, a weakness hidden in the backward pass ------------


class _Bend(torch.autograd.Function):
    """Identity forward; backward ``scale * grad + noise`` (noise drawn in the forward pass)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, noise: Tensor | None) -> Tensor:
        ctx.scale, ctx.noise = scale, noise
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        out = ctx.scale * grad
        if ctx.noise is not None:
            out = out + ctx.noise * grad.abs().amax()
        return out, None, None


class ReverseGradient(Defense):
    """Returns its input; its gradient points the wrong way (exact PGD climbs away)."""

    info = DefenseInfo(stochastic=False, differentiable=True, purifier_calls=0)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return _Bend.apply(x, -1.0, None)


class NoisyGradient(Defense):
    """Returns its input; its gradient drowns in noise 20 times its largest entry."""

    info = DefenseInfo(stochastic=False, differentiable=True, purifier_calls=0)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        noise = 20 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return _Bend.apply(x, 1.0, noise)


class TinyNoise(Defense):
    """Adds Gaussian noise of std 0.02: stochastic, but as robust as the bare classifier."""

    info = DefenseInfo(stochastic=True, differentiable=True, purifier_calls=0)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + 0.02 * noise).clamp(0, 1)


# -- the levels and the decision ---------------------------------------------------------------


def test_levels_double_steps_and_eot_and_add_a_restart_with_another_loss() -> None:
    cfg = EscalationConfig()
    base = Budget(steps=10, eot_samples=2, restarts=2, losses=("ce", "margin"))
    one = level_budget(base, 1, cfg, stochastic=True, num_classes=10)
    two = level_budget(base, 2, cfg, stochastic=True, num_classes=10)
    assert (one.steps, one.eot_samples, one.restarts) == (20, 4, 3)
    assert one.losses == ("ce", "margin", "dlr")
    assert (two.steps, two.eot_samples, two.restarts) == (40, 8, 4)
    det = level_budget(base, 2, cfg, stochastic=False, num_classes=10)
    assert det.eot_samples == 2  # a deterministic defense gains nothing from more samples
    binary = level_budget(base, 1, cfg, stochastic=False, num_classes=2)
    assert "dlr" not in binary.losses  # DLR needs a third class
    assert estimate(one, targets=10, draws=4) == 10 * (21 * 4 * 3 + 4)


def test_tolerance_is_one_image_or_one_standard_error() -> None:
    cfg = EscalationConfig()
    assert tolerance(cfg, 0.5, 256) == pytest.approx((0.25 / 256) ** 0.5)
    assert tolerance(cfg, 0.0, 256) == pytest.approx(1 / 256)
    assert tolerance(EscalationConfig(tolerance=0.02), 0.5, 256) == 0.02


def test_the_probe_is_a_seeded_sample_of_the_survivors() -> None:
    mask = torch.zeros(40, dtype=torch.bool)
    mask[::2] = True
    one, again = probe_sample(mask, 8, seed=3), probe_sample(mask, 8, seed=3)
    assert int(one.sum()) == 8 and not (one & ~mask).any()
    assert torch.equal(one, again) and not torch.equal(one, probe_sample(mask, 8, seed=4))
    assert projection(probed=8, broken=2, rest=12) == 3.0


def test_a_projected_change_counts_against_the_tolerance() -> None:
    cfg = EscalationConfig()
    rules = {"single": 0.5}
    path = Escalation("pgd", "single", 100)
    path.levels = [Level(0, {}, 100, 0, 0.0, rules), Level(1, {}, 20, 0, 0.0, {"single": 0.48})]
    assert path.converged(cfg, projected=2.0) and "projected from a probe" in path.reason
    assert not path.converged(cfg, projected=4.0)  # 2 + 4 images = 6 points > one SE (5)


def test_state_puts_escalation_and_checks_together() -> None:
    assert state({"state": "converged"}, [], []) == "converged"
    assert state({"state": "bound"}, [], []) == "bound"
    assert state({"state": "converged"}, [], ["unstable_predictions"]) == "bound"
    assert state({"state": "converged"}, ["unbounded"], []) == "failed"
    assert state(None, [], []) == "bound"  # not escalated: nobody checked it stopped moving


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ("escalation.max_levels=0", "escalation.max_levels=0"),
        ("escalation.calls_cap=-5", "escalation.calls_cap=-5"),
        ("escalation.tolerance=1.5", "escalation.tolerance=1.5"),
        ("escalation.losses=[hinge]", "escalation.losses=\\['hinge'\\]"),
        ("+escalation.speed=11", "escalation options \\['speed'\\]"),
        ("escalation.probe=0", "escalation.probe=0"),
    ],
)
def test_bad_escalation_config_fails_before_work(
    compose_cfg, tmp_path: Path, extra: str, match: str
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    cfg = compose_cfg([*fast_overrides(cache, tmp_path), extra])
    with pytest.raises(ConfigError, match=match):
        evaluate(cfg, output_dir=out, choices=dict(cfg.hydra.runtime.choices))
    assert not (out / "record.json").exists() and not cache.exists()


# -- end to end --------------------------------------------------------------------------------


def _run(compose_cfg, cache: Path, out: Path, defense: dict[str, Any], *extra: str) -> RunRecord:
    cfg = compose_cfg([*fast_overrides(cache, out.parent), *extra])
    with open_dict(cfg):
        cfg.defense = OmegaConf.create(defense)
    choices = dict(cfg.hydra.runtime.choices)
    choices["defense"] = defense["_target_"].rsplit(".", 1)[-1].lower()
    return evaluate(cfg, output_dir=out, choices=choices)


def _weak(compose_cfg, cache: Path, tmp_path: Path, *extra: str) -> RunRecord:
    """The bare classifier under PGD-5 (CE): a suite far from converged."""
    none = {"_target_": "defenses.none.NoDefense"}
    args = ("suite=pgd", "suite.attacks.pgd.steps=5", *extra)
    return _run(compose_cfg, cache, tmp_path / "run", none, *args)


def test_a_weak_suite_is_escalated_until_it_converges(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    """PGD-5 with CE leaves images a longer margin attack breaks; the path records each level."""
    record = _weak(
        compose_cfg, cache_dir, tmp_path, "escalation.max_levels=3", "escalation.calls_cap=null"
    )
    path = record.escalation
    levels = path["levels"]
    assert [lv["level"] for lv in levels] == list(range(len(levels))) and len(levels) >= 2
    accs = [lv["rules"]["single"] for lv in levels]
    assert accs == sorted(accs, reverse=True)  # a worst case over more stages only falls
    assert accs[-1] < accs[0]  # the suite's PGD-5 was not converged
    assert levels[1]["budget"] == {
        "steps": 10,
        "eot_samples": 1,
        "restarts": 2,
        "loss": ["ce", "margin"],
    }
    assert record.robust_acc.value == pytest.approx(accs[-1])
    assert record.verdict == path["state"] == "converged"
    assert path["level"] == levels[-1]["level"]
    for name in (f"escalate@{lv['level']}" for lv in levels[1:]):
        assert record.attacks[name].n_attacked > 0
    assert {"clean_s", "attacks_s", "escalation_s", "diagnostics_s"} <= set(record.cost)


def test_the_cap_stops_escalation_and_the_row_says_bound(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    record = _weak(compose_cfg, cache_dir, tmp_path, "escalation.calls_cap=8")
    assert record.verdict == "bound" and record.escalation["state"] == "bound"
    assert "escalation.calls_cap" in record.escalation["reason"]
    assert [lv["level"] for lv in record.escalation["levels"]] == [0]


def test_a_probe_that_breaks_many_attacks_the_rest_and_one_that_breaks_none_stops(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    """PGD-1 is far from converged: level 1's probe breaks enough that the rest is attacked too;
    once the number stops moving a probe settles its level alone."""
    none = {"_target_": "defenses.none.NoDefense"}
    extra = ("escalation.max_levels=4", "escalation.calls_cap=null", "escalation.probe=12")
    args = ("suite=pgd", "suite.attacks.pgd.steps=1", *extra)
    record = _run(compose_cfg, cache_dir, tmp_path / "run", none, *args)
    levels = record.escalation["levels"]
    assert levels[1]["probe"] is None and "escalate@1+" in record.attacks
    assert record.attacks["escalate@1"].n_attacked == 12
    both = record.attacks["escalate@1"].n_attacked + record.attacks["escalate@1+"].n_attacked
    assert levels[1]["attacked"] == both
    last = levels[-1]
    assert record.verdict == "converged" and last["probe"] is not None
    assert f"escalate@{last['level']}+" not in record.attacks and last["attacked"] == 12
    assert last["probe"]["survivors"] > 12 and "probe" in record.escalation["reason"]


def test_escalation_resumes_across_levels(
    compose_cfg, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed inside level 2 resumes there and ends with the uninterrupted record."""
    args = (
        "suite=pgd",
        "suite.attacks.pgd.steps=5",
        "escalation.calls_cap=null",
        "escalation.tolerance=0",
    )
    none = {"_target_": "defenses.none.NoDefense"}
    full = _run(compose_cfg, cache_dir, tmp_path / "full", none, *args, "batch_size=16")
    if len(full.escalation["levels"]) < 3:
        pytest.skip("the run converged at level 1: no level 2 to interrupt")
    from bench.engine import attacking

    real = attacking.AttackRun.batch

    def dies_in_level_2(self: Any, b: int, xb: Tensor, yb: Tensor) -> Any:
        if self.name == "escalate@2" and b == 1:
            raise RuntimeError("planted failure in level 2")
        return real(self, b, xb, yb)

    monkeypatch.setattr(attacking.AttackRun, "batch", dies_in_level_2)
    with pytest.raises(RuntimeError, match="planted failure"):
        _run(compose_cfg, cache_dir, tmp_path / "a", none, *args, "batch_size=16")
    monkeypatch.setattr(attacking.AttackRun, "batch", real)
    resumed = _run(compose_cfg, cache_dir, tmp_path / "b", none, *args, "batch_size=16")
    drop = ("wall_s", "purifications_per_image")
    strip = [{k: v for k, v in lv.items() if k not in drop} for lv in resumed.escalation["levels"]]
    want = [{k: v for k, v in lv.items() if k not in drop} for lv in full.escalation["levels"]]
    assert strip == want and resumed.robust_acc == full.robust_acc


# -- acceptance: planted weaknesses at the default bench's budgets -----------------------------


def _digits(cache: Path, compose_cfg) -> tuple[Any, torch.nn.Module]:
    """The digits dataset and the cached classifier every run of this file attacks."""
    from hydra.utils import instantiate

    cfg = compose_cfg(fast_overrides(cache, cache.parent))
    dataset = instantiate(cfg.dataset)
    return dataset, instantiate(cfg.classifier).load(dataset, torch.device("cpu"))


def _true_bare_accuracy(record: RunRecord, cache: Path, compose_cfg) -> float:
    """A strong attack on the bare classifier on the record's images: PGD-200, 3 losses."""
    dataset, classifier = _digits(cache, compose_cfg)
    x, y = dataset.test()
    idx = torch.tensor(record.indices)
    x, y = x[idx], y[idx]
    view = AttackView(classifier, NoDefense(), ViewOptions(eot_samples=1))
    attack = PGDEOT(
        view,
        norm="Linf",
        eps=float(record.threat["eps"]),
        steps=200,
        restarts=3,
        loss=["ce", "margin", "dlr"],
        seed=1,
    )
    with torch.no_grad():
        clean_ok = view(x).argmax(1) == y
    x_adv = attack(x, y)
    with torch.no_grad():
        return float(((view(x_adv).argmax(1) == y) & clean_ok).float().mean())


# The default bench's budgets on digits, escalation uncapped so its convergence decides.
QUICK = (
    "profile=quick",
    "suite=quick",  # fast_overrides picks the smoke suite; the profile's is the point here
    "n_samples=64",
    "batch_size=64",
    "diagnostics.n_samples=16",
    "escalation.max_levels=3",
    "escalation.calls_cap=null",
)


PLANTED = {
    # name: (defense config, checks any of which may name its trick when it is not broken)
    "reverse": (
        {"_target_": "tests.test_escalation.ReverseGradient"},
        ("unbounded", "eps_monotone", "blackbox_beats_whitebox"),
    ),
    "noisy_gradient": (
        {"_target_": "tests.test_escalation.NoisyGradient"},
        ("unbounded", "eps_monotone", "blackbox_beats_whitebox"),
    ),
    "tiny_noise": ({"_target_": "tests.test_escalation.TinyNoise"}, ()),
    "detach": ({"_target_": "tests.planted.Detach"}, ("unavailable_gradients[exact]",)),
    "identity": ({"_target_": "defenses.none.NoDefense"}, ()),
    "quantize": (
        {"_target_": "tests.planted.Quantize", "levels": 8},
        ("unavailable_gradients[exact]", "aa_zero_gradients"),
    ),
    "nan_gradient": ({"_target_": "tests.planted.NaNGradient"}, ("gradient_failures",)),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_weakness_is_found_or_named_at_the_quick_profile(
    compose_cfg, cache_dir: Path, tmp_path: Path, name: str
) -> None:
    defense, tricks = PLANTED[name]
    record = _run(compose_cfg, cache_dir, tmp_path / name, defense, *QUICK)
    saved = json.loads((tmp_path / name / "record.json").read_text())
    assert saved["status"] == "completed"
    truth = _true_bare_accuracy(record, cache_dir, compose_cfg)
    found = abs(record.robust_acc.value - truth) <= 0.05
    named = isinstance(record.verdict, list) and any(t in record.verdict for t in tricks)
    log.info(
        "%s: robust %.3f, truth %.3f, verdict %s, attacks %s",
        name,
        record.robust_acc.value,
        truth,
        record.verdict,
        list(record.attacks),
    )
    assert found or named, (name, record.robust_acc.value, truth, record.verdict)
    if found and not named:
        assert record.verdict in ("converged", "bound")

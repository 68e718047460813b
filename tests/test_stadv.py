"""The StAdv flow threat (threat=stadv): its attack, its threat check, its suite and its refusals.

End to end on digits and the CPU: StAdv breaks the bare classifier within the flow bound, and a
stochastic defense runs with EOT and every decision rule. The threat check is held to what it
must refuse (a flow beyond the bound, a missing or ill-shaped flow, images its flow does not
produce), through planted attacks that run in the engine, and Lp attacks are refused under the
flow threat (and StAdv under an Lp one) before any network is trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import Tensor, nn

from attacks.stadv import StAdv, flow_smoothness, warp
from bench.engine.threat import WARP_TOLERANCE, check_threat, flow_warp
from bench.reporting.records import RunRecord
from bench.run import evaluate
from common.errors import ConfigError, ThreatModelViolation
from tests.conftest import fast_overrides

EPS = 0.05  # conf/threat/stadv.yaml
NOISE = {"_target_": "tests.planted.GaussianNoise", "sigma": 0.1}
# A seconds-long StAdv suite and diagnostics (the suite's own budget is 50 steps, 2 restarts).
SMALL = [
    "suite.attacks.stadv.steps=20",
    "suite.attacks.stadv_transfer.steps=10",
    "diagnostics.steps=5",
    "diagnostics.eps_factors=[0.5,1.0,2.0]",
    "diagnostics.repeats=4",
]


def overrides(cache_dir: Path, out: Path, *extra: str, threat: str = "stadv") -> list[str]:
    """digits on the CPU under ``threat`` with the threat's own suite (not smoke's)."""
    fast = [o for o in fast_overrides(cache_dir, out.parent) if not o.startswith("suite=")]
    return [*fast, f"threat={threat}", *extra]


def run(compose_cfg, overrides: list[str], out: Path, defense: dict | None = None) -> RunRecord:
    cfg = compose_cfg(overrides)
    choices = dict(cfg.hydra.runtime.choices)
    if defense is not None:
        with open_dict(cfg):
            cfg.defense = OmegaConf.create(defense)
        choices["defense"] = defense["_target_"].rsplit(".", 1)[-1].lower()
    return evaluate(cfg, output_dir=out, choices=choices)


def with_attack(compose_cfg, overrides: list[str], attack: dict[str, Any]) -> Any:
    """The composed config with the suite replaced by the one ``attack``."""
    cfg = compose_cfg(overrides)
    with open_dict(cfg):
        cfg.suite.attacks = OmegaConf.create({"planted": attack})
        cfg.suite.views = {}
    return cfg


# -- planted flow attacks ------------------------------------------------------------------


class _Planted:
    """A flow attack that warps by a constant flow of ``factor * eps`` and reports something."""

    norms: ClassVar[tuple[str, ...]] = ("stadv",)

    def __init__(self, model: nn.Module, *, norm: str, eps: float, factor: float = 2.0) -> None:
        self.eps, self.factor = eps, factor
        self.flow: Tensor | None = None

    def applied(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        return torch.full((n, h, w, 2), self.factor * self.eps, device=x.device)


class Overflow(_Planted):
    """Applies and reports a flow of twice the bound."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        self.flow = self.applied(x)
        return warp(x, self.flow).clamp(0, 1)


class NoFlow(_Planted):
    """Applies a flow within the bound but reports none."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return warp(x, self.applied(x)).clamp(0, 1)


class WrongFlow(_Planted):
    """Applies a flow beyond the bound and reports a zero one (the image shows no flow)."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        flow = self.applied(x)
        self.flow = torch.zeros_like(flow)
        return warp(x, flow).clamp(0, 1)


def planted(name: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "_target_": f"tests.test_stadv.{name}",
        "_partial_": True,
        "norm": "${threat.norm}",
        "eps": "${threat.eps}",
        **kwargs,
    }


# -- the warp, the smoothness term, the attack ---------------------------------------------


def test_a_zero_flow_is_the_identity_and_one_pixel_is_two_over_the_width() -> None:
    x = torch.rand(3, 2, 8, 6, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(3, 8, 6, 2)
    assert torch.allclose(warp(x, zero), x, atol=1e-6)
    # A flow of one pixel to the right samples the right neighbour (the last column the border).
    right = zero.clone()
    right[..., 0] = 2 / 6
    shifted = warp(x, right)
    assert torch.allclose(shifted[..., :-1], x[..., 1:], atol=1e-6)
    assert torch.allclose(shifted[..., -1], x[..., -1], atol=1e-6)
    # The harness's own definition of the threat agrees with the attack's warp.
    assert torch.allclose(flow_warp(x, right), shifted, atol=1e-7)


def test_flow_smoothness_is_xiao_et_al_s_sum_over_four_neighbours() -> None:
    flow = torch.randn(2, 5, 4, 2, generator=torch.Generator().manual_seed(1))
    expected = torch.zeros(2)
    h, w = 5, 4
    for i in range(h):
        for j in range(w):
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                q = flow[:, min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1)]
                d = flow[:, i, j] - q
                expected += (d.pow(2).sum(1) + 1e-8).sqrt()
    assert torch.allclose(flow_smoothness(flow), expected, rtol=1e-5)
    # A constant flow (a translation) is perfectly smooth, whatever its size.
    constant = torch.full((1, 5, 4, 2), 0.3)
    assert flow_smoothness(constant).item() == pytest.approx(4 * h * w * 1e-4, rel=1e-3)


def test_stadv_reaches_the_bound_reports_its_flow_and_passes_the_check(tiny_model, batch) -> None:
    x, y = batch
    attack = StAdv(tiny_model, norm="stadv", eps=EPS, steps=10, seed=3)
    x_adv = attack(x, y)
    assert attack.flow.shape == (len(x), 8, 8, 2)
    worst = check_threat(x, x_adv, "stadv", EPS, "stadv", flow=attack.flow)
    assert worst <= EPS + 1e-6
    reach = attack.flow.flatten(1).abs().amax(1) / EPS
    assert reach[~attack.fooled_any].min() >= 0.99, "a flow that stopped short of the bound"
    with torch.no_grad():
        assert (tiny_model(x_adv).argmax(1) == y).float().mean() < 1.0
    # Its random starts come from its own seed: the same call gives the same images.
    assert torch.equal(StAdv(tiny_model, norm="stadv", eps=EPS, steps=10, seed=3)(x, y), x_adv)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"norm": "Linf"}, "StAdv does not support norm='Linf'; allowed: stadv"),
        ({"steps": 4, "rel_stepsize": 0.2}, "StAdv: 4 steps of rel_stepsize=0.2"),
        ({"loss": ["ce", "margin"]}, "StAdv loss=['ce', 'margin'] with restarts=1"),
        ({"smoothness": -1.0}, "StAdv smoothness=-1.0 is not allowed"),
    ],
)
def test_stadv_refuses_bad_arguments(tiny_model, kwargs: dict[str, Any], shown: str) -> None:
    args = {"norm": "stadv", "eps": EPS, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(shown)):
        StAdv(tiny_model, **args)


# -- the threat check ----------------------------------------------------------------------


def _flow(x: Tensor, value: float) -> Tensor:
    n, _, h, w = x.shape
    return torch.full((n, h, w, 2), value)


@pytest.mark.parametrize(
    ("case", "shown"),
    [
        ("beyond", "stadv flow 0.0625 > eps 0.05"),
        ("missing", "reported no flow field"),
        ("shape", "reported a flow of shape (16, 8, 8, 1)"),
        ("nan", "NaN or inf in its flow field"),
        ("mismatch", "not the clean ones warped by the flow it reported"),
        ("pixels", "left [0, 1]"),
    ],
)
def test_the_flow_check_refuses_what_the_threat_does_not_allow(
    batch, case: str, shown: str
) -> None:
    x, _ = batch
    flow = _flow(x, 0.0625 if case == "beyond" else 0.04)
    x_adv = warp(x, flow).clamp(0, 1)
    if case == "missing":
        flow = None
    elif case == "shape":
        flow = flow[..., :1]
    elif case == "nan":
        flow = flow.clone()
        flow[0, 0, 0, 0] = float("nan")
    elif case == "mismatch":
        x_adv = (x_adv + 10 * WARP_TOLERANCE).clamp(0, 1)
    elif case == "pixels":
        x_adv = x_adv + 1.0
    with pytest.raises(ThreatModelViolation, match=re.escape(shown)):
        check_threat(x, x_adv, "stadv", EPS, "planted", flow=flow)
    # Within the bound and exactly the warp it reports, the same batch passes.
    good = _flow(x, EPS)
    worst = check_threat(x, warp(x, good).clamp(0, 1), "stadv", EPS, "ok", flow=good)
    assert worst == pytest.approx(EPS)


@pytest.mark.parametrize(
    ("attack", "shown"),
    [
        ("Overflow", "planted exceeded the threat model: stadv flow 0.1 > eps 0.05"),
        ("NoFlow", "planted reported no flow field"),
        ("WrongFlow", "planted returned images that are not the clean ones warped by the flow"),
    ],
)
def test_a_run_fails_on_a_flow_attack_that_breaks_the_threat(
    compose_cfg, cache_dir: Path, tmp_path: Path, attack: str, shown: str
) -> None:
    out = tmp_path / "run"
    cfg = with_attack(compose_cfg, overrides(cache_dir, out), planted(attack))
    with pytest.raises(ThreatModelViolation, match=re.escape(shown)):
        evaluate(cfg, output_dir=out, choices=cfg.hydra.runtime.choices)
    saved = json.loads((out / "record.json").read_text())
    assert saved["status"] == "failed" and "ThreatModelViolation" in saved["error"]
    assert saved["robust_acc"] is None


# -- refusals before any work --------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "shown"),
    [
        (
            ["suite=bench"],
            "attack 'pgd' (attacks.pgd_eot.PGDEOT) does not support threat norm 'stadv'; "
            "allowed threats: Linf, L2",
        ),
        (
            ["suite=autoattack"],
            "attack 'autoattack' (attacks.autoattack.AutoAttack) does not support threat norm "
            "'stadv'; allowed threats: Linf, L2",
        ),
        (
            ["suite=pgd", "attack@suite.attacks.pgd=square"],
            "attack 'pgd' (attacks.autoattack.AutoAttack) does not support threat norm 'stadv'",
        ),
        (
            ["suite=pgd", "attack@suite.attacks.pgd=bpda"],
            "attack 'pgd' (attacks.pgd_eot.PGDEOT) does not support threat norm 'stadv'",
        ),
        (
            ["suite=quick", "profile=quick"],
            "attack 'pgd' (attacks.pgd_eot.PGDEOT) does not support threat norm 'stadv'",
        ),
        (
            ["suite=stadv", "threat=linf"],
            "attack 'stadv' (attacks.stadv.StAdv) does not support threat norm 'Linf'; "
            "allowed threats: stadv",
        ),
    ],
)
def test_attacks_of_another_threat_are_refused_before_any_work(
    compose_cfg, tmp_path: Path, extra: list[str], shown: str
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    threat = next((e.split("=")[1] for e in extra if e.startswith("threat=")), "stadv")
    chosen = [e for e in extra if not e.startswith("threat=")]
    cfg = compose_cfg(overrides(cache, out, *chosen, threat=threat))
    with pytest.raises(ConfigError, match=re.escape(shown)) as err:
        evaluate(cfg, output_dir=out, choices=cfg.hydra.runtime.choices)
    assert "\n" not in str(err.value)
    assert not (out / "record.json").exists()
    assert not cache.exists(), "the refusal must come before any network is trained"


def test_the_threat_picks_its_suite_over_a_profile_and_the_command_line_wins(
    compose_cfg,
) -> None:
    def suite(*args: str) -> str:
        return compose_cfg(list(args)).hydra.runtime.choices.suite

    assert suite("threat=stadv") == "stadv"
    assert suite("threat=stadv", "profile=quick") == suite("threat=stadv", "profile=paper")
    assert suite("threat=stadv", "profile=quick") == "stadv"
    assert compose_cfg(["threat=stadv", "profile=quick"]).n_samples == 256  # its budgets
    assert suite("threat=stadv", "suite=pgd") == "pgd"
    assert suite() == "bench" and suite("profile=quick") == "quick"
    cfg = compose_cfg(["threat=stadv", "dataset=digits"])
    assert cfg.threat.norm == "stadv" and cfg.threat.eps == EPS


# -- end to end ----------------------------------------------------------------------------


def test_stadv_breaks_the_bare_classifier_within_the_bound(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    record = run(compose_cfg, overrides(cache_dir, out, "defense=none", *SMALL), out)
    assert record.status == "completed" and record.threat["norm"] == "stadv"
    assert record.clean_acc.value > 0.9
    assert record.robust_acc.value < record.clean_acc.value - 0.3, "StAdv did not break it"
    for name, attack in record.attacks.items():
        # Every adversarial image of every batch passed the flow check: none beyond the bound.
        assert attack.max_perturbation <= EPS + 1e-6, name
    assert record.attacks["stadv"].max_perturbation >= 0.99 * EPS
    assert record.attacks["stadv_transfer"].kind == "transfer"
    # The escalation strengthened StAdv, the lead of the flow threat's suite.
    assert record.escalation["lead"] == "stadv" and len(record.escalation["levels"]) >= 2
    assert record.attacks["escalate@1"].target == "attacks.stadv.StAdv"
    # Diagnostics: the eps sweep runs on the flow bound, the Lp-only check is skipped with a
    # reason, and nothing failed.
    diagnostics = record.diagnostics
    assert "unbounded" not in diagnostics["checks"]
    assert "Lp check" in diagnostics["skipped"]["unbounded"]
    curve = diagnostics["checks"]["eps_monotone"]["value"]
    assert list(curve) == ["0.025", "0.05", "0.1"] and curve["0.1"] <= curve["0.025"]
    assert record.verdict in ("converged", "bound"), diagnostics["checks"]


def test_a_stochastic_defense_runs_with_eot_and_every_decision_rule(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    extra = [*SMALL, "eot_default=2", "decision.draws=4", "escalation.max_levels=1"]
    record = run(compose_cfg, overrides(cache_dir, out, *extra), out, defense=NOISE)
    assert record.status == "completed" and record.defense_info["stochastic"]
    assert record.attacks["stadv"].view["eot_samples"] == 2
    assert record.attacks["escalate@1"].view["eot_samples"] == 4
    assert record.headline_rule == "avg" and record.decision["draws"] == 4
    rules = {rule: record.rules[rule]["robust"].value for rule in record.rules}
    assert set(rules) == {"single", "avg", "worst", "vote"}
    assert rules["worst"] <= rules["avg"] and rules["worst"] <= rules["single"]
    assert record.robust_acc.value < record.clean_acc.value - 0.2
    assert all(a.max_perturbation <= EPS + 1e-6 for a in record.attacks.values())
    assert record.diagnostics["checks"]["randomness"]["passed"]

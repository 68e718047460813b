"""The adaptive evaluation engine end to end, with planted defenses of known behaviour.

Each planted defense (tests/planted.py) has a known truth: a quantizer masks gradients, a
noise layer is stochastic, a detaching purifier cuts the graph, the identity is the bare
classifier. The engine must find each of them out on its own, on digits, on CPU, in seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from bench.engine.diagnostics import failed_checks
from bench.reporting.records import RunRecord
from bench.run import evaluate
from common.errors import ConfigError, NonFiniteError
from tests.conftest import fast_overrides

NONE = {"_target_": "defenses.none.NoDefense"}
QUANTIZE = {"_target_": "tests.planted.Quantize", "levels": 8}
NOISE = {"_target_": "tests.planted.GaussianNoise", "sigma": 0.3}
DETACH = {"_target_": "tests.planted.Detach"}


def run_with(
    compose_cfg, cache_dir: Path, out: Path, defense: dict[str, Any], *extra: str
) -> RunRecord:
    """Evaluate a planted defense (not a conf/defense option) on digits with the PGD suite."""
    overrides = [*fast_overrides(cache_dir, out.parent), "suite=pgd", "n_samples=128"]
    cfg = compose_cfg([*overrides, "batch_size=128", *extra])
    with open_dict(cfg):
        cfg.defense = OmegaConf.create(defense)
    choices = dict(cfg.hydra.runtime.choices)
    choices["defense"] = defense["_target_"].rsplit(".", 1)[-1].lower()
    return evaluate(cfg, output_dir=out, choices=choices)


def robust(record: RunRecord, rule: str) -> float:
    return record.rules[rule]["robust"].value


def test_identity_is_trusted(compose_cfg, cache_dir: Path, tmp_path: Path) -> None:
    record = run_with(compose_cfg, cache_dir, tmp_path / "run", NONE)
    assert record.verdict == "converged", record.diagnostics["checks"]
    checks = record.diagnostics["checks"]
    assert checks["unbounded"]["value"] <= 0.1
    assert checks["randomness"]["passed"] and checks["unavailable_gradients[exact]"]["passed"]
    saved = json.loads((tmp_path / "run" / "record.json").read_text())
    assert saved["verdict"] == "converged" and "eps_monotone" in saved["diagnostics"]["checks"]
    assert saved["escalation"]["state"] == "converged" and saved["escalation"]["levels"]


def test_quantizer_is_flagged_under_exact_and_broken_by_bpda(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    bare = run_with(compose_cfg, cache_dir, tmp_path / "bare", NONE)
    exact = run_with(compose_cfg, cache_dir, tmp_path / "exact", QUANTIZE)
    bpda = run_with(compose_cfg, cache_dir, tmp_path / "bpda", QUANTIZE, "view.grad=bpda")
    # Exact gradients through rounding are zero: the attack does nothing, the engine says so.
    assert exact.robust_acc.value >= exact.clean_acc.value - 0.05
    assert "unavailable_gradients[exact]" in exact.verdict and "unbounded" in exact.verdict
    # BPDA passes the gradient through and breaks it to about the bare classifier's level.
    assert bpda.diagnostics["checks"]["unavailable_gradients[bpda]"]["passed"]
    assert bpda.robust_acc.value <= bare.robust_acc.value + 0.15
    assert bpda.robust_acc.value < exact.robust_acc.value - 0.3


def test_noise_defense_needs_eot_and_repeated_judging(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    # The suite's own numbers: the escalation would raise the EOT of both.
    fixed = "escalation.enabled=false"
    no_eot = run_with(compose_cfg, cache_dir, tmp_path / "a", NOISE, "view.eot_samples=1", fixed)
    eot = run_with(compose_cfg, cache_dir, tmp_path / "b", NOISE, "view.eot_samples=8", fixed)
    for record in (no_eot, eot):
        assert record.defense_info["stochastic"] and record.decision["draws"] == 10
        assert record.headline_rule == "avg"
        assert record.diagnostics["checks"]["randomness"]["passed"]
        # Structural: an image that survives all N draws survives the first and the mean.
        assert robust(record, "worst") <= robust(record, "avg")
        assert robust(record, "worst") <= robust(record, "single")
        # Avg is the mean of N one-pass evaluations of which `single` is the first: equal in
        # expectation, so Avg <= single holds only up to the sampling error of one pass.
        p, n = robust(record, "single"), record.n_samples
        assert robust(record, "avg") <= p + 3 * math.sqrt(max(p * (1 - p), 0.05) / n)
        # One pass overstates what resubmission achieves by a wide margin here.
        assert robust(record, "worst") < robust(record, "single") - 0.2
    # Without EOT the attack follows noise and the estimate is inflated; EOT brings it down.
    assert robust(eot, "avg") < robust(no_eot, "avg") - 0.05
    assert robust(eot, "single") < robust(no_eot, "single") - 0.05
    # The engine tells the no-EOT attacker its view is unstable: the number is only a bound.
    assert no_eot.diagnostics["checks"]["unstable_predictions"]["passed"] is False
    assert no_eot.verdict == "bound"
    samples = pd.read_csv(tmp_path / "b" / "per_sample.csv")
    assert {"robust_single", "robust_avg", "robust_worst", "robust_vote"} <= set(samples)
    assert samples["pgd_draws_correct"].between(0, 10).all()
    assert samples["robust_avg"].mean() == pytest.approx(robust(eot, "avg"))


def test_detaching_purifier_is_flagged(compose_cfg, cache_dir: Path, tmp_path: Path) -> None:
    record = run_with(compose_cfg, cache_dir, tmp_path / "run", DETACH)
    check = record.diagnostics["checks"]["unavailable_gradients[exact]"]
    assert not check["passed"] and "graph is cut" in check["detail"]
    assert "unavailable_gradients[exact]" in record.verdict
    assert any("gradients unavailable" in w for w in record.attacks["pgd"].warnings)


def test_nan_defense_fails_loudly_with_a_failed_record(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    nan = {"_target_": "tests.planted.NaNDefense"}
    with pytest.raises(NonFiniteError, match="nandefense"):
        run_with(compose_cfg, cache_dir, tmp_path / "run", nan)
    saved = json.loads((tmp_path / "run" / "record.json").read_text())
    assert saved["status"] == "failed" and "NonFiniteError" in saved["error"]
    assert saved["robust_acc"] is None


def test_known_randomness_judges_with_the_attackers_noise(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    fresh = run_with(
        compose_cfg,
        cache_dir,
        tmp_path / "fresh",
        NOISE,
        "view.eot_samples=4",
        "suite.attacks.pgd.early_stop=false",
    )
    known = run_with(
        compose_cfg,
        cache_dir,
        tmp_path / "known",
        NOISE,
        "view.eot_samples=4",
        "view.randomness=known",
        "suite.attacks.pgd.early_stop=false",
    )
    # The locked noise is the evaluation's noise: draw d is judged with known seed d mod 4, so
    # draws 0-3 of the 10 repeat (the clean stage is judged with fresh noise, as deployed).
    samples = pd.read_csv(tmp_path / "known" / "per_sample.csv")
    assert samples["pgd_draws_correct"].isin(range(11)).all()
    assert known.attacks["pgd"].believed_fooled > 0
    # An attacker who knows the noise does better than one who does not.
    assert robust(known, "avg") < robust(fresh, "avg")
    assert known.attacks["pgd"].view["randomness"] == "known"


def test_adaptive_suite_cascade_and_costs(compose_cfg, cache_dir: Path, tmp_path: Path) -> None:
    record = run_with(
        compose_cfg,
        cache_dir,
        tmp_path / "run",
        {"_target_": "tests.planted.Blur"},
        "suite=adaptive",
        "suite.attacks.pgd.steps=10",
        "suite.attacks.bpda_eot.steps=5",
        "suite.attacks.bpda_eot.check_reps=2",
        "suite.attacks.transfer.steps=10",
        "suite.attacks.square.n_queries=50",
    )
    names = [n for n in record.attacks if not n.startswith("escalate@")]
    assert names == ["pgd", "bpda_eot", "transfer", "square"]
    kinds = {n: a.kind for n, a in record.attacks.items() if n in names}
    assert kinds == {
        "pgd": "white-box",
        "bpda_eot": "white-box",
        "transfer": "transfer",
        "square": "black-box",
    }
    assert record.attacks["bpda_eot"].view["grad"] == "bpda"
    assert record.attacks["bpda_eot"].view["eot_samples"] == 15
    # Cascade: each attack sees only what the ones before left standing.
    for before, after in zip(names, names[1:], strict=False):
        assert record.attacks[after].n_attacked <= round(
            record.attacks[before].robust_acc.value * record.n_samples
        )
    assert record.robust_acc.value <= min(a.robust_acc.value for a in record.attacks.values())
    # Cost: Blur is one purifier call per image; every attack pushed images through it.
    assert record.attacks["pgd"].purifier_calls_per_image > 2  # PGD-10, with early exit
    assert record.attacks["transfer"].passes["purify"] == 0  # crafted on the bare classifier
    assert record.attacks["transfer"].transfer_failure is not None
    assert record.cost["purifier_calls_per_image"] > 0 and record.cost["peak_memory_mb"] > 0
    assert "blackbox_beats_whitebox" in record.diagnostics["checks"]


def test_clean_only_suite_measures_what_purification_costs(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    record = run_with(compose_cfg, cache_dir, tmp_path / "run", NOISE, "suite=clean")
    assert record.attacks == {} and record.robust_acc is None and record.verdict == "not run"
    assert record.clean_acc.value == record.rules["avg"]["clean"].value
    assert set(record.rules["worst"]) == {"clean"}
    assert record.rules["worst"]["clean"].value <= record.rules["avg"]["clean"].value


def test_success_at_any_iterate_counts_what_the_attack_saw(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    after = run_with(compose_cfg, cache_dir, tmp_path / "a", NOISE, "view.eot_samples=1")
    during = run_with(
        compose_cfg,
        cache_dir,
        tmp_path / "b",
        NOISE,
        "view.eot_samples=1",
        "decision.success_at=any",
    )
    assert after.decision["evaluate"] == "after" and during.decision["evaluate"] == "while"
    assert after.attacks["pgd"].broken_on_path is None
    assert during.attacks["pgd"].broken_on_path > 0
    # Same attack, same seeds: counting the fooled iterates can only lower every rule.
    for rule in ("single", "avg", "worst", "vote"):
        assert robust(during, rule) <= robust(after, rule)
    assert robust(during, "avg") < robust(after, "avg")


def test_autoattack_flags_enter_the_verdict() -> None:
    from types import SimpleNamespace

    import torch

    from bench.engine.diagnostics import DiagnosisInput, DiagnosticsConfig, _Diagnosis
    from defenses.none import NoDefense

    result = SimpleNamespace(
        target="attacks.autoattack.AutoAttack",
        warnings=["there are 3 points with zero gradient! This might lead to ..."],
    )
    inp = DiagnosisInput(
        classifier=torch.nn.Identity(),
        defense=NoDefense(),
        name="none",
        x=torch.zeros(0, 1, 8, 8),
        y=torch.zeros(0, dtype=torch.long),
        norm="Linf",
        eps=0.1,
        device=torch.device("cpu"),
        views={},
        kinds={},
        results={"autoattack": result},
        returns_best={},
        ledger=None,
        num_classes=10,
        seed=0,
        batch_size=8,
    )
    d = _Diagnosis(inp, DiagnosticsConfig())
    d.autoattack_flags()
    assert d.checks["aa_zero_gradients"]["passed"] is False
    assert d.checks["aa_square"]["passed"] is True
    assert failed_checks({"checks": d.checks}) == ["aa_zero_gradients"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["+view.colour=red"], "view options \\['colour'\\]"),
        (["+suite.views.nope={grad: bpda}"], "suite.views names \\['nope'\\]"),
        (["view.grad=sideways"], "grad='sideways'"),
        (["decision.headline=best"], "decision.headline='best'"),
        (["decision.draws=0"], "decision.draws=0"),
        (["decision.success_at=never"], "decision.success_at='never'"),
        (["diagnostics.steps=0"], "diagnostics.steps=0"),
        (["suite.attacks.pgd.loss=hinge"], "loss='hinge'"),
        (["threads=0"], "threads=0"),
    ],
)
def test_bad_engine_config_fails_before_work(compose_cfg, tmp_path: Path, extra, match) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        run_with(compose_cfg, cache, out, NONE, *extra)
    assert not (out / "record.json").exists() and not cache.exists()


def test_exact_on_a_declared_non_differentiable_defense_fails_before_work(
    compose_cfg, tmp_path: Path
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    masked = {"_target_": "tests.test_engine.Declared"}
    with pytest.raises(ConfigError, match="non-differentiable"):
        run_with(compose_cfg, cache, out, masked)
    assert not cache.exists()


def test_failed_checks_are_listed() -> None:
    checks = {"a": {"passed": True}, "b": {"passed": False}, "c": {"passed": None}}
    assert failed_checks({"checks": checks}) == ["b"]
    assert failed_checks({"checks": {"a": {"passed": True}}}) == []


from tests.planted import Quantize  # noqa: E402


class Declared(Quantize):
    """A quantizer that honestly declares itself non-differentiable."""

    from defenses.base import DefenseInfo

    info = DefenseInfo(stochastic=False, differentiable=False)


def test_diagnostics_probe_attacks_like_the_strongest_white_box_view() -> None:
    import torch

    from bench.engine.attack_view import ViewOptions
    from bench.engine.diagnostics import DiagnosisInput, DiagnosticsConfig, _Diagnosis
    from tests.planted import GaussianNoise

    views = {
        "aa": ViewOptions(eot_samples=1),
        "bpda": ViewOptions(grad="bpda", eot_samples=16),
        "known": ViewOptions(eot_samples=16, randomness="known"),
        "pgd": ViewOptions(eot_samples=4),
        "transfer": ViewOptions(grad="transfer", eot_samples=1),
    }
    kinds = {n: "transfer" if n == "transfer" else "white-box" for n in views}
    inp = DiagnosisInput(
        classifier=torch.nn.Identity(),
        defense=GaussianNoise(),
        name="noise",
        x=torch.zeros(0, 1, 8, 8),
        y=torch.zeros(0, dtype=torch.long),
        norm="Linf",
        eps=0.1,
        device=torch.device("cpu"),
        views=views,
        kinds=kinds,
        results={},
        returns_best={},
        ledger=None,
        num_classes=10,
        seed=0,
        batch_size=8,
    )
    # Exact gradients and fresh noise first, then the most EOT samples.
    assert _Diagnosis(inp, DiagnosticsConfig()).probe_from == "pgd"


def _blackbox_check(white_p: float, black_p: float, draws: int = 4, n: int = 400) -> dict:
    """The blackbox check on a synthetic ledger: every image survives clean; the white-box and
    the black-box stage judge each image correct with the given per-draw probabilities."""
    from types import SimpleNamespace

    from bench.engine.decision import Ledger
    from bench.engine.diagnostics import _Diagnosis

    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(n, dtype=torch.long)
    ledger = Ledger(labels, draws=draws, vote=draws)
    every = torch.ones(n, dtype=torch.bool)
    ledger.add("clean", torch.zeros(draws, n, dtype=torch.long), every)
    for name, p in (("pgd", white_p), ("square", black_p)):
        preds = (torch.rand(draws, n, generator=gen) > p).long()  # class 1 is wrong
        ledger.add(name, preds, every)
    fake = SimpleNamespace(
        inp=SimpleNamespace(
            ledger=ledger,
            views={"pgd": None, "square": None},
            kinds={"pgd": "white-box", "square": "black-box"},
        ),
        checks={},
    )
    _Diagnosis.blackbox(fake)  # type: ignore[arg-type]
    return fake.checks["blackbox_beats_whitebox"]


def test_blackbox_check_allows_for_the_randomness_of_stochastic_defenses() -> None:
    # Fresh draws of a defense that is right 80% of the time are sometimes mostly wrong: that
    # alone must not read as gradient masking; a black-box attack that breaks survivors must.
    assert _blackbox_check(white_p=0.8, black_p=0.8)["passed"]
    broken = _blackbox_check(white_p=0.8, black_p=0.3)
    assert not broken["passed"] and broken["value"]["broken"]["square"] > 100
    # Deterministic (one draw): any survivor the black-box attack breaks beyond 0.2% counts.
    assert _blackbox_check(white_p=1.0, black_p=1.0, draws=1)["passed"]
    assert not _blackbox_check(white_p=1.0, black_p=0.99, draws=1)["passed"]

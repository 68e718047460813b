"""Gradient failures never end a run: they are counted, and every attack finishes (issue 15).

Three planted defenses break the attacker's gradient in the three ways the attack view counts:
``Detach`` cuts the autograd graph (``missing``), ``Quantize`` rounds (``zero``) and
``NaNGradient`` is the identity with an inf/NaN backward (``nonfinite``). Every attack family
the harness runs (its own PGD, torchattacks, pyautoattack's sub-attacks) must return finite,
in-threat images on them, and a whole ``profile=quick`` run must complete with a record that
carries the counts. Broken components (NaN images, NaN logits) still fail loudly: that is
tests/test_attack_view.py and tests/test_engine.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import Tensor, nn

from attacks.autoattack import AutoAttack
from attacks.fgsm_rs import FGSMRS
from attacks.pgd import PGD
from attacks.pgd_eot import PGDEOT
from bench.engine.attack_view import AttackView, ViewOptions
from bench.engine.threat import check_threat
from bench.reporting.records import RunRecord, read_record
from bench.run import evaluate
from defenses.base import Defense
from tests.conftest import TinyNet
from tests.planted import Detach, DetachedDecision, GaussianDetach, NaNGradient, Quantize

# The failure each planted defense causes, as the view's counter names it.
FAILURES: dict[str, type[Defense]] = {
    "grad_missing": Detach,
    "grad_zero": Quantize,
    "grad_nonfinite": NaNGradient,
}
FAILURE_KEYS = tuple(FAILURES)
EPS = {"Linf": 0.1, "L2": 0.5}


def declared_stochastic(cls: type[Defense]) -> type[Defense]:
    """``cls`` declared stochastic, so that AutoAttack keeps its EOT (``eot_iter``) on it."""
    return type(f"Stochastic{cls.__name__}", (cls,), {"info": replace(cls.info, stochastic=True)})


def _autoattack(sub: str, **budget: Any) -> Callable[[nn.Module, str, float], Any]:
    def make(view: nn.Module, norm: str, eps: float) -> AutoAttack:
        return AutoAttack(
            view, norm=norm, eps=eps, version="custom", attacks=[sub], n_iter=5, **budget
        )

    return make


# Every attack family, at smoke-sized budgets: (view, norm, eps) -> attack.
ATTACKS: dict[str, Callable[[nn.Module, str, float], Any]] = {
    "pgd_eot": lambda v, norm, eps: PGDEOT(v, norm=norm, eps=eps, steps=5, restarts=2),
    "torchattacks_pgd": lambda v, norm, eps: PGD(v, norm=norm, eps=eps, steps=5),
    "apgd-ce": _autoattack("apgd-ce"),
    "apgd-dlr": _autoattack("apgd-dlr", eot_iter=3),
    "apgd-t": _autoattack("apgd-t", n_target_classes=2),
    "fab-t": _autoattack("fab-t", n_target_classes=2),
    "square": _autoattack("square", n_queries=20),
}


def labelled(view: AttackView, x: Tensor) -> Tensor:
    """The view's own predictions, so that every image is clean-correct and gets attacked."""
    with torch.no_grad():
        return view(x).argmax(1)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("failure", FAILURE_KEYS)
def test_every_attack_finishes_on_broken_gradients_and_the_view_counts_them(
    tiny_model: nn.Module, batch: tuple[Tensor, Tensor], failure: str, attack: str, norm: str
) -> None:
    x, _ = batch
    view = AttackView(tiny_model, declared_stochastic(FAILURES[failure])(), ViewOptions())
    y = labelled(view, x)
    view.counter.reset()
    x_adv = ATTACKS[attack](view, norm, EPS[norm])(x.clone(), y)
    check_threat(x, x_adv, norm, EPS[norm], attack)  # finite, in [0, 1], within eps
    counts = view.counter.snapshot()
    if attack == "square":  # black-box: no gradient asked for, none failed
        assert counts["gradients"] == 0 and counts["backward"] == 0
    else:
        assert counts["gradients"] > 0
        # Every gradient failed the planted way, and only that way.
        assert counts[failure] == counts["gradients"], counts
    assert all(counts[k] == 0 for k in FAILURE_KEYS if k != failure), counts


def test_fgsm_rs_finishes_on_broken_gradients(tiny_model, batch) -> None:
    x, _ = batch
    for failure, cls in FAILURES.items():
        view = AttackView(tiny_model, cls(), ViewOptions())
        y = labelled(view, x)
        x_adv = FGSMRS(view, norm="Linf", eps=0.1)(x.clone(), y)
        check_threat(x, x_adv, "Linf", 0.1, "fgsm_rs")
        assert view.counter.snapshot()[failure] == len(x)


def test_a_tensor_forwarded_many_times_counts_each_backward_once(tiny_model, batch) -> None:
    # APGD's EOT loop forwards the same tensor eot_iter times, one backward after each.
    x, y = batch
    view = AttackView(tiny_model, GaussianDetach(), ViewOptions(eot_samples=2))
    xg = x.clone().requires_grad_(True)
    for _ in range(3):
        loss = nn.functional.cross_entropy(view(xg), y)
        torch.autograd.grad(loss, xg)
    counts = view.counter.snapshot()
    assert counts["gradients"] == 3 * len(x) and counts["backward"] == 3 * 2 * len(x)
    assert counts["grad_missing"] == 3 * len(x)


def test_a_cut_in_the_defense_decision_is_missing_and_bpda_bridges_it(tiny_model, batch) -> None:
    x, y = batch
    for grad, missing in (("exact", len(x)), ("bpda", 0)):
        view = AttackView(tiny_model, DetachedDecision(), ViewOptions(grad=grad))
        x_adv = PGD(view, norm="Linf", eps=0.1, steps=2)(x.clone(), y)
        check_threat(x, x_adv, "Linf", 0.1, "pgd")
        assert view.counter.grad_missing == 2 * missing, grad


def test_a_trainable_classifier_does_not_hide_a_cut_defense(batch) -> None:
    # Its parameters keep the logits in the graph; the input is cut off all the same.
    x, y = batch
    view = AttackView(TinyNet().train(), Detach(), ViewOptions())
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(view(xg), y), xg)
    assert grad.abs().max() == 0 and view.counter.grad_missing == len(x)


def test_autoattack_keeps_clean_images_where_it_returns_non_finite_ones(
    tiny_model, batch, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attacks import autoattack

    def run(self, x, y, batch_size=None):  # noqa: ANN001, ANN202 - pyautoattack's signature
        out = (x + 0.05).clamp(0, 1)
        out[::2] = float("nan")
        return out, y

    monkeypatch.setattr(autoattack._PyAutoAttack, "run_standard_evaluation", run)
    x, y = batch
    attack = AutoAttack(tiny_model, norm="Linf", eps=0.1, version="custom", attacks=["fab-t"])
    x_adv = attack(x, y)
    assert torch.equal(x_adv[::2], x[::2])
    assert torch.equal(x_adv[1::2], (x[1::2] + 0.05).clamp(0, 1))
    assert any("non-finite images for 8 of 16" in w for w in attack.warnings)


# -- a whole run --------------------------------------------------------------------------


def quick_run(
    compose_cfg, cache_dir: Path, out: Path, defense: type[Defense]
) -> tuple[RunRecord, dict[str, Any]]:
    """``profile=quick`` on 16 digits with a planted defense; the record and its JSON."""
    cfg = compose_cfg(
        [
            "dataset=digits",
            "profile=quick",
            "n_samples=16",
            "batch_size=16",
            "device=cpu",
            "diagnostics.n_samples=8",
            "classifier.recipe.epochs=10",
            "classifier.recipe.lr=0.1",
            "classifier.recipe.batch_size=64",
            f"paths.cache_dir={cache_dir}",
            f"paths.results_dir={out.parent}",
        ]
    )
    target = f"{defense.__module__}.{defense.__name__}"
    with open_dict(cfg):
        cfg.defense = OmegaConf.create({"_target_": target})
    choices = {**cfg.hydra.runtime.choices, "defense": defense.__name__.lower()}
    record = evaluate(cfg, output_dir=out, choices=choices)
    return record, json.loads((out / "record.json").read_text())


@pytest.mark.parametrize("failure", FAILURE_KEYS)
def test_a_quick_run_completes_and_records_the_gradient_failures(
    compose_cfg, cache_dir: Path, tmp_path: Path, failure: str
) -> None:
    record, saved = quick_run(compose_cfg, cache_dir, tmp_path / "run", FAILURES[failure])
    assert record.status == "completed" and saved["status"] == "completed"
    assert {"pgd", "bpda_eot", "autoattack_rand", "transfer", "square"} <= set(record.attacks)
    key = failure.removeprefix("grad_")
    for name, result in record.attacks.items():
        counts = result.gradient_failures
        assert set(counts) == {"missing", "zero", "nonfinite", "gradients"}, name
        assert counts["gradients"] == result.passes["gradients"], name
        assert all(counts[k] == 0 for k in counts if k not in (key, "gradients")), (name, counts)
        if result.view["grad"] == "exact" and result.kind == "white-box":
            # Exact gradients through the planted defense: every one of them failed.
            assert counts["gradients"] > 0 and counts[key] == counts["gradients"], (name, counts)
        else:  # BPDA passes the classifier's gradient through; transfer and Square need none
            assert counts[key] == 0, (name, counts)
    # The record round-trips with the counts.
    again = read_record(tmp_path / "run" / "record.json")
    assert {n: a.gradient_failures for n, a in again.attacks.items()} == {
        n: a.gradient_failures for n, a in record.attacks.items()
    }
    # A record written before the counts existed still loads, with none.
    old = {
        **saved,
        "attacks": {
            n: {k: v for k, v in a.items() if k != "gradient_failures"}
            for n, a in saved["attacks"].items()
        },
    }
    assert all(a.gradient_failures == {} for a in RunRecord.from_dict(old).attacks.values())
    if failure == "grad_missing":
        warnings = record.attacks["autoattack_rand"].warnings
        assert any("gradients unavailable" in w for w in warnings)

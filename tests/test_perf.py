"""`make perf` (bench/tools/perf/) at a tiny budget, and the engine's fast paths it measures.

No timing is asserted: the machine is shared. The tests check the structure of the result, that
every ratio is a finite positive number, that preparation is announced and timed apart, that
the gradient-memory probe repeats and grows with the graph, and that the fast paths (inference
mode for passes without gradients, the ``success`` rule of PGDEOT, the CUDA view options) keep
the numbers.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attacks.pgd_eot import PGDEOT
from bench.devices import allocation_peak_mb
from bench.engine.attack_view import AttackView, ViewOptions
from bench.tools.perf.report import _notes, markdown, write_results
from bench.tools.perf.runner import run_perf
from bench.tools.perf.setup import CACHED, NOT_CACHED, Setup
from bench.tools.perf.timing import Timings, fit_exponent, interleave
from common.errors import ConfigError
from defenses.noise import GaussianNoise

CHOICES = {"dataset": "digits", "classifier": "small_cnn", "threat": "linf"}


def _tiny(cache_dir: Path, results_dir: Path, items: str) -> list[str]:
    return [
        "dataset=digits",
        "classifier=small_cnn",
        "classifier.recipe.epochs=10",
        "classifier.recipe.lr=0.1",
        "classifier.recipe.batch_size=64",
        "device=cpu",
        f"paths.cache_dir={cache_dir}",
        f"paths.results_dir={results_dir}",
        f"items={items}",
        "n_samples=16",
        "batch_size=16",
        "repeats=1",
        "judge_draws=2",
        "attack.steps=2",
        "attack.eot_samples=2",
        "chunk.eot_samples=2",
        "chunk.batch=8",
        "chunk.passes=1",
        "autoattack.n_iter=2",
        "autoattack.eot_samples=1",
        "cascade.n_samples=16",
        "cascade.repeats=1",
        "cascade.draws=2",
        "cascade.suite.attacks.pgd.steps=2",
        "cascade.suite.attacks.apgd_ce.n_iter=2",
        "scaling.n=[8,16]",
        "scaling.batch_sizes=[8,16]",
        "scaling.repeats=2",
        "escalation.n_samples=16",
        # CARSO and AToP train a CVAE, an AT classifier, an inpainter: too slow for a test.
        "~escalation.rows.carso",
        "~escalation.rows.atop",
        "escalation.strong.steps=4",
        "escalation.strong.eot_samples=2",
    ]


def _ratios(
    obj: object, keys: tuple[str, ...] = ("ratio", "one_call_vs_k_calls"), path: str = ""
) -> dict[str, float]:
    """Every number under a key starting with one of ``keys``, recursively, by its path."""
    found: dict[str, float] = {}
    items: Any = obj.items() if isinstance(obj, dict) else ()
    if isinstance(obj, list):
        items = enumerate(obj)
    for key, value in items:
        where = f"{path}/{key}"
        if isinstance(value, int | float) and str(key).startswith(keys):
            found[where] = float(value)
        else:
            found |= _ratios(value, keys, where)
    return found


def test_perf_runs_every_cheap_item_at_a_tiny_budget(
    compose_cfg, cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = "[chunk,overhead,torchattacks,autoattack,cascade,scaling,cuda,escalation]"
    cfg = compose_cfg(_tiny(cache_dir, tmp_path, items), config_name="perf")
    with caplog.at_level(logging.INFO, logger="bench.tools.perf"):
        result = run_perf(cfg, tmp_path / "run", CHOICES)

    for item in ("chunk", "overhead", "torchattacks", "autoattack", "cascade", "scaling"):
        assert item in result and result[item]["item_wall_s"] > 0
    ratios = _ratios(result)
    assert len(ratios) >= 10
    assert all(math.isfinite(r) and r > 0 for r in ratios.values()), ratios
    # A slope fitted to two tiny timings can come out at or below zero (at batch 16, n=8 and n=16
    # are both one batch; CI once timed n=16 faster): only its finiteness is the code's to keep.
    exponents = _ratios(result, ("exponent",))
    assert len(exponents) >= 2 and all(math.isfinite(e) for e in exponents.values()), exponents

    chunk = result["chunk"]
    assert set(chunk["pass_ms"]) == {"1", "2"} and chunk["auto_chunk"] == 1
    overhead = result["overhead"]
    # The floor replays exactly the attack's view calls: steps with gradient, one final without.
    assert overhead["grad_calls"] >= 1 and overhead["view_calls"] == overhead["grad_calls"] + 1
    assert overhead["passes"]["backward"] > 0
    stochastic = result["torchattacks"]["stochastic"]
    assert set(stochastic["harness"]) == {"default", "early_exit", "early_exit_all"}
    for row in stochastic["harness"].values():
        assert 0 <= row["robust_acc_any"] <= row["robust_acc"] <= 1
    assert result["torchattacks"]["deterministic"]["eot_samples"] == 1
    # The adapter and pyautoattack itself, same seed and view seeds: the same images.
    assert result["autoattack"]["same_output"]
    cascade = result["cascade"]
    for name, row in cascade["full"]["per_attack"].items():
        assert cascade["cascade"]["per_attack"][name]["n_attacked"] <= row["n_attacked"]
    scaling = result["scaling"]
    assert scaling["n"] == [8, 16] and len(scaling["exponent_per_repetition"]) == 2
    assert scaling["batch_size"] == 8 and set(scaling["other_batch_sizes"]) == {"16"}
    assert "skipped" in result["cuda"]  # CPU: the CUDA options are not measured
    noise = result["escalation"]["rows"]["gaussian_noise"]
    assert noise["escalating"]["levels"] >= 1 and noise["strong"]["levels"] == 0
    assert noise["calls_ratio"] > 0 and isinstance(noise["within_interval"], bool)

    md, js = write_results(result, tmp_path / "results")
    table = md.read_text()
    assert "| 1. Engine overhead" in table and "| 6. Scaling exponent" in table
    assert "| 7. Escalation / fixed strong budget" in table
    assert json.loads(js.read_text())["overhead"]["ratio"] == overhead["ratio"]
    assert markdown(result).count("\n| ") >= 8

    # Preparation: announced before it starts, timed per step, apart from every measurement.
    messages = [r.getMessage() for r in caplog.records]
    status = f"({re.escape(CACHED)}|{re.escape(NOT_CACHED)})"
    announced = [
        i
        for i, m in enumerate(messages)
        if re.fullmatch(rf"perf: preparing classifier small_cnn on digits \({status}\)", m)
    ]
    assert announced and announced[0] < messages.index("perf: chunk ...")
    prepared = {p["what"]: p for p in result["prepared"]}
    assert set(prepared) == {"dataset digits", "classifier small_cnn on digits"}
    assert result["setup_s"] == pytest.approx(sum(p["setup_s"] for p in prepared.values()))
    assert result["setup_s"] > 0 and json.loads(js.read_text())["setup_s"] == result["setup_s"]
    assert "Preparation (excluded from every measurement)" in table
    assert "classifier small_cnn on digits" in table
    # The runner's own loading is not part of the cascade's timings.
    for name, loads in cascade["runner_setup_s"].items():
        assert len(loads) == len(cascade[name]["wall_runs_s"]) and all(t >= 0 for t in loads)


@pytest.mark.slow
def test_perf_memory_item_measures_growth_with_repeatable_readings(
    compose_cfg, cache_dir: Path, tmp_path: Path
) -> None:
    score = [  # the tiny score model and classifier of tests/test_purifiers.py
        "classifier.recipe.epochs=10",
        "classifier.recipe.lr=0.1",
        "classifier.recipe.batch_size=64",
        "defense.score.recipe.steps=20",
        "defense.score.recipe.eval_samples=50",
        "defense.score.arch.block_out_channels=[16,32,32]",
    ]
    overrides = [
        *_tiny(cache_dir, tmp_path, "[memory]"),
        "memory.n_samples=2",
        "memory.defenses.diffpure.values=[2,4]",
        f"memory.defenses.diffpure.overrides=[{','.join(repr(o) for o in score)}]",
        "~memory.defenses.pursamere",
        "classifier.recipe.epochs=10",
    ]
    cfg = compose_cfg(overrides, config_name="perf")
    result = run_perf(cfg, tmp_path / "run", CHOICES)
    mem = result["memory"]["diffpure"]
    assert set(mem["peak_mb"]) == {"2", "4"} and mem["value_ratio"] == 2
    assert math.isfinite(mem["memory_ratio"]) and mem["memory_ratio"] > 0
    # Three readings per value (conf/perf.yaml), within the target spread of each other.
    assert all(len(r) == 3 and min(r) > 0 for r in mem["peak_mb_runs"].values())
    assert mem["max_spread"] <= mem["target_spread"] == 0.1 and mem["met"]
    # The score model is prepared (trained here, or found) before the item, and timed apart.
    steps = [p for p in result["prepared"] if "memory item" in p["what"]]
    assert [p["what"].split(" ")[0] for p in steps] == ["classifier", "diffpure"]
    assert steps[1]["status"] in (CACHED, NOT_CACHED) and steps[1]["setup_s"] > 0
    assert "| 5. Gradient memory, diffpure (checkpoint=True)" in markdown(result)


def _chain_gradient(layers: int, *, segments: bool = False) -> Tensor:
    """The input gradient through ``layers`` blocks of two tanh layers (64 x 256 activations)."""
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(256, 256) / 16

    def layer(h: Tensor) -> Tensor:
        return torch.tanh(torch.tanh(h @ w) @ w)

    h = x
    for _ in range(layers):
        h = checkpoint(layer, h, use_reentrant=False) if segments else layer(h)
    (grad,) = torch.autograd.grad(F.mse_loss(h, torch.zeros_like(h)), x)
    return grad


def test_allocation_peak_counts_tensor_bytes_exactly() -> None:
    cpu = torch.device("cpu")
    assert allocation_peak_mb(lambda: torch.ones(2**18), cpu) == pytest.approx(1.0)  # 1 MiB
    held = torch.ones(2**18)  # allocated before: not what the call adds (but a scalar's bytes)
    assert allocation_peak_mb(lambda: held.add_(1), cpu) < 0.001
    with pytest.raises(ConfigError, match="device=meta"):
        allocation_peak_mb(lambda: None, torch.device("meta"))


def test_gradient_memory_probe_repeats_and_grows_with_the_graph() -> None:
    cpu = torch.device("cpu")
    small = [allocation_peak_mb(lambda: _chain_gradient(5), cpu) for _ in range(3)]
    assert max(small) <= 1.1 * min(small)  # the same gradient reads the same
    big = allocation_peak_mb(lambda: _chain_gradient(20), cpu)
    # Every block keeps two 64 KiB activations for the backward pass: 15 more blocks, 1.9 MiB.
    assert big - min(small) == pytest.approx(15 * 2 * 64 / 1024, rel=0.1)
    # A checkpointed block keeps only its input, one activation instead of two, so the graph
    # reads less, and repeatably: checkpoint's reference cycles are collected first.
    checkpointed = [
        allocation_peak_mb(lambda: _chain_gradient(20, segments=True), cpu) for _ in range(3)
    ]
    assert max(checkpointed) <= 1.1 * min(checkpointed)
    assert max(checkpointed) < big - 10 * 64 / 1024


def test_timings_minus_subtracts_each_clock_its_own_reading() -> None:
    # On a loaded machine the setup's elapsed time exceeds its CPU time: each clock loses its own.
    t = Timings({"a": [3.0, 4.0]}, {"a": [2.0, 2.5]}).minus({"a": [1.5, 1.0]}, {"a": [1.0, 0.5]})
    assert t.wall["a"] == [1.5, 3.0] and t.cpu["a"] == [1.0, 2.0]


def test_judged_uses_one_evaluator_seed_for_every_caller(tiny_model: nn.Module) -> None:
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6) % 10
    setup = Setup(
        classifier=tiny_model,
        defense=GaussianNoise(0.5),
        x=x,
        y=y,
        device=torch.device("cpu"),
        norm="Linf",
        eps=0.1,
        steps=1,
        eot=1,
        alpha=0.1,
        batch_size=4,
        seed=0,
    )
    first, again = setup.judged(x, y, draws=4), setup.judged(x, y, draws=4)
    assert torch.equal(first, again) and first.shape == (6,)
    assert torch.equal(first * 4, (first * 4).round()) and 0 <= first.min() <= first.max() <= 1


def test_notes_explain_a_missed_torchattacks_target() -> None:
    def row(ratio: float, acc: float, **options: object) -> dict:
        return {
            "options": options,
            "ratio": ratio,
            "robust_acc": acc,
            "robust_acc_any": acc / 2,
            "met": False,
        }

    result = {
        "torchattacks": {
            "target": 0.8,
            "stochastic": {
                "torchattacks": {"robust_acc": 0.2},
                "harness": {
                    "early_exit": row(0.5, 0.3, early_stop=True),
                    "default": row(1.1, 0.21),
                },
            },
            "deterministic": {
                "torchattacks": {"robust_acc": 0.1},
                "harness": {"default": row(0.4, 0.1)},
            },
        },
        "overhead": {"met": False, "ratio": 1.2, "ratio_wall": 1.3},
    }
    notes = _notes(result)
    assert len(notes) == 2
    assert "ratio 0.50" in notes[0] and "ratio 1.10 at 21.0%" in notes[0] and "15.0%" in notes[0]
    assert notes[1].startswith("Target 1 missed at 1.200")


def test_interleave_times_every_variant_on_both_clocks() -> None:
    calls: list[str] = []
    times = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the order reverses every other repetition
    assert len(times.wall["a"]) == len(times.cpu["b"]) == 3
    summary = times.summary("a")
    assert summary["median_s"] == summary["cpu_median_s"] >= 0
    with pytest.raises(ConfigError, match="clock='gpu'"):
        interleave({"a": lambda: None}, 1, clock="gpu")


def test_fit_exponent_recovers_a_power_law() -> None:
    n = [64, 128, 256]
    assert fit_exponent(n, [2.0 * v**0.75 for v in n]) == pytest.approx(0.75)


def test_gaussian_noise_is_seeded_and_validated() -> None:
    x = torch.rand(4, 1, 8, 8)
    a = GaussianNoise(0.2).purify(x, generator=torch.Generator().manual_seed(3))
    b = GaussianNoise(0.2).purify(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    with pytest.raises(ValueError, match="sigma=0"):
        GaussianNoise(0)


# -- the fast paths inside the view and the harness's PGD ------------------------------------


def test_view_passes_without_gradient_run_in_inference_mode(tiny_model: nn.Module) -> None:
    x = torch.rand(8, 1, 8, 8)
    view = AttackView(tiny_model, GaussianNoise(0.3), ViewOptions(eot_samples=3), seed=1)
    with torch.no_grad():
        fast = view.sample_logits(x)
    view.reseed(1)
    with_graph = view.sample_logits(x.clone().requires_grad_(True))
    assert torch.equal(fast, with_graph.detach())
    # A normal tensor: callers may write into it outside inference mode.
    assert not fast.is_inference()
    fast[0, 0, 0] = 0.0
    assert view.counter.forward == 2 * 3 * len(x)


def test_view_bf16_and_channels_last_options(tiny_model: nn.Module) -> None:
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 10)).eval()
    x = torch.rand(8, 1, 8, 8)
    plain = AttackView(conv, GaussianNoise(0.3), ViewOptions(eot_samples=2), seed=0)
    nhwc = AttackView(
        conv, GaussianNoise(0.3), ViewOptions(eot_samples=2, channels_last=True), seed=0
    )
    assert torch.allclose(plain(x), nhwc(x), atol=1e-5)
    bf16 = AttackView(conv, GaussianNoise(0.3), ViewOptions(eot_samples=2, precision="bf16"))
    xg = x.clone().requires_grad_(True)
    logits = bf16(xg)
    assert logits.dtype == torch.float32
    (grad,) = torch.autograd.grad(logits.sum(), xg)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    with pytest.raises(ConfigError, match="precision='fp16'"):
        ViewOptions(precision="fp16").validate()


class _Split(nn.Module):
    """Two EOT samples that disagree: one fooled by far, one correct by a little."""

    eot_samples = 2

    def forward(self, x: Tensor) -> Tensor:
        return self.sample_logits(x).mean(0)

    def sample_logits(self, x: Tensor) -> Tensor:
        base = torch.tensor([[0.0, 5.0, 0.0], [1.0, 0.0, 0.0]])  # y = 0: fooled, correct
        zero = 0 * x.flatten(1).sum(1, keepdim=True)  # keeps the graph to the input
        return base[:, None, :] + zero[None]


@pytest.mark.parametrize(("success", "fooled"), [("mean", True), ("all", False)])
def test_pgd_success_rule(success: str, fooled: bool) -> None:
    x, y = torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    attack = PGDEOT(_Split(), norm="Linf", eps=0.1, steps=2, random_start=False, success=success)
    attack(x, y)
    assert attack.fooled_any.tolist() == [fooled, fooled]
    # "all" is the stricter rule: frozen points have no sampled purification still correct.
    assert attack.fooled_history.all(0).tolist() == [fooled, fooled]


def test_pgd_success_rule_is_validated() -> None:
    with pytest.raises(ValueError, match="success='most'"):
        PGDEOT(_Split(), norm="Linf", eps=0.1, success="most")

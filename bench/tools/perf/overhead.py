"""Item 1 of ``make perf``: the engine's overhead over the passes its attack makes.

The harness's EOT-PGD on the stochastic defense against its *floor*: the same forward+backward
passes of the same view (same batch sizes, as recorded during the attack, early exit
included), timed bare at the engine's chunk size; optionally also against the passes without
the view (``classifier(purify(x))`` loops).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from bench.engine.attack_view import auto_chunk
from bench.tools.perf.passes import bare_pass, raw_pass, record_calls
from bench.tools.perf.setup import Setup
from bench.tools.perf.timing import interleave


def engine_overhead(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """The harness's EOT-PGD against the same passes of the same view, timed bare."""
    x, y = setup.points(int(cfg.n_samples))
    view = setup.view(eot_reduce=str(cfg.attack.eot_reduce))
    attack = setup.pgd(view)

    def run_attack() -> None:
        view.reseed(setup.seed)
        attack(x, y)

    view.counter.reset()
    calls = record_calls(view, run_attack)  # untimed: also the attack's warm-up
    counts = view.counter.snapshot()

    def floor() -> None:
        view.reseed(setup.seed)
        for n, grad in calls:
            bare_pass(view, x[:n], y[:n], grad=grad)

    def raw_floor() -> None:
        for n, grad in calls:
            raw_pass(setup, x[:n], y[:n], grad=grad, eot=view.eot_samples)

    variants = {"attack": run_attack, "floor": floor}
    if cfg.overhead.raw:
        variants["raw"] = raw_floor
    times = interleave(variants, int(cfg.repeats), cfg.clock)
    ratio = times.ratio("attack", "floor")
    out = {
        "n": len(x),
        "chunk": view.options.chunk or auto_chunk(setup.device, view.eot_samples),
        "eot_reduce": view.options.eot_reduce,
        "view_calls": len(calls),
        "grad_calls": sum(g for _, g in calls),
        "images_per_step": [n for n, _ in calls],
        "passes": counts,
        "attack": times.summary("attack"),
        "floor": times.summary("floor"),
        "ratio": ratio,
        "ratio_wall": times.ratio("attack", "floor", "wall"),
        "target": float(cfg.targets.overhead),
        "met": ratio <= float(cfg.targets.overhead),
    }
    if "raw" in variants:
        out["raw_floor"] = times.summary("raw")
        out["ratio_raw"] = times.ratio("attack", "raw")
    return out

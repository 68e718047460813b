"""Item 4 of ``make perf``: what the suite cascade saves, through the runner itself.

A suite through :func:`bench.run.evaluate` with ``suite.cascade`` true (later attacks only see
points still robust) against false (every attack on every clean-correct point). Each runner
call loads its cached data and classifier again; that loading (the record's
``cost.setup_s``) is subtracted from every timing, so the ratio compares evaluations only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.tools.perf.setup import compose_config, runner_overrides
from bench.tools.perf.timing import interleave


def eval_config(
    cfg: DictConfig, results_dir: Path, cascade: bool, choices: Mapping[str, str]
) -> DictConfig:
    """The runner's config for the cascade measurement: our model, defense and suite."""
    c = cfg.cascade
    overrides = [
        *runner_overrides(
            cfg, results_dir, choices, n_samples=int(c.n_samples), draws=int(c.draws)
        ),
        f"classifier={choices['classifier']}",
        f"eot_default={int(cfg.attack.eot_samples)}",
        "escalation.enabled=false",  # the suite's own cost is measured, not the escalation's
        *list(c.overrides),
    ]
    ecfg = compose_config("eval", overrides)
    OmegaConf.set_struct(ecfg, False)
    ecfg.defense = OmegaConf.to_container(cfg.defense)
    suite = OmegaConf.to_container(c.suite, resolve=False)
    suite["cascade"] = cascade
    ecfg.suite = suite
    return ecfg


def _describe(rec: Any) -> dict[str, Any]:
    """A run record's times, accuracies and points attacked per attack."""
    return {
        "wall_s": rec.wall_s,
        "setup_s": rec.cost.get("setup_s", 0.0),
        "attacks_s": sum(a.wall_s for a in rec.attacks.values()),
        "robust_acc": rec.robust_acc.value,
        "clean_acc": rec.clean_acc.value,
        "per_attack": {
            k: {"n_attacked": a.n_attacked, "wall_s": a.wall_s, "robust_acc": a.robust_acc.value}
            for k, a in rec.attacks.items()
        },
    }


def cascade_savings(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str]) -> dict[str, Any]:
    """A suite's time through the runner with the cascade against without it."""
    from bench.run import evaluate

    record_choices = {**choices, "defense": str(cfg.cascade.defense_name)}
    records: dict[str, list[Any]] = {"cascade": [], "full": []}

    def run(name: str) -> Callable[[], None]:
        def go() -> None:
            ecfg = eval_config(cfg, run_dir / "cascade_runs", name == "cascade", choices)
            out = run_dir / "cascade_runs" / f"{name}_{len(records[name])}"
            records[name].append(evaluate(ecfg, output_dir=out, choices=record_choices))

        return go

    # One untimed run of each first: one-time costs (imports, lazily built kernels, a network
    # the runner finds missing) would otherwise land in the first timed repetition only.
    for name in records:
        run(name)()
        records[name].clear()
    timed = interleave({n: run(n) for n in records}, int(cfg.cascade.repeats), cfg.clock)
    loading = {n: [r.cost.get("setup_s", 0.0) for r in recs] for n, recs in records.items()}
    loading_cpu = {
        n: [r.cost.get("setup_cpu_s", r.cost.get("setup_s", 0.0)) for r in recs]
        for n, recs in records.items()
    }
    times = timed.minus(loading, loading_cpu)
    ratio = times.ratio("cascade", "full")
    cas, full = records["cascade"][-1], records["full"][-1]
    return {
        "n": cas.n_samples,
        "attacks": list(cas.attacks),
        "draws": int(cfg.cascade.draws),
        "cascade": {**times.summary("cascade"), **_describe(cas)},
        "full": {**times.summary("full"), **_describe(full)},
        "runner_setup_s": loading,
        "ratio_wall": times.ratio("cascade", "full", "wall"),
        "ratio": ratio,
        "saving": 1 - ratio,
    }

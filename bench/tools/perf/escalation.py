"""Item 7 of ``make perf``: the escalating evaluation against a fixed strong budget.

For each stochastic defense of ``escalation.rows``, on the same images, through
:func:`bench.run.evaluate`:

* **escalating**: the default bench's evaluation (``profile=quick``: its suite, then the
  escalation until the number stops moving);
* **strong**: one fixed budget chosen to be safe rather than cheap, the harness's PGD with
  ``steps`` steps, ``eot_samples`` EOT samples and ``restarts`` restarts (CE, then the margin
  loss), without escalation.

Both skip the diagnostics, which are the same for both. The item reports both accuracies with
their intervals, whether the escalating one lies inside the strong one's interval, and the
ratio of purifications per image (the escalating run's over the strong run's): the point of
escalation is the strong budget's number at a fraction of its cost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bench.tools.perf.setup import compose_config, runner_overrides

log = logging.getLogger(__name__)


def _strong(cfg: DictConfig) -> list[str]:
    s = cfg.escalation.strong
    return [
        "suite=pgd",
        f"suite.attacks.pgd.steps={int(s.steps)}",
        f"suite.attacks.pgd.restarts={int(s.restarts)}",
        "suite.attacks.pgd.loss=[ce,margin]",
        f"view.eot_samples={int(s.eot_samples)}",
        "escalation.enabled=false",
    ]


def _summary(rec: Any) -> dict[str, Any]:
    acc = rec.robust_acc
    return {
        "robust_acc": acc.value,
        "low": acc.low,
        "high": acc.high,
        "clean_acc": rec.clean_acc.value,
        "purifications_per_image": rec.cost.get("purifications_per_image"),
        "purifier_calls_per_image": rec.cost.get("purifier_calls_per_image"),
        "eval_s": rec.cost.get("eval_s"),
        "verdict": rec.verdict,
        "levels": len(rec.escalation.get("levels", [])) - 1 if rec.escalation else 0,
    }


def escalation_vs_strong(
    cfg: DictConfig, run_dir: Path, choices: Mapping[str, str]
) -> dict[str, Any]:
    """Per defense, the escalating evaluation's accuracy and cost against the strong budget's."""
    from bench.run import evaluate

    out: dict[str, Any] = {"n": int(cfg.escalation.n_samples), "rows": {}}
    e = cfg.escalation
    # Both judged alike, on profile=quick's draws.
    base = runner_overrides(
        cfg, run_dir / "escalation_runs", choices, n_samples=int(e.n_samples), draws=int(e.draws)
    )
    for name, extra in cfg.escalation.rows.items():
        row: dict[str, Any] = {}
        for variant, more in (("escalating", ["profile=quick"]), ("strong", _strong(cfg))):
            overrides = [*base, *more, *list(extra)]
            ecfg = compose_config("eval", overrides)
            picked = [o.split("=", 1)[1] for o in overrides if o.startswith("classifier=")]
            record_choices = {
                **choices,
                "classifier": picked[-1] if picked else choices["classifier"],
                "defense": str(name),
            }
            log.info("perf escalation: %s, %s", name, variant)
            rec = evaluate(
                ecfg,
                output_dir=run_dir / "escalation_runs" / f"{name}_{variant}",
                choices=record_choices,
            )
            row[variant] = _summary(rec)
        esc, strong = row["escalating"], row["strong"]
        row["within_interval"] = strong["low"] <= esc["robust_acc"] <= strong["high"]
        row["calls_ratio"] = esc["purifications_per_image"] / max(
            strong["purifications_per_image"], 1e-12
        )
        row["target"] = float(cfg.targets.escalation)
        row["met"] = row["within_interval"] and row["calls_ratio"] <= row["target"]
        out["rows"][name] = row
    return out

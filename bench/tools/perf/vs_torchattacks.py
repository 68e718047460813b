"""Item 2 of ``make perf``: the harness's EOT-PGD against ``torchattacks.EOTPGD``.

Both attack ``classifier(defense.purify(x))`` with the same eps, step size, steps, EOT samples
and random start (the harness averages the loss over EOT, as EOTPGD does); the time ratio
harness / torchattacks and the robust accuracy of both, judged on the same fresh
purifications (the harness's must be no higher).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from bench.tools.perf.passes import Composed
from bench.tools.perf.setup import Setup
from bench.tools.perf.timing import Timings, interleave
from defenses.none import NoDefense


def versus_torchattacks(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """Every variant of ``cfg.torchattacks.variants`` against EOTPGD, interleaved.

    On the stochastic defense, every variant (PGDEOT options: the success rule, early exit)
    runs interleaved with EOTPGD, each judged on the same fresh purifications. With
    ``cfg.torchattacks.deterministic``, the harness's default PGD also runs against EOTPGD on
    the bare classifier (EOT-1), where a fooled point stays fooled.
    """
    if setup.norm != "Linf":
        return {"skipped": f"torchattacks.EOTPGD is Linf only; the threat is {setup.norm}"}
    variants = {str(k): OmegaConf.to_container(v) for k, v in cfg.torchattacks.variants.items()}
    out = {"stochastic": _compare(setup, cfg, variants, int(cfg.judge_draws))}
    if cfg.torchattacks.deterministic:
        bare = dataclasses.replace(setup, defense=NoDefense().to(setup.device), eot=1)
        out["deterministic"] = _compare(bare, cfg, {"default": {}}, draws=1)
    out["target"] = float(cfg.targets.torchattacks)
    return out


def _run_all(
    setup: Setup, cfg: DictConfig, variants: dict[str, Any], x: Tensor, y: Tensor
) -> tuple[Timings, dict[str, Tensor], dict[str, Tensor]]:
    """Time the harness's variants and EOTPGD; their last outputs and the harness's fooled sets."""
    import torchattacks

    library = torchattacks.EOTPGD(
        Composed(setup.classifier, setup.defense),
        eps=setup.eps,
        alpha=setup.alpha,
        steps=setup.steps,
        eot_iter=setup.eot,
        random_start=True,
    )
    outputs: dict[str, Tensor] = {}
    seen: dict[str, Tensor] = {}

    def harness(name: str, options: dict[str, Any]) -> Callable[[], None]:
        view = setup.view(eot_reduce="loss")
        attack = setup.pgd(view, **options)

        def go() -> None:
            view.reseed(setup.seed)
            outputs[name] = attack(x, y)
            seen[name] = attack.fooled_any.cpu()

        return go

    def run_library() -> None:
        torch.manual_seed(setup.seed)  # torchattacks draws starts and noise from the global RNG
        outputs["torchattacks"] = library(x, y)

    runs = {name: harness(name, opts) for name, opts in variants.items()}
    times = interleave({**runs, "torchattacks": run_library}, int(cfg.repeats), cfg.clock)
    return times, outputs, seen


def _compare(setup: Setup, cfg: DictConfig, variants: dict[str, Any], draws: int) -> dict[str, Any]:
    """One comparison: every variant's time ratio and robust accuracy against EOTPGD's."""
    x, y = setup.points(int(cfg.n_samples))
    times, outputs, seen = _run_all(setup, cfg, variants, x, y)
    correct = {name: setup.judged(adv, y, draws) for name, adv in outputs.items()}
    acc = {name: c.mean().item() for name, c in correct.items()}
    target = float(cfg.targets.torchattacks)
    rows = {}
    for name, opts in variants.items():
        ratio = times.ratio(name, "torchattacks")
        rows[name] = {
            "options": opts,
            **times.summary(name),
            "robust_acc": acc[name],
            # The runner's success_at=any: a point the attack saw fooled counts as broken.
            "robust_acc_any": (correct[name] * ~seen[name]).mean().item(),
            "ratio": ratio,
            "ratio_wall": times.ratio(name, "torchattacks", "wall"),
            "acc_gap": acc[name] - acc["torchattacks"],
            "met": ratio <= target and acc[name] <= acc["torchattacks"],
        }
    return {
        "n": len(x),
        "defense": type(setup.defense).__name__,
        "eot_samples": setup.eot,
        "harness": rows,
        "torchattacks": {**times.summary("torchattacks"), "robust_acc": acc["torchattacks"]},
        "clean_acc": setup.judged(x, y, draws).mean().item(),
        "judge_draws": draws,
    }

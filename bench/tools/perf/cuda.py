"""The CUDA-only item of ``make perf``: bf16 autocast, channels-last and ``torch.compile``.

Each view option against fp32 on the same attack: the speedup and the robust accuracy, judged
on the same fresh purifications (a faster option that changes the accuracy is not free).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from bench.tools.perf.setup import Setup
from bench.tools.perf.timing import interleave


def cuda_options(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """Every option of ``cfg.cuda.variants`` against fp32: time and accuracy (CUDA only)."""
    if setup.device.type != "cuda":
        return {"skipped": f"device is {setup.device.type}: these are CUDA options"}
    x, y = setup.points(int(cfg.n_samples))
    variants = {"fp32": {}, **{k: dict(v) for k, v in cfg.cuda.variants.items()}}
    views = {name: setup.view(eot_reduce="logits", **opts) for name, opts in variants.items()}
    attacks = {name: setup.pgd(v) for name, v in views.items()}
    outputs: dict[str, Tensor] = {}

    def run(name: str) -> Callable[[], None]:
        def go() -> None:
            views[name].reseed(setup.seed)
            outputs[name] = attacks[name](x, y)
            torch.cuda.synchronize(setup.device)

        return go

    for name in variants:  # compile and autotune outside the timing
        run(name)()
    times = interleave({name: run(name) for name in variants}, int(cfg.repeats), "wall")
    draws = int(cfg.judge_draws)
    out = {}
    for name in variants:
        with torch.inference_mode():
            clean = (views[name](x).argmax(1) == y).float().mean().item()
        out[name] = {
            **times.summary(name),
            "speedup": times.ratio("fp32", name),
            "clean_acc_own_view": clean,
            "robust_acc": setup.judged(outputs[name], y, draws).mean().item(),
        }
    return out

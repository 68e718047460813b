"""Item 3 of ``make perf``: the AutoAttack adapter against ``pyautoattack.AutoAttack`` itself.

:class:`attacks.autoattack.AutoAttack` and pyautoattack called directly, same version, budget
and seed on the same view: the adapter must cost (almost) nothing and return the same images.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from bench.tools.perf.setup import Setup
from bench.tools.perf.timing import interleave


def versus_pyautoattack(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """The adapter's time over pyautoattack's, interleaved, and whether the outputs agree."""
    from pyautoattack import AutoAttack as PyAutoAttack

    from attacks.autoattack import AutoAttack

    aa = cfg.autoattack
    x, y = setup.points(int(cfg.n_samples))
    view = setup.view(eot_samples=int(aa.eot_samples))
    attacks, n_iter = list(aa.attacks), int(aa.n_iter)
    adapter = AutoAttack(
        view,
        norm=setup.norm,
        eps=setup.eps,
        version="custom",
        attacks=attacks,
        n_iter=n_iter,
        seed=setup.seed,
        batch_size=setup.batch_size,
    )
    outputs: dict[str, Tensor] = {}

    def run_adapter() -> None:
        view.reseed(setup.seed)
        outputs["adapter"] = adapter(x, y)

    def run_direct() -> None:
        view.reseed(setup.seed)
        direct = PyAutoAttack(
            view,
            attacks=attacks,
            device=x.device,
            eps=setup.eps,
            norm=setup.norm,
            seed=setup.seed,
            version="custom",
        )
        direct.apgd.n_iter = direct.apgd_targeted.n_iter = direct.fab.n_iter = n_iter
        outputs["direct"], _ = direct.run_standard_evaluation(x, y, batch_size=setup.batch_size)

    times = interleave({"adapter": run_adapter, "direct": run_direct}, int(cfg.repeats), cfg.clock)
    ratio = times.ratio("adapter", "direct")
    return {
        "n": len(x),
        "attacks": attacks,
        "n_iter": n_iter,
        "eot_samples": view.eot_samples,
        "adapter": times.summary("adapter"),
        "direct": times.summary("direct"),
        "ratio_wall": times.ratio("adapter", "direct", "wall"),
        "same_output": bool(torch.equal(outputs["adapter"], outputs["direct"])),
        "ratio": ratio,
        "target": float(cfg.targets.autoattack),
        "met": ratio <= float(cfg.targets.autoattack),
    }

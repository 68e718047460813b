"""Step 4 of ``make gpu-check``: one ``profile=paper`` evaluation through ``bench.evaluate``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.tools.gpu_check.networks import Networks
from bench.tools.gpu_check.sizes import RT, Sizes
from defenses.atop import AToP

EPS = 8 / 255  # CIFAR-10's Linf budget (conf/dataset_threat/cifar10_linf.yaml)


def paper_row(
    nets: Networks, sizes: Sizes, device: torch.device, out_dir: Path, threads: int
) -> dict[str, Any]:
    """``bench.evaluate`` of AToP in front of the classifier at ``profile=paper``, timed."""
    from bench.api import evaluate

    overrides = list(sizes.paper_overrides)
    t0 = time.perf_counter()
    record = evaluate(
        AToP(nets.inpainter, RT),
        nets.classifier,
        data=nets.test,
        eps=EPS,
        profile="paper",
        name="atop_gpu_check",
        n_samples=sizes.paper_n,
        device=str(device),
        results_dir=out_dir,
        threads=threads,
        overrides=overrides,
    )
    wall = time.perf_counter() - t0
    return {
        "what": f"AToP (RT2, the trained inpainter) + the trained ResNet-18, Linf 8/255, "
        f"profile=paper, {sizes.paper_n} images",
        "overrides": overrides,
        "status": record.status,
        "error": record.error,
        "evaluate_s": wall,
        "record_wall_s": record.wall_s,
        "suite": record.choices.get("suite"),
        "clean_acc": None if record.clean_acc is None else record.clean_acc.value,
        "robust_acc": None if record.robust_acc is None else record.robust_acc.value,
        "verdict": record.verdict,
        "attacks": {
            name: {
                "wall_s": a.wall_s,
                "n_attacked": a.n_attacked,
                "purifier_calls_per_image": a.purifier_calls_per_image,
            }
            for name, a in record.attacks.items()
        },
        "cost": record.cost,
    }

"""Item 6 of ``make perf``: how the harness's EOT-PGD scales with the number of images.

The attack runs over ``n`` images in the runner's batches, for several ``n``; the exponent of
time against ``n`` is fitted in log-log (1 is linear: no per-image cost grows with ``n``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from bench.tools.perf.setup import Setup
from bench.tools.perf.timing import fit_exponent, interleave


def scaling(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """The harness's EOT-PGD on n images in the runner's batches; the log-log exponent.

    ``scaling.batch_sizes``: the first is the headline (the runner's default), the others show
    how the images per call change the exponent on this device.
    """
    sizes = [int(b) for b in cfg.scaling.batch_sizes]
    result = _scaling_at(setup, cfg, sizes[0])
    result["other_batch_sizes"] = {str(b): _scaling_at(setup, cfg, b) for b in sizes[1:]}
    result["target"] = float(cfg.targets.scaling)
    result["met"] = result["exponent"] <= result["target"]
    return result


def _scaling_at(setup: Setup, cfg: DictConfig, batch: int) -> dict[str, Any]:
    """Times and exponent at one batch size."""
    ns = [int(v) for v in cfg.scaling.n]
    view = setup.view(eot_reduce=str(cfg.attack.eot_reduce))
    attack = setup.pgd(view)

    def run(n: int) -> Callable[[], None]:
        x, y = setup.points(n)

        def go() -> None:
            view.reseed(setup.seed)
            for i in range(0, n, batch):
                attack(x[i : i + batch], y[i : i + batch])

        return go

    times = interleave({str(n): run(n) for n in ns}, int(cfg.scaling.repeats), cfg.clock)
    medians = [times.median(str(n)) for n in ns]
    # One exponent per repetition: the spread says how far the fit is from noise.
    per_rep = [
        fit_exponent(ns, list(reps)) for reps in zip(*(times.of(str(n)) for n in ns), strict=True)
    ]
    return {
        "n": ns,
        "batch_size": batch,
        "median_s": medians,
        "runs": {str(n): times.summary(str(n)) for n in ns},
        "exponent": fit_exponent(ns, medians),
        "exponent_per_repetition": per_rep,
        "exponent_wall": fit_exponent(ns, [statistics.median(times.wall[str(n)]) for n in ns]),
    }

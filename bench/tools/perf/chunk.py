"""Item 0 of ``make perf``: the EOT chunk sweep behind :func:`~bench.engine.attack_view.auto_chunk`.

``chunk`` EOT samples share one purifier call of ``chunk * B`` stacked images; chunk 1 is K
calls of B images, chunk K one call of K * B. Which is faster depends on the device (a CPU's
caches, a GPU's occupancy), and ``auto_chunk`` picks by device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from bench.engine.attack_view import AttackView, auto_chunk
from bench.tools.perf.passes import bare_pass
from bench.tools.perf.setup import Setup
from bench.tools.perf.timing import interleave


def chunk_sweep(setup: Setup, cfg: DictConfig) -> dict[str, Any]:
    """Time one forward+backward of EOT-K on B images for several chunk sizes."""
    eot, batch = int(cfg.chunk.eot_samples), int(cfg.chunk.batch)
    chunks = sorted({int(c) for c in cfg.chunk.chunks if int(c) <= eot} | {1, eot})
    x, y = setup.points(batch)
    views = {c: setup.view(eot_samples=eot, chunk=c) for c in chunks}
    passes = int(cfg.chunk.passes)

    def timed(view: AttackView) -> Callable[[], None]:
        return lambda: [bare_pass(view, x, y, grad=True) for _ in range(passes)]

    times = interleave({str(c): timed(v) for c, v in views.items()}, int(cfg.repeats), cfg.clock)
    per_pass = {c: times.median(str(c)) / passes for c in chunks}
    best = min(per_pass, key=per_pass.__getitem__)
    chosen = auto_chunk(setup.device, eot)
    return {
        "eot_samples": eot,
        "batch": batch,
        "pass_ms": {str(c): round(1000 * per_pass[c], 2) for c in chunks},
        "images_per_call": {str(c): c * batch for c in chunks},
        "runs": {str(c): times.summary(str(c)) for c in chunks},
        "best_chunk": best,
        "auto_chunk": chosen,
        "auto_vs_best": per_pass[chosen] / per_pass[best],
        "one_call_vs_k_calls": per_pass[eot] / per_pass[1],
    }

"""Timing for ``make perf``: interleaved repetitions on two clocks, paired ratios, log-log fits."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError

CLOCKS = ("cpu", "wall")


@dataclass
class Timings:
    """Seconds per variant and repetition on both clocks; ratios use ``clock``.

    ``cpu`` is this process's CPU time (all its threads): on a shared machine it leaves out the
    time other processes hold the cores, which wall time cannot. With one torch thread it is
    the work the engine does; wall time is kept beside it.
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    clock: str = "cpu"

    def of(self, name: str) -> list[float]:
        """The headline clock's seconds of ``name``, one per repetition."""
        return (self.cpu if self.clock == "cpu" else self.wall)[name]

    def median(self, name: str) -> float:
        """Median seconds of ``name`` on the headline clock."""
        return statistics.median(self.of(name))

    def ratio(self, a: str, b: str, clock: str | None = None) -> float:
        """Median over repetitions of ``a / b`` (both timed in the same repetition)."""
        clock = clock or self.clock
        src = self.cpu if clock == "cpu" else self.wall
        return paired_ratio(src[a], src[b])

    def summary(self, name: str) -> dict[str, Any]:
        """Medians and every repetition, on both clocks."""
        return {
            "median_s": self.median(name),
            "wall_median_s": statistics.median(self.wall[name]),
            "cpu_median_s": statistics.median(self.cpu[name]),
            "wall_runs_s": [round(t, 4) for t in self.wall[name]],
            "cpu_runs_s": [round(t, 4) for t in self.cpu[name]],
        }

    def minus(
        self, excluded: Mapping[str, list[float]], excluded_cpu: Mapping[str, list[float]]
    ) -> Timings:
        """These timings less work inside a timed call that is not part of the measurement.

        ``excluded`` is its elapsed seconds per variant and repetition, ``excluded_cpu`` its
        CPU seconds (a runner loading its cached networks): each clock loses its own reading
        (elapsed setup time on a loaded machine exceeds the CPU time it took, and subtracting
        it from the CPU clock gave negative times).
        """

        def less(
            src: dict[str, list[float]], out: Mapping[str, list[float]]
        ) -> dict[str, list[float]]:
            return {
                name: [t - e for t, e in zip(ts, out.get(name, [0.0] * len(ts)), strict=True)]
                for name, ts in src.items()
            }

        return Timings(less(self.wall, excluded), less(self.cpu, excluded_cpu), self.clock)


def interleave(
    variants: Mapping[str, Callable[[], Any]], repeats: int, clock: str = "cpu"
) -> Timings:
    """Time every variant, repetitions interleaved, the order reversed every other one.

    Interleaving spreads drift in the machine's load (other processes) over all variants; the
    reversal cancels a systematic advantage of running first or second.
    """
    if clock not in CLOCKS:
        raise ConfigError(f"clock={clock!r} is not allowed; allowed: {', '.join(CLOCKS)}")
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    items = list(variants.items())
    for r in range(repeats):
        for name, fn in items if r % 2 == 0 else items[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return Timings(wall, cpu, clock)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repetitions of ``a[i] / b[i]`` (both timed in the same repetition)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def fit_exponent(n: list[int] | list[float], values: list[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(n)``."""
    xs, ys = [math.log(v) for v in n], [math.log(v) for v in values]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / den

"""Accuracy with confidence intervals, from the engine's counts."""

from __future__ import annotations

from dataclasses import dataclass

from scipy.stats import binomtest

from bench.engine.stats import Tally


@dataclass(frozen=True)
class Accuracy:
    """An accuracy over ``n`` images with its Wilson 95% interval.

    Attributes:
        value: fraction of correct images, in [0, 1].
        low: lower end of the 95% Wilson score interval.
        high: upper end of the 95% Wilson score interval.
        n: number of images.
    """

    value: float
    low: float
    high: float
    n: int

    @classmethod
    def from_counts(cls, correct: int, n: int) -> Accuracy:
        """Accuracy of ``correct`` out of ``n`` images (Wilson interval, as RobustBench omits)."""
        if n <= 0:
            raise ValueError(f"accuracy needs n > 0 images, got n={n}")
        ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
        return cls(value=correct / n, low=float(ci.low), high=float(ci.high), n=n)

    @classmethod
    def from_tally(cls, tally: Tally) -> Accuracy:
        """Accuracy of an engine count; a fractional count (the ``avg`` rule) keeps its value.

        The interval is the Wilson interval of the rounded count, which is conservative for
        ``avg`` over several draws (a mean of per-image fractions varies less than a binomial).
        """
        rounded = cls.from_counts(round(tally.correct), tally.n)
        return cls(value=tally.correct / tally.n, low=rounded.low, high=rounded.high, n=tally.n)

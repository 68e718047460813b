"""Accuracy with confidence intervals."""

from __future__ import annotations

from dataclasses import dataclass

from scipy.stats import binomtest


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

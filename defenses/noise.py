"""Additive Gaussian noise: the cheapest stochastic defense, for engine benchmarks and tests."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from common.checks import real
from defenses.base import Defense, DefenseInfo


class GaussianNoise(Defense):
    """Additive Gaussian input noise, then clamping to [0, 1]: the cheapest stochastic defense.

    Randomized smoothing's noise layer (Cohen et al., https://arxiv.org/abs/1902.02918) without
    the certification: every call draws fresh noise, so attacks need EOT and the judge needs
    repeated draws, while the purifier itself costs nothing next to the classifier. The
    benchmark therefore measures the engine, not the purifier.

    Properties: stochastic, differentiable, not iterative, no network calls.

    Args:
        sigma: noise standard deviation in [0, 1] pixel units (> 0).

    Example:
        >>> view = AttackView(classifier, GaussianNoise(0.1), ViewOptions(eot_samples=8))
    """

    info: ClassVar[DefenseInfo] = DefenseInfo(
        stochastic=True,
        differentiable=True,
        paper="https://arxiv.org/abs/1902.02918",
        purifier_calls=0,
    )

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = real("sigma", sigma, "> 0", lambda v: v > 0)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``clamp(x + sigma * N(0, I), 0, 1)`` with the noise drawn from ``generator``."""
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + self.sigma * noise).clamp(0, 1)

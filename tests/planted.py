"""Planted attacks with known (broken) behaviour, for testing the runner's checks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Overstep:
    """Returns x moved by ``factor * eps`` in every pixel: breaks the Linf threat model."""

    def __init__(self, model: nn.Module, *, eps: float, factor: float = 2.0) -> None:
        self.eps, self.factor = eps, factor

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return (x + self.factor * self.eps).clamp(0, 1)


class NaNs:
    """Returns NaN images: a diverging attack must fail the run, never give a number."""

    def __init__(self, model: nn.Module) -> None:
        pass

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.full_like(x, float("nan"))

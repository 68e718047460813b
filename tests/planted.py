"""Planted attacks and defenses with known (broken) behaviour, for testing the runner's checks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from defenses.base import Defense, DefenseInfo

# The honest stochastic defense of the set is the repository's own, re-exported: tests and
# configs name it tests.planted.GaussianNoise, beside the planted violators.
from defenses.noise import GaussianNoise as GaussianNoise


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


# -- planted defenses of known behaviour -----------------------------------------------------


class Quantize(Defense):
    """Rounds pixels to ``levels`` grey levels: zero gradient almost everywhere.

    It (wrongly) declares itself differentiable, as a naive author would: the harness must find
    the masked gradients itself, and BPDA (identity backward) must break it.
    """

    info = DefenseInfo(stochastic=False, differentiable=True, purifier_calls=0)

    def __init__(self, levels: int = 8) -> None:
        super().__init__()
        self.levels = levels

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


class Detach(Defense):
    """Returns its input detached from the graph: gradients are unavailable."""

    info = DefenseInfo(stochastic=False, differentiable=True, purifier_calls=0)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return x.detach().clone()


class Blur(Defense):
    """A 3x3 box blur: deterministic, differentiable, iterative=False; `approx` is itself."""

    info = DefenseInfo(stochastic=False, differentiable=True, purifier_calls=1)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        c = x.shape[1]
        kernel = torch.full((c, 1, 3, 3), 1 / 9, device=x.device, dtype=x.dtype)
        return torch.nn.functional.conv2d(x, kernel, padding=1, groups=c).clamp(0, 1)


class NaNDefense(Defense):
    """Purifies to NaN: the run must fail loudly, naming the defense."""

    info = DefenseInfo(stochastic=False, differentiable=True, purifier_calls=1)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return x * float("nan")


class _InfBackward(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by inf."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad * float("inf")


class NaNGradient(Defense):
    """The identity forward, a non-finite gradient backward (inf, NaN where the gradient is 0).

    Its forward is finite and correct, so only the attack's gradients are broken: a gradient
    failure, which must never end a run.
    """

    info = DefenseInfo(stochastic=False, differentiable=True, purifier_calls=0)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return _InfBackward.apply(x)


class GaussianDetach(Defense):
    """Gaussian noise, then detached: a stochastic defense that cuts the graph."""

    info = DefenseInfo(stochastic=True, differentiable=True, purifier_calls=0)

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + self.sigma * noise).clamp(0, 1).detach()


class DetachedDecision(Defense):
    """A defense with its own decision (as CARSO's), whose logits are cut from the input."""

    info = DefenseInfo(stochastic=False, differentiable=True, purifier_calls=0)

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return x

    def predict(
        self, classifier: nn.Module, x: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        return classifier(x).detach()

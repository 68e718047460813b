"""The defense contract every purifier implements.

A defense cleans an input before the classifier sees it. The harness composes
``classifier(defense.purify(x))`` and decides how that composition is differentiated and how
its randomness is averaged; the defense only declares static facts about itself in
:class:`DefenseInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DefenseInfo:
    """Static facts about a defense, read by the harness to choose a fair evaluation.

    Attributes:
        stochastic: ``purify(x)`` differs between calls for the same ``x`` (needs EOT and
            repeated evaluation).
        differentiable: autograd through ``purify`` is exact and affordable.
        iterative: an optimisation or sampling loop runs at inference (AutoAttack's
            ``check_dynamic`` fires; adaptive attacks are mandatory).
        paper: link to the paper (arXiv where possible), shown in the leaderboard.
        purifier_calls: forward passes of the purifier network(s) per image (NFE).
    """

    stochastic: bool
    differentiable: bool
    iterative: bool = False
    paper: str = ""
    purifier_calls: int = 0


class Defense(nn.Module):
    """Base class of purification defenses.

    Subclasses set the class attribute ``info`` and implement :meth:`purify`. Inputs and outputs
    are float NCHW images in [0, 1] with the same shape and device; any internal range (e.g.
    [-1, 1] for diffusion models) is converted inside ``purify`` only. Randomness enters only
    through ``generator``. ``purify`` is never wrapped in ``torch.no_grad``: the evaluation owns
    the gradient context.
    """

    info: ClassVar[DefenseInfo]

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Return the purified images (same shape, device and range as ``x``)."""
        raise NotImplementedError

    def approx(self, x: Tensor) -> Tensor:
        """Differentiable stand-in for ``purify`` used by BPDA (identity by default)."""
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Purify with fresh randomness (``nn.Module`` convenience)."""
        return self.purify(x)

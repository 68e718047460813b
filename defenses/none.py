"""The undefended baseline: the identity purifier."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from defenses.base import Defense, DefenseInfo


class NoDefense(Defense):
    """No purification: ``purify(x) == x``.

    The baseline every purifier is compared against; attacks on it are attacks on the bare
    classifier.

    Properties: deterministic, differentiable, not iterative.

    Example:
        >>> defense = NoDefense()
        >>> defense.purify(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 1, 28, 28])
    """

    info: ClassVar[DefenseInfo] = DefenseInfo(
        stochastic=False, differentiable=True, iterative=False, paper="", purifier_calls=0
    )

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Return ``x`` unchanged."""
        return x

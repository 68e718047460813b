"""The attack protocol.

An attack is built from its YAML as a partial, bound at run time to the model view
(``attack = partial(model=view)``) and called as ``attack(x, y) -> x_adv``. Attacks never see a
defense, only an ``nn.Module`` that maps images in [0, 1] to logits. torchattacks classes satisfy
this protocol as they are.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

Norm = Literal["Linf", "L2"]
NORMS: tuple[str, ...] = ("Linf", "L2")


@runtime_checkable
class Attack(Protocol):
    """Maps clean images and labels to adversarial images within the threat model."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial versions of ``x`` (same shape, in [0, 1])."""
        ...


def check_norm(norm: str, allowed: tuple[str, ...], attack: str) -> None:
    """Raise ``ValueError`` naming the attack when it does not support ``norm``."""
    if norm not in allowed:
        raise ValueError(f"{attack} does not support norm={norm!r}; allowed: {', '.join(allowed)}")

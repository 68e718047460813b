"""FGSM with random start (FGSM-RS) through torchattacks."""

from __future__ import annotations

from typing import ClassVar

import torchattacks
from torch import Tensor, nn

from attacks.base import check_norm
from common.checks import real


class FGSMRS:
    r"""FGSM with random start in the paper 'Fast is better than free'.

    [https://arxiv.org/abs/2001.03994]

    ``torchattacks.FFGSM``: a uniform random start in the Linf ball, one signed-gradient step of
    ``rel_stepsize * eps`` (1.25 by default, as Wong et al.), projection. Used mainly as the
    adversary of FGSM-RS adversarial training.

    Arguments:
        model (nn.Module): the model to attack.
        norm (str): must be ``"Linf"``.
        eps (float): perturbation budget.
        rel_stepsize (float): step size as a fraction of ``eps``, at least 1: a shorter single
            step cannot reach the threat's boundary from the clean image. (Default: 1.25)

    Example:
        >>> x_adv = FGSMRS(model, norm="Linf", eps=0.1)(x, y)
    """

    kind: ClassVar[str] = "white-box"
    returns_best: ClassVar[bool] = False  # torchattacks returns its (single) iterate

    def __init__(
        self, model: nn.Module, *, norm: str, eps: float, rel_stepsize: float = 1.25
    ) -> None:
        check_norm(norm, ("Linf",), "FGSM-RS")
        real("FGSM-RS eps", eps, "> 0", lambda v: v > 0)
        # The rule of PGD's check_reach for its one step: it must be able to travel eps.
        real(
            "FGSM-RS rel_stepsize",
            rel_stepsize,
            ">= 1 (its one step must reach eps)",
            lambda v: v >= 1,
        )
        self.norm, self.eps, self.alpha = norm, eps, rel_stepsize * eps
        self._attack = torchattacks.FFGSM(model, eps=eps, alpha=self.alpha)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial examples for ``(x, y)``."""
        self._attack.set_device(x.device)
        return self._attack(x, y)

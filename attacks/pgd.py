"""Projected gradient descent through torchattacks (Linf and L2)."""

from __future__ import annotations

from typing import ClassVar

import torchattacks
from torch import Tensor, nn

from attacks.base import check_norm
from attacks.pgd_eot import check_reach
from common.checks import flag, positive_int, real


class PGD:
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'.

    [https://arxiv.org/abs/1706.06083]

    Runs ``torchattacks.PGD`` (Linf) or ``torchattacks.PGDL2`` (L2), so the norm follows the
    threat model from one config key. Cross-entropy loss, uniform random start, returns the last
    iterate (torchattacks does no best-iterate tracking).

    Arguments:
        model (nn.Module): the model view to attack (images in [0, 1] -> logits).
        norm (str): ``"Linf"`` or ``"L2"``.
        eps (float): perturbation budget.
        steps (int): number of iterations. (Default: 50)
        rel_stepsize (float | None): step size as a fraction of ``eps``; ``None`` uses Madry et
            al.'s rule ``2.5 / steps``. Refused when ``steps * rel_stepsize < 1``: those steps
            cannot reach the threat's boundary. (Default: None)
        random_start (bool): start from a random point in the eps-ball. (Default: True)

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: like images.

    Example:
        >>> attack = PGD(model, norm="Linf", eps=0.1, steps=40)
        >>> x_adv = attack(x, y)
    """

    kind: ClassVar[str] = "white-box"
    returns_best: ClassVar[bool] = False  # torchattacks returns the last iterate

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str,
        eps: float,
        steps: int = 50,
        rel_stepsize: float | None = None,
        random_start: bool = True,
    ) -> None:
        check_norm(norm, ("Linf", "L2"), "PGD")
        real("PGD eps", eps, "> 0", lambda v: v > 0)
        positive_int("PGD steps", steps)
        if rel_stepsize is not None:
            real("PGD rel_stepsize", rel_stepsize, "> 0 or null", lambda v: v > 0)
        flag("PGD random_start", random_start)
        check_reach("PGD", eps, steps, rel_stepsize=rel_stepsize)
        alpha = eps * (2.5 / steps if rel_stepsize is None else rel_stepsize)
        cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
        self.norm, self.eps, self.steps, self.alpha = norm, eps, steps, alpha
        self._attack = cls(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial examples for ``(x, y)``."""
        # torchattacks takes its device from the model's first parameter; a parameter-free view
        # would leave it unset, so pin it to the inputs' device.
        self._attack.set_device(x.device)
        return self._attack(x, y)

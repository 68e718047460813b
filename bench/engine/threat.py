"""The threat model: the budget a run allows, and the check every adversarial batch passes.

Validity is asserted, not assumed: every batch an attack returns is compared with a copy of the
clean images taken before the attack ran (an attack that writes into its input would otherwise
be compared with itself), and must be finite, inside [0, 1] and within eps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attacks.base import NORMS
from common.checks import choice, real
from common.errors import ConfigError, ThreatModelViolation

# Slack on the eps check, as AutoAttack's own sanity line: float rounding of x + delta.
EPS_TOLERANCE = 1e-6


def diameter(norm: str, shape: tuple[int, ...]) -> float:
    """The largest distance between two images of ``shape`` in [0, 1] under ``norm``."""
    return 1.0 if norm == "Linf" else math.sqrt(math.prod(shape))


def check_budget(norm: str, eps: object, shape: tuple[int, ...]) -> tuple[str, float]:
    """The threat's norm and eps, refused when eps is not a positive number within the diameter.

    A budget beyond the diameter of the input space allows every image: it is a typo, and an
    attack would spend its steps on a meaningless ball.

    Raises:
        ConfigError: naming the value and the largest allowed eps.
    """
    choice("threat.norm", norm, NORMS)
    value = real("threat.eps", eps, "> 0", lambda v: v > 0)
    cap = diameter(norm, shape)
    if value > cap:
        what = "the whole [0, 1] pixel range" if norm == "Linf" else "sqrt(C*H*W)"
        raise ConfigError(
            f"threat.eps={value:g} exceeds {cap:.6g}, the diameter of the input space "
            f"({what}) for {norm} on images of shape {tuple(shape)}; allowed: (0, {cap:.6g}]"
        )
    return norm, value


def check_threat(x: Tensor, x_adv: Tensor, norm: str, eps: float, attack: str) -> float:
    """Assert the threat model on one adversarial batch and return its largest perturbation.

    Args:
        x: the clean images, as they were before the attack ran (a copy).
        x_adv: what the attack returned.
        norm: ``Linf`` or ``L2``.
        eps: the budget.
        attack: the attack's name, for the message.

    Raises:
        ThreatModelViolation: a wrong shape, NaN or inf, a pixel outside [0, 1], or a
            perturbation beyond eps.
    """
    if x_adv.shape != x.shape:
        raise ThreatModelViolation(
            f"{attack} returned shape {tuple(x_adv.shape)} for inputs of shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x_adv).all():
        raise ThreatModelViolation(f"{attack} returned NaN or inf pixels")
    low, high = x_adv.min().item(), x_adv.max().item()
    if low < 0 or high > 1:
        raise ThreatModelViolation(f"{attack} left [0, 1]: pixel range [{low:.6g}, {high:.6g}]")
    delta = (x_adv - x).flatten(1)
    dist = delta.abs().amax(1) if norm == "Linf" else delta.norm(p=2, dim=1)
    worst = dist.max().item() if len(dist) else 0.0
    if worst > eps + EPS_TOLERANCE:
        raise ThreatModelViolation(
            f"{attack} exceeded the threat model: {norm} perturbation {worst:.8g} > eps {eps:.8g} "
            f"(+{EPS_TOLERANCE:g}) on {(dist > eps + EPS_TOLERANCE).sum().item()} image(s)"
        )
    return worst

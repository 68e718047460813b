"""The threat model: the budget a run allows, and the check every adversarial batch passes.

Validity is asserted, not assumed: every batch an attack returns is compared with a copy of the
clean images taken before the attack ran (an attack that writes into its input would otherwise
be compared with itself), and must be finite, inside [0, 1] and within eps.

Two kinds of threat (docs/threats.md):

* Lp balls (``Linf``, ``L2``): ``|x_adv - x| <= eps``, read off the two images.
* Flow fields (``stadv``, Xiao et al. 2018 with Laidlaw et al.'s 2021 bound): ``x_adv`` is
  ``x`` resampled along a flow with ``|flow|_inf <= eps``. An image alone does not reveal its
  flow (many flows, or none, give the same image), so the attack reports the flow it applied
  (``attack.flow``, read by :func:`attacks.base.report`), and the check asserts both halves:
  the reported flow is finite, of shape ``(N, H, W, 2)`` and within eps, *and* the returned
  images are the clean copy warped by it (:func:`flow_warp`, the harness's own definition of
  the warp, not the attack's) to within :data:`WARP_TOLERANCE`. An attack that reports no flow,
  a flow beyond the bound, or images that its flow does not produce fails the run. The check is
  sound because it recomputes the image from the clean copy: whatever the attack did, the
  returned batch is a warp of the clean images by a flow within the budget.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attacks.base import FLOW_NORMS, NORMS, norms_of
from attacks.pgd_eot import PGDEOT
from attacks.stadv import StAdv
from common.checks import choice, real
from common.errors import ConfigError, ThreatModelViolation

# Slack on the eps check, as AutoAttack's own sanity line: float rounding of x + delta.
EPS_TOLERANCE = 1e-6
# Largest pixel gap between the returned images and the clean ones warped by the reported flow:
# float rounding of two bilinear interpolations (the attack's and this module's), and the
# attack's clamp to [0, 1] of values a rounding error above 1.
WARP_TOLERANCE = 1e-5
# The extent of the image in the flow's normalized coordinates: a flow component of 2 reaches
# from one edge to the other, so a larger bound allows nothing more.
FLOW_SPAN = 2.0
# The harness's own white-box attacks (the escalation raises their budgets, the diagnostics probe
# with them), each for the threats it declares; :func:`harness_attack` picks one per threat.
HARNESS_ATTACKS: tuple[type, ...] = (PGDEOT, StAdv)


def harness_attack(norm: str) -> type:
    """The harness's white-box attack for threat ``norm`` (PGDEOT for Lp, StAdv for flows)."""
    return next(cls for cls in HARNESS_ATTACKS if norm in norms_of(cls))


def diameter(norm: str, shape: tuple[int, ...]) -> float:
    """The largest distance between two images of ``shape`` in [0, 1] under ``norm``.

    For a flow threat, the largest flow bound that still means something (:data:`FLOW_SPAN`).
    """
    if norm in FLOW_NORMS:
        return FLOW_SPAN
    return 1.0 if norm == "Linf" else math.sqrt(math.prod(shape))


def flow_warp(x: Tensor, flow: Tensor) -> Tensor:
    """The flow threat's perturbation: ``x`` (N, C, H, W) resampled along ``flow`` (N, H, W, 2).

    Each output pixel samples ``x`` at its own centre moved by ``flow`` in ``grid_sample``'s
    normalized coordinates (the image spans [-1, 1]; ``align_corners=False``), bilinearly, with
    border padding. A zero flow returns ``x``.
    """
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False) + flow
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
        what = {"Linf": "the whole [0, 1] pixel range", "L2": "sqrt(C*H*W)"}.get(
            norm, "the image's width in normalized flow coordinates"
        )
        raise ConfigError(
            f"threat.eps={value:g} exceeds {cap:.6g}, the diameter of the input space "
            f"({what}) for {norm} on images of shape {tuple(shape)}; allowed: (0, {cap:.6g}]"
        )
    return norm, value


def check_threat(
    x: Tensor,
    x_adv: Tensor,
    norm: str,
    eps: float,
    attack: str,
    flow: Tensor | None = None,
) -> float:
    """Assert the threat model on one adversarial batch and return its largest perturbation.

    Args:
        x: the clean images, as they were before the attack ran (a copy).
        x_adv: what the attack returned.
        norm: ``Linf``, ``L2`` or ``stadv``.
        eps: the budget.
        attack: the attack's name, for the message.
        flow: the flow the attack reported (flow threats; ignored for Lp ones).

    Returns:
        The largest perturbation in the threat's norm (for ``stadv``: the largest flow
        component).

    Raises:
        ThreatModelViolation: a wrong shape, NaN or inf, a pixel outside [0, 1], a
            perturbation beyond eps; for a flow threat also a missing or ill-shaped flow, or
            images that are not the clean ones warped by it.
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
    if norm in FLOW_NORMS:
        dist = flow_distance(x, x_adv, flow, attack)
    else:
        delta = (x_adv - x).flatten(1)
        dist = delta.abs().amax(1) if norm == "Linf" else delta.norm(p=2, dim=1)
    worst = dist.max().item() if len(dist) else 0.0
    if worst > eps + EPS_TOLERANCE:
        what = "flow" if norm in FLOW_NORMS else "perturbation"
        raise ThreatModelViolation(
            f"{attack} exceeded the threat model: {norm} {what} {worst:.8g} > eps {eps:.8g} "
            f"(+{EPS_TOLERANCE:g}) on {(dist > eps + EPS_TOLERANCE).sum().item()} image(s)"
        )
    return worst


def flow_distance(x: Tensor, x_adv: Tensor, flow: Tensor | None, attack: str) -> Tensor:
    """Per image, the largest component of the reported flow, once the flow is verified.

    Raises:
        ThreatModelViolation: no flow, a flow of the wrong shape or not finite, or returned
            images that are not ``flow_warp(x, flow)`` to within :data:`WARP_TOLERANCE`.
    """
    n, _, h, w = x.shape
    if flow is None:
        raise ThreatModelViolation(
            f"{attack} reported no flow field: under a flow threat an attack reports the flow "
            f"it applied (attribute `flow`, shape (N, H, W, 2)); an image alone does not show it"
        )
    if tuple(flow.shape) != (n, h, w, 2):
        raise ThreatModelViolation(
            f"{attack} reported a flow of shape {tuple(flow.shape)} for images of shape "
            f"{tuple(x.shape)}; expected {(n, h, w, 2)}"
        )
    if not torch.isfinite(flow).all():
        raise ThreatModelViolation(f"{attack} reported NaN or inf in its flow field")
    flow = flow.to(x.device, x.dtype)
    gap = (x_adv - flow_warp(x, flow)).flatten(1).abs().amax(1)
    if len(gap) and gap.max().item() > WARP_TOLERANCE:
        raise ThreatModelViolation(
            f"{attack} returned images that are not the clean ones warped by the flow it "
            f"reported: |x_adv - warp(x, flow)| up to {gap.max().item():.6g} (> "
            f"{WARP_TOLERANCE:g}) on {(gap > WARP_TOLERANCE).sum().item()} image(s)"
        )
    return flow.flatten(1).abs().amax(1)

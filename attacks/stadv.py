"""StAdv: adversarial flow fields, found by PGD on the flow instead of on the pixels.

The threat (docs/threats.md) moves pixels instead of changing their values: the adversarial
image is the clean one resampled along a flow field, ``x_adv = warp(x, flow)``. The flow is one
displacement ``(dx, dy)`` per pixel in ``grid_sample``'s normalized coordinates, where the image
spans [-1, 1] in each direction (one pixel is ``2 / W`` wide, ``2 / H`` high), and the budget
bounds every component: ``|flow|_inf <= eps``, Laidlaw et al.'s (2021) 0.05 (0.8 pixels on a
32 x 32 image, 0.2 on an 8 x 8 one). The warp is bilinear with border padding at pixel centres
(``align_corners=False``), so a zero flow returns the image itself.

Like the harness's PGD (:mod:`attacks.pgd_eot`) the attack sees only a model view and finds its
EOT there: ``model.sample_logits`` for the per-sample loss, ``model.stochastic`` for early stop,
``model.options.eot_reduce`` for the estimator. It imports nothing from the harness.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import FLOW_NORMS, check_norm
from attacks.pgd_eot import (
    EOT_REDUCTIONS,
    LOSSES,
    LossFn,
    ce_loss,
    check_reach,
    dlr_loss,
    margin_loss,
)
from common.checks import choice, flag, integer, positive_int, real
from common.errors import ConfigError

logger = logging.getLogger(__name__)

_LOSS_FNS: dict[str, LossFn] = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}
# Xiao et al.'s epsilon inside L_flow's square root: a finite gradient where a flow is constant.
SMOOTHNESS_EPS = 1e-8
# The four neighbours of a pixel, as offsets into the flow padded by one pixel on every side.
_NEIGHBOURS = ((0, 1), (2, 1), (1, 0), (1, 2))


def identity_grid(x: Tensor) -> Tensor:
    """The sampling grid that returns ``x`` unchanged: its pixel centres, ``(N, H, W, 2)``."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(n, 2, 3)
    return F.affine_grid(theta, [n, c, h, w], align_corners=False)


def warp(x: Tensor, flow: Tensor) -> Tensor:
    """``x`` (N, C, H, W) resampled at its pixel centres moved by ``flow`` (N, H, W, 2).

    Bilinear, with border padding: a pixel that samples beyond the image takes the edge's value.
    """
    grid = identity_grid(x) + flow
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flow_smoothness(flow: Tensor) -> Tensor:
    """Xiao et al.'s flow loss per image, ``(N,)``, of a flow ``(N, H, W, 2)``.

    ``L_flow = sum_p sum_{q in N(p)} sqrt(|du_p - du_q|^2 + |dv_p - dv_q|^2 + eps)`` over every
    pixel ``p`` and its four neighbours ``q`` (a neighbour beyond the border is ``p`` itself),
    in the flow's own units; small for a smooth flow, whatever its size.
    """
    f = flow.permute(0, 3, 1, 2)
    h, w = f.shape[-2:]
    padded = F.pad(f, (1, 1, 1, 1), mode="replicate")
    total = f.new_zeros(len(f))
    for dy, dx in _NEIGHBOURS:
        diff = f - padded[:, :, dy : dy + h, dx : dx + w]
        total = total + diff.pow(2).sum(1).add(SMOOTHNESS_EPS).sqrt().flatten(1).sum(1)
    return total


class _Best:
    """The best flow per point so far, ranked by ``(fooled, score)`` as PGDEOT ranks iterates."""

    def __init__(self, flow: Tensor) -> None:
        self.flow = flow.clone()
        self.fooled = torch.zeros(len(flow), dtype=torch.bool, device=flow.device)
        self.score = torch.full((len(flow),), -math.inf, device=flow.device)

    def update(self, idx: Tensor, flow: Tensor, score: Tensor, fooled: Tensor) -> None:
        """Keep ``flow`` for the points ``idx`` where it beats their best so far."""
        score = torch.nan_to_num(score.float(), nan=-math.inf)  # NaN never wins nor blocks
        old_fooled, old_score = self.fooled[idx], self.score[idx]
        better = (fooled & ~old_fooled) | ((fooled == old_fooled) & (score > old_score))
        sel = idx[better]
        self.flow[sel] = flow[better]
        self.score[sel] = score[better]
        self.fooled[sel] = fooled[better]


class StAdv:
    r"""StAdv in the paper 'Spatially Transformed Adversarial Examples'.

    [https://arxiv.org/abs/1801.02612], under the flow bound of 'Perceptual Adversarial
    Robustness: Defense Against Unseen Threat Models' [https://arxiv.org/abs/2006.12655].

    Projected gradient ascent on the flow field: every step moves each flow component by
    ``alpha * sign(gradient)`` and clamps it to ``[-eps, eps]`` (Laidlaw et al.'s Linf bound on
    the flow per pixel); the image is ``warp(x, flow)`` (module doc). The loss is CE, the margin
    or DLR of the model's logits (EOT as the view provides it), minus ``smoothness`` times Xiao
    et al.'s L_flow. Returns the best iterate of every point over all iterates and restarts,
    ranked by (fooled, loss) as :class:`attacks.pgd_eot.PGDEOT` does, and reports the flow of
    every returned image (``flow``), which the harness's threat check verifies.

    Properties: white-box, iterative; stochastic only through its random starts, drawn on CPU
    from its own ``seed``.

    Arguments:
        model (nn.Module): the model view to attack (images in [0, 1] -> logits).
        norm (str): ``"stadv"`` (the threat's norm; Lp threats are refused).
        eps (float): the flow bound, per component, in normalized coordinates.
        steps (int): gradient steps per restart. (Default: 50)
        rel_stepsize (float | None): step as a fraction of ``eps``; ``None``: ``2.5 / steps``.
            Refused when ``steps * rel_stepsize < 1``. (Default: None)
        step_size (float | None): absolute step, overrides ``rel_stepsize``; refused when
            ``steps * step_size < eps``. (Default: None)
        restarts (int): runs; restart ``r > 0`` attacks only points no earlier run fooled.
            (Default: 1)
        loss (str | list[str]): ``"ce"``, ``"margin"`` or ``"dlr"``; a list is cycled over the
            restarts and the best iterate is ranked by its first loss. (Default: "ce")
        random_start (bool): start from a flow uniform in ``[-eps, eps]``. (Default: True)
        smoothness (float): weight of L_flow subtracted from the loss (Xiao et al.'s tau; 0
            attacks the bound alone). (Default: 0.0)
        eot_reduce (str | None): ``"logits"`` (loss of the averaged logits) or ``"loss"``
            (average of the per-sample losses over ``model.sample_logits``); ``None`` takes
            ``model.options.eot_reduce`` where the model has one. (Default: None)
        early_stop (bool | str): freeze a point once fooled; ``"auto"`` does unless the model
            says it is stochastic (``model.stochastic``), as PGDEOT. (Default: "auto")
        seed (int): seed of the random starts. (Default: 0)
        track (bool): keep the first restart's per-iterate loss and success. (Default: True)

    Attributes:
        flow (Tensor): ``(N, H, W, 2)`` on the images' device: the flow of each returned image.
        fooled_any (Tensor): bool ``(N,)`` on CPU, fooled at some iterate in the last call.
        loss_history (Tensor | None): float ``(steps + 1, N)`` on CPU, or ``None``.
        fooled_history (Tensor | None): bool ``(steps + 1, N)`` on CPU, or ``None``.
        warnings (list[str]): unavailable, non-finite or zero gradients seen in the last call.

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: like images, ``warp(x, flow)``.

    Example:
        >>> attack = StAdv(model, norm="stadv", eps=0.05, steps=50, loss=["ce", "margin"])
        >>> x_adv = attack(x, y)  # attack.flow holds the flow of every image
    """

    kind: ClassVar[str] = "white-box"
    returns_best: ClassVar[bool] = True
    internal_eot: ClassVar[int] = 1  # its EOT is the view's
    norms: ClassVar[tuple[str, ...]] = FLOW_NORMS

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str,
        eps: float,
        steps: int = 50,
        rel_stepsize: float | None = None,
        step_size: float | None = None,
        restarts: int = 1,
        loss: str | Sequence[str] = "ce",
        random_start: bool = True,
        smoothness: float = 0.0,
        eot_reduce: str | None = None,
        early_stop: bool | str = "auto",
        seed: int = 0,
        track: bool = True,
    ) -> None:
        check_norm(norm, FLOW_NORMS, "StAdv")
        real("StAdv eps", eps, "> 0", lambda v: v > 0)
        positive_int("StAdv steps", steps)
        positive_int("StAdv restarts", restarts)
        for name, value in (("rel_stepsize", rel_stepsize), ("step_size", step_size)):
            if value is not None:
                real(f"StAdv {name}", value, "> 0 or null", lambda v: v > 0)
        real("StAdv smoothness", smoothness, ">= 0", lambda v: v >= 0)
        losses = [loss] if isinstance(loss, str) else list(loss)
        if not losses or len(losses) > restarts:
            raise ConfigError(
                f"StAdv loss={loss!r} with restarts={restarts}: name one loss per restart at "
                "most (restart r uses loss[r % len(loss)]), and at least one"
            )
        for name in losses:
            choice("StAdv loss", name, LOSSES)
        choice("StAdv eot_reduce", eot_reduce, (None, *EOT_REDUCTIONS))
        choice("StAdv early_stop", early_stop, (True, False, "auto"))
        flag("StAdv random_start", random_start)
        flag("StAdv track", track)
        integer("StAdv seed", seed, minimum=0)
        check_reach("StAdv", eps, steps, step_size=step_size, rel_stepsize=rel_stepsize)

        self.model = model
        self.norm, self.eps, self.steps, self.restarts = norm, float(eps), steps, restarts
        rel = 2.5 / steps if rel_stepsize is None else rel_stepsize
        self.alpha = float(step_size) if step_size is not None else self.eps * rel
        self.losses, self.random_start = losses, random_start
        self.smoothness, self.eot_reduce = float(smoothness), eot_reduce
        self.early_stop, self.seed, self.track = early_stop, seed, track

        self.flow = torch.zeros(0, 0, 0, 2)
        self.fooled_any = torch.zeros(0, dtype=torch.bool)
        self.loss_history: Tensor | None = None
        self.fooled_history: Tensor | None = None
        self.warnings: list[str] = []
        self._reduce = "logits"
        self._grad_warned = False

    # -- the attack ------------------------------------------------------------------------

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Return ``warp(x, flow)`` for the best flow found for every point of ``(x, y)``."""
        x = x.detach()
        y = y.detach().to(x.device)
        self.warnings, self._grad_warned = [], False
        self._reduce = self._resolve_reduce()
        generator = torch.Generator().manual_seed(self.seed)  # the same starts on every call
        n, _, h, w = x.shape
        best = _Best(x.new_zeros(n, h, w, 2))
        self.loss_history = self.fooled_history = None
        for r in range(self.restarts):
            idx = torch.arange(n, device=x.device) if r == 0 else (~best.fooled).nonzero()[:, 0]
            if idx.numel() == 0:
                break
            loss_fn = _LOSS_FNS[self.losses[r % len(self.losses)]]
            self._restart(x[idx], y[idx], idx, loss_fn, best, generator, record=r == 0)
        self.fooled_any = best.fooled.cpu()
        self.flow = best.flow
        return warp(x, best.flow).clamp(0, 1)

    @property
    def freezes_fooled_points(self) -> bool:
        """Whether a fooled point stops being attacked (``early_stop``, resolved)."""
        if self.early_stop != "auto":
            return bool(self.early_stop)
        return not getattr(self.model, "stochastic", False)

    def _restart(
        self,
        x: Tensor,
        y: Tensor,
        idx: Tensor,
        loss_fn: LossFn,
        best: _Best,
        generator: torch.Generator,
        *,
        record: bool,
    ) -> None:
        """One run on the points ``idx`` (``x``, ``y`` are those points), updating ``best``."""
        m, _, h, w = x.shape
        flow = torch.zeros(m, h, w, 2)
        if self.random_start:
            flow = (torch.rand(flow.shape, generator=generator) * 2 - 1) * self.eps
        flow = flow.to(x.device, x.dtype)
        active = torch.ones(m, dtype=torch.bool, device=x.device)
        last_score = torch.full((m,), math.nan, device=x.device)
        last_fooled = torch.zeros(m, dtype=torch.bool, device=x.device)
        track = record and self.track
        if track:
            loss_hist = torch.full((self.steps + 1, m), math.nan)
            fooled_hist = torch.zeros((self.steps + 1, m), dtype=torch.bool)
        for t in range(self.steps + 1):
            act = active.nonzero()[:, 0]
            if act.numel() == 0:
                if track:
                    loss_hist[t:], fooled_hist[t:] = last_score.cpu(), last_fooled.cpu()
                break
            fa = flow[act]
            # The final point needs no gradient: only its loss and success are scored.
            score, fooled, grad = self._evaluate(
                x[act], fa, y[act], loss_fn, t < self.steps, record and t == 0
            )
            best.update(idx[act], fa, score, fooled)
            last_score[act], last_fooled[act] = score.float(), fooled
            if track:
                loss_hist[t], fooled_hist[t] = last_score.cpu(), last_fooled.cpu()
            if grad is None:
                break
            if self.freezes_fooled_points:
                active[act[fooled]] = False
                act, fa, grad = act[~fooled], fa[~fooled], grad[~fooled]
            # The projection: Laidlaw et al.'s Linf bound on every flow component.
            flow[act] = (fa + self.alpha * grad.sign()).clamp(-self.eps, self.eps)
        if track:
            self.loss_history, self.fooled_history = loss_hist, fooled_hist

    # -- one iterate -----------------------------------------------------------------------

    def _evaluate(
        self, x: Tensor, flow: Tensor, y: Tensor, loss_fn: LossFn, with_grad: bool, first: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Score, success and (when asked) the loss gradient with respect to the flow."""
        grad = None
        if with_grad:
            # A fresh leaf per step, and grad mode forced on: callers may hold a no_grad context.
            leaf = flow.clone().requires_grad_(True)
            with torch.enable_grad():
                samples, objective, score = self._objective(x, leaf, y, loss_fn)
                grad = self._gradient(objective, leaf, first)
        else:
            with torch.inference_mode():
                samples, objective, score = self._objective(x, flow, y, loss_fn)
        # Success as PGDEOT's "mean" rule: the EOT-averaged logits misclassify.
        return score, samples.mean(0).argmax(1) != y, grad

    def _objective(
        self, x: Tensor, flow: Tensor, y: Tensor, loss_fn: LossFn
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits ``(K, N, C)`` (detached), the loss to maximise ``(N,)``, the score ``(N,)``."""
        images = warp(x, flow).clamp(0, 1)
        if self._reduce == "loss":
            samples = self.model.sample_logits(images).float()
            logits = samples
        else:
            samples = logits = self.model(images).float().unsqueeze(0)
        k, n, c = logits.shape
        flat, labels = logits.reshape(k * n, c), y.repeat(k)
        objective = loss_fn(flat, labels).view(k, n).mean(0)
        primary = _LOSS_FNS[self.losses[0]]
        if primary is loss_fn:
            score = objective.detach()
        else:  # restarts with other losses stay comparable: ranked by the first loss
            score = primary(flat.detach(), labels).view(k, n).mean(0)
        if self.smoothness:
            penalty = self.smoothness * flow_smoothness(flow)
            objective = objective - penalty
            score = score - penalty.detach().float()
        return samples.detach(), objective, score

    def _gradient(self, objective: Tensor, flow: Tensor, first: bool) -> Tensor:
        """The flow gradient of ``objective.sum()``; zeros (and a warning) where unavailable."""
        if not objective.requires_grad:
            self._warn_grad("the loss does not depend on the input (the model cut the graph)")
            return torch.zeros_like(flow)
        (grad,) = torch.autograd.grad(objective.sum(), flow, allow_unused=True)
        if grad is None:
            self._warn_grad("autograd returned no flow gradient (the model cut the graph)")
            return torch.zeros_like(flow)
        grad = grad.detach()
        if not torch.isfinite(grad).all():
            bad = int((~torch.isfinite(grad)).flatten(1).any(1).sum())
            self._warn(f"non-finite gradients for {bad} samples; StAdv set them to zero")
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if first:
            zero = int((grad.flatten(1).norm(dim=1) == 0).sum())
            if zero:
                self._warn(f"zero gradient at the first step for {zero} of {len(flow)} samples")
        return grad

    # -- helpers ---------------------------------------------------------------------------

    def _resolve_reduce(self) -> str:
        reduce = self.eot_reduce
        if reduce is None:
            reduce = getattr(getattr(self.model, "options", None), "eot_reduce", None) or "logits"
        if reduce not in EOT_REDUCTIONS:
            raise ConfigError(
                f"model.options.eot_reduce={reduce!r} is not allowed; allowed: "
                f"{', '.join(EOT_REDUCTIONS)}"
            )
        if reduce == "loss" and not callable(getattr(self.model, "sample_logits", None)):
            return "logits"  # a model without EOT samples is one sample
        return reduce

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("StAdv: %s", message)

    def _warn_grad(self, why: str) -> None:
        if not self._grad_warned:
            self._warn(f"gradients unavailable: {why}; StAdv used zero gradients")
            self._grad_warned = True

    def __repr__(self) -> str:
        return (
            f"StAdv(eps={self.eps:g}, steps={self.steps}, alpha={self.alpha:g}, "
            f"restarts={self.restarts}, loss={self.losses}, smoothness={self.smoothness:g}, "
            f"eot_reduce={self.eot_reduce})"
        )

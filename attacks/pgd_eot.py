"""The harness's own PGD, for what no library does right.

torchattacks' PGD returns the last iterate, has no restarts, only cross-entropy and no EOT on the
loss. :class:`PGDEOT` keeps the best iterate of every point over all iterates and restarts, offers
the CE, margin (Carlini-Wagner) and DLR losses, averages either the logits or the per-sample loss
over EOT samples, can judge success on many fresh purifications (DiffPure's BPDA+EOT re-checks),
and adds a defense-aware loss term when the model offers one.

The model is any ``nn.Module`` mapping images in [0, 1] to logits. Three optional methods are found
by duck typing, never by importing the harness: ``sample_logits(x) -> (K, N, C)`` with
``eot_samples`` (K) and ``options.eot_reduce``, and ``defense_loss(x) -> (N,) | None``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import check_norm
from common.checks import choice, flag, integer, positive_int, real
from common.errors import ConfigError

logger = logging.getLogger(__name__)

LOSSES: tuple[str, ...] = ("ce", "margin", "dlr")
EOT_REDUCTIONS: tuple[str, ...] = ("logits", "loss")
SUCCESS_RULES: tuple[str, ...] = ("mean", "all")

LossFn = Callable[[Tensor, Tensor], Tensor]


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy, shape ``(N,)``."""
    return F.cross_entropy(logits, y, reduction="none")


def _true_and_best_other(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    is_y = F.one_hot(y, logits.shape[1]).bool()
    return z_y, logits.masked_fill(is_y, -math.inf).amax(1)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y``, shape ``(N,)``; positive iff fooled."""
    z_y, z_other = _true_and_best_other(logits, y)
    return z_other - z_y


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020), shape ``(N,)``.

    ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` with ``z_pi`` the sorted logits: invariant to
    shifting and rescaling the logits, so a model cannot mask gradients by scaling its outputs.

    Raises:
        ConfigError: fewer than 3 classes (the denominator needs a third logit).
    """
    if logits.shape[1] < 3:
        raise ConfigError(f"loss='dlr' needs >= 3 classes, the model gives {logits.shape[1]}")
    z_y, z_other = _true_and_best_other(logits, y)
    top = logits.sort(dim=1, descending=True).values
    return (z_other - z_y) / (top[:, 0] - top[:, 2] + 1e-12)


_LOSS_FNS: dict[str, LossFn] = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}

# Relative slack of the reach check, so that e.g. 3 steps of eps / 3 pass despite rounding.
_REACH_SLACK = 1e-9


def check_reach(
    attack: str,
    eps: float,
    steps: int,
    *,
    step_size: float | None = None,
    rel_stepsize: float | None = None,
) -> None:
    """Refuse a step schedule that cannot carry an iterate from the clean image to eps.

    A PGD iterate moves at most one step per iteration, so ``steps`` steps shorter than ``eps``
    in total never reach the threat's boundary, and the attack is weaker than its budget says:
    an absolute 2/255 (Hill et al.'s BPDA+EOT at eps 8/255) run for the 10 steps of a CPU
    suite travels 0.078 < 0.1 on Fashion-MNIST. An absolute ``step_size`` (it wins, as in
    :class:`PGDEOT`) is checked against ``eps``, a relative ``rel_stepsize`` against 1;
    ``None`` for both is Madry et al.'s ``2.5 / steps``, which always reaches.

    Args:
        attack: the attack's name in the message.
        eps: the perturbation budget (> 0).
        steps: gradient steps per run (>= 1).
        step_size: absolute step, or ``None``.
        rel_stepsize: step as a fraction of ``eps``, or ``None``.

    Raises:
        ConfigError: the steps cannot travel ``eps``; names the values and what would.
    """
    if step_size is not None:
        travel = steps * step_size
        if travel >= eps * (1 - _REACH_SLACK):
            return
        need = math.ceil(eps / step_size * (1 - _REACH_SLACK))
        raise ConfigError(
            f"{attack}: {steps} steps of step_size={step_size:.4g} travel at most {travel:.4g} "
            f"< eps={eps:.4g}: the attack cannot reach the threat's boundary; use rel_stepsize "
            f"(a fraction of eps, re-derived per budget) or at least {need} steps"
        )
    if rel_stepsize is not None and steps * rel_stepsize < 1 - _REACH_SLACK:
        need = math.ceil((1 - _REACH_SLACK) / rel_stepsize)
        raise ConfigError(
            f"{attack}: {steps} steps of rel_stepsize={rel_stepsize:.4g} travel at most "
            f"{steps * rel_stepsize:.4g} eps < eps: the attack cannot reach the threat's "
            f"boundary; use rel_stepsize >= {1 / steps:.4g} (1 / steps), null (2.5 / steps) "
            f"or at least {need} steps"
        )


class _Best:
    """The best iterate per point so far: ``(fooled, score)`` ordered lexicographically."""

    def __init__(self, x: Tensor) -> None:
        self.adv = x.clone()
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.score = torch.full((len(x),), -math.inf, device=x.device)

    def update(self, idx: Tensor, adv: Tensor, score: Tensor, fooled: Tensor) -> None:
        # NaN must never win nor block: it ranks as the lowest possible loss.
        score = torch.nan_to_num(score.float(), nan=-math.inf)
        old_fooled, old_score = self.fooled[idx], self.score[idx]
        better = (fooled & ~old_fooled) | ((fooled == old_fooled) & (score > old_score))
        sel = idx[better]
        self.adv[sel] = adv[better]
        self.score[sel] = score[better]
        self.fooled[sel] = fooled[better]


class PGDEOT:
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'.

    [https://arxiv.org/abs/1706.06083], with Expectation over Transformation from 'Obfuscated
    Gradients Give a False Sense of Security' [https://arxiv.org/abs/1802.00420].

    The harness's own PGD (Linf and L2): returns the best iterate of every point over all
    iterates (start and final point included) and restarts, ranked by (fooled, loss): a fooled
    iterate beats any non-fooled one, and among equals the higher loss wins. A point once fooled
    can be frozen (``early_stop``). Restarts after the first run only on points not yet fooled and
    may cycle through several losses. For ``step_size=None, rel_stepsize=None, random_start=False``
    and cross-entropy on a deterministic model the Linf trajectory is torchattacks' PGD's.

    EOT has two estimators, which are not the same: ``eot_reduce="logits"`` takes the loss of
    ``model(x)`` (for a stochastic view, the logits averaged over its EOT samples), while
    ``"loss"`` averages the per-sample loss over ``model.sample_logits(x)``, the expectation of the
    loss that Athalye et al. describe. Their gradients differ whenever the loss is nonlinear in the
    logits (always, for CE).

    Properties: white-box, iterative; stochastic only through its random starts, which come from
    its own ``seed`` (never the global RNG) and are drawn on CPU, so they match on every device.

    Arguments:
        model (nn.Module): the model view to attack (images in [0, 1] -> logits).
        norm (str): ``"Linf"`` or ``"L2"``.
        eps (float): perturbation budget.
        steps (int): gradient steps per restart. (Default: 50)
        rel_stepsize (float | None): step size as a fraction of ``eps``; ``None`` uses Madry et
            al.'s rule ``2.5 / steps``. Refused when ``steps * rel_stepsize < 1``. (Default: None)
        step_size (float | None): absolute step size, overrides ``rel_stepsize``. Refused when
            ``steps * step_size < eps`` (:func:`check_reach`): prefer ``rel_stepsize``, which
            follows eps when a threat changes it. (Default: None)
        restarts (int): runs from fresh random starts; restart ``r > 0`` only attacks points no
            earlier run fooled. (Default: 1)
        loss (str | list[str]): ``"ce"``, ``"margin"`` (Carlini-Wagner) or ``"dlr"`` (Croce & Hein
            2020, needs >= 3 classes); with a list, restart ``r`` uses ``loss[r % len(loss)]`` and
            the best iterate is ranked by ``loss[0]``. (Default: "ce")
        random_start (bool): start from a uniform random point in the eps-ball. (Default: True)
        eot_reduce (str | None): ``"logits"`` or ``"loss"`` (see above); ``None`` takes
            ``model.options.eot_reduce`` where the model has one, else ``"logits"``.
            (Default: None)
        defense_loss_weight (float): weight of ``model.defense_loss(x)`` added to the loss the
            attack maximises; 0 never calls it. (Default: 0.0)
        check_reps (int): judge success at every iterate, without gradients, on logits averaged
            over ``ceil(check_reps / K)`` extra calls of ``model`` (about ``check_reps``
            purifications, K = ``model.eot_samples``), as DiffPure's BPDA+EOT; 0 reuses the logits
            of the gradient step. (Default: 0)
        success (str): when an iterate counts as fooled (for early stop, the best iterate and
            ``fooled_any``): ``"mean"``, the EOT-averaged logits misclassify; ``"all"``, every
            EOT sample of ``model.sample_logits`` misclassifies, at no extra pass. On a
            stochastic defense judged on fresh purifications, ``"mean"`` freezes points at the
            boundary that fresh noise often classifies correctly; ``"all"`` waits until no
            sampled purification does (``make perf`` measures both against torchattacks'
            EOTPGD). Models without ``sample_logits`` and ``check_reps > 0`` use ``"mean"``.
            (Default: "mean")
        early_stop (bool | str): freeze a point once fooled and stop computing it. ``"auto"``
            does so unless the model says it is stochastic (``model.stochastic``, as the
            harness's attack view does for a stochastic defense with fresh noise) and success
            is not re-checked (``check_reps == 0``): a point whose EOT-averaged logits are
            fooled is often still classified correctly by fresh purifications, so freezing it
            there made this PGD weaker than torchattacks' EOTPGD (``make perf``, see
            docs/costs.md). Switch off when the model's randomness depends on the batch
            composition. (Default: "auto")
        seed (int): seed of the random starts. (Default: 0)
        track (bool): keep the per-iterate loss and fooled history of the first restart.
            (Default: True)

    Attributes:
        fooled_any (Tensor): bool ``(N,)`` on CPU: fooled at some iterate, by the model's own
            forward or the ``check_reps`` check, in the last call.
        loss_history (Tensor | None): float ``(steps + 1, N)`` on CPU, the first restart's loss
            (including the weighted defense term) at every iterate; a frozen point keeps its last
            value. ``None`` unless ``track``.
        fooled_history (Tensor | None): bool ``(steps + 1, N)`` on CPU, likewise.
        warnings (list[str]): problems seen in the last call (unavailable or zero gradients).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: like images, within eps of images.

    Example:
        >>> attack = PGDEOT(model, norm="Linf", eps=8 / 255, steps=200, step_size=2 / 255)
        >>> x_adv = attack(x, y)
    """

    kind: ClassVar[str] = "white-box"
    returns_best: ClassVar[bool] = True
    # Its EOT is the view's (``eot_reduce`` only picks the estimator): nothing to stack on.
    internal_eot: ClassVar[int] = 1

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
        eot_reduce: str | None = None,
        defense_loss_weight: float = 0.0,
        check_reps: int = 0,
        success: str = "mean",
        early_stop: bool | str = "auto",
        seed: int = 0,
        track: bool = True,
    ) -> None:
        check_norm(norm, ("Linf", "L2"), "PGDEOT")
        real("PGDEOT eps", eps, "> 0", lambda v: v > 0)
        positive_int("PGDEOT steps", steps)
        positive_int("PGDEOT restarts", restarts)
        integer("PGDEOT check_reps", check_reps, minimum=0)
        for name, value in (("rel_stepsize", rel_stepsize), ("step_size", step_size)):
            if value is not None:
                real(f"PGDEOT {name}", value, "> 0 or null", lambda v: v > 0)
        real("PGDEOT defense_loss_weight", defense_loss_weight, ">= 0", lambda v: v >= 0)
        losses = [loss] if isinstance(loss, str) else list(loss)
        if not losses:
            raise ConfigError(f"PGDEOT loss={loss!r} is not allowed; it must name a loss")
        for name in losses:
            choice("PGDEOT loss", name, LOSSES)
        if len(losses) > restarts:
            # Restart r uses loss[r % len(loss)]: the later losses would silently never run.
            raise ConfigError(
                f"PGDEOT loss={losses!r} names {len(losses)} losses but restarts={restarts}: "
                f"restart r uses loss[r % {len(losses)}], so {losses[restarts:]!r} would never "
                f"run; set restarts >= {len(losses)}"
            )
        choice("PGDEOT success", success, SUCCESS_RULES)
        choice("PGDEOT early_stop", early_stop, (True, False, "auto"))
        choice("PGDEOT eot_reduce", eot_reduce, (None, *EOT_REDUCTIONS))
        flag("PGDEOT random_start", random_start)
        flag("PGDEOT track", track)
        integer("PGDEOT seed", seed, minimum=0)

        check_reach("PGDEOT", eps, steps, step_size=step_size, rel_stepsize=rel_stepsize)

        self.model = model
        self.norm, self.eps, self.steps, self.restarts = norm, float(eps), steps, restarts
        if step_size is not None:
            self.alpha = float(step_size)
        else:
            self.alpha = self.eps * (2.5 / steps if rel_stepsize is None else rel_stepsize)
        self.losses = losses
        self.random_start, self.eot_reduce = random_start, eot_reduce
        self.defense_loss_weight = float(defense_loss_weight)
        self.check_reps, self.early_stop = check_reps, early_stop
        self.success = success
        self.seed, self.track = seed, track
        if restarts > 1 and not random_start and len(set(losses)) == 1:
            logger.info("PGDEOT: restarts=%d without random_start repeat one run", restarts)

        self.fooled_any = torch.zeros(0, dtype=torch.bool)
        self.loss_history: Tensor | None = None
        self.fooled_history: Tensor | None = None
        self.warnings: list[str] = []
        self._reduce = "logits"
        self._per_sample = False
        self._grad_warned = self._term_logged = False

    # -- the attack ------------------------------------------------------------------------

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Return the best adversarial example found for every point of ``(x, y)``."""
        x = x.detach()
        y = y.detach().to(x.device)
        self.warnings = []
        self._grad_warned = self._term_logged = False
        self._reduce = self._resolve_reduce()
        # Per-sample logits for the success rule "all": the view computes them anyway.
        self._per_sample = self._reduce == "loss" or (
            self.success == "all"
            and self.check_reps == 0
            and callable(getattr(self.model, "sample_logits", None))
        )
        # One generator per call: the same seed gives the same starts on every call and device.
        generator = torch.Generator().manual_seed(self.seed)
        best = _Best(x)
        self.loss_history = self.fooled_history = None
        for r in range(self.restarts):
            if r == 0:
                idx = torch.arange(len(x), device=x.device)
            else:
                idx = (~best.fooled).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
            loss_fn = _LOSS_FNS[self.losses[r % len(self.losses)]]
            self._restart(x[idx], y[idx], idx, loss_fn, best, generator, record=r == 0)
        self.fooled_any = best.fooled.cpu()
        logger.debug(
            "PGDEOT: %d of %d points fooled", int(self.fooled_any.sum()), len(self.fooled_any)
        )
        return best.adv

    @property
    def freezes_fooled_points(self) -> bool:
        """Whether a fooled point stops being attacked (``early_stop``, resolved)."""
        if self.early_stop != "auto":
            return bool(self.early_stop)
        return self.check_reps > 0 or not getattr(self.model, "stochastic", False)

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
        """One PGD run on the points ``idx`` (``x``, ``y`` are those points), updating ``best``."""
        m = len(x)
        adv = self._random_start(x, generator) if self.random_start else x.clone()
        active = torch.ones(m, dtype=torch.bool, device=x.device)
        # The last value seen per point: frozen points carry it through the history.
        last_score = torch.full((m,), math.nan, device=x.device)
        last_fooled = torch.zeros(m, dtype=torch.bool, device=x.device)
        track = record and self.track
        freeze = self.freezes_fooled_points
        if track:
            loss_hist = torch.full((self.steps + 1, m), math.nan)
            fooled_hist = torch.zeros((self.steps + 1, m), dtype=torch.bool)
        for t in range(self.steps + 1):
            act = active.nonzero().squeeze(1)
            if act.numel() == 0:
                if track:
                    loss_hist[t:] = last_score.cpu()
                    fooled_hist[t:] = last_fooled.cpu()
                break
            xa = adv[act]
            # The final point needs no gradient: only its loss and success are scored.
            with_grad = t < self.steps
            score, fooled, grad = self._evaluate(xa, y[act], loss_fn, with_grad, record and t == 0)
            best.update(idx[act], xa, score, fooled)
            last_score[act] = score.float()
            last_fooled[act] = fooled
            if track:
                loss_hist[t] = last_score.cpu()
                fooled_hist[t] = last_fooled.cpu()
            if grad is None:
                break
            if freeze:
                active[act[fooled]] = False
                keep = ~fooled
                act, xa, grad = act[keep], xa[keep], grad[keep]
            adv[act] = self._step(xa, x[act], grad)
        if track:
            self.loss_history, self.fooled_history = loss_hist, fooled_hist

    # -- one iterate -----------------------------------------------------------------------

    def _evaluate(
        self, x: Tensor, y: Tensor, loss_fn: LossFn, with_grad: bool, first_step: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Score, success and (when asked) the loss gradient of the iterate ``x``."""
        grad = None
        if with_grad:
            # A fresh leaf per step, and grad mode forced on: callers may hold a no_grad context.
            xg = x.clone().requires_grad_(True)
            with torch.enable_grad():
                samples, objective, score = self._objective(xg, y, loss_fn)
                grad = self._gradient(objective, xg, first_step)
        else:
            # No gradient: inference mode skips autograd's bookkeeping (the final iterate).
            with torch.inference_mode():
                samples, objective, score = self._objective(x, y, loss_fn)
        return score, self._fooled(x, y, samples), grad

    def _objective(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor, Tensor]:
        """Logits ``(K, N, C)`` (detached), the loss to maximise ``(N,)``, the score ``(N,)``.

        The score is the same objective under ``loss[0]``, so that restarts with other losses
        stay comparable; it is computed from the logits already at hand, without another forward.
        """
        samples = self._sample_logits(x).float()
        # The loss of the averaged logits, unless the per-sample loss is averaged.
        logits = samples if self._reduce == "loss" else samples.mean(0, keepdim=True)
        k, n, c = logits.shape
        flat, labels = logits.reshape(k * n, c), y.repeat(k)
        objective = loss_fn(flat, labels).view(k, n).mean(0)
        primary = _LOSS_FNS[self.losses[0]]
        if primary is loss_fn:
            score = objective.detach()
        else:
            score = primary(flat.detach(), labels).view(k, n).mean(0)
        term = self._defense_term(x)
        if term is not None:
            objective = objective + self.defense_loss_weight * term
            score = score + self.defense_loss_weight * term.detach().float()
        return samples.detach(), objective, score

    def _sample_logits(self, x: Tensor) -> Tensor:
        """Logits per EOT sample ``(K, N, C)``: K samples where needed, else the mean as one."""
        if self._per_sample:
            out = self.model.sample_logits(x)
            if out.dim() != 3 or out.shape[1] != len(x):
                raise ValueError(
                    f"model.sample_logits gave shape {tuple(out.shape)}; expected (K, {len(x)}, C)"
                )
            return out
        return self.model(x).unsqueeze(0)

    def _defense_term(self, x: Tensor) -> Tensor | None:
        if self.defense_loss_weight == 0:
            return None
        hook = getattr(self.model, "defense_loss", None)
        term = hook(x) if callable(hook) else None
        if term is None:
            if not self._term_logged:
                # Info, not a warning: a suite may set the weight for defenses that offer no term.
                logger.info("PGDEOT: defense_loss_weight > 0 but the model offers no defense loss")
                self._term_logged = True
            return None
        if term.shape != (len(x),):
            raise ValueError(
                f"model.defense_loss gave shape {tuple(term.shape)}; expected ({len(x)},)"
            )
        return term

    def _gradient(self, objective: Tensor, x: Tensor, first_step: bool) -> Tensor:
        """The input gradient of ``objective.sum()``; zeros (and a warning) where unavailable.

        Summing per-sample losses keeps each point's gradient independent of the batch size.
        """
        if not objective.requires_grad:
            self._warn_grad("the loss does not depend on the input (the model cut the graph)")
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(objective.sum(), x, allow_unused=True)
        if grad is None:
            self._warn_grad("autograd returned no input gradient (the model cut the graph)")
            return torch.zeros_like(x)
        grad = grad.detach()
        if not torch.isfinite(grad).all():
            bad = int((~torch.isfinite(grad)).flatten(1).any(1).sum())
            self._warn(f"non-finite gradients for {bad} samples; PGDEOT set them to zero")
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if first_step:
            zero = int((grad.flatten(1).norm(dim=1) == 0).sum())
            if zero:
                self._warn(f"zero gradient at the first step for {zero} of {len(x)} samples")
        return grad

    def _fooled(self, x: Tensor, y: Tensor, samples: Tensor) -> Tensor:
        """Success per point: the ``success`` rule on the logits ``(K, N, C)`` at hand.

        With ``check_reps > 0``, on logits averaged over about ``check_reps`` fresh
        purifications instead; a model that says it is deterministic (``model.stochastic`` is
        false) would only repeat the logits at hand, so they are used as they are.
        """
        if self.check_reps > 0 and getattr(self.model, "stochastic", True):
            k = max(int(getattr(self.model, "eot_samples", 1) or 1), 1)
            reps = math.ceil(self.check_reps / k)
            with torch.inference_mode():
                logits = self.model(x).float()
                for _ in range(reps - 1):
                    logits = logits + self.model(x).float()
                logits = logits / reps
            return logits.argmax(1) != y
        if self.success == "all":
            return (samples.argmax(2) != y).all(0)
        return samples.mean(0).argmax(1) != y

    # -- geometry --------------------------------------------------------------------------

    def _random_start(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A uniform random point in the eps-ball (L2: uniform direction, radius ``U * eps``)."""
        # Drawn on CPU and moved, so that a seed gives the same starts on every device.
        if self.norm == "Linf":
            noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * self.eps
        else:
            noise = torch.randn(x.shape, generator=generator)
            norms = noise.flatten(1).norm(dim=1).clamp_min(1e-12)
            radius = torch.rand(len(x), generator=generator) * self.eps
            noise = noise * (radius / norms).view(-1, *([1] * (x.dim() - 1)))
        return torch.clamp(x + noise.to(x.device, x.dtype), min=0, max=1)

    def _step(self, adv: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        """One ascent step from ``adv``, projected onto the eps-ball around ``x`` and [0, 1]."""
        if self.norm == "Linf":
            # torchattacks.PGD's arithmetic, operation for operation, so trajectories match.
            adv = adv + self.alpha * grad.sign()
            delta = torch.clamp(adv - x, min=-self.eps, max=self.eps)
            return torch.clamp(x + delta, min=0, max=1).detach()
        shape = (-1, *([1] * (x.dim() - 1)))
        # A zero gradient stays a zero step instead of a division by zero.
        grad_norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        adv = adv + self.alpha * grad / grad_norms.view(shape)
        delta = adv - x
        delta_norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = torch.clamp(self.eps / delta_norms, max=1.0)
        # Clamping to [0, 1] moves every pixel towards x (which is in [0, 1]): the norm only drops.
        return torch.clamp(x + delta * factor.view(shape), min=0, max=1).detach()

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
            # A model without EOT samples is one sample: the loss of its logits is the same thing.
            logger.info("PGDEOT: eot_reduce='loss' but no model.sample_logits; using logits")
            reduce = "logits"
        return reduce

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("PGDEOT: %s", message)

    def _warn_grad(self, why: str) -> None:
        if not self._grad_warned:
            self._warn(f"gradients unavailable: {why}; PGDEOT used zero gradients")
            self._grad_warned = True

    def __repr__(self) -> str:
        return (
            f"PGDEOT(norm={self.norm}, eps={self.eps:g}, steps={self.steps}, "
            f"alpha={self.alpha:g}, restarts={self.restarts}, loss={self.losses}, "
            f"eot_reduce={self.eot_reduce}, check_reps={self.check_reps}, "
            f"success={self.success})"
        )

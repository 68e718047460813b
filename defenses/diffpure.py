"""DiffPure: diffuse the input with Gaussian noise, then denoise it with the reverse VP-SDE.

Nie, Guo, Huang, Xiao, Vahdat & Anandkumar, 'Diffusion Models for Adversarial Purification'
(ICML 2022), https://arxiv.org/abs/2205.07460; the authors' code is ``NVlabs/DiffPure``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpoint_step

from common import seeds
from common.checks import choice, flag, optional_positive_int, positive_int, real
from common.errors import ConfigError
from defenses.base import Defense, DefenseInfo
from defenses.score import ScoreNet

Method = Literal["sde", "ode"]
Gradient = Literal["backprop", "adjoint"]

_METHODS: tuple[str, ...] = ("sde", "ode")
_GRADIENTS: tuple[str, ...] = ("backprop", "adjoint")
_DEFAULT_STEPS = 10
# The solver step is nudged up by this relative amount so that ``steps`` accumulated steps
# always reach the end of the interval: torchsde adds ``dt`` repeatedly, and rounding could
# otherwise leave a sliver that costs one more network call.
_DT_NUDGE = 1e-9


class DiffPure(Defense):
    r"""DiffPure, Nie et al. 2022 [https://arxiv.org/abs/2205.07460].

    Purification by a pretrained diffusion model: the input (mapped to [-1, 1]) is diffused to
    time ``t*`` of the VP-SDE in closed form,

        x(t*) = sqrt(alpha_bar(t*)) x + sqrt(1 - alpha_bar(t*)) z,      z ~ N(0, I),

    so that the Gaussian noise drowns the adversarial perturbation, and is then carried back to
    ``t_end`` ~ 0 by the reverse-time SDE of the shared score model, discretised with
    Euler-Maruyama on ``steps`` uniform steps (in torchsde's forward time ``s = t* - t``):

        x <- x + [beta(t)/2 x + beta(t) score(x, t)] ds + sqrt(beta(t)) dW,

    or, with ``method="ode"``, by the probability-flow ODE with Euler steps (no ``dW``, half the
    score term), which is deterministic given the forward noise ``z``. The result is mapped back
    to [0, 1] and clamped.

    Properties: stochastic (the forward noise and the Brownian motion), differentiable (exactly,
    by autograd through the sampler, or by torchsde's stochastic adjoint as in the paper),
    iterative (a sampling loop).

    Randomness: everything comes from ``generator``: first the forward noise ``z``, then (SDE
    only) one integer that seeds a ``torchsde.BrownianInterval``, whose increments over the step
    grid are the ``dW``. Both gradient modes query the same Brownian path on the same grid, so
    ``gradient="backprop"`` and ``gradient="adjoint"`` purify alike for the same generator state
    (they differ only by floating-point rounding). With ``generator=None`` a fresh generator is
    seeded from one draw of torch's default generator (drawn from, never seeded).

    Gradients: ``"backprop"`` differentiates the exact discretisation the defense runs (memory
    linear in ``steps``, or flat with ``checkpoint=True`` for about one more forward per step);
    ``"adjoint"`` is ``torchsde.sdeint_adjoint`` (memory flat in ``steps``), whose backward pass
    re-solves the SDE in reverse with the same coarse Euler steps and therefore gives only
    approximate gradients, so an evaluation should use exact backprop
    (docs/defenses/diffpure.md). ``surrogate`` offers the same sampler with fewer steps for
    attacks only (Lee & Kim, ICCV 2023).

    Arguments:
        score (ScoreNet): the shared VP-SDE score model (works on [-1, 1] images).
        t_star (float): diffusion time ``t*`` in (0, 1]; the noise std must dominate the
            threat's eps. The paper uses 0.1 for CIFAR-10 Linf 8/255. (Default: 0.3)
        steps (int): reverse steps from ``t*`` to ``t_end``; score evaluations per purification.
            The paper uses dt = 1e-3, i.e. 100 steps at ``t* = 0.1``. (Default: 10)
        method (str): ``"sde"`` (reverse VP-SDE, Euler-Maruyama) or ``"ode"`` (probability-flow
            ODE, Euler). (Default: ``"sde"``)
        gradient (str): ``"backprop"`` (autograd through the sampler) or ``"adjoint"``
            (stochastic adjoint, as the paper; ``method="sde"`` only). (Default: ``"backprop"``)
        checkpoint (bool): per-step gradient checkpointing of the backprop paths (``purify``
            with ``gradient="backprop"``, and ``surrogate``): only the step boundaries are
            stored and each step is recomputed in the backward pass; the gradient is the same.
            (Default: False)
        surrogate_steps (int | None): steps of :meth:`surrogate`, the attack-only cheaper
            purifier (same ``t*``, method and Brownian seed, backprop gradients); ``None``:
            ``surrogate`` is ``purify``. (Default: None)
        t_end (float): time the reverse process stops at, in [0, ``t_star``); the score is
            singular at 0, and the adjoint's backward pass evaluates the drift at ``t_end``
            itself, so a tiny ``t_end`` ruins adjoint gradients. (Default: 1e-3, Song et al.'s
            VP sampling end)

    Shape:
        - Input: ``(N, C, H, W)`` in [0, 1].
        - Output: ``(N, C, H, W)`` in [0, 1].

    Example:
        >>> defense = DiffPure(ScoreNet(small_unet(1, 28)), t_star=0.3, steps=20)
        >>> clean = defense.purify(torch.rand(4, 1, 28, 28), generator=torch.Generator())
    """

    # ``info`` is a static class attribute, so ``purifier_calls`` is the default ``steps``: the
    # runner's cost accounting reads it. ``calls_per_purify`` has the configured instance's count.
    info: ClassVar[DefenseInfo] = DefenseInfo(
        stochastic=True,
        differentiable=True,
        iterative=True,
        paper="https://arxiv.org/abs/2205.07460",
        purifier_calls=_DEFAULT_STEPS,
    )

    def __init__(
        self,
        score: ScoreNet,
        *,
        t_star: float = 0.3,
        steps: int = _DEFAULT_STEPS,
        method: Method = "sde",
        gradient: Gradient = "backprop",
        checkpoint: bool = False,
        surrogate_steps: int | None = None,
        t_end: float = 1e-3,
    ) -> None:
        super().__init__()
        self.score = score
        self.t_star = real("t_star", t_star, "in (0, 1]", lambda v: 0 < v <= 1)
        self.steps = positive_int("steps", steps)
        self.method = choice("method", method, _METHODS)
        self.gradient = choice("gradient", gradient, _GRADIENTS)
        if gradient == "adjoint" and method != "sde":
            raise ConfigError(
                f"gradient={gradient!r} needs method='sde' (the stochastic adjoint of torchsde), "
                f"got method={method!r}; use gradient='backprop' for the ODE"
            )
        self.checkpoint = flag("checkpoint", checkpoint)
        self.surrogate_steps = optional_positive_int("surrogate_steps", surrogate_steps)
        self.t_end = real("t_end", t_end, f"in [0, t_star={t_star})", lambda v: 0 <= v < t_star)

    @property
    def calls_per_purify(self) -> int:
        """Score-network evaluations per purified image: ``steps``.

        ``gradient="adjoint"`` adds one: torchsde evaluates the drift once to check its shape.
        """
        return self.steps

    # -- purification ----------------------------------------------------------------------

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Diffuse ``x`` to ``t*`` and run the reverse process back to ``t_end``."""
        return self._purify(x, generator, self.steps, self.gradient)

    def surrogate(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The same purifier with ``surrogate_steps`` steps and backprop gradients."""
        if self.surrogate_steps is None:
            return self.purify(x, generator=generator)
        return self._purify(x, generator, self.surrogate_steps, "backprop")

    def _purify(
        self, x: Tensor, generator: torch.Generator | None, steps: int, gradient: str
    ) -> Tensor:
        if generator is None:
            # Fresh randomness without touching global seeding: one draw from the default
            # generator seeds a private one on the input's device.
            seed = int(torch.randint(0, seeds.SEED_HIGH, ()))
            generator = torch.Generator(device=x.device).manual_seed(seed)
        sde = self.score.sde
        alpha_bar = float(sde.alpha_bar(self.t_star))
        # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
        z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        x_t = math.sqrt(alpha_bar) * (2 * x - 1) + math.sqrt(1 - alpha_bar) * z.to(x.device)
        grid, dt = _time_grid(self.t_star - self.t_end, steps)
        if self.method == "ode":
            out = self._reverse_backprop(x_t, grid, None)
        else:
            bm = _brownian(x_t, generator, grid[-1], dt)
            if gradient == "adjoint":
                out = self._reverse_adjoint(x_t, grid[-1], dt, bm)
            else:
                out = self._reverse_backprop(x_t, grid, bm)
        return ((out + 1) / 2).clamp(0, 1)

    def _reverse_backprop(self, x: Tensor, grid: list[float], bm: Callable | None) -> Tensor:
        """Euler(-Maruyama) steps on ``grid``, differentiated by autograd."""
        use_checkpoint = self.checkpoint and torch.is_grad_enabled()
        for s0, s1 in zip(grid[:-1], grid[1:], strict=True):
            # The Brownian increment is an explicit input of the step, so the recomputation of
            # a checkpointed step is exact.
            dw = None if bm is None else bm(s0, s1).view_as(x)
            step = partial(self._step, s=s0, ds=s1 - s0)
            x = checkpoint_step(step, x, dw, use_reentrant=False) if use_checkpoint else step(x, dw)
        return x

    def _step(self, x: Tensor, dw: Tensor | None, *, s: float, ds: float) -> Tensor:
        """One step ``s -> s + ds``; ``dw`` is the Brownian increment (``None``: the ODE)."""
        x = x + self._drift(x, s) * ds
        if dw is None:
            return x
        return x + self._diffusion(s) * dw

    def _drift(self, x: Tensor, s: float) -> Tensor:
        """Drift in forward time ``s = t* - t`` (the reverse SDE's, or the ODE's)."""
        t = self.t_star - s
        beta = float(self.score.sde.beta(t))
        # The probability-flow ODE carries half the score term of the reverse SDE.
        score_weight = beta if self.method == "sde" else beta / 2
        return beta / 2 * x + score_weight * self.score.score(x, t)

    def _diffusion(self, s: float) -> float:
        return math.sqrt(float(self.score.sde.beta(self.t_star - s)))

    def _reverse_adjoint(self, x: Tensor, span: float, dt: float, bm: Callable) -> Tensor:
        """The reverse SDE by ``torchsde.sdeint_adjoint`` on the same grid and Brownian path."""
        import torchsde  # imported here: only the adjoint needs it

        sde = _FlatReverseSDE(self._drift, self._diffusion, x.shape)
        ts = torch.tensor([0.0, span], dtype=torch.float64)
        ys = torchsde.sdeint_adjoint(
            sde,
            x.flatten(1),
            ts,
            bm=bm,
            method="euler",
            # torchsde's default for an Ito SDE with diagonal noise is Milstein, whose extra
            # terms need dg/dy; the diffusion here does not depend on the state, so they vanish
            # and Euler solves the same adjoint SDE with fewer vector-Jacobian products.
            adjoint_method="euler",
            dt=dt,
            # Empty when the score model is frozen; torchsde keeps those requiring grad.
            adjoint_params=tuple(self.score.parameters()),
        )
        return ys[-1].view_as(x)

    def extra_repr(self) -> str:
        """Hyper-parameters, for ``print(defense)``."""
        return (
            f"t_star={self.t_star}, steps={self.steps}, method={self.method!r}, "
            f"gradient={self.gradient!r}, checkpoint={self.checkpoint}, "
            f"surrogate_steps={self.surrogate_steps}, t_end={self.t_end}"
        )


class _FlatReverseSDE(nn.Module):
    """The reverse process in torchsde's form: Ito, diagonal noise, states flattened ``(N, d)``.

    Holds callables, not the defense: the score model stays registered in one place only.
    """

    sde_type = "ito"
    noise_type = "diagonal"

    def __init__(
        self,
        drift: Callable[[Tensor, float], Tensor],
        diffusion: Callable[[float], float],
        shape: torch.Size,
    ) -> None:
        super().__init__()
        self._drift_fn, self._diffusion_fn, self._shape = drift, diffusion, shape

    def f(self, s: Tensor, y: Tensor) -> Tensor:
        """Drift ``f(s, y)``."""
        return self._drift_fn(y.view(self._shape), float(s)).flatten(1)

    def g(self, s: Tensor, y: Tensor) -> Tensor:
        """Diagonal diffusion ``sqrt(beta(t))``, the same for every coordinate."""
        return torch.full_like(y, self._diffusion_fn(float(s)))


def _time_grid(span: float, steps: int) -> tuple[list[float], float]:
    """Step boundaries in ``s`` from 0 to ``span`` and the step size, as torchsde forms them.

    torchsde's fixed-step solver visits ``s_{k+1} = min(s_k + dt, span)``; the backprop path
    uses the identical float64 arithmetic, so both query the Brownian path at the same times.
    """
    dt = span / steps * (1 + _DT_NUDGE)
    grid = [0.0]
    while grid[-1] < span:
        grid.append(min(grid[-1] + dt, span))
    return grid, dt


def _brownian(x: Tensor, generator: torch.Generator, span: float, dt: float) -> Callable:
    """The Brownian path of one purification, seeded by one draw from ``generator``.

    A ``BrownianInterval``'s samples depend on its entropy, its ``dt`` hint and the order of the
    queries; both gradient modes build it identically and query it forwards on the same grid.
    """
    from torchsde import BrownianInterval  # imported here: only the SDE needs it

    # The path's seed: the purification's second draw from its generator (after the forward
    # noise), in the range of torchsde's own default entropy.
    entropy = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device))
    return BrownianInterval(
        t0=0.0,
        t1=span,
        size=(x.shape[0], x[0].numel()),
        dtype=x.dtype,
        device=x.device,
        entropy=entropy,
        dt=dt,
    )

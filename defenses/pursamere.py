"""PurSAMERE: deterministic purification by SAM descent on a score model's reconstruction error.

Hoang, Krumscheid, Rauhut & Tempone (2026), https://arxiv.org/abs/2602.06269. Only the abstract
is public; the algorithm here is a reconstruction (see :class:`PurSAMERE`).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from common.checks import flag, integer, optional_positive_int, positive_int, real
from common.errors import ConfigError
from defenses.base import Defense, DefenseInfo, inner_autograd
from defenses.score import ScoreNet

log = logging.getLogger(__name__)

# Below this L2 norm a gradient counts as zero: the normalised direction is then zero too.
_TINY = 1e-12


class PurSAMERE(Defense):
    r"""PurSAMERE, Hoang, Krumscheid, Rauhut & Tempone 2026 [https://arxiv.org/abs/2602.06269].

    Deterministic purification by Sharpness-Aware Minimisation of the Expected Reconstruction
    Error (ERE) of a score model under noise corruption.

    Only the abstract is public (no code, no body text), so the algorithm is a reconstruction
    from the abstract, ScoreOpt's ``x0`` objective (Zhang, Luo & Zhang, NeurIPS 2023) and SAM
    (Foret et al., ICLR 2021); see docs/defenses/pursamere.md. With ``K`` noise tensors
    ``e_k`` drawn once from ``noise_seed`` and Tweedie's denoiser ``D`` of the shared score model,

        ERE(x) = (1/K) sum_k || D(x + sigma e_k, sigma) - x ||^2     (per image, in [-1, 1])

    and purification runs ``steps`` SAM steps from the input ``x0``:

        g     = grad ERE(x);  e = rho g / ||g||           (ascent to the sharpest nearby point)
        g_sam = grad ERE(x + e)                           (g itself when rho = 0)
        x     = clip_[0,1]( clip_{x0 +- r}( x - step_size g_sam / ||g_sam|| ) )

    Properties: deterministic (the noise is fixed; ``generator`` is ignored), differentiable
    (exactly, by second-order autodiff through the unrolled loop), iterative. Bit-identical
    across calls on CPU; on CUDA only with deterministic kernels (the inner gradients run
    convolution backward passes, which cuDNN may compute with atomics).

    Gradients: when the caller differentiates through ``purify`` (grad enabled and the input
    requires grad) the inner gradients are built with ``create_graph=True``, so an attack gets
    the exact gradient of the unrolled loop, not a silent BPDA; memory then grows linearly in
    ``steps`` unless ``checkpoint=True``. Otherwise every step is detached (cheap).

    Arguments:
        score (ScoreNet): the shared noise-conditional score model; its denoiser is ``D``.
        sigma (float): noise level of the ERE in [0, 1] pixel units (``2 * sigma`` in the
            denoiser's [-1, 1] units). (Default: 0.25)
        n_noise (int): ``K``, the fixed noise draws averaged in the ERE. (Default: 1)
        steps (int): ``T``, SAM descent steps. (Default: 5)
        step_size (float): L2 length of each normalised descent step, [0, 1] units.
            (Default: 0.6)
        sam_rho (float): L2 radius of the SAM ascent; 0 switches SAM off (plain ERE descent,
            the ablation, half the network calls). (Default: 0.5)
        radius (float): Linf radius ``r`` of the neighbourhood of the input the purified image
            stays in; ``r >= eps`` so that an eps-perturbation can be undone. (Default: 0.15)
        noise_seed (int): seed of the CPU generator drawing the ``K`` noise tensors, once per
            image shape. (Default: 0)
        checkpoint (bool): per-step gradient checkpointing of the exact gradient: the backward
            rebuilds one step's second-order graph at a time, so memory is flat in ``steps``
            for one more cheap step per step; gradients then reach the images only, not the
            (frozen) score parameters. (Default: False)
        surrogate_steps (int | None): steps of :meth:`surrogate` (a truncated purifier for
            attacks); ``None``: as many as ``purify``. (Default: None)

    Shape:
        - Input: ``(N, C, H, W)`` in [0, 1].
        - Output: ``(N, C, H, W)`` in [0, 1], within Linf ``radius`` of the input.

    Example:
        >>> defense = PurSAMERE(ScoreNet(small_unet(1, 28)), steps=10)
        >>> clean = defense.purify(torch.rand(4, 1, 28, 28))
    """

    info: ClassVar[DefenseInfo] = DefenseInfo(
        stochastic=False,
        differentiable=True,
        iterative=True,
        paper="https://arxiv.org/abs/2602.06269",
        purifier_calls=10,  # 2 * K * T at the defaults; calls_per_purify has the actual count
    )

    def __init__(
        self,
        score: ScoreNet,
        *,
        sigma: float = 0.25,
        n_noise: int = 1,
        steps: int = 5,
        step_size: float = 0.6,
        sam_rho: float = 0.5,
        radius: float = 0.15,
        noise_seed: int = 0,
        checkpoint: bool = False,
        surrogate_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.score = score
        self.sigma = real("sigma", sigma, "> 0", lambda v: v > 0)
        self.n_noise = positive_int("n_noise", n_noise)
        self.steps = positive_int("steps", steps)
        self.step_size = real("step_size", step_size, "> 0", lambda v: v > 0)
        self.sam_rho = real("sam_rho", sam_rho, ">= 0 (0 switches SAM off)", lambda v: v >= 0)
        self.radius = real("radius", radius, "> 0", lambda v: v > 0)
        self.noise_seed = integer("noise_seed", noise_seed, minimum=0)
        self.checkpoint = flag("checkpoint", checkpoint)
        self.surrogate_steps = optional_positive_int("surrogate_steps", surrogate_steps)
        if surrogate_steps is not None and surrogate_steps > steps:
            raise ConfigError(
                f"surrogate_steps={surrogate_steps!r} must be at most steps={steps} (a "
                "surrogate is the cheaper purifier), or null for as many as purify"
            )
        # The K noise tensors per (image shape, device, dtype). Derived from noise_seed, so not
        # state to save: a plain dict keeps them out of state_dict and out of .to().
        self._noise: dict[tuple[tuple[int, ...], torch.device, torch.dtype], Tensor] = {}

    @property
    def calls_per_purify(self) -> int:
        """Denoiser evaluations per purified image: ``2 K T`` with SAM, ``K T`` without."""
        return (2 if self.sam_rho > 0 else 1) * self.n_noise * self.steps

    # -- the objective ---------------------------------------------------------------------

    def noise(self, x: Tensor) -> Tensor:
        """The ``K`` fixed noise tensors for images shaped like ``x``: ``(K, C, H, W)``.

        Drawn once per image shape on CPU (so the same on every device), shared by every image
        of every batch: an image's purification does not depend on its batch.
        """
        shape = tuple(x.shape[1:])
        key = (shape, x.device, x.dtype)
        if key not in self._noise:
            # Never an inference tensor, even when first asked for under inference_mode: the
            # exact-gradient path saves it for backward.
            with torch.inference_mode(False):
                # The seed of the fixed noise set (a constructor argument): part of the defense.
                gen = torch.Generator().manual_seed(self.noise_seed)
                cpu = torch.randn((self.n_noise, *shape), generator=gen)
                self._noise[key] = cpu.to(device=x.device, dtype=x.dtype)
            log.debug("drew %d fixed noise tensors for images of shape %s", self.n_noise, shape)
        return self._noise[key]

    def ere(self, x: Tensor) -> Tensor:
        """Expected reconstruction error per image, shape ``(N,)``; ``x`` in [0, 1].

        Summed over pixels in the denoiser's [-1, 1] units (4x the [0, 1] value).
        """
        return self._ere(x, self.noise(x))

    def _ere(self, x: Tensor, noise: Tensor) -> Tensor:
        k, n = len(noise), len(x)
        y = 2 * x - 1
        s = 2 * self.sigma
        # One network call on all K noisy copies: (K * N, C, H, W), k-major.
        noisy = (y.unsqueeze(0) + s * noise.unsqueeze(1)).flatten(0, 1)
        denoised = self.score.denoise(noisy, s).view(k, n, *x.shape[1:])
        return (denoised - y).square().flatten(2).sum(2).mean(0)

    def attack_loss(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``-ERE(x)`` per image: the defense-aware attacker seeks points the purifier keeps.

        Maximising ``CE - weight * ERE`` (Croce et al., ICML 2022) drives the adversarial image
        towards a low-ERE point (near a mode of the score model) of the wrong class, which the
        descent then barely moves. ERE is a sum over pixels in [-1, 1] units, so it grows with
        the image size: choose the attack's weight with that scale in mind. Deterministic (the
        noise set is fixed): ``generator`` is ignored.
        """
        return -self.ere(x)

    # -- purification ----------------------------------------------------------------------

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Purified images; ``generator`` is ignored (the defense is deterministic)."""
        return self._run(x, self.steps)

    def surrogate(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The same purifier truncated to ``surrogate_steps`` steps."""
        return self._run(x, self.surrogate_steps or self.steps)

    def _run(self, x0: Tensor, steps: int) -> Tensor:
        with inner_autograd(x0) as (x0, exact):
            noise = self.noise(x0)
            x = x0
            for _ in range(steps):
                if exact and self.checkpoint:
                    x = _CheckpointedStep.apply(x, x0, noise, self)
                else:
                    x = self._step(x, x0, noise, exact)
        return x

    def _step(self, x: Tensor, x0: Tensor, noise: Tensor, exact: bool) -> Tensor:
        """One SAM step followed by the projection onto the neighbourhood of ``x0``."""
        if not exact:
            x = x.detach().requires_grad_(True)
        g = self._grad(x, noise, exact)
        if self.sam_rho > 0:
            x_sharp = x + self.sam_rho * _unit(g)
            if not exact:
                x_sharp = x_sharp.detach().requires_grad_(True)
            # SAM: the gradient at the perturbed point, with respect to that point.
            g = self._grad(x_sharp, noise, exact)
        x = x - self.step_size * _unit(g)
        x = torch.minimum(torch.maximum(x, x0 - self.radius), x0 + self.radius).clamp(0, 1)
        return x if exact else x.detach()

    def _grad(self, x: Tensor, noise: Tensor, create_graph: bool) -> Tensor:
        (g,) = torch.autograd.grad(self._ere(x, noise).sum(), x, create_graph=create_graph)
        return g

    def extra_repr(self) -> str:
        """Hyper-parameters, for ``print(defense)``."""
        return (
            f"sigma={self.sigma}, n_noise={self.n_noise}, steps={self.steps}, "
            f"step_size={self.step_size}, sam_rho={self.sam_rho}, radius={self.radius}, "
            f"noise_seed={self.noise_seed}, checkpoint={self.checkpoint}, "
            f"surrogate_steps={self.surrogate_steps}"
        )


class _CheckpointedStep(torch.autograd.Function):
    """One purification step whose second-order graph is rebuilt in the backward pass.

    ``torch.utils.checkpoint`` (non-reentrant) does not save memory here: the step's own inner
    ``autograd.grad`` unpacks the checkpointed tensors during the forward pass, which triggers a
    recomputation whose saved tensors are then kept, so memory still grows with ``steps`` (and
    the forward runs twice). Instead the forward runs the cheap detached step and keeps only its
    input; the backward rebuilds the step with ``create_graph=True`` at that input and
    back-propagates through it, so only one step's graph is alive at a time. Gradients flow to
    ``x`` and ``x0``; not to the score network's parameters (frozen in evaluation).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        x0: Tensor,
        noise: Tensor,
        defense: PurSAMERE,
    ) -> Tensor:
        ctx.save_for_backward(x, x0)
        ctx.defense, ctx.noise = defense, noise  # type: ignore[attr-defined]
        with torch.enable_grad():
            return defense._step(x, x0, noise, exact=False)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, x0 = ctx.saved_tensors  # type: ignore[attr-defined]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            x0 = x0.detach().requires_grad_(True)
            out = ctx.defense._step(x, x0, ctx.noise, exact=True)  # type: ignore[attr-defined]
            gx, gx0 = torch.autograd.grad(out, (x, x0), grad_out, allow_unused=True)
        return gx, gx0, None, None


def _unit(g: Tensor) -> Tensor:
    """``g / ||g||`` per image (L2 over C, H, W); zero where ``g`` is zero."""
    norm = g.flatten(1).norm(dim=1).clamp_min(_TINY)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))

"""MaskDiT as AMRM-Pure's masked reconstructor: a small masked diffusion transformer.

Zheng, Nie, Vahdat & Anandkumar, "Fast Training of Diffusion Models with Masked Transformers",
TMLR 2024, https://arxiv.org/abs/2306.09305: a DiT trained on images with half their patches
dropped, with a denoising score-matching loss on the visible tokens plus an MAE-style
reconstruction loss on the masked tokens, which a light decoder fills with mask tokens.
Dou et al., "AMRM-Pure" (https://arxiv.org/abs/2607.04474), use it as the second instantiation
of their purifier: the signed descent of :class:`defenses.amrm_pure.AMRMPure` on the MaskDiT's
loss instead of the MAE's.

This file holds the network (:class:`MaskDiT`), its training (:func:`train_maskdit`), the view
of it that the purification loop and RAMRM-Pure's fine-tuning use
(:class:`MaskDiTReconstructor`: the loss at one fixed noise level) and that fine-tuning
(:func:`finetune_ramrm_maskdit`). The loop itself is AMRM-Pure's, not a copy.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from common import seeds
from common.checks import optional_positive_int, positive_int, real
from common.errors import ConfigError
from common.progress import TrainingProgress
from defenses.amrm_pure import PatchGrid, finetune_ramrm, sincos_2d
from defenses.base import PartContext

log = logging.getLogger(__name__)

# The noise levels the held-out losses of training are reported at (EDM sigma, [-1, 1] data).
REPORT_SIGMAS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)


# -- the network --------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (Peebles & Xie, https://arxiv.org/abs/2212.09748).

    ``x + gate_a * attn(modulate(ln(x)))``, then the same with the MLP; shift, scale and gate of
    both come from the condition through one linear layer initialised at zero, so that every
    block starts as the identity. Attention is written out (no fused kernel) so that the
    second-order autograd of AMRM-Pure's exact and surrogate gradients works on every device.
    """

    def __init__(self, dim: int, cond_dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"width={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``(N, L, dim)`` tokens and ``(N, cond_dim)`` condition -> ``(N, L, dim)``."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c)[:, None].chunk(6, dim=-1)
        n, length, dim = x.shape
        h = self.norm1(x) * (1 + scale_a) + shift_a
        q, k, v = (
            self.qkv(h).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        )
        attn = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(-1)
        x = x + gate_a * self.proj((attn @ v).transpose(1, 2).reshape(n, length, dim))
        return x + gate_m * self.mlp(self.norm2(x) * (1 + scale_m) + shift_m)


class ModulatedLinear(nn.Module):
    """``linear(modulate(ln(x)))`` with adaLN shift and scale: DiT's final and decoder layers."""

    def __init__(self, dim: int, cond_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``(N, L, dim)`` tokens and ``(N, cond_dim)`` condition -> ``(N, L, out_dim)``."""
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class NoiseEmbedding(nn.Module):
    """EDM's ``c_noise = ln(sigma) / 4`` as sine-cosine features, then an MLP (DiT's embedder).

    The frequencies run geometrically from 1 to ``top``: ``c_noise`` spans about 2 over the
    trained noise levels, so these resolve it finely (DiT's 1e-4..1 range, meant for timesteps
    up to 1000, would leave most features constant).
    """

    def __init__(self, width: int, features: int = 32, top: float = 100.0) -> None:
        super().__init__()
        half = features // 2
        freqs = top ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)  # fixed: not state to save
        self.mlp = nn.Sequential(nn.Linear(2 * half, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, c_noise: Tensor) -> Tensor:
        """``(N,) -> (N, width)``."""
        args = c_noise[:, None] * self.freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=1))


class MaskDiT(PatchGrid):
    """A small masked diffusion transformer (MaskDiT, Zheng et al., TMLR 2024), unconditional.

    EDM's denoiser (Karras et al., https://arxiv.org/abs/2206.00364) on images in [-1, 1]:
    ``D(y~; sigma) = c_skip y~ + c_out F(c_in y~; c_noise)`` with ``sigma_data``. ``F`` is a
    DiT on patches: a linear patch embedding with fixed 2D sine-cosine positions; the encoder
    (adaLN-Zero blocks conditioned on the noise level) sees only the visible tokens; a
    modulated linear layer maps them to the decoder's width, a shared learned mask token fills
    every masked position, and the light decoder's blocks and a zero-initialised modulated head
    predict every patch. Masks are drawn by the caller (``ranks`` of shape ``(N, L)``: the
    ``round(L (1 - ratio))`` lowest stay visible), so all randomness stays with the caller.

    The head's output is read per token: on a visible token as ``F`` of the EDM denoiser (the
    denoised patch ``D``), on a masked token as the patch itself, in [-1, 1] units, as the MAE
    reads it. MaskDiT reads masked positions through the same skip ``c_skip y~``, which carries
    the masked pixels themselves into the prediction; reading them directly scores only what the
    decoder infers from the visible tokens.

    Arguments:
        in_channels (int): image channels ``C``.
        image_size (tuple[int, int]): ``(H, W)``; both must be multiples of ``patch_size``.
        patch_size (int): side ``p`` of the square patches; ``(H / p) (W / p)`` tokens.
        width, depth, heads (int): the encoder.
        decoder_width, decoder_depth, decoder_heads (int): the decoder.
        mlp_ratio (float): hidden width of the MLPs relative to their block's width.
        sigma_data (float): EDM's data standard deviation in [-1, 1] units. (Default: 0.5)

    Shape:
        - Noisy images: ``(N, C, H, W)`` in [-1, 1] plus noise; patches ``(N, L, C p p)``.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        *,
        patch_size: int = 4,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        decoder_width: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mlp_ratio: float = 2.0,
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__(in_channels, image_size, patch_size)
        positive_int("depth", depth)
        positive_int("decoder_depth", decoder_depth)
        self.sigma_data = real("sigma_data", sigma_data, "> 0", lambda v: v > 0)
        patch_dim = in_channels * patch_size**2
        self.embed = nn.Linear(patch_dim, width)
        self.noise_embed = NoiseEmbedding(width)
        self.blocks = nn.ModuleList(DiTBlock(width, width, heads, mlp_ratio) for _ in range(depth))
        self.decoder_embed = ModulatedLinear(width, width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.decoder_blocks = nn.ModuleList(
            DiTBlock(decoder_width, width, decoder_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.head = ModulatedLinear(decoder_width, width, patch_dim)
        self.register_buffer("pos", sincos_2d(*self.grid, width)[None], persistent=False)
        self.register_buffer(
            "decoder_pos", sincos_2d(*self.grid, decoder_width)[None], persistent=False
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's: Xavier linears, N(0, 0.02) noise MLP and mask token, adaLN-Zero, zero head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in self.noise_embed.mlp[0], self.noise_embed.mlp[2]:
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [*self.blocks, *self.decoder_blocks, self.decoder_embed, self.head]:
            nn.init.zeros_(module.ada[-1].weight)
            nn.init.zeros_(module.ada[-1].bias)
        nn.init.zeros_(self.head.linear.weight)
        nn.init.zeros_(self.head.linear.bias)

    # -- patches, masks, preconditioning ---------------------------------------------------------

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """EDM's ``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` ``(N,)``."""
        sd2 = self.sigma_data**2
        total = sigma.square() + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """EDM's ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``."""
        return (sigma.square() + self.sigma_data**2) / (sigma * self.sigma_data).square()

    # -- the network -------------------------------------------------------------------------

    def forward(
        self, noisy: Tensor, sigma: Tensor, ranks: Tensor, mask_ratio: float
    ) -> tuple[Tensor, Tensor]:
        """Denoise the visible patches of ``noisy`` and predict the masked ones from them.

        Args:
            noisy: ``y + sigma * eps``, images in [-1, 1] plus noise ``(N, C, H, W)``.
            sigma: the noise levels ``(N,)``.
            ranks: ``(N, L)`` uniform draws ranking the patches (lowest ``keep`` stay visible).
            mask_ratio: fraction of patches masked.

        Returns:
            ``(pred, mask)``: ``(N, L, C p p)`` patches, the denoised ``D`` on visible tokens and
            the predicted patch on masked ones, and the mask ``(N, L)``, 1.0 where masked.
        """
        n, length = noisy.shape[0], self.num_patches
        keep = self.visible_count(mask_ratio)
        order = ranks.argsort(dim=1)
        restore = order.argsort(dim=1)
        c_skip, c_out, c_in, c_noise = (c.to(noisy.dtype) for c in self.precondition(sigma))
        patches = self.patchify(noisy)
        tokens = self.embed(patches * c_in[:, None, None]) + self.pos
        tokens = tokens.gather(1, order[:, :keep, None].expand(-1, -1, tokens.shape[-1]))
        cond = self.noise_embed(c_noise)
        for block in self.blocks:
            tokens = block(tokens, cond)
        tokens = self.decoder_embed(tokens, cond)
        filler = self.mask_token.expand(n, length - keep, -1).to(tokens.dtype)
        tokens = torch.cat([tokens, filler], dim=1)
        tokens = tokens.gather(1, restore[..., None].expand(-1, -1, tokens.shape[-1]))
        tokens = tokens + self.decoder_pos
        for block in self.decoder_blocks:
            tokens = block(tokens, cond)
        out = self.head(tokens, cond)
        mask = torch.ones(n, length, device=noisy.device, dtype=noisy.dtype)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)
        denoised = c_skip[:, None, None] * patches + c_out[:, None, None] * out
        return torch.where(mask[..., None].bool(), out, denoised), mask

    def loss_terms(
        self, y: Tensor, eps: Tensor, ranks: Tensor, sigma: Tensor, mask_ratio: float
    ) -> tuple[Tensor, Tensor]:
        """MaskDiT's two losses per image, each ``(N,)``, for clean images ``y`` in [-1, 1].

        ``dsm``: EDM-weighted denoising MSE over the visible patches of ``y + sigma eps``;
        ``mae``: MSE of the predicted masked patches against the clean ones. MaskDiT scores
        those against the *noisy* patches, normalised per patch; the noise on a masked patch is
        independent of everything the network sees, so the clean target has the same minimiser
        without the irreducible ``sigma^2`` (which at MaskDiT's largest training noise levels
        would swamp the term), and stays an image that can be pasted back (RAMRM's fine-tuning).
        """
        pred, mask = self(y + sigma.view(-1, 1, 1, 1) * eps, sigma, ranks, mask_ratio)
        err = (pred - self.patchify(y)).square().mean(-1)
        visible = 1 - mask
        dsm = self.loss_weight(sigma) * (err * visible).sum(1) / visible.sum(1)
        return dsm, (err * mask).sum(1) / mask.sum(1)


def maskdit_net(ctx: PartContext, **kwargs: Any) -> MaskDiT:
    """Factory of the :class:`MaskDiT` for the dataset in ``ctx`` (``TrainedPart``'s ``arch``).

    The defaults are the tiny MaskDiT of the small variant (patch 4 on 28x28: 49 tokens, width
    64, 4 encoder + 2 decoder blocks, 4 heads, MLP ratio 2, about 0.38 M parameters); the
    AMRM-Pure paper's CIFAR MaskDiT is ``width=128, depth=6, decoder_depth=3`` at patch 4
    (docs/defenses/amrm_pure.md). ``patch_size`` must divide the image (2 or 4 for 8x8 digits).
    """
    c, h, w = ctx.shape
    return MaskDiT(c, (h, w), **kwargs)


# -- training -----------------------------------------------------------------------------------


def train_maskdit(
    net: MaskDiT,
    ctx: PartContext,
    *,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    final_lr: float = 1e-4,
    mask_ratio: float = 0.5,
    mae_loss_coef: float = 1.0,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    n_train: int | None = None,
    log_every: int = 50,
    eval_samples: int = 1000,
) -> dict[str, Any]:
    """Train ``net`` in place on MaskDiT's objective with Adam, on images mapped to [-1, 1].

    Each step draws EDM's log-normal noise levels ``ln sigma ~ N(p_mean, p_std^2)``, Gaussian
    noise and a mask of ``mask_ratio`` per image, and minimises ``dsm + mae_loss_coef * mae``
    (:meth:`MaskDiT.loss_terms`). MaskDiT's own coefficient is 0.1 on per-patch normalised
    targets of unit variance; on [-1, 1] pixels the masked MSE is several times smaller, so a
    larger coefficient gives the masked term a comparable share. The learning rate decays from
    ``lr`` to ``final_lr`` on a cosine. Data order comes from a generator seeded by ``ctx.seed``,
    masks and noise from another. Returns the loss curve, the held-out ``dsm`` and ``mae`` on
    ``ctx.x_test[:eval_samples]`` at the noise levels :data:`REPORT_SIGMAS`, and ``train_s``.
    """
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    real("lr", lr, "> 0", lambda v: v > 0)
    real("final_lr", final_lr, "in (0, lr]", lambda v: 0 < v <= lr)
    real("mae_loss_coef", mae_loss_coef, ">= 0", lambda v: v >= 0)
    real("p_mean", p_mean)
    real("p_std", p_std, ">= 0", lambda v: v >= 0)
    optional_positive_int("n_train", n_train)
    positive_int("log_every", log_every)
    net.visible_count(mask_ratio)
    rng = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.DATA))
    draws = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.NOISE))
    x = ctx.x_train
    if n_train is not None:
        x = x[torch.randperm(len(x), generator=rng)[:n_train]]
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=final_lr)
    progress = TrainingProgress("train MaskDiT", steps, log_every, logger=log)
    for step in progress:
        xb = x[torch.randint(len(x), (batch_size,), generator=rng)]
        sigma = (p_mean + p_std * torch.randn(batch_size, generator=draws)).exp()
        eps = torch.randn(xb.shape, generator=draws)
        ranks = torch.rand(batch_size, net.num_patches, generator=draws)
        y, eps, ranks, sigma = (t.to(ctx.device) for t in (2 * xb - 1, eps, ranks, sigma))
        dsm, mae = net.loss_terms(y, eps, ranks, sigma, mask_ratio)
        loss = (dsm + mae_loss_coef * mae).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.update(step, loss=loss.item(), dsm=dsm.mean().item(), mae=mae.mean().item())
    net.eval()
    held_out = _held_out(net, ctx.x_test[:eval_samples], ctx, mask_ratio)
    log.info(
        "MaskDiT trained in %.0f s: final loss %.4f, held-out at sigma 0.1: %s",
        progress.elapsed,
        progress.curve[-1]["loss"],
        held_out["0.1"],
    )
    return {
        "loss_curve": progress.curve,
        "test_loss_by_sigma": held_out,
        "n_train": len(x),
        "train_s": progress.elapsed,
    }


@torch.no_grad()
def _held_out(net: MaskDiT, x: Tensor, ctx: PartContext, mask_ratio: float) -> dict[str, Any]:
    """Mean ``dsm`` and ``mae`` over ``x`` at each of :data:`REPORT_SIGMAS`."""
    out = {}
    for sigma in REPORT_SIGMAS:
        g = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.HELD_OUT))
        dsm = mae = 0.0
        for i in range(0, len(x), 256):
            xb = x[i : i + 256]
            eps = torch.randn(xb.shape, generator=g)
            ranks = torch.rand(len(xb), net.num_patches, generator=g)
            y, eps, ranks = (t.to(ctx.device) for t in (2 * xb - 1, eps, ranks))
            s = torch.full((len(xb),), sigma, device=ctx.device)
            d, m = net.loss_terms(y, eps, ranks, s, mask_ratio)
            dsm, mae = dsm + d.sum().item(), mae + m.sum().item()
        out[str(sigma)] = {"dsm": dsm / max(len(x), 1), "mae": mae / max(len(x), 1)}
    return out


# -- the reconstructor AMRM-Pure descends on ----------------------------------------------------


class MaskDiTReconstructor(nn.Module):
    """A :class:`MaskDiT` read as AMRM-Pure's masked reconstructor at one noise level ``sigma``.

    It offers the :class:`defenses.amrm_pure.MAE`'s masked-reconstruction interface, so that
    :class:`defenses.amrm_pure.AMRMPure` and :func:`defenses.amrm_pure.finetune_ramrm` run on
    it unchanged. One row of :meth:`draw` holds a mask's ranks and the diffusion noise, both
    fresh per purification step. :meth:`loss` is MaskDiT's own training loss at ``sigma``,
    ``dsm + mae_loss_coef * mae``, on the image mapped to [-1, 1]: the denoising loss of the
    visible patches and the reconstruction loss of the masked ones
    (:meth:`MaskDiT.loss_terms`). The AMRM-Pure papers do not say at which noise level the
    MaskDiT's loss is scored; a fixed small ``sigma`` keeps the signal of both terms (the
    masked reconstruction degrades, and the denoising term becomes uninformative, as ``sigma``
    grows). 0.1 lies between the EDM levels of DDPM timesteps 25 (0.092) and 30 (0.108) of 1000
    (linear beta schedule), one reading of the 15-30 "time steps" the paper studies for its
    MaskDiT (docs/defenses/amrm_pure.md).

    Arguments:
        net (nn.Module): the :class:`MaskDiT` (a harness ``TrainedPart`` until it is trained).
        sigma (float): EDM noise level of the loss, in [-1, 1] data units. (Default: 0.1)
        mae_loss_coef (float): weight of the masked term, as in training. (Default: 1.0)

    Shape:
        - Images ``(N, C, H, W)`` in [0, 1]; draws ``(N, L + C H W)``.
    """

    def __init__(self, net: nn.Module, *, sigma: float = 0.1, mae_loss_coef: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.sigma = real("sigma", sigma, "> 0", lambda v: v > 0)
        self.mae_loss_coef = real("mae_loss_coef", mae_loss_coef, ">= 0", lambda v: v >= 0)

    @property
    def num_patches(self) -> int:
        """Tokens ``L`` of the network."""
        return self.net.num_patches

    def visible_count(self, mask_ratio: float) -> int:
        """Patches left visible at ``mask_ratio`` (see :meth:`MaskDiT.visible_count`)."""
        return self.net.visible_count(mask_ratio)

    def draw(self, count: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """``count`` rows: uniform mask ranks ``(L,)``, then standard Gaussian noise ``(C H W,)``.

        Drawn on the generator's device (all ranks first, then all noise) and moved to
        ``device``.
        """
        c, (h, w) = self.net.in_channels, self.net.image_size
        ranks = torch.rand(count, self.num_patches, generator=generator, device=generator.device)
        eps = torch.randn(count, c * h * w, generator=generator, device=generator.device)
        return torch.cat([ranks, eps], dim=1).to(device)

    def _split(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(ranks, eps, sigma)`` from one draw per image."""
        ranks, eps = noise[:, : self.num_patches], noise[:, self.num_patches :]
        sigma = torch.full((len(x),), self.sigma, device=x.device, dtype=x.dtype)
        return ranks, eps.reshape(x.shape), sigma

    def loss(self, x: Tensor, noise: Tensor, mask_ratio: float) -> Tensor:
        """MaskDiT's loss per image ``(N,)`` at ``sigma`` for images ``x`` in [0, 1]."""
        ranks, eps, sigma = self._split(x, noise)
        dsm, mae = self.net.loss_terms(2 * x - 1, eps, ranks, sigma, mask_ratio)
        return dsm + self.mae_loss_coef * mae

    def reconstruct(self, x: Tensor, noise: Tensor, mask_ratio: float) -> Tensor:
        """One pass: the denoised visible patches and the predicted masked ones, in [0, 1]."""
        ranks, eps, sigma = self._split(x, noise)
        pred, _ = self.net(2 * x - 1 + self.sigma * eps, sigma, ranks, mask_ratio)
        return ((self.net.unpatchify(pred) + 1) / 2).clamp(0, 1)

    def extra_repr(self) -> str:
        """Noise level and masked-term weight, for ``print(defense)``."""
        return f"sigma={self.sigma}, mae_loss_coef={self.mae_loss_coef}"


def finetune_ramrm_maskdit(
    net: MaskDiT,
    ctx: PartContext,
    *,
    sigma: float = 0.1,
    mae_loss_coef: float = 1.0,
    steps: int = 160,
    batch_size: int = 64,
    lr: float = 1.5e-4,
    mask_ratio: float = 0.5,
    eps: float = 0.1,
    attack_steps: int = 2,
    noise_std: float = 0.05,
    mae_weight: float = 1.0,
    n_train: int | None = 10000,
    log_every: int = 20,
    eval_samples: int = 500,
) -> dict[str, Any]:
    """RAMRM-Pure's robust fine-tuning (:func:`defenses.amrm_pure.finetune_ramrm`) of a MaskDiT.

    The same two stages on :class:`MaskDiTReconstructor` ``(net, sigma, mae_loss_coef)``: its
    one-pass reconstruction at the purification's noise level is the purifier ``P_theta`` the
    classifier's loss is taken through, and its loss (MaskDiT's at ``sigma``) the term weighted
    by ``mae_weight``. Only ``sigma`` and ``mae_loss_coef`` are MaskDiT's; every other argument
    is :func:`~defenses.amrm_pure.finetune_ramrm`'s. Returns its metrics.
    """
    return finetune_ramrm(
        MaskDiTReconstructor(net, sigma=sigma, mae_loss_coef=mae_loss_coef),
        ctx,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        mask_ratio=mask_ratio,
        eps=eps,
        attack_steps=attack_steps,
        noise_std=noise_std,
        mae_weight=mae_weight,
        n_train=n_train,
        log_every=log_every,
        eval_samples=eval_samples,
    )

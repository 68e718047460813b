"""AMRM-Pure / RAMRM-Pure: purification by signed descent on a masked autoencoder's loss.

Dou, Gao, Cui, Wang, Zhao, Zhang, Yan, Xie & Zhang, "AMRM-Pure" (OpenReview KmHelR36FB,
https://arxiv.org/abs/2607.04474; earlier "MAE-Pure", OpenReview 8mFVIRTr7I). This file holds the
masked autoencoder (:class:`MAE`, a ViT on image patches), its pre-training (:func:`train_mae`),
the robust fine-tuning of the R-variant (:func:`finetune_ramrm`) and the defense
(:class:`AMRMPure`). The MaskDiT instantiation lives in :mod:`defenses.maskdit`: its network
plugs into the same purification loop and fine-tuning through the masked-reconstruction
interface the :class:`MAE` defines (``num_patches``, ``draw``, ``loss``, ``reconstruct``,
``visible_count``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from common import seeds
from common.checks import flag, integer, optional_positive_int, positive_int, real
from common.errors import ConfigError
from common.progress import TrainingProgress
from defenses.base import Defense, DefenseInfo, PartContext, inner_autograd

log = logging.getLogger(__name__)

Smoothing = Literal["tanh", "l2"]
SMOOTHINGS: tuple[str, ...] = ("tanh", "l2")

# Below this size a gradient (or its mean magnitude) counts as zero in the smooth steps.
_TINY = 1e-12


# -- the masked autoencoder -------------------------------------------------------------------


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> Tensor:
    """Fixed 2D sine-cosine position embedding ``(grid_h * grid_w, dim)``, as in MAE."""
    if dim % 4:
        raise ConfigError(f"embedding width={dim} must be a multiple of 4 (2D sine-cosine)")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    out_y = ys.reshape(-1, 1) * omega
    out_x = xs.reshape(-1, 1) * omega
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return emb.float()


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

    Attention is written out (no fused kernel) so that second-order autograd, which the exact
    gradient through the purification loop and the smooth surrogate need, works on every device.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"width={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, L, dim) -> (N, L, dim)``."""
        n, length, dim = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(n, length, 3, self.heads, dim // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(n, length, dim))
        return x + self.mlp(self.norm2(x))


class PatchGrid(nn.Module):
    """Images as a grid of square patches: the token layout the MAE and MaskDiT share.

    Args:
        in_channels: image channels ``C``.
        image_size: ``(H, W)``; ``patch_size`` must divide both.
        patch_size: side ``p`` of a patch; ``L = (H / p) (W / p)`` tokens.
    """

    def __init__(self, in_channels: int, image_size: tuple[int, int], patch_size: int) -> None:
        super().__init__()
        h, w = image_size
        positive_int("patch_size", patch_size)
        if h % patch_size or w % patch_size:
            raise ConfigError(
                f"patch_size={patch_size} must divide the image size {h}x{w} (e.g. 2 or 4 for "
                "8x8 digits, 4 or 7 for 28x28, 4 for 32x32)"
            )
        self.in_channels, self.image_size, self.patch_size = in_channels, (h, w), patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]

    def patchify(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, L, C p p)``, row-major over the patch grid."""
        n, c = x.shape[:2]
        p, (gh, gw) = self.patch_size, self.grid
        return x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, -1)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """``(N, L, C p p) -> (N, C, H, W)``, the inverse of :meth:`patchify`."""
        n = patches.shape[0]
        p, (gh, gw), c = self.patch_size, self.grid, self.in_channels
        x = patches.reshape(n, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, c, gh * p, gw * p)

    def visible_count(self, mask_ratio: float) -> int:
        """Patches left visible at ``mask_ratio``; raises unless 1 <= it < ``L``."""
        keep = int(round(self.num_patches * (1 - mask_ratio)))
        if not 1 <= keep < self.num_patches:
            raise ConfigError(
                f"mask_ratio={mask_ratio!r} leaves {keep} of {self.num_patches} patches visible; "
                "at least one patch must be masked and one visible (choose a ratio in "
                f"[{1 / self.num_patches:.3g}, {1 - 1 / self.num_patches:.3g}] or a smaller "
                "patch_size)"
            )
        return keep


class MAE(PatchGrid):
    """Masked autoencoder on ViT patches (He et al., CVPR 2022), without the class token.

    The encoder sees only the visible patches; the decoder gets the encoded visible tokens plus a
    shared learned mask token at every masked position and predicts the pixels of every patch.
    Position embeddings are fixed 2D sine-cosine. Masks are drawn by the caller: a uniform
    ``noise`` of shape ``(N, L)`` ranks the patches, and the ``round(L * (1 - ratio))`` lowest
    stay visible (MAE's ``random_masking``), so all randomness stays with the caller's generator.

    Arguments:
        in_channels (int): image channels ``C``.
        image_size (tuple[int, int]): ``(H, W)``; both must be multiples of ``patch_size``.
        patch_size (int): side ``p`` of the square patches; ``(H / p) (W / p)`` tokens.
        width, depth, heads (int): the encoder.
        decoder_width, decoder_depth, decoder_heads (int): the decoder.
        mlp_ratio (float): hidden width of the MLPs relative to their block's width.

    Shape:
        - Images: ``(N, C, H, W)`` in [0, 1]; patches: ``(N, L, C p p)``.
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
    ) -> None:
        super().__init__(in_channels, image_size, patch_size)
        positive_int("depth", depth)
        positive_int("decoder_depth", decoder_depth)
        patch_dim = in_channels * patch_size**2
        self.embed = nn.Linear(patch_dim, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_width, decoder_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_width)
        self.head = nn.Linear(decoder_width, patch_dim)
        # Fixed, derived from the shape: not state to save.
        self.register_buffer("pos", sincos_2d(*self.grid, width)[None], persistent=False)
        self.register_buffer(
            "decoder_pos", sincos_2d(*self.grid, decoder_width)[None], persistent=False
        )
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def draw(self, count: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """The randomness of ``count`` masked losses: uniform mask ranks ``(count, L)``.

        Drawn on the generator's device and moved to ``device``; one row per image is the
        ``noise`` argument of :meth:`loss`, :meth:`forward` and :meth:`reconstruct`. Every
        reconstructor that :class:`AMRMPure` and :func:`finetune_ramrm` accept draws its
        randomness this way (:class:`defenses.maskdit.MaskDiTReconstructor` adds the diffusion
        noise to each row).
        """
        return _draw_noise(count, self.num_patches, generator, device)

    # -- the network ---------------------------------------------------------------------------

    def forward(self, x: Tensor, noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor]:
        """Predict every patch from the visible ones.

        Args:
            x: images ``(N, C, H, W)``.
            noise: ``(N, L)`` uniform draws ranking the patches (lowest ``keep`` stay visible).
            mask_ratio: fraction of patches masked.

        Returns:
            ``(pred, mask)``: predicted patches ``(N, L, C p p)`` and the mask ``(N, L)``, 1.0
            where a patch was masked.
        """
        n, length = x.shape[0], self.num_patches
        keep = self.visible_count(mask_ratio)
        order = noise.argsort(dim=1)
        restore = order.argsort(dim=1)
        kept = order[:, :keep]
        tokens = self.embed(self.patchify(x)) + self.pos
        tokens = tokens.gather(1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.decoder_embed(self.norm(tokens))
        filler = self.mask_token.expand(n, length - keep, -1).to(tokens.dtype)
        tokens = torch.cat([tokens, filler], dim=1)
        tokens = tokens.gather(1, restore[..., None].expand(-1, -1, tokens.shape[-1]))
        tokens = tokens + self.decoder_pos
        for block in self.decoder_blocks:
            tokens = block(tokens)
        pred = self.head(self.decoder_norm(tokens))
        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, :keep] = 0
        return pred, mask.gather(1, restore)

    def loss(self, x: Tensor, noise: Tensor, mask_ratio: float) -> Tensor:
        """Masked reconstruction loss per image, shape ``(N,)``: MSE over the masked patches."""
        pred, mask = self(x, noise, mask_ratio)
        per_patch = (pred - self.patchify(x)).square().mean(-1)
        return (per_patch * mask).sum(1) / mask.sum(1)

    def reconstruct(self, x: Tensor, noise: Tensor, mask_ratio: float) -> Tensor:
        """The image with its masked patches filled in by the decoder, clipped to [0, 1]."""
        pred, mask = self(x, noise, mask_ratio)
        patches = torch.where(mask[..., None].bool(), pred, self.patchify(x))
        return self.unpatchify(patches).clamp(0, 1)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def mae_vit(ctx: PartContext, **kwargs: Any) -> MAE:
    """Factory of the :class:`MAE` for the dataset in ``ctx`` (``TrainedPart``'s ``arch``).

    The defaults are the tiny MAE of the small variant (patch 4 on 28x28: 49 tokens, width 64,
    4 encoder + 2 decoder blocks, 4 heads, about 0.2 M parameters); MAE-Base at patch 4 is
    ``width=768, depth=12, heads=12, decoder_width=512, decoder_depth=8, decoder_heads=16,
    mlp_ratio=4``. ``patch_size`` must divide the image (2 or 4 for 8x8 digits).
    """
    c, h, w = ctx.shape
    return MAE(c, (h, w), **kwargs)


def _draw_noise(n: int, length: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform ``(n, length)`` mask ranks, drawn on the generator's device, moved to ``device``."""
    return torch.rand(n, length, generator=generator, device=generator.device).to(device)


# -- training ----------------------------------------------------------------------------------


def train_mae(
    net: MAE,
    ctx: PartContext,
    *,
    steps: int = 470,
    batch_size: int = 128,
    lr: float = 1e-3,
    final_lr: float = 1e-4,
    mask_ratio: float = 0.5,
    mask_ratio_spread: float = 0.0,
    n_train: int | None = None,
    log_every: int = 50,
    eval_samples: int = 1000,
) -> dict[str, Any]:
    """Pre-train ``net`` in place on masked reconstruction (MSE on masked patches) with Adam.

    The learning rate decays from ``lr`` to ``final_lr`` on a cosine (the paper: 2,000 epochs at
    1e-3, then 1,000 at 1.5e-4, batch 64). Each step masks a ratio drawn uniformly from
    ``mask_ratio +- mask_ratio_spread``: a briefly trained tiny MAE does not generalise from one
    training ratio to the purification's (trained at 0.5 only, it reconstructs worse at 0.25
    than at 0.75), which MAE-Base does. Data order and masks come from generators seeded by
    ``ctx.seed``. Returns the loss curve (every ``log_every`` steps), the held-out masked MSE on
    ``ctx.x_test[:eval_samples]`` at ``mask_ratio`` and at 0.25 / 0.5 / 0.75, and ``train_s``.
    """
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    real("lr", lr, "> 0", lambda v: v > 0)
    real("final_lr", final_lr, "in (0, lr]", lambda v: 0 < v <= lr)
    real("mask_ratio_spread", mask_ratio_spread, ">= 0", lambda v: v >= 0)
    optional_positive_int("n_train", n_train)
    positive_int("log_every", log_every)
    for ratio in (mask_ratio - mask_ratio_spread, mask_ratio + mask_ratio_spread):
        net.visible_count(ratio)
    rng = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.DATA))
    masks = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.NOISE))
    x = ctx.x_train
    if n_train is not None:
        x = x[torch.randperm(len(x), generator=rng)[:n_train]]
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=final_lr)
    progress = TrainingProgress("train MAE", steps, log_every, logger=log)
    for step in progress:
        idx = torch.randint(len(x), (batch_size,), generator=rng)
        xb = x[idx].to(ctx.device)
        noise = net.draw(len(xb), masks, ctx.device)
        ratio = mask_ratio + mask_ratio_spread * (2 * float(torch.rand((), generator=masks)) - 1)
        loss = net.loss(xb, noise, ratio).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.update(step, loss=loss.item())
    net.eval()
    x_test = ctx.x_test[:eval_samples]
    test_loss = _held_out_mse(net, x_test, ctx, mask_ratio)
    by_ratio = {}
    for ratio in (0.25, 0.5, 0.75):
        try:
            by_ratio[str(ratio)] = _held_out_mse(net, x_test, ctx, ratio)
        except ConfigError:  # too few patches for this ratio (tiny test images)
            continue
    log.info(
        "MAE trained in %.0f s: final loss %.4f, test masked MSE %.4f",
        progress.elapsed,
        progress.curve[-1]["loss"],
        test_loss,
    )
    return {
        "loss_curve": progress.curve,
        "test_masked_mse": test_loss,
        "test_masked_mse_by_ratio": by_ratio,
        "n_train": len(x),
        "train_s": progress.elapsed,
    }


@torch.no_grad()
def _held_out_mse(net: nn.Module, x: Tensor, ctx: PartContext, mask_ratio: float) -> float:
    g = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.HELD_OUT))
    total = 0.0
    for i in range(0, len(x), 256):
        xb = x[i : i + 256].to(ctx.device)
        noise = net.draw(len(xb), g, ctx.device)
        total += net.loss(xb, noise, mask_ratio).sum().item()
    return total / max(len(x), 1)


def finetune_ramrm(
    net: nn.Module,
    ctx: PartContext,
    *,
    steps: int = 160,
    batch_size: int = 64,
    lr: float = 1.5e-4,
    mask_ratio: float = 0.25,
    eps: float = 0.1,
    attack_steps: int = 2,
    noise_std: float = 0.05,
    mae_weight: float = 10.0,
    n_train: int | None = 10000,
    log_every: int = 20,
    eval_samples: int = 500,
) -> dict[str, Any]:
    r"""RAMRM-Pure's robust fine-tuning of a pre-trained MAE against the frozen classifier.

    ``net`` is an :class:`MAE` or any module with its masked-reconstruction interface
    (``draw``, ``loss``, ``reconstruct``, ``visible_count``), such as the MaskDiT at a fixed
    noise level (:func:`defenses.maskdit.finetune_ramrm_maskdit`).

    Our reading of the paper's App. F.1, whose formulas are not legible (see
    docs/defenses/amrm_pure.md): Stage I adds Gaussian noise (std ``noise_std``) to training
    images and crafts Linf adversarial examples (radius ``eps``, ``attack_steps`` signed steps of
    ``2.5 eps / attack_steps`` from a random start; FGSM-RS for one step) against the whole
    reconstruction + classifier system ``f(recon_theta(x))``, where ``recon_theta`` fills the
    masked patches (ratio ``mask_ratio``) with the decoder's prediction. Stage II fine-tunes
    ``theta`` on them with the classifier's loss (AToP-style, classifier frozen) plus the MAE loss
    on the clean images at the same mask ratio, which keeps the reconstruction loss the
    purification loop descends on meaningful:

        min_theta  CE(f(recon_theta(x'_adv)), y) + mae_weight * L_rec(x)

    The paper does not say how CE gradients reach ``theta`` through its signed-gradient
    purifier; this implementation takes ``P_theta`` to be the reconstruction output.
    Returns the loss curves, clean and adversarial accuracy of ``f(recon_theta)`` on
    ``ctx.x_test[:eval_samples]`` before and after, and ``train_s``.
    """
    recipe = _Recipe(mask_ratio, eps, attack_steps, noise_std, mae_weight)
    classifier = _check_finetune(net, ctx, recipe, steps, batch_size, lr, n_train, log_every)
    rng = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.DATA))
    draws = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.NOISE))
    x_all, y_all = ctx.x_train, ctx.y_train
    if n_train is not None:
        keep = torch.randperm(len(x_all), generator=rng)[:n_train]
        x_all, y_all = x_all[keep], y_all[keep]
    x_test = ctx.x_test[:eval_samples].to(ctx.device)
    y_test = ctx.y_test[:eval_samples].to(ctx.device)
    net.eval()
    before = _recon_accuracy(net, classifier, x_test, y_test, mask_ratio, eps, attack_steps, ctx)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    progress = TrainingProgress("fine-tune RAMRM", steps, log_every, logger=log)
    for step in progress:
        idx = torch.randint(len(x_all), (batch_size,), generator=rng)
        x, y = x_all[idx].to(ctx.device), y_all[idx].to(ctx.device)
        ce, rec = _finetune_step(net, classifier, optimizer, x, y, draws, recipe)
        progress.update(step, ce=ce, mae=rec)
    net.eval()
    after = _recon_accuracy(net, classifier, x_test, y_test, mask_ratio, eps, attack_steps, ctx)
    test_loss = _held_out_mse(net, ctx.x_test[:1000], ctx, mask_ratio)
    log.info(
        "RAMRM fine-tuning in %.0f s: recon clean/adv acc %.3f/%.3f -> %.3f/%.3f",
        progress.elapsed,
        before["clean"],
        before["adv"],
        after["clean"],
        after["adv"],
    )
    return {
        "loss_curve": progress.curve,
        "recon_acc_before": before,
        "recon_acc_after": after,
        "test_masked_mse": test_loss,
        "n_train": len(x_all),
        "train_s": progress.elapsed,
    }


@dataclass(frozen=True)
class _Recipe:
    """What one step of :func:`finetune_ramrm` needs beyond the batch (see there)."""

    mask_ratio: float
    eps: float
    attack_steps: int
    noise_std: float
    mae_weight: float


def _check_finetune(
    net: nn.Module,
    ctx: PartContext,
    recipe: _Recipe,
    steps: int,
    batch_size: int,
    lr: float,
    n_train: int | None,
    log_every: int,
) -> nn.Module:
    """Validate :func:`finetune_ramrm`'s arguments; return the classifier it trains against."""
    if ctx.classifier is None:
        raise ConfigError(
            "finetune_ramrm needs the protected classifier: its TrainedPart needs "
            "uses_classifier: true"
        )
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    real("lr", lr, "> 0", lambda v: v > 0)
    real("eps", recipe.eps, "> 0", lambda v: v > 0)
    positive_int("attack_steps", recipe.attack_steps)
    real("noise_std", recipe.noise_std, ">= 0", lambda v: v >= 0)
    real("mae_weight", recipe.mae_weight, ">= 0", lambda v: v >= 0)
    optional_positive_int("n_train", n_train)
    positive_int("log_every", log_every)
    net.visible_count(recipe.mask_ratio)
    return ctx.classifier


def _finetune_step(
    net: nn.Module,
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    draws: torch.Generator,
    recipe: _Recipe,
) -> tuple[float, float]:
    """One step of :func:`finetune_ramrm` on the batch ``(x, y)``; returns its CE and MAE loss."""
    gauss = torch.randn(x.shape, generator=draws).to(x.device)
    noisy = (x + recipe.noise_std * gauss).clamp(0, 1)
    ratio = recipe.mask_ratio
    # Stage I: the weights are fixed while crafting (eval mode, no parameter gradients).
    net.eval()
    x_adv = _attack_recon(net, classifier, noisy, y, ratio, recipe.eps, recipe.attack_steps, draws)
    # Stage II.
    net.train()
    noise = net.draw(len(x), draws, x.device)
    ce = F.cross_entropy(classifier(net.reconstruct(x_adv, noise, ratio)), y)
    noise = net.draw(len(x), draws, x.device)
    rec = net.loss(x, noise, ratio).mean()
    loss = ce + recipe.mae_weight * rec
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    return ce.item(), rec.item()


def _attack_recon(
    net: nn.Module,
    classifier: nn.Module,
    x: Tensor,
    y: Tensor,
    mask_ratio: float,
    eps: float,
    steps: int,
    draws: torch.Generator,
) -> Tensor:
    """Linf PGD (FGSM-RS for one step) on ``CE(f(recon(x)))``, fresh masks per step."""
    step_size = 2.5 * eps / steps if steps > 1 else 1.25 * eps
    start = (torch.rand(x.shape, generator=draws) * 2 - 1).to(x.device) * eps
    x_adv = (x + start).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        noise = net.draw(len(x), draws, x.device)
        with torch.enable_grad():
            loss = F.cross_entropy(classifier(net.reconstruct(x_adv, noise, mask_ratio)), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def _recon_accuracy(
    net: nn.Module,
    classifier: nn.Module,
    x: Tensor,
    y: Tensor,
    mask_ratio: float,
    eps: float,
    steps: int,
    ctx: PartContext,
) -> dict[str, float]:
    """Accuracy of ``f(recon(x))`` on clean and on attacked (as in training) test images."""
    draws = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.HELD_OUT_ATTACK))
    hits = {"clean": 0, "adv": 0}
    for i in range(0, len(x), 250):
        xb, yb = x[i : i + 250], y[i : i + 250]
        x_adv = _attack_recon(net, classifier, xb, yb, mask_ratio, eps, steps, draws)
        for name, batch in (("clean", xb), ("adv", x_adv)):
            noise = net.draw(len(xb), draws, x.device)
            with torch.no_grad():
                pred = classifier(net.reconstruct(batch, noise, mask_ratio)).argmax(1)
            hits[name] += int((pred == yb).sum())
    return {name: count / max(len(x), 1) for name, count in hits.items()}


# -- the defense --------------------------------------------------------------------------------


class AMRMPure(Defense):
    r"""AMRM-Pure (MAE), Dou et al. [https://arxiv.org/abs/2607.04474] (earlier "MAE-Pure").

    Purification by descent on the masked-reconstruction loss of a masked autoencoder with
    respect to the *input* (the paper's Alg. 1): the adversarial noise raises the MAE's
    attention-matrix variation and hence its reconstruction loss, so lowering the loss removes
    it. From ``x^0 = x``, for ``s = 1..S`` with a fresh random mask per step (ratio ``rho``):

        g   = grad_x L_rec(x^{s-1}; mask_s)        (MSE on the masked patches)
        x^s = clip_[0,1]( clip_{x +- eta}( x^{s-1} - lambda_s sign(g) ) )

    with ``lambda_s = step_size``, halved for the second half of the steps when
    ``halve_step``. The "clip(., eta)" of the paper is read as the projection onto the Linf ball
    of radius ``eta`` around the input (our reading: the formula is not legible; see
    docs/defenses/amrm_pure.md). RAMRM-Pure is the same
    loop on a robustly fine-tuned MAE (:func:`finetune_ramrm`; ``conf/defense/ramrm_pure.yaml``).

    The reconstructor is pluggable: any module with the :class:`MAE`'s masked-reconstruction
    interface (``draw(count, generator, device)`` for the randomness of one loss per image,
    ``loss(x, noise, mask_ratio)`` per image) runs in the same loop. AMRM-Pure with MaskDiT
    passes a :class:`defenses.maskdit.MaskDiTReconstructor`, whose loss is MaskDiT's own
    training loss at a fixed diffusion noise level, with fresh diffusion noise per step
    (``conf/defense/amrm_pure_maskdit.yaml``).

    Properties: stochastic (masks from ``generator``), differentiable, iterative. ``sign`` has a
    zero derivative, so the exact Jacobian of the loop is the identity almost everywhere (apart
    from where the Linf ball or [0, 1] clips): exact gradients equal BPDA-identity. The loop
    still builds the full graph (``create_graph=True`` for the inner gradients, unless
    ``second_order=False``) when the caller differentiates through ``purify`` (grad enabled and
    the input requires grad), so that ``grad=exact`` is the true gradient computed by autograd,
    not an assumption; otherwise every step is detached (cheap).

    Attack hooks: :meth:`approx` is the identity (BPDA). :meth:`surrogate` runs the same loop,
    with the same masks for the same generator, with a smooth step instead of ``sign``
    (``tanh(k g / mean|g|)`` or ``sqrt(D) g / ||g||``), whose second-order gradient captures how
    the purification path depends on the input. :meth:`attack_loss` is minus the masked
    reconstruction loss averaged over ``attack_masks`` fixed masks (defense-aware attacks).

    Arguments:
        mae (nn.Module): the masked reconstructor (frozen in evaluation): an :class:`MAE`, or
            a :class:`defenses.maskdit.MaskDiTReconstructor`.
        steps (int): ``S``, signed descent steps; one MAE forward + backward each. (Default: 30)
        step_size (float): ``lambda`` in [0, 1] pixel units. (Default: 2/255)
        halve_step (bool): halve ``lambda`` after ``S // 2`` steps. (Default: True)
        eta (float): Linf radius around the input the purified image stays in. (Default: 0.1)
        mask_ratio (float): ``rho``, fraction of patches masked per step. (Default: 0.25)
        checkpoint (bool): per-step checkpointing of the exact (and surrogate) gradient: the
            forward keeps only each step's input and mask, the backward rebuilds one step's
            second-order graph at a time, so memory is flat in ``steps`` for one more step's
            forward per step; gradients then reach the images only, not the (frozen) MAE
            parameters. (Default: False)
        second_order (bool): build the graph of the inner gradients (``create_graph``) in the
            exact path of the sign steps. ``sign`` has a zero derivative, so ``False`` gives the
            same gradient (a test checks it) without the double backward through the MAE,
            several times cheaper on a CPU; ``True`` is the literal full-graph "exact gradient"
            of the paper's protocol. The surrogate always builds it. (Default: True)
        smoothing (str): the surrogate's step, ``"tanh"`` or ``"l2"``. (Default: "tanh")
        smoothing_k (float): sharpness ``k`` of ``tanh(k g / mean|g|)``, per image; large ``k``
            approaches ``sign``. Ignored for ``"l2"``. (Default: 2.0)
        attack_masks (int): masks averaged in :meth:`attack_loss`. (Default: 4)
        attack_seed (int): seed of those masks (a fixed set: the term is deterministic).
            (Default: 0)

    Shape:
        - Input: ``(N, C, H, W)`` in [0, 1], ``H`` and ``W`` multiples of the MAE's patch size.
        - Output: ``(N, C, H, W)`` in [0, 1], within Linf ``eta`` of the input.

    Example:
        >>> defense = AMRMPure(MAE(1, (28, 28)), steps=30)
        >>> clean = defense.purify(torch.rand(4, 1, 28, 28), generator=torch.Generator())
    """

    info: ClassVar[DefenseInfo] = DefenseInfo(
        stochastic=True,
        differentiable=True,
        iterative=True,
        paper="https://arxiv.org/abs/2607.04474",
        purifier_calls=30,  # S at the defaults; calls_per_purify has the configured count
    )

    def __init__(
        self,
        mae: nn.Module,
        *,
        steps: int = 30,
        step_size: float = 2 / 255,
        halve_step: bool = True,
        eta: float = 0.1,
        mask_ratio: float = 0.25,
        checkpoint: bool = False,
        second_order: bool = True,
        smoothing: Smoothing = "tanh",
        smoothing_k: float = 2.0,
        attack_masks: int = 4,
        attack_seed: int = 0,
    ) -> None:
        super().__init__()
        self.mae = mae
        self.steps = positive_int("steps", steps)
        self.step_size = real("step_size", step_size, "> 0", lambda v: v > 0)
        self.halve_step = flag("halve_step", halve_step)
        self.eta = real("eta", eta, "in (0, 1]", lambda v: 0 < v <= 1)
        self.mask_ratio = real("mask_ratio", mask_ratio, "in (0, 1)", lambda v: 0 < v < 1)
        self.checkpoint = flag("checkpoint", checkpoint)
        self.second_order = flag("second_order", second_order)
        if smoothing not in SMOOTHINGS:
            raise ConfigError(f"smoothing={smoothing!r} must be one of {', '.join(SMOOTHINGS)}")
        self.smoothing = smoothing
        self.smoothing_k = real("smoothing_k", smoothing_k, "> 0", lambda v: v > 0)
        self.attack_masks = positive_int("attack_masks", attack_masks)
        self.attack_seed = integer("attack_seed", attack_seed, minimum=0)

    @property
    def calls_per_purify(self) -> int:
        """MAE evaluations per purified image: ``S`` (each a forward and a backward pass)."""
        return self.steps

    def step_sizes(self) -> list[float]:
        """``lambda_s`` for ``s = 1..S``."""
        half = self.steps // 2 if self.halve_step else self.steps
        return [self.step_size if s < half else self.step_size / 2 for s in range(self.steps)]

    # -- the objective -------------------------------------------------------------------------

    def reconstruction_loss(self, x: Tensor, noise: Tensor) -> Tensor:
        """Masked reconstruction loss per image ``(N,)`` for the draws ``noise`` (``mae.draw``)."""
        return self.mae.loss(x, noise, self.mask_ratio)

    def attack_loss(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Minus the masked reconstruction loss per image, averaged over fixed masks.

        A defense-aware attacker maximises ``CE - weight * L_rec`` (Croce et al., ICML 2022):
        an adversarial image the MAE already reconstructs well gives the descent little to
        undo. ``L_rec`` is a per-pixel mean, small beside the cross-entropy, so the attack's
        weight should be large (tens) to matter. The masks are a fixed set drawn from
        ``attack_seed``, so the term is deterministic and ``generator`` is ignored.
        """
        # The seed of the fixed attack masks: the same set for every call, batch and device.
        gen = torch.Generator().manual_seed(self.attack_seed)
        noise = self.mae.draw(self.attack_masks * len(x), gen, x.device)
        noise = noise.view(self.attack_masks, len(x), -1)
        losses = [self.reconstruction_loss(x, noise[k]) for k in range(self.attack_masks)]
        return -torch.stack(losses).mean(0)

    # -- purification --------------------------------------------------------------------------

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``S`` signed descent steps on the masked reconstruction loss, fresh mask per step."""
        return self._run(x, generator, smooth=False)

    def surrogate(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The same loop (same masks for the same generator) with smooth steps."""
        return self._run(x, generator, smooth=True)

    def _run(self, x0: Tensor, generator: torch.Generator | None, smooth: bool) -> Tensor:
        if generator is None:
            # Fresh randomness without touching global seeding: one draw from the default
            # generator seeds a private one on the input's device.
            seed = int(torch.randint(0, seeds.SEED_HIGH, ()))
            generator = torch.Generator(device=x0.device).manual_seed(seed)
        with inner_autograd(x0) as (x0, exact):
            # All masks first, so that purify and surrogate see the same masks for one
            # generator state, whatever the steps compute.
            noise = self.mae.draw(self.steps * len(x0), generator, x0.device)
            noise = noise.view(self.steps, len(x0), -1)
            x = x0
            # Without second-order terms a step's graph is a few elementwise ops: nothing to save.
            checkpointed = exact and self.checkpoint and (smooth or self.second_order)
            for s, lam in enumerate(self.step_sizes()):
                if checkpointed:
                    x = _CheckpointedStep.apply(x, x0, noise[s], lam, smooth, self)
                else:
                    x = self._step(x, x0, noise[s], lam, smooth, exact)
        return x

    def _step(
        self, x: Tensor, x0: Tensor, noise: Tensor, lam: float, smooth: bool, exact: bool
    ) -> Tensor:
        """One descent step followed by the projection onto the ball around ``x0`` and [0, 1]."""
        if exact and not (smooth or self.second_order):
            # d sign(g) / dx = 0: the inner gradient is a constant of the exact chain rule.
            g = self._grad(x.detach().requires_grad_(True), noise, create_graph=False)
        else:
            if not exact:
                x = x.detach().requires_grad_(True)
            g = self._grad(x, noise, create_graph=exact)
        direction = self._smooth(g) if smooth else g.sign()
        x = x - lam * direction
        x = torch.minimum(torch.maximum(x, x0 - self.eta), x0 + self.eta).clamp(0, 1)
        return x if exact else x.detach()

    def _grad(self, x: Tensor, noise: Tensor, create_graph: bool) -> Tensor:
        (g,) = torch.autograd.grad(
            self.reconstruction_loss(x, noise).sum(), x, create_graph=create_graph
        )
        return g

    def _smooth(self, g: Tensor) -> Tensor:
        """A differentiable stand-in for ``sign(g)``, per image, of comparable size."""
        flat = g.flatten(1)
        shape = (-1, *([1] * (g.dim() - 1)))
        if self.smoothing == "tanh":
            # Scale-free: the gradient is measured in units of its own mean magnitude.
            scale = flat.abs().mean(1).clamp_min(_TINY).view(shape)
            return torch.tanh(self.smoothing_k * g / scale)
        # The L2 length of a sign step, sqrt(D), along the gradient's direction.
        norm = flat.norm(dim=1).clamp_min(_TINY).view(shape)
        return math.sqrt(flat.shape[1]) * g / norm

    def extra_repr(self) -> str:
        """Hyper-parameters, for ``print(defense)``."""
        return (
            f"steps={self.steps}, step_size={self.step_size:.5g}, halve_step={self.halve_step}, "
            f"eta={self.eta}, mask_ratio={self.mask_ratio}, checkpoint={self.checkpoint}, "
            f"second_order={self.second_order}, "
            f"smoothing={self.smoothing}, smoothing_k={self.smoothing_k}, "
            f"attack_masks={self.attack_masks}, attack_seed={self.attack_seed}"
        )


class _CheckpointedStep(torch.autograd.Function):
    """One purification step whose second-order graph is rebuilt in the backward pass.

    As in PurSAMERE: ``torch.utils.checkpoint`` would recompute during the forward (the step's
    own inner ``autograd.grad`` unpacks the saved tensors) and keep the graph, so instead the
    forward runs the cheap detached step and saves only its input and mask; the backward rebuilds
    the step with ``create_graph=True`` and back-propagates through it. Gradients flow to ``x``
    and ``x0``, not to the MAE's parameters (frozen in evaluation).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        x0: Tensor,
        noise: Tensor,
        lam: float,
        smooth: bool,
        defense: AMRMPure,
    ) -> Tensor:
        ctx.save_for_backward(x, x0, noise)
        ctx.lam, ctx.smooth, ctx.defense = lam, smooth, defense  # type: ignore[attr-defined]
        with torch.enable_grad():
            return defense._step(x, x0, noise, lam, smooth, exact=False)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        x, x0, noise = ctx.saved_tensors  # type: ignore[attr-defined]
        defense: AMRMPure = ctx.defense  # type: ignore[attr-defined]
        lam, smooth = ctx.lam, ctx.smooth  # type: ignore[attr-defined]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            x0 = x0.detach().requires_grad_(True)
            out = defense._step(x, x0, noise, lam, smooth, exact=True)
            gx, gx0 = torch.autograd.grad(out, (x, x0), grad_out, allow_unused=True)
        return gx, gx0, None, None, None, None

"""AToP: Adversarial Training on Purification (Lin, Li, Zhang, Tanaka & Zhao, ICLR 2024).

https://openreview.net/forum?id=u7559ZMvwY. A random transform (Gaussian noise and a random
block mask) destroys a perturbation; an inpainting network restores the image; the network is
pre-trained on reconstruction and then fine-tuned with the frozen classifier's loss on FGSM
examples (the "adversarial training on purification"). This file holds the transforms
(:class:`RandomTransform`), the inpainter (:class:`Inpainter`, built by :func:`arch`), its two
training stages (:func:`pretrain`, :func:`finetune`) and the defense (:class:`AToP`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import seeds
from common.checks import choice, integer, positive_int, real
from common.errors import ConfigError
from common.progress import TrainingProgress
from defenses.base import Defense, DefenseInfo, PartContext

log = logging.getLogger(__name__)

KINDS = ("rt1", "rt2", "rt3")


@dataclass(frozen=True)
class RandomTransform:
    """AToP's random transforms RT1, RT2 and RT3 (docs/defenses/atop.md).

    The image is divided into a ``grid x grid`` array of blocks (block edges at ``i * H //
    grid``, so 28x28 with ``grid=4`` gives 7x7 blocks, 8x8 gives 2x2, 256x256 with ``grid=8``
    gives the authors' 32x32). A block is *missing* when the mask zeroes it.

    * ``rt1``: a random block mask, ``round(missing * grid**2)`` blocks missing.
    * ``rt2``: Gaussian noise of std ``sigma``, clipped to [0, 1], then the RT1 mask (the
      authors' main setting).
    * ``rt3``: the RT2 noise, then ``n_masks`` disjoint masks that partition the blocks (each
      misses about ``1 / n_masks`` of them); every masked copy is inpainted and each copy
      contributes the pixels of the blocks it had missing. ``missing`` is not used.

    Masks are drawn per image (the authors share one mask across a batch; per-image draws keep
    every image's randomness independent of its batch and of the EOT copies stacked with it).
    Noise is additive and the mask multiplicative, so gradients reach every kept pixel; the
    clip after the noise has zero gradient where it clips, as the defense itself does.

    Attributes:
        kind: ``rt1``, ``rt2`` or ``rt3``.
        sigma: std of the Gaussian noise in [0, 1] pixel units (not used by ``rt1``).
        grid: blocks per side.
        missing: fraction of the blocks masked by ``rt1`` and ``rt2``, in [0, 1).
        n_masks: the disjoint masks of ``rt3`` (the authors' 4), at most ``grid**2``.
        resize: side length the image is resized to (bilinear) before the transform and the
            inpainter, and back after them (the authors work at 256); ``None`` keeps the size.
    """

    kind: str = "rt2"
    sigma: float = 0.25
    grid: int = 4
    missing: float = 0.25
    n_masks: int = 4
    resize: int | None = None

    def __post_init__(self) -> None:
        choice("kind", self.kind, KINDS)
        real("sigma", self.sigma, ">= 0", lambda v: v >= 0)
        positive_int("grid", self.grid)
        real("missing", self.missing, "in [0, 1)", lambda v: 0 <= v < 1)
        integer("n_masks", self.n_masks, minimum=2)
        if self.kind == "rt3" and self.n_masks > self.grid**2:
            raise ConfigError(
                f"n_masks={self.n_masks!r} must be at most grid**2={self.grid**2}: each of "
                "rt3's disjoint masks needs a block"
            )
        if self.resize is not None:
            # The resized image must hold at least one pixel per block.
            integer("resize", self.resize, minimum=self.grid)

    @property
    def passes(self) -> int:
        """Inpainter evaluations per transformed image (``n_masks`` for rt3, else 1)."""
        return self.n_masks if self.kind == "rt3" else 1

    @property
    def n_missing(self) -> int:
        """Blocks masked by rt1 / rt2."""
        return round(self.missing * self.grid**2)

    def block_ids(self, h: int, w: int, device: torch.device | None = None) -> Tensor:
        """Block index of every pixel, ``(H, W)`` int64, row-major over the grid."""
        if min(h, w) < self.grid:
            raise ConfigError(
                f"grid={self.grid} needs images of at least {self.grid}x"
                f"{self.grid} pixels, got {h}x{w}"
            )
        rows = torch.arange(h, device=device) * self.grid // h
        cols = torch.arange(w, device=device) * self.grid // w
        return rows[:, None] * self.grid + cols[None, :]

    def masks(
        self, n: int, h: int, w: int, *, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """Missing-pixel masks, ``(passes, N, 1, H, W)`` with 1 where a block is missing.

        For rt3 the ``passes`` masks partition the image: they sum to one at every pixel.
        """
        ids = self.block_ids(h, w, device)
        n_blocks = self.grid**2
        where = generator.device if generator is not None else device
        # A random rank per block and image: its position in a random permutation.
        rank = torch.rand(n, n_blocks, generator=generator, device=where).argsort(1).argsort(1)
        rank = rank.to(device)
        if self.kind == "rt3":
            groups = torch.arange(self.n_masks, device=device)
            blocks = rank.unsqueeze(0) % self.n_masks == groups[:, None, None]
        else:
            blocks = (rank < self.n_missing).unsqueeze(0)
        pixels = blocks[:, :, ids.flatten()].view(len(blocks), n, 1, h, w)
        return pixels.float()

    def noise(self, x: Tensor, *, generator: torch.Generator | None) -> Tensor:
        """``x`` plus Gaussian noise of std ``sigma``, clipped to [0, 1] (rt2 / rt3)."""
        where = generator.device if generator is not None else x.device
        z = torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype)
        return (x + self.sigma * z.to(x.device)).clamp(0, 1)


def inpaint(
    net: nn.Module, rt: RandomTransform, x: Tensor, *, generator: torch.Generator | None = None
) -> Tensor:
    """``g(RT(x))``: transform ``x`` at random and inpaint it; same shape, in [0, 1].

    The purification of the defense and the forward pass of both training stages. Draws the
    noise first, then the masks, both from ``generator`` (torch's default generator of the
    device when ``None``). Differentiable in ``x`` and in the network's weights.
    """
    size = x.shape[-2:]
    z = x
    if rt.resize is not None and tuple(size) != (rt.resize, rt.resize):
        # Through the resize, not around it: an attack differentiates the whole chain.
        z = F.interpolate(z, size=(rt.resize, rt.resize), mode="bilinear", align_corners=False)
    if rt.kind != "rt1" and rt.sigma > 0:
        z = rt.noise(z, generator=generator)
    masks = rt.masks(len(z), *z.shape[-2:], generator=generator, device=z.device)
    masks = masks.to(z.dtype)
    if rt.kind == "rt3":
        # Each copy fills its own missing blocks; the masks partition the image, so every pixel
        # comes from exactly one of the n_masks passes.
        out = sum(m * net(z * (1 - m), m) for m in masks)
    else:
        out = net(z * (1 - masks[0]), masks[0])
    if out.shape[-2:] != size:
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp(0, 1)


class Inpainter(nn.Module):
    """A small U-Net inpainter: (noisy masked image, mask) -> completed image in (0, 1).

    A stand-in for DeepFillv2's gated-conv generator (docs/defenses/atop.md): ``depth``
    stride-2 levels of two 3x3 convolutions (widths ``width * 2**i``, each followed by group
    normalisation and ReLU), a dilated bottleneck convolution for a receptive field that spans
    a missing block, skip connections, a sigmoid output. He-initialised. Fully convolutional,
    so it runs at any image size (upsampling matches each skip's size, which need not be even).

    Args:
        channels: image channels ``C``; the input has ``C + 1`` (the mask).
        width: channels of the first level.
        depth: downsampling levels.

    Example:
        >>> net = Inpainter(1, width=16)
        >>> out = net(torch.rand(2, 1, 28, 28), torch.zeros(2, 1, 28, 28))
    """

    def __init__(self, channels: int, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        positive_int("channels", channels)
        positive_int("width", width)
        positive_int("depth", depth)
        widths = [width * 2**i for i in range(depth + 1)]
        self.inc = _double(channels + 1, widths[0])
        self.downs = nn.ModuleList(
            nn.Sequential(
                _conv(widths[i], widths[i + 1], stride=2), _conv(widths[i + 1], widths[i + 1])
            )
            for i in range(depth)
        )
        self.mid = _conv(widths[-1], widths[-1], dilation=2)
        self.ups = nn.ModuleList(
            _double(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(widths[0], channels, 1)
        # He initialisation: with PyTorch's default the signal fades through the ~10 layers,
        # the output starts input-independent, and L1 drives it to the median pixel (0 on
        # Fashion-MNIST), where the sigmoid saturates and the gradients vanish for good.
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Completed images ``(N, C, H, W)`` in (0, 1) from masked images and their masks."""
        h = self.inc(torch.cat([x, mask], 1))
        skips = [h]
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.mid(skips.pop())
        for up in self.ups:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = up(torch.cat([h, skip], 1))
        return torch.sigmoid(self.out(h))


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """3x3 convolution, group normalisation (per image: no batch statistics), ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.ReLU(inplace=True),
    )


def _double(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(_conv(c_in, c_out), _conv(c_out, c_out))


def arch(ctx: PartContext, width: int = 16, depth: int = 2) -> Inpainter:
    """The inpainter for ``ctx``'s images (the factory of the defense's ``TrainedPart``)."""
    return Inpainter(ctx.shape[0], width=width, depth=depth)


# -- training -------------------------------------------------------------------------------


def _check_recipe(
    steps: int, batch_size: int, lr: float, log_every: int, eval_samples: int, rt: RandomTransform
) -> None:
    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    real("lr", lr, "> 0", lambda v: v > 0)
    positive_int("log_every", log_every)
    positive_int("eval_samples", eval_samples)
    if not isinstance(rt, RandomTransform):
        raise ConfigError(f"rt={rt!r} must be a RandomTransform")


def pretrain(
    net: nn.Module,
    ctx: PartContext,
    *,
    rt: RandomTransform,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    log_every: int = 50,
    eval_samples: int = 1000,
) -> dict[str, Any]:
    """Stage 1: L1 reconstruction of the clean image from ``RT(x)`` (no classifier, no GAN).

    Adam with a cosine decay to a tenth of ``lr``; random batches of the training images.
    Trains ``net`` in place; returns the loss curve (every ``log_every`` steps), the held-out
    L1 on the first ``eval_samples`` test images and the time taken.
    """
    _check_recipe(steps, batch_size, lr, log_every, eval_samples, rt)
    data = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.DATA))
    noise = torch.Generator(device=ctx.device)
    noise.manual_seed(seeds.training(ctx.seed, seeds.Stream.NOISE))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 10)
    net.train()
    progress = TrainingProgress("pre-train AToP inpainter", steps, log_every, logger=log)
    for step in progress:
        idx = torch.randint(len(ctx.x_train), (batch_size,), generator=data)
        x = ctx.x_train[idx].to(ctx.device)
        loss = (inpaint(net, rt, x, generator=noise) - x).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(step, l1=loss.item())
    net.eval()
    held_out = _held_out(net, rt, ctx, eval_samples)
    log.info(
        "AToP inpainter pre-trained in %.0f s: final L1 %.4f, test L1 %.4f",
        progress.elapsed,
        progress.curve[-1]["l1"],
        held_out["test_l1"],
    )
    return {"loss_curve": progress.curve, **held_out, "train_s": progress.elapsed}


def finetune(
    net: nn.Module,
    ctx: PartContext,
    *,
    rt: RandomTransform,
    eps: float,
    steps: int,
    lam: float = 0.05,
    batch_size: int = 128,
    lr: float = 1e-4,
    beta1: float = 0.5,
    clean_fraction: float = 0.0,
    log_every: int = 50,
    eval_samples: int = 1000,
) -> dict[str, Any]:
    """Stage 2, AToP: fine-tune the inpainter against the frozen classifier on FGSM examples.

    Per batch: ``x' = clip(x + eps * sign(grad_x CE(f(x), y)))`` against the classifier ``f``
    alone (not through the purifier), then one Adam step (betas ``(beta1, 0.999)``, as the
    authors) on

        L1(g(RT(x')), x') + lam * CE(f(g(RT(x'))), y)

    whose reconstruction target is the adversarial image itself, as in the authors' notebook.
    ``clean_fraction`` of every batch stays clean (``x' = x``; 0, the authors' recipe, makes
    every image adversarial): adversarial-only fine-tuning teaches the inpainter to map FGSM
    patterns to their class, and clean accuracy through the purifier falls below FGSM accuracy.
    Returns the loss curve (both terms), held-out L1, clean and FGSM accuracy through the
    purifier and of the bare classifier on the first ``eval_samples`` test images.
    """
    _check_recipe(steps, batch_size, lr, log_every, eval_samples, rt)
    real("eps", eps, "> 0", lambda v: v > 0)
    real("lam", lam, ">= 0", lambda v: v >= 0)
    real("beta1", beta1, "in [0, 1)", lambda v: 0 <= v < 1)
    real("clean_fraction", clean_fraction, "in [0, 1]", lambda v: 0 <= v <= 1)
    n_clean = round(clean_fraction * batch_size)
    f = ctx.classifier
    if f is None:
        raise ConfigError(
            "AToP fine-tuning needs the protected classifier: its TrainedPart needs "
            "uses_classifier: true"
        )
    data = torch.Generator().manual_seed(seeds.training(ctx.seed, seeds.Stream.DATA))
    noise = torch.Generator(device=ctx.device)
    noise.manual_seed(seeds.training(ctx.seed, seeds.Stream.NOISE))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(beta1, 0.999))
    net.train()
    progress = TrainingProgress("AToP fine-tuning", steps, log_every, logger=log)
    for step in progress:
        idx = torch.randint(len(ctx.x_train), (batch_size,), generator=data)
        x, y = ctx.x_train[idx].to(ctx.device), ctx.y_train[idx].to(ctx.device)
        # The first n_clean images of the (random) batch stay clean.
        x_adv = x
        if n_clean < batch_size:
            x_adv = torch.cat([x[:n_clean], _fgsm(f, x[n_clean:], y[n_clean:], eps)])
        out = inpaint(net, rt, x_adv, generator=noise)
        l1 = (out - x_adv).abs().mean()
        ce = F.cross_entropy(f(out), y)
        loss = l1 + lam * ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.update(step, l1=l1.item(), ce=ce.item())
    net.eval()
    held_out = _held_out(net, rt, ctx, eval_samples, eps=eps)
    h = held_out
    log.info(
        "AToP fine-tuning took %.0f s: test L1 %.4f, clean acc %.3f, FGSM acc %.3f "
        "(bare classifier %.3f / %.3f)",
        progress.elapsed,
        h["test_l1"],
        h["test_acc"],
        h["test_acc_fgsm"],
        h["bare_acc"],
        h["bare_acc_fgsm"],
    )
    return {"loss_curve": progress.curve, **held_out, "train_s": progress.elapsed}


def _fgsm(f: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One signed-gradient step of size ``eps`` on the classifier's cross-entropy."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(f(xg), y), xg)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def _held_out(
    net: nn.Module, rt: RandomTransform, ctx: PartContext, n: int, eps: float | None = None
) -> dict[str, float]:
    """L1 to the clean test images and, with a classifier, accuracies with and without it."""
    g = torch.Generator(device=ctx.device)
    g.manual_seed(seeds.training(ctx.seed, seeds.Stream.HELD_OUT))
    x_all, y_all = ctx.x_test[:n], ctx.y_test[:n]
    sums = {
        "test_l1": 0.0,
        "test_acc": 0.0,
        "bare_acc": 0.0,
        "test_acc_fgsm": 0.0,
        "bare_acc_fgsm": 0.0,
    }
    f = ctx.classifier
    for i in range(0, len(x_all), 250):
        x, y = x_all[i : i + 250].to(ctx.device), y_all[i : i + 250].to(ctx.device)
        with torch.no_grad():
            out = inpaint(net, rt, x, generator=g)
            sums["test_l1"] += (out - x).abs().mean((1, 2, 3)).sum().item()
        if f is None:
            continue
        x_adv = _fgsm(f, x, y, eps) if eps is not None else x
        with torch.no_grad():
            sums["test_acc"] += (f(out).argmax(1) == y).sum().item()
            sums["bare_acc"] += (f(x).argmax(1) == y).sum().item()
            purified_adv = inpaint(net, rt, x_adv, generator=g)
            sums["test_acc_fgsm"] += (f(purified_adv).argmax(1) == y).sum().item()
            sums["bare_acc_fgsm"] += (f(x_adv).argmax(1) == y).sum().item()
    keys = list(sums) if f is not None and eps is not None else ["test_l1"]
    return {k: sums[k] / max(len(x_all), 1) for k in keys}


# -- the defense ----------------------------------------------------------------------------


class AToP(Defense):
    """AToP, Lin, Li, Zhang, Tanaka & Zhao, ICLR 2024 [https://openreview.net/forum?id=u7559ZMvwY].

    Adversarial Training on Purification: ``purify(x) = g(RT(x))``, a random transform (noise
    and a random block mask, :class:`RandomTransform`) followed by an inpainting network ``g``
    whose refined output is used directly (not re-composited with the kept pixels), as in the
    authors' code. ``g`` is pre-trained on reconstruction (:func:`pretrain`) and then
    fine-tuned with the frozen classifier's loss on FGSM examples (:func:`finetune`); the YAML
    wires both stages as ``TrainedPart`` nodes, and ``atop_pretrained`` is the same purifier
    without the fine-tuning.

    Properties: stochastic (fresh noise and mask per call, from ``generator`` only),
    differentiable (exactly: through the resize, the additive noise, the multiplicative mask
    and ``g``; the clip after the noise has zero gradient where it clips), not iterative. One
    inpainter pass per image (rt3: ``n_masks``). BPDA's ``approx`` is the identity, the setting
    of the authors' ablations (tables 7/8), which inflates robustness (docs/defenses/atop.md).

    Arguments:
        purifier (nn.Module): the inpainter, called as ``purifier(masked_image, mask)``
            (:class:`Inpainter`; a ``TrainedPart`` until the harness resolves it).
        rt (RandomTransform): the random transform. (Default: RT2, sigma 0.25, 4x4 blocks,
            25% missing)

    Shape:
        - Input: ``(N, C, H, W)`` in [0, 1].
        - Output: ``(N, C, H, W)`` in [0, 1].

    Example:
        >>> defense = AToP(Inpainter(1).eval(), RandomTransform("rt2", sigma=0.25))
        >>> clean = defense.purify(torch.rand(4, 1, 28, 28), generator=torch.Generator())
    """

    info: ClassVar[DefenseInfo] = DefenseInfo(
        stochastic=True,
        differentiable=True,
        iterative=False,
        paper="https://openreview.net/forum?id=u7559ZMvwY",
        purifier_calls=1,  # RT2; calls_per_purify has rt3's n_masks
    )

    def __init__(self, purifier: nn.Module, rt: RandomTransform | None = None) -> None:
        super().__init__()
        if not isinstance(purifier, nn.Module):
            raise ConfigError(f"purifier={purifier!r} must be an nn.Module (the inpainter)")
        rt = RandomTransform() if rt is None else rt
        if not isinstance(rt, RandomTransform):
            raise ConfigError(f"rt={rt!r} must be a RandomTransform")
        self.purifier = purifier
        self.rt = rt

    @property
    def calls_per_purify(self) -> int:
        """Inpainter passes per purified image: 1, or ``n_masks`` for rt3."""
        return self.rt.passes

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``g(RT(x))`` with noise and masks drawn from ``generator``."""
        return inpaint(self.purifier, self.rt, x, generator=generator)

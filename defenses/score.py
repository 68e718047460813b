"""The score model shared by DiffPure and PurSAMERE: one noise-conditional denoiser, two views.

A VP-SDE noise-prediction network ``eps(x_t, t)`` on images in [-1, 1] (Song et al., ICLR 2021,
https://arxiv.org/abs/2011.13456) is, by Tweedie's formula, also a denoiser of Gaussian noise at
any level: for ``x~ = x0 + sigma * e`` the VP time with ``alpha_bar(t) = 1 / (1 + sigma^2)``
sees ``sqrt(alpha_bar) * x~`` as its noisy sample, and

    D(x~, sigma) = (x_t - sqrt(1 - alpha_bar) * eps(x_t, t)) / sqrt(alpha_bar),
    x_t = sqrt(alpha_bar) * x~.

So DiffPure (reverse SDE from t*) and PurSAMERE (minimising the expected reconstruction error
of ``D``) purify with the same learned prior, and comparing them is fair.

The network is diffusers' ``UNet2DModel``, so a pretrained diffusers-format checkpoint (e.g. a
DDPM for CIFAR-10, whose linear beta schedule is this VP-SDE's discretisation) loads from a local
directory with :meth:`ScoreNet.from_pretrained`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from common.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import UNet2DModel


@dataclass(frozen=True)
class VPSDE:
    """The variance-preserving SDE ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dw`` on t in [0, 1].

    ``beta(t) = beta_min + t (beta_max - beta_min)``; the defaults are Song et al.'s and the
    continuous limit of DDPM's 1,000-step linear schedule (1e-4 to 0.02).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: Tensor | float) -> Tensor:
        """``beta(t)``."""
        return self.beta_min + torch.as_tensor(t) * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: Tensor | float) -> Tensor:
        """``log alpha_bar(t) = -(beta_max - beta_min) t^2 / 2 - beta_min t``."""
        t = torch.as_tensor(t)
        return -0.5 * (self.beta_max - self.beta_min) * t**2 - self.beta_min * t

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """Signal fraction of the variance at time ``t``."""
        return self.log_alpha_bar(t).exp()

    def t_of_alpha_bar(self, alpha_bar: Tensor | float) -> Tensor:
        """Inverse of :meth:`alpha_bar` (the positive root of a quadratic in ``t``)."""
        log_ab = torch.as_tensor(alpha_bar).log()
        span = self.beta_max - self.beta_min
        return (-self.beta_min + (self.beta_min**2 - 2 * span * log_ab).sqrt()) / span

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        """VP time whose noise-to-signal ratio is ``sigma`` (in [-1, 1] pixel units)."""
        return self.t_of_alpha_bar(1 / (1 + torch.as_tensor(sigma) ** 2))


def small_unet(
    in_channels: int,
    image_size: int,
    *,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
) -> UNet2DModel:
    """A CPU-sized ``UNet2DModel``: no attention, ``len(block_out_channels) - 1`` downsamplings.

    ``image_size`` must be divisible by ``2 ** (len(block_out_channels) - 1)`` (28 -> 14 -> 7).
    """
    from diffusers import UNet2DModel  # imported here: diffusers takes seconds to import

    levels = len(block_out_channels)
    if image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"image_size={image_size} is not divisible by 2**{levels - 1}, as "
            f"block_out_channels={tuple(block_out_channels)} needs"
        )
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        add_attention=False,
    )


class ScoreNet(nn.Module):
    """A VP-SDE noise-prediction network, with its score and its Tweedie denoiser.

    'Score-Based Generative Modeling through Stochastic Differential Equations'
    [https://arxiv.org/abs/2011.13456]. All methods work on images in [-1, 1].

    Arguments:
        net (nn.Module | None): ``net(x_t, timestep)`` predicting the noise, diffusers-style
            (an output with ``.sample``) or a plain tensor. ``None`` until a subclass loads it.
        sde (VPSDE): the noise schedule. (Default: Song et al.'s)
        timestep_scale (float): continuous ``t`` in [0, 1] is fed as ``t * timestep_scale``
            (999 for DDPM-trained networks).

    Example:
        >>> score = ScoreNet(small_unet(1, 28))
        >>> eps = score.eps(torch.randn(4, 1, 28, 28), torch.full((4,), 0.3))
    """

    def __init__(
        self, net: nn.Module | None, sde: VPSDE | None = None, timestep_scale: float = 999.0
    ) -> None:
        super().__init__()
        self.net = net
        self.sde = sde or VPSDE()
        self.timestep_scale = timestep_scale

    @classmethod
    def from_pretrained(cls, path: str | Path, *, timestep_scale: float = 999.0) -> ScoreNet:
        """Load a diffusers ``UNet2DModel`` from a local directory (no download)."""
        from diffusers import UNet2DModel

        net = UNet2DModel.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
        return cls(net, timestep_scale=timestep_scale)

    def _net(self) -> nn.Module:
        if self.net is None:
            raise RuntimeError(
                f"{type(self).__name__} has no network yet: it is trained or loaded when the "
                "harness prepares the defense (prepare(dataset, device))"
            )
        return self.net

    def eps(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Predicted noise at VP time ``t`` (a scalar or one time per image)."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(len(x_t))
        out = self._net()(x_t, t * self.timestep_scale)
        return out.sample if hasattr(out, "sample") else out

    def score(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``grad log p_t(x_t) = -eps / sqrt(1 - alpha_bar(t))``."""
        ab = self.sde.alpha_bar(torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device))
        return -self.eps(x_t, t) / _bcast((1 - ab).sqrt(), x_t)

    def denoise(self, x_noisy: Tensor, sigma: float) -> Tensor:
        """Tweedie's estimate of the clean image from ``x0 + sigma * e`` (VE parametrisation)."""
        ab = 1.0 / (1.0 + sigma**2)
        t = float(self.sde.t_of_alpha_bar(ab))
        x_t = math.sqrt(ab) * x_noisy
        return (x_t - math.sqrt(1 - ab) * self.eps(x_t, t)) / math.sqrt(ab)

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Denoising score matching (noise prediction), ``t ~ U(1e-3, 1)``; ``x0`` in [-1, 1]."""
        shape = (len(x0),)
        t = torch.rand(shape, generator=generator, device=x0.device) * (1 - 1e-3) + 1e-3
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        ab = _bcast(self.sde.alpha_bar(t), x0)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        return (self.eps(x_t, t) - noise).square().mean()


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-image (or scalar) tensor to broadcast against NCHW images."""
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v

"""The score model DiffPure and PurSAMERE share, trained here on first use and cached.

The cache entry (:mod:`bench.models.cache`) is itself a diffusers model directory
(``config.json`` and ``diffusion_pytorch_model.safetensors``), so it loads anywhere diffusers
does; a local diffusers checkpoint (``pretrained``) replaces training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.models.cache import Entry, fetch
from bench.models.checkpoints import sha256_files
from common import seeds
from common.checks import optional_positive_int, positive_int, real
from common.errors import CheckpointError
from common.progress import TrainingProgress
from defenses.score import VPSDE, ScoreNet

if TYPE_CHECKING:
    from bench.data import ImageDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreRecipe:
    """How the score network is trained: Adam on the denoising score-matching loss.

    Attributes:
        steps: optimizer steps.
        batch_size: images per step.
        lr: Adam's learning rate (cosine-decayed to 10% over the run).
        n_train: train on the first ``n_train`` images of a seeded permutation (``None``: all).
        log_every: steps between two points of the recorded loss curve.
        eval_samples: test images of the final held-out denoising loss.
        ema_decay: keep an exponential moving average of the weights and use it in the end
            (standard for diffusion models: it denoises markedly better than the last iterate);
            ``None`` keeps the last weights.
    """

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    n_train: int | None = None
    log_every: int = 50
    eval_samples: int = 1000
    ema_decay: float | None = 0.999

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_samples"):
            positive_int(f"score recipe {name}", getattr(self, name))
        optional_positive_int("score recipe n_train", self.n_train)
        real("score recipe lr", self.lr, "> 0", lambda v: v > 0)
        if self.ema_decay is not None:
            real("score recipe ema_decay", self.ema_decay, "in (0, 1)", lambda v: 0 < v < 1)


def train_score_net(
    score: ScoreNet,
    dataset: ImageDataset,
    recipe: ScoreRecipe,
    *,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Train ``score.net`` in place on ``dataset``'s training images; return its metrics."""
    torch.manual_seed(seeds.training(seed, seeds.Stream.DATA))  # dropout and the like, if any
    rng = torch.Generator().manual_seed(seeds.training(seed, seeds.Stream.DATA))
    x, _ = dataset.train()
    if recipe.n_train is not None:
        x = x[torch.randperm(len(x), generator=rng)[: recipe.n_train]]
    net = score.net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=recipe.steps, eta_min=recipe.lr / 10
    )
    ema = None
    if recipe.ema_decay is not None:
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema_decay)
        )
    noise = torch.Generator(device=device).manual_seed(seeds.training(seed, seeds.Stream.NOISE))
    progress = TrainingProgress("train score model", recipe.steps, recipe.log_every)
    for step in progress:
        idx = torch.randint(len(x), (recipe.batch_size,), generator=rng)
        x0 = x[idx].to(device) * 2 - 1
        loss = score.loss(x0, generator=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update_parameters(net)
        progress.update(step, loss=loss.item())
    if ema is not None:
        net.load_state_dict(ema.module.state_dict())
    net.eval()
    x_test, _ = dataset.test()
    held_out = _held_out_loss(score, x_test[: recipe.eval_samples], device, seed)
    log.info(
        "score model trained in %.0f s: final loss %.4f, test loss %.4f",
        progress.elapsed,
        progress.curve[-1]["loss"],
        held_out,
    )
    return {
        "loss_curve": progress.curve,
        "test_loss": held_out,
        "n_train": len(x),
        "train_s": progress.elapsed,
        "device": str(device),
    }


@torch.inference_mode()
def _held_out_loss(score: ScoreNet, x: torch.Tensor, device: torch.device, seed: int) -> float:
    g = torch.Generator(device=device).manual_seed(seeds.training(seed, seeds.Stream.HELD_OUT))
    losses = [
        score.loss(x[i : i + 256].to(device) * 2 - 1, generator=g).item() * len(x[i : i + 256])
        for i in range(0, len(x), 256)
    ]
    return sum(losses) / max(len(x), 1)


class TrainedScoreNet(ScoreNet):
    """A :class:`~defenses.score.ScoreNet` the harness trains on first use and caches.

    Empty until :meth:`prepare`; then either loads a local diffusers checkpoint (``pretrained``)
    or finds or trains a small ``UNet2DModel`` for the dataset.

    Args:
        arch: network factory (``_partial_: true``), called as ``arch(in_channels=C,
            image_size=H)``; ``defenses.score.small_unet`` by default.
        recipe: how to train it.
        seed: weight initialisation and data order.
        cache_dir: where trained networks live (``${paths.cache_dir}/purifiers``).
        pretrained: a local diffusers ``UNet2DModel`` directory to use instead of training
            (e.g. a DDPM for CIFAR-10); never downloaded.
        timestep_scale: ``t`` in [0, 1] is fed as ``t * timestep_scale``.
    """

    def __init__(
        self,
        arch: Callable[..., nn.Module],
        recipe: ScoreRecipe,
        seed: int = 0,
        cache_dir: str = ".cache/purifiers",
        pretrained: str | None = None,
        timestep_scale: float = 999.0,
    ) -> None:
        super().__init__(None, VPSDE(), timestep_scale)
        self.arch, self.recipe, self.seed = arch, recipe, seed
        self.cache_dir = Path(cache_dir).expanduser()
        self.pretrained = Path(pretrained).expanduser() if pretrained else None
        if self.pretrained is not None and not (self.pretrained / "config.json").is_file():
            raise CheckpointError(
                f"pretrained={str(self.pretrained)!r} is not a diffusers model directory (no "
                "config.json there); give a local UNet2DModel directory, or null to train one"
            )
        self.info: dict[str, Any] = {}
        self._digest: str | None = None

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies ``pretrained`` weights (their files' digest); else ``None``.

        A trained network is identified by its spec, which the run's config already holds.
        """
        if self.pretrained is None:
            return None
        if self._digest is None:  # hashed once: the plan asks, then prepare records it
            files = sorted(p for p in self.pretrained.rglob("*") if p.is_file())
            self._digest = sha256_files(files)
        return {"part": "score", "sha256": self._digest}

    def prepare(self, dataset: ImageDataset, device: torch.device) -> None:
        """Load or train the network for ``dataset`` and freeze it on ``device``."""
        if self.pretrained is not None:
            self.net = _read_unet(self.pretrained)
            self.info = {
                "kind": "pretrained",
                "path": str(self.pretrained),
                **(self.fingerprint() or {}),
            }
        else:
            self._train_or_load(dataset, device)
        self.net.to(device).eval().requires_grad_(False)

    def entry(self, dataset: ImageDataset) -> Entry:
        """The cache entry of the network this spec trains for ``dataset``."""
        spec = {
            "kind": "score",
            "arch": self.arch,
            "recipe": self.recipe,
            "seed": self.seed,
            "sde": {"beta_min": self.sde.beta_min, "beta_max": self.sde.beta_max},
            "dataset": dataset.identity(),
        }
        return Entry(self.cache_dir, f"{dataset.name}-score", spec)

    def _train_or_load(self, dataset: ImageDataset, device: torch.device) -> None:
        c, h, _ = dataset.shape
        entry = self.entry(dataset)

        def build() -> nn.Module:
            torch.manual_seed(seeds.training(self.seed, seeds.Stream.DATA))
            return self.arch(in_channels=c, image_size=h)

        def train(net: nn.Module) -> dict[str, Any]:
            self.net = net
            return train_score_net(self, dataset, self.recipe, seed=self.seed, device=device)

        self.net, metrics = fetch(
            entry,
            build=build,
            train=train,
            save=lambda net, tmp: net.save_pretrained(str(tmp)),
            load=_read_unet,
            what="score model",
        )
        self.info = {
            "kind": "trained",
            "cache_key": entry.key,
            "checkpoint": str(entry.path),
            "sha256": entry.digest(),
            "training": metrics,
        }

    def describe(self) -> dict[str, Any]:
        """Facts for the run record (cache key, checkpoint, loss curve) after :meth:`prepare`."""
        return {"part": "score", **self.info}


def _read_unet(directory: Path) -> nn.Module:
    """A diffusers ``UNet2DModel`` from a local directory (never downloaded)."""
    from diffusers import UNet2DModel  # imported here: diffusers takes seconds to import

    try:
        return UNet2DModel.from_pretrained(
            str(directory), local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError) as err:
        raise CheckpointError(f"score model {directory} is unreadable: {err}") from err

"""Training classifiers: standard training, PGD-AT and FGSM-RS, and the cache they live in.

A classifier is identified by everything that determines its weights (architecture, dataset,
recipe, seed); :func:`train_or_load` finds it in the cache (:mod:`bench.models.cache`) or
trains and caches it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import Attack
from attacks.pgd import PGD
from bench.models.cache import (
    OMIT_IF_DEFAULT,
    WEIGHTS_NAME,
    Entry,
    fetch,
    load_state_dict,
    save_state_dict,
)
from common import seeds
from common.checks import optional_positive_int, positive_int, real
from common.progress import TrainingProgress

if TYPE_CHECKING:
    from bench.data import ImageDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How a classifier is trained: SGD with Nesterov momentum and a one-cycle schedule.

    Attributes:
        epochs: passes over the training set.
        batch_size: images per step.
        lr: peak learning rate of the one-cycle schedule.
        momentum: SGD momentum.
        weight_decay: L2 penalty on the weights.
        n_train: train on the first ``n_train`` images of a seeded permutation (``None``: all).
        min_steps: train for at least this many optimisation steps (``None``: ``epochs``
            passes): ``epochs`` sized for a large training set give a small one too few steps
            (scikit-learn's digits, 1297 images, gets 11 steps an epoch at batch 128), so the
            number of passes is raised to reach ``min_steps``.
        adversary: ``None`` for standard training, else a partial that binds an attack to the
            model being trained (PGD for PGD-AT, FGSM-RS for fast AT); each batch is replaced by
            its adversarial version.
        eval_steps: PGD steps of the robust-accuracy check after adversarial training.
        eval_samples: test images used for that check.
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    n_train: int | None = None
    min_steps: int | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})
    adversary: Callable[[nn.Module], Attack] | None = None
    eval_steps: int = 20
    eval_samples: int = 1000

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_steps", "eval_samples"):
            positive_int(f"recipe {name}", getattr(self, name))
        optional_positive_int("recipe n_train", self.n_train)
        optional_positive_int("recipe min_steps", self.min_steps)
        real("recipe lr", self.lr, "> 0", lambda v: v > 0)
        real("recipe momentum", self.momentum, "in [0, 1)", lambda v: 0 <= v < 1)
        real("recipe weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)

    def epochs_for(self, n_images: int) -> int:
        """Passes over ``n_images`` training images: ``epochs``, raised to reach ``min_steps``."""
        if self.min_steps is None:
            return self.epochs
        return max(self.epochs, math.ceil(self.min_steps / math.ceil(n_images / self.batch_size)))


def train_classifier(
    model: nn.Module,
    dataset: ImageDataset,
    recipe: Recipe,
    *,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Train ``model`` in place on ``dataset``'s training split and return its metrics.

    The metrics hold per-epoch loss and accuracy, the clean test accuracy and, after adversarial
    training, PGD robust accuracy on the first ``recipe.eval_samples`` test images at the
    adversary's norm and eps.
    """
    # The harness (not components) owns global seeding: weight init and torchattacks' random
    # starts draw from torch's global generator.
    torch.manual_seed(seeds.training(seed, seeds.Stream.DATA))
    shuffle = torch.Generator().manual_seed(seeds.training(seed, seeds.Stream.DATA))
    x, y = dataset.train()
    if recipe.n_train is not None:
        keep = torch.randperm(len(x), generator=shuffle)[: recipe.n_train]
        x, y = x[keep], y[keep]
    steps_per_epoch = math.ceil(len(x) / recipe.batch_size)
    epochs = recipe.epochs_for(len(x))
    if epochs != recipe.epochs:
        log.info("%d epochs instead of %d: min_steps=%d", epochs, recipe.epochs, recipe.min_steps)
    model.to(device).train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
        weight_decay=recipe.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=epochs * steps_per_epoch
    )
    adversary = recipe.adversary(model) if recipe.adversary is not None else None
    start = time.perf_counter()
    step = _Step(model, optimizer, schedule, adversary, device)
    history = [
        _epoch(step, x, y, torch.randperm(len(x), generator=shuffle), recipe, (epoch, epochs))
        for epoch in range(epochs)
    ]
    train_s = time.perf_counter() - start
    model.eval()
    x_test, y_test = dataset.test()
    metrics: dict[str, Any] = {
        "epochs": history,
        "n_train": len(x),
        "train_s": train_s,
        "device": str(device),
        "test_clean_acc": _accuracy(model, x_test, y_test, device, recipe.batch_size * 4),
    }
    if adversary is not None:
        metrics["test_robust_acc"] = _pgd_accuracy(model, adversary, x_test, y_test, recipe, device)
    log.info("trained in %.0f s: %s", train_s, {k: v for k, v in metrics.items() if "acc" in k})
    return metrics


@dataclass
class _Step:
    """One optimisation step of classifier training (on adversarial images for AT recipes)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    adversary: Attack | None
    device: torch.device

    def __call__(self, xb: Tensor, yb: Tensor) -> tuple[float, int]:
        """Train on one batch; return its summed loss and its number of correct predictions."""
        xb, yb = xb.to(self.device), yb.to(self.device)
        if self.adversary is not None:
            xb = self.adversary(xb, yb)
            self.model.train()  # attacks put the model in eval mode while they run
        logits = self.model(xb)
        loss = F.cross_entropy(logits, yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return loss.item() * len(xb), int((logits.argmax(1) == yb).sum().item())


def _epoch(
    step: _Step, x: Tensor, y: Tensor, order: Tensor, recipe: Recipe, of: tuple[int, int]
) -> dict[str, Any]:
    """Pass ``of[0]`` (0-based) of ``of[1]`` over the images in ``order``; mean loss, accuracy."""
    (epoch, epochs), n, size = of, len(x), recipe.batch_size
    progress = TrainingProgress(
        f"train classifier, epoch {epoch + 1}/{epochs}", math.ceil(n / size), log_every=50
    )
    loss_sum, correct = 0.0, 0
    for i in progress:
        idx = order[i * size : (i + 1) * size]
        batch_loss, batch_correct = step(x[idx], y[idx])
        loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
        progress.update(i, loss=batch_loss / len(idx))
    log.info(
        "epoch %d/%d: loss %.4f, train accuracy %.4f%s",
        epoch + 1,
        epochs,
        loss_sum / n,
        correct / n,
        " (adversarial)" if step.adversary else "",
    )
    return {"epoch": epoch + 1, "loss": loss_sum / n, "train_acc": correct / n}


@torch.inference_mode()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch: int) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i : i + batch].to(device)).argmax(1).cpu() == y[i : i + batch]).sum()
    return int(correct) / len(x)


def _pgd_accuracy(
    model: nn.Module, adversary: Attack, x: Tensor, y: Tensor, recipe: Recipe, device: torch.device
) -> dict[str, Any]:
    """PGD robust accuracy at the adversary's threat, to catch catastrophic overfitting early."""
    norm, eps = getattr(adversary, "norm", "Linf"), adversary.eps  # type: ignore[attr-defined]
    x, y = x[: recipe.eval_samples], y[: recipe.eval_samples]
    attack = PGD(model, norm=norm, eps=eps, steps=recipe.eval_steps)
    correct = 0
    for i in range(0, len(x), recipe.batch_size * 2):
        xb, yb = x[i : i + recipe.batch_size * 2].to(device), y[i : i + recipe.batch_size * 2]
        x_adv = attack(xb, yb.to(device))
        with torch.inference_mode():
            correct += int((model(x_adv).argmax(1).cpu() == yb).sum())
    return {
        "acc": correct / len(x),
        "attack": f"PGD-{recipe.eval_steps}",
        "norm": norm,
        "eps": eps,
        "n": len(x),
    }


def classifier_entry(
    arch: Callable[..., nn.Module], recipe: Recipe, seed: int, dataset: ImageDataset, root: Path
) -> Entry:
    """The cache entry of the classifier this spec trains."""
    if recipe.min_steps is not None:
        # Keyed by the training that runs: min_steps resolved into epochs, so a recipe it does
        # not change (Fashion-MNIST's 6 epochs are 2,814 steps) keeps its cached checkpoint.
        n = len(dataset.train()[1])
        n = min(n, recipe.n_train) if recipe.n_train is not None else n
        recipe = replace(recipe, epochs=recipe.epochs_for(n), min_steps=None)
    spec = {
        "kind": "classifier",
        "arch": arch,
        "recipe": recipe,
        "seed": seed,
        "dataset": dataset.identity(num_classes=True),
    }
    arch_name = getattr(arch, "func", arch).__name__
    return Entry(Path(root), f"{dataset.name}-{arch_name}", spec)


def train_or_load(
    arch: Callable[..., nn.Module],
    recipe: Recipe,
    *,
    seed: int,
    dataset: ImageDataset,
    device: torch.device,
    cache_dir: Path,
) -> tuple[nn.Module, dict[str, Any]]:
    """Return the classifier for this spec, training and caching it on first use.

    Returns:
        The model in eval mode on ``device`` and a description for the run record (cache key,
        checkpoint path, weights digest, training metrics).
    """
    c, h, _ = dataset.shape
    entry = classifier_entry(arch, recipe, seed, dataset, cache_dir)

    def build() -> nn.Module:
        # Seeded here, not only in training: the initial weights are part of what the spec fixes.
        torch.manual_seed(seeds.training(seed, seeds.Stream.DATA))
        return arch(in_channels=c, num_classes=dataset.num_classes, image_size=h)

    model, metrics = fetch(
        entry,
        build=build,
        train=lambda m: train_classifier(m, dataset, recipe, seed=seed, device=device),
        save=save_state_dict,
        load=lambda path: load_state_dict(build(), path, f"cached classifier {entry.path}"),
        what="classifier",
    )
    model.to(device).eval().requires_grad_(False)
    return model, {
        "cache_key": entry.key,
        "checkpoint": str(entry.path / WEIGHTS_NAME),
        "sha256": entry.digest(),
        "training": metrics,
    }

"""The defense contract every purifier implements.

A defense cleans an input before the classifier sees it. The harness composes
``classifier(defense.purify(x))`` and decides how that composition is differentiated (exact,
BPDA through :meth:`Defense.approx`, or a cheaper :meth:`Defense.surrogate`) and how its
randomness is averaged (EOT); the defense only declares static facts about itself in
:class:`DefenseInfo` and offers the hooks below.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DefenseInfo:
    """Static facts about a defense, read by the harness to choose a fair evaluation.

    Attributes:
        stochastic: ``purify(x)`` differs between calls for the same ``x`` (needs EOT and
            repeated evaluation).
        differentiable: autograd through ``purify`` is exact and affordable. The harness does
            not take this on trust: its diagnostics measure the gradients.
        iterative: an optimisation or sampling loop runs at inference (AutoAttack's
            ``check_dynamic`` fires; adaptive attacks are mandatory).
        paper: link to the paper (arXiv where possible), shown in the leaderboard.
        purifier_calls: forward passes of the purifier network(s) per purified image (NFE).
        vote: the deployed decision rule: ``0`` for a single purification per query, ``K > 1``
            for a majority vote over ``K`` purifications (the harness then reports ``vote@K``
            as the headline number).
    """

    stochastic: bool
    differentiable: bool
    iterative: bool = False
    paper: str = ""
    purifier_calls: int = 0
    vote: int = 0


@dataclass(frozen=True)
class PartContext:
    """What the harness hands to the factory and the training function of a trainable part.

    Learned purifiers (a conditional VAE, an inpainter, a masked autoencoder) are built by a
    factory ``arch(ctx) -> nn.Module`` and trained by ``train(net, ctx) -> metrics``; both live
    in the defense's own file and see only this context, never the harness. The harness fills
    it, caches the trained weights and hands the network to the defense.

    Attributes:
        x_train: training images, float (N, C, H, W) in [0, 1], on the CPU.
        y_train: their labels, int64 (N,).
        x_test: held-out images for a final metric (never used for training).
        y_test: their labels.
        num_classes: number of classes of the dataset.
        device: where to train.
        seed: seeds weight initialisation, data order and every random draw of training; each
            generator's seed is derived from it by :func:`common.seeds.training`.
        classifier: the frozen classifier the defense protects (``eval()``, no parameter
            requiring grad, on ``device``), for parts trained against it (CARSO's conditioning,
            AToP's and RAMRM-Pure's fine-tuning); ``None`` when the part does not use it.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    device: torch.device
    seed: int = 0
    classifier: nn.Module | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape (C, H, W)."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


class Defense(nn.Module):
    """Base class of purification defenses.

    Subclasses set the class attribute ``info`` and implement :meth:`purify`. Inputs and outputs
    are float NCHW images in [0, 1] with the same shape and device; any internal range (e.g.
    [-1, 1] for diffusion models) is converted inside ``purify`` only. Randomness enters only
    through ``generator``: with the same generator state, ``purify`` must return the same
    images. ``purify`` is never wrapped in ``torch.no_grad``: the evaluation owns the gradient
    context.

    Optional hooks, each with a neutral default:

    * :meth:`approx`: the BPDA stand-in (identity).
    * :meth:`surrogate`: a cheaper configuration of the same purifier whose gradients an
      attacker may use instead of the full chain (Lee & Kim 2023); defaults to ``purify``.
    * :meth:`predict`: the decision when it is not ``classifier(purify(x))`` (CARSO aggregates
      several decoded samples).
    * :meth:`attack_loss`: a per-image term that a defense-aware attack adds to its loss (e.g.
      minus the purifier's own reconstruction error), or ``None``; randomness from its
      ``generator``.
    * :meth:`bind`: receive the protected classifier (CARSO conditions on its activations).
    """

    info: ClassVar[DefenseInfo]

    def purify(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Return the purified images (same shape, device and range as ``x``)."""
        raise NotImplementedError

    @property
    def calls_per_purify(self) -> int:
        """Purifier network evaluations per purified image of this configured instance.

        ``info.purifier_calls`` is a static default; defenses whose cost depends on their
        arguments (steps, samples) override this, and the harness's cost accounting reads it.
        """
        return type(self).info.purifier_calls

    def approx(self, x: Tensor) -> Tensor:
        """Differentiable stand-in for ``purify`` used by BPDA (identity by default)."""
        return x

    def surrogate(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """A cheaper purifier whose gradients stand in for the full one (default: ``purify``)."""
        return self.purify(x, generator=generator)

    def predict(
        self, classifier: nn.Module, x: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Logits of the defended classifier.

        Override only when the decision is not a plain ``classifier(purify(x))``.
        """
        return classifier(self.purify(x, generator=generator))

    def attack_loss(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor | None:
        """A per-image term (shape ``(N,)``) for defense-aware attacks to maximise, or ``None``.

        The harness's attacks add ``weight * attack_loss(x)`` to their classification loss when
        configured to; a defense offers here what an adaptive attacker would exploit (e.g. the
        negative reconstruction error of a purifier that moves inputs towards its own modes).
        Randomness the term needs (CARSO's latents) comes only from ``generator``, so the same
        generator state gives the same term; a deterministic term ignores it. With
        ``generator=None`` the draws are fresh, as in :meth:`purify`.
        """
        return None

    def bind(self, classifier: nn.Module) -> None:
        """Receive the classifier this defense protects; the harness calls it before any use.

        A no-op by default. Defenses whose purifier reads the classifier (CARSO conditions its
        decoder on the classifier's activations) keep a reference here. Keep it out of the
        module tree (e.g. in a tuple), so the classifier's weights are not counted, moved or
        saved twice.
        """

    def forward(self, x: Tensor) -> Tensor:
        """Purify with fresh randomness (``nn.Module`` convenience)."""
        return self.purify(x)


def has_own_predict(defense: Defense) -> bool:
    """Whether ``defense`` overrides :meth:`Defense.predict`.

    Such a defense's decision is not a plain ``classifier(purify(x))``.
    """
    return type(defense).predict is not Defense.predict


@contextmanager
def inner_autograd(x0: Tensor) -> Iterator[tuple[Tensor, bool]]:
    """Autograd for a purifier's inner optimisation loop; yields ``(x0, exact)``.

    ``exact`` is whether somebody differentiates through ``purify`` (then the inner gradients
    must be built with ``create_graph``: a detached inner loop would silently turn an "exact"
    attack into BPDA). The inner gradients need autograd even when the evaluator purifies under
    ``no_grad`` or ``inference_mode``, whose tensors autograd refuses: inside the block ``x0`` is
    a normal tensor, detached unless ``exact``.
    """
    exact = torch.is_grad_enabled() and x0.requires_grad
    with torch.inference_mode(False), torch.enable_grad():
        if x0.is_inference():
            x0 = x0.clone()
        if not exact:
            x0 = x0.detach()
        yield x0, exact

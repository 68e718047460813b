"""Bare passes through the defended classifier: the floor the engine's attacks are timed against.

An attack step is one forward and, with a gradient, one backward pass through the view; the
passes here make exactly those, without the attack around them (:func:`bare_pass`), without
the view either (:func:`raw_pass`, as a library user writes ``classifier(purify(x))``), and
record which passes an attack made (:func:`record_calls`) so that a floor replays them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.engine.attack_view import AttackView
from bench.tools.perf.setup import Setup
from defenses.base import Defense


class Composed(nn.Module):
    """``classifier(defense.purify(x))`` as a library user writes it (noise from torch's RNG)."""

    def __init__(self, classifier: nn.Module, defense: Defense) -> None:
        super().__init__()
        self.classifier, self.defense = classifier, defense

    def forward(self, x: Tensor) -> Tensor:
        """Logits of one purification of ``x``."""
        return self.classifier(self.defense.purify(x))


def bare_pass(view: AttackView, x: Tensor, y: Tensor, *, grad: bool) -> None:
    """One pass of the view as an attack step does it, without the attack around it."""
    if not grad:
        with torch.inference_mode():
            view.sample_logits(x)
        return
    xg = x.clone().requires_grad_(True)
    logits = view.sample_logits(xg)
    if view.options.eot_reduce == "loss":
        k = logits.shape[0]
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none")
        loss = loss.view(k, -1).mean(0)
    else:
        loss = F.cross_entropy(logits.mean(0), y, reduction="none")
    torch.autograd.grad(loss.sum(), xg)


def raw_pass(setup: Setup, x: Tensor, y: Tensor, *, grad: bool, eot: int) -> None:
    """The same pass without the view: ``eot`` calls of ``classifier(defense.purify(x))``."""
    model = Composed(setup.classifier, setup.defense)
    if not grad:
        with torch.inference_mode():
            for _ in range(eot):
                model(x)
        return
    xg = x.clone().requires_grad_(True)
    logits = torch.stack([model(xg) for _ in range(eot)])
    loss = F.cross_entropy(logits.mean(0), y, reduction="sum")
    torch.autograd.grad(loss, xg)


def warm_up(setup: Setup) -> None:
    """A few passes first: thread pools, the allocator and lazy initialisation are not measured."""
    view = setup.view()
    x, y = setup.points(min(setup.batch_size, len(setup.x)))
    for _ in range(3):
        bare_pass(view, x, y, grad=True)


def record_calls(view: AttackView, run: Callable[[], Any]) -> list[tuple[int, bool]]:
    """``(images, with_grad)`` of every ``sample_logits`` call made during ``run()``."""
    calls: list[tuple[int, bool]] = []
    method = view.sample_logits

    def recording(x: Tensor) -> Tensor:
        calls.append((len(x), bool(x.requires_grad and torch.is_grad_enabled())))
        return method(x)

    view.sample_logits = recording  # type: ignore[method-assign]  # the instance shadows it
    try:
        run()
    finally:
        del view.sample_logits
    return calls

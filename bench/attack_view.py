"""The model attacks see: the classifier after the defense, as one ``nn.Module``."""

from __future__ import annotations

from torch import Tensor, nn

from defenses.base import Defense


class AttackView(nn.Module):
    """``classifier(defense.purify(x))`` as a plain module mapping images in [0, 1] to logits.

    Attacks never see the defense itself, so torchattacks and pyautoattack run on this view
    unchanged. Gradients flow exactly through ``purify`` (autograd through the whole purifier).

    Args:
        classifier: maps images in [0, 1] to logits.
        defense: the purifier applied first.
    """

    def __init__(self, classifier: nn.Module, defense: Defense) -> None:
        super().__init__()
        self.classifier = classifier
        self.defense = defense

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits of the defended classifier on ``x``."""
        return self.classifier(self.defense.purify(x))

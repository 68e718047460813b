"""Judging a defense fairly: decision rules over repeated purifications, and the suite cascade.

A stochastic defense cannot be judged on one lucky pass. Every stage of a run (the clean
images, then each attack's adversarial images) is judged with ``draws`` fresh purifications,
and the run reports one number per decision rule (DiffHammer, Wang et al., NeurIPS 2024;
Lee & Kim, ICCV 2023):

* ``single``: the first purification of every stage, what a one-pass evaluation reports;
* ``avg``: the mean over the ``draws`` repetitions of the whole one-pass evaluation (an image
  counts in repetition ``j`` if draw ``j`` is correct at every stage);
* ``worst``: an image counts only if all ``draws`` purifications are correct at every stage (the
  resubmission threat: an attacker may submit the same image several times);
* ``vote``: the majority over the first ``vote`` draws is correct at every stage (the deployed
  rule of defenses that vote).

For a deterministic defense every rule equals ``single`` and one draw suffices. ``worst`` is
never above ``avg``, ``single`` or ``vote`` for the same images. Success is judged on the point
an attack returns ("evaluate after"), or, with ``success_at: any``, also counts an attack's own
observation of a fooled iterate ("evaluate while"), where the attack reports one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.engine.attack_view import AttackView
from bench.engine.stats import Tally

RULES = ("single", "avg", "worst", "vote")
SUCCESS_AT = ("final", "any")


@dataclass
class Stage:
    """What one stage (clean, or one attack) did to the evaluation subset.

    Attributes:
        name: ``clean`` or the attack's name.
        correct: per draw and image, whether the judged prediction was right, ``(draws, n)``;
            images the stage did not look at (already broken under every rule) are ``False``.
        vote_correct: per image, whether the majority vote was right, ``(n,)``.
        attacked: per image, whether the stage looked at it, ``(n,)``.
        predictions: the first draw's predicted class per image (``-1`` where not attacked).
    """

    name: str
    correct: Tensor
    vote_correct: Tensor
    attacked: Tensor
    predictions: Tensor


def majority(preds: Tensor, k: int) -> Tensor:
    """Majority vote over the first ``k`` rows of ``preds`` ``(draws, n)`` (ties: lowest class)."""
    return torch.mode(preds[:k], dim=0).values


@dataclass
class Ledger:
    """Per-image outcomes of every stage so far, and the decision rules over them.

    Args:
        labels: the true classes, ``(n,)``.
        draws: purifications per judged image.
        vote: ``K`` of the majority-vote rule (at most ``draws``).
    """

    labels: Tensor
    draws: int
    vote: int
    stages: list[Stage] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Images in the evaluation subset."""
        return len(self.labels)

    def add(
        self, name: str, preds: Tensor, attacked: Tensor, broken_on_path: Tensor | None = None
    ) -> Stage:
        """Record a stage from the judged predictions ``(draws, n_attacked)``.

        Args:
            name: the stage's name.
            preds: predicted classes for the attacked images, one row per draw.
            attacked: boolean mask ``(n,)`` of the images the stage looked at.
            broken_on_path: for ``success_at: any``, images (among the attacked, in order) that
                the attack saw fooled at some iterate; they count as broken under every rule.
        """
        y = self.labels[attacked]
        correct = torch.zeros(self.draws, self.n, dtype=torch.bool)
        vote_correct = torch.zeros(self.n, dtype=torch.bool)
        first = torch.full((self.n,), -1, dtype=torch.long)
        if len(y):
            ok = preds == y
            vote_ok = majority(preds, self.vote) == y
            if broken_on_path is not None:
                ok &= ~broken_on_path
                vote_ok &= ~broken_on_path
            correct[:, attacked] = ok
            vote_correct[attacked] = vote_ok
            first[attacked] = preds[0]
        stage = Stage(name, correct, vote_correct, attacked.clone(), first)
        self.stages.append(stage)
        return stage

    def _flags(self, stages: list[Stage]) -> dict[str, Tensor]:
        alive = torch.ones(self.draws, self.n, dtype=torch.bool)
        vote = torch.ones(self.n, dtype=torch.bool)
        for s in stages:
            # An image a stage did not look at keeps what the other stages say: it was broken
            # already, or the attack ran on a capped slice (``max_images``) without it.
            alive &= s.correct | ~s.attacked
            vote &= s.vote_correct | ~s.attacked
        return {
            "single": alive[0],
            "avg": alive.float().mean(0),
            "worst": alive.all(0),
            "vote": vote,
        }

    def flags(self, names: list[str] | None = None) -> dict[str, Tensor]:
        """Per-image value of every rule over the named stages (all stages when ``None``).

        ``single``, ``worst`` and ``vote`` are booleans; ``avg`` is the fraction of draws in
        which the image survived every stage.
        """
        stages = self.stages if names is None else [s for s in self.stages if s.name in names]
        return self._flags(stages)

    def alive(self, names: list[str] | None = None) -> Tensor:
        """Images still robust under at least one rule over the named stages (all: ``None``).

        Over all stages, the images later attacks of a cascade must look at.
        """
        f = self.flags(names)
        return (f["avg"] > 0) | f["vote"]

    def tallies(self, names: list[str] | None = None) -> dict[str, Tally]:
        """The count of images under every rule over the named stages (all when ``None``).

        ``avg`` is a mean of per-image fractions, so its count is fractional.
        """
        return {
            rule: Tally(correct=flag.float().sum().item(), n=self.n)
            for rule, flag in self.flags(names).items()
        }

    def per_sample(self, indices: Tensor, headline: str) -> dict[str, list]:
        """The per-image table: one column per fact, one row per image.

        Label, clean prediction, every stage's outcome (first draw, and for repeated judging the
        correct draws and the vote), and the final outcome under every rule and the headline.
        """
        clean = self.stages[0]
        table: dict[str, list] = {
            "index": indices.tolist(),
            "label": self.labels.tolist(),
            "clean_pred": clean.predictions.tolist(),
        }
        for stage in self.stages:
            table[f"{stage.name}_correct"] = stage.correct[0].tolist()
            if self.draws > 1:
                table[f"{stage.name}_draws_correct"] = stage.correct.sum(0).tolist()
                table[f"{stage.name}_vote_correct"] = stage.vote_correct.tolist()
        flags = self.flags()
        for rule in RULES:
            if self.draws > 1 or rule == "single":
                table[f"robust_{rule}"] = flags[rule].tolist()
        table["robust"] = flags[headline].tolist()
        return table


class Judge:
    """Judges images with fresh purifications drawn from the evaluation's own seed stream.

    The evaluator's randomness is separate from every attacker's: its seed stream starts from
    ``seed`` and no attack view shares it (Athalye et al.'s white-box attacker does not know the
    test-time seed).

    Args:
        view: a view of the defended classifier (exact mode, one EOT sample) seeded with the
            evaluation seed.
        draws: purifications per image.
        batch_size: images per forward.
    """

    def __init__(self, view: AttackView, *, draws: int, batch_size: int) -> None:
        self.view, self.draws, self.batch_size = view, draws, batch_size

    @torch.inference_mode()
    def predictions(self, x: Tensor, device: torch.device) -> Tensor:
        """Predicted classes ``(draws, n)`` for images ``x`` (any device; result on CPU)."""
        rows = []
        for _ in range(self.draws):
            row = [
                self.view(x[i : i + self.batch_size].to(device)).argmax(1).cpu()
                for i in range(0, len(x), self.batch_size)
            ]
            rows.append(torch.cat(row) if row else torch.empty(0, dtype=torch.long))
        return torch.stack(rows)


@torch.inference_mode()
def locked_predictions(view: AttackView, x: Tensor, draws: int) -> Tensor:
    """Known randomness: each judged draw purifies once with one of the attacker's known seeds.

    The defense is deployed with one purification per query; the attacker knows the seeds the
    evaluator will use (the view's ``known_seeds``, cycled over the ``draws``) and optimised
    the average over them. Judging the average instead would judge a smoother model than the
    one deployed.
    """
    seeds = view.known_seeds
    rows = [view.logits_for_seed(x, seeds[d % len(seeds)]).argmax(1).cpu() for d in range(draws)]
    return torch.stack(rows)

"""One attack of the suite: its batches, each attacked, checked against the threat and judged.

Every batch reseeds every stream it draws from (the attack's random starts, its view's
purifications, the judge's fresh purifications) from the batch's position alone
(:func:`common.seeds.batch`), so a resumed run that takes finished batches from its checkpoint
ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attacks.base import Attack, report
from bench.engine.attack_view import AttackView, PassCounter
from bench.engine.decision import Judge, locked_predictions
from bench.engine.resume import BatchResult, ResumeState
from bench.engine.threat import check_threat
from common import seeds

log = logging.getLogger(__name__)

# Adversarial images kept per attack for the dashboard's image grid.
GRID_IMAGES = 8

# The view's counts, summed over batches (older resume checkpoints lack the gradient ones).
PASS_KEYS = tuple(f.name for f in fields(PassCounter))


def gradient_failures(passes: Mapping[str, int]) -> dict[str, int]:
    """``AttackStats.gradient_failures`` from a view's (summed) pass counts."""
    return {
        "missing": passes.get("grad_missing", 0),
        "zero": passes.get("grad_zero", 0),
        "nonfinite": passes.get("grad_nonfinite", 0),
        "gradients": passes.get("gradients", 0),
    }


def gradient_warnings(passes: Mapping[str, int]) -> list[str]:
    """Warnings for the gradient failures the view saw, in words that carry no counts.

    Without counts, each message stays the same across batches and is kept once; the numbers
    are in ``gradient_failures``.
    """
    failures = gradient_failures(passes)
    out = []
    if failures["missing"]:
        out.append(
            "gradients unavailable: the defended classifier's autograd graph does not reach the "
            "input (cut); the view gave the attack gradients of 0 there (see gradient_failures)"
        )
    if failures["nonfinite"]:
        out.append(
            "non-finite input gradients (NaN or inf): the view set those entries to 0 "
            "(see gradient_failures)"
        )
    return out


@dataclass(frozen=True)
class AttackSeeds:
    """The three streams of the ``k``-th attack of a run seeded ``seed``.

    Attributes:
        attack: its own randomness (random starts).
        view: the purifications its view draws while it attacks.
        judge: the fresh purifications that judge its images.
    """

    attack: int
    view: int
    judge: int

    @classmethod
    def of(cls, seed: int, k: int) -> AttackSeeds:
        """The seeds of attack ``k`` (see :mod:`common.seeds`)."""
        return cls(seeds.attack(seed, k), seeds.attack_view(seed, k), seeds.judge(seed, k))


@dataclass
class AttackRun:
    """What one attack needs besides its images: itself, its view, the judge and the budget.

    Attributes:
        name: the attack's name in the suite.
        attack: the attack, bound to ``view``.
        view: the attack's view of the defended classifier.
        judge: judges adversarial images with the evaluator's fresh purifications.
        seeds: the attack's seed streams.
        norm: the threat norm; eps: the threat budget.
        draws: judging draws per image.
        batch_size: images per batch.
        track_path: keep the images the attack saw fooled (``success_at: any``).
    """

    name: str
    attack: Attack
    view: AttackView
    judge: Judge
    seeds: AttackSeeds
    norm: str
    eps: float
    draws: int
    batch_size: int
    track_path: bool

    def batch(self, b: int, xb: Tensor, yb: Tensor) -> BatchResult:
        """Attack one batch, check it against the threat model and judge it."""
        start = time.perf_counter()
        # torchattacks draws random starts from torch's global generator: seeded per batch, so
        # a run is reproducible, independent of attack order, and resumable batch by batch.
        torch.manual_seed(seeds.batch(self.seeds.attack, b))
        self.view.reseed(seeds.batch(self.seeds.view, b))
        self.judge.view.reseed(seeds.batch(self.seeds.judge, b))
        self.view.counter.reset()
        self.judge.view.counter.reset()
        # The threat check compares with a copy: an attack that writes into its input would
        # otherwise be measured against the very tensor it moved.
        clean = xb.clone()
        x_adv = self.attack(xb, yb).detach()
        # Read at once: a flow threat's check needs the flow the attack reports (attack.flow).
        said = report(self.attack, len(xb))
        worst = check_threat(clean, x_adv, self.norm, self.eps, self.name, flow=said.flow)
        known = self.view.options.randomness == "known"
        # Known randomness: the batch the attack saw is judged with the noise it was given.
        if known:
            preds = locked_predictions(self.view, x_adv, self.draws)
        else:
            preds = self.judge.predictions(x_adv, xb.device)
        believed = None
        # What the attack's own view believes, to measure transfer failure (approximate
        # gradients) and to confirm that locked noise judges exactly as the attacker saw.
        if self.view.options.grad != "exact" or known:
            with torch.inference_mode():
                believed = self.view(x_adv).argmax(1).cpu()
        passes = self.view.counter.snapshot()
        return BatchResult(
            preds=preds,
            worst=worst,
            passes=passes,
            judge_purify=self.judge.view.counter.purify,
            wall_s=time.perf_counter() - start,
            warnings=[*said.warnings, *gradient_warnings(passes)],
            believed=believed,
            on_path=said.fooled_any if self.track_path else None,
            examples=x_adv[:GRID_IMAGES].cpu() if b == 0 else None,
        )

    def run(
        self, x: Tensor, y: Tensor, device: torch.device, state: ResumeState
    ) -> list[BatchResult]:
        """Every batch of ``x``: finished ones from ``state``, the rest attacked and saved."""
        done = state.done(self.name)
        out: list[BatchResult] = []
        starts = range(0, len(x), self.batch_size)
        clock, ran = time.perf_counter(), 0
        for b, i in enumerate(tqdm(starts, desc=self.name, leave=False, disable=None)):
            if b not in done:
                xb = x[i : i + self.batch_size].to(device)
                state.save_batch(
                    self.name, b, self.batch(b, xb, y[i : i + self.batch_size].to(device))
                )
                ran += 1
            out.append(done[b])
            self._progress(out, y, ran, time.perf_counter() - clock, len(starts))
        return out

    def _progress(
        self, out: list[BatchResult], y: Tensor, ran: int, seconds: float, batches: int
    ) -> None:
        """One line per batch: images done, the share judged correct so far, time left."""
        n, correct = 0, 0.0
        for o in out:  # batches hold consecutive images of ``y``
            k = o.preds.shape[1]
            correct += float((o.preds == y[n : n + k]).float().mean(0).sum())
            n += k
        left = seconds / ran * (batches - len(out)) if ran else 0.0
        log.info(
            "%s: batch %d/%d, %d of %d images attacked, %.1f still robust (avg over draws), "
            "%.0f s, about %.0f s left",
            self.name,
            len(out),
            batches,
            n,
            len(y),
            correct,
            seconds,
            left,
        )


@dataclass
class AttackTotals:
    """One attack's batches, put together.

    Attributes:
        preds: judged classes ``(draws, n_attacked)``.
        worst: the largest perturbation over all batches.
        warnings: the attack's warnings, each once.
        believed: the view's own predictions (approximate-gradient attacks), or ``None``.
        on_path: images seen fooled at some iterate, or ``None``.
        passes: summed pass and gradient counts of the attack's view.
        judge_purify: purifications spent judging.
        wall_s: seconds in all batches.
        examples: the first adversarial images, or ``None``.
    """

    preds: Tensor
    worst: float
    warnings: list[str]
    believed: Tensor | None
    on_path: Tensor | None
    passes: dict[str, int]
    judge_purify: int
    wall_s: float
    examples: Tensor | None

    @classmethod
    def of(cls, batches: list[BatchResult], draws: int) -> AttackTotals:
        """Concatenate the batches' outcomes and sum their costs."""

        def cat(parts: list[Tensor | None], dim: int = 0) -> Tensor | None:
            return torch.cat(parts, dim) if parts and all(p is not None for p in parts) else None

        preds = cat([o.preds for o in batches], 1)
        return cls(
            preds=preds if preds is not None else torch.empty(draws, 0, dtype=torch.long),
            worst=max((o.worst for o in batches), default=0.0),
            warnings=list(dict.fromkeys(w for o in batches for w in o.warnings)),
            believed=cat([o.believed for o in batches]),
            on_path=cat([o.on_path for o in batches]),
            passes={k: sum(o.passes.get(k, 0) for o in batches) for k in PASS_KEYS},
            judge_purify=sum(o.judge_purify for o in batches),
            wall_s=sum(o.wall_s for o in batches),
            examples=batches[0].examples if batches else None,
        )

    @property
    def gradient_failures(self) -> dict[str, int]:
        """Failed input gradients of the attack's view (``AttackStats.gradient_failures``)."""
        return gradient_failures(self.passes)

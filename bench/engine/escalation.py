"""Convergence-driven budgets: attack the survivors harder until the number stops moving.

A suite's robust accuracy is an upper bound that a stronger attack may lower; a fixed budget
never says how loose it is. After the suite (level 0) the runner escalates the suite's lead
white-box attack (the harness's PGD with exact gradients and fresh noise where the suite has
one) on the images that survived every white-box stage, one level at a time:

* level ``L`` runs ``steps * steps_factor**L`` steps, ``eot * eot_factor**L`` EOT samples for a
  stochastic defense (a deterministic one keeps one), and ``restarts + L`` restarts cycling the
  suite's losses and then the ones in ``losses`` (a restart with another loss only attacks the
  points the earlier ones left unbroken);
* the step size is re-derived for every level (PGD's ``2.5 * eps / steps``), so no level stops
  short of the threat's boundary;
* with ``probe`` set, a level first attacks a random sample of that many survivors. When the
  images it breaks, projected onto the survivors it did not attack, would still leave the
  change within the tolerance, the level stops there: the row has converged and the record
  keeps the projection (the images a full level would be expected to break on top). Otherwise
  the level attacks the rest too (stage ``escalate@L+``). On a stochastic defense at a few
  hundred images most survivors stay robust at every level, so the probe saves most of a
  level's cost where the number has already stopped moving.

The evaluation has **converged** at level ``L`` when the headline accuracy (the per-sample worst
case over every stage so far) fell by at most the tolerance from level ``L - 1`` to ``L``: by
default the larger of one image and one standard error of the accuracy (Wilson-free
``sqrt(p (1 - p) / n)`` at level ``L - 1``). It is **bound** when it was still falling at the
last level allowed, or when the next level would exceed the per-row cap on purifier calls per
image: the row is an upper bound and says so. Which checks make a row **failed** is
:mod:`bench.engine.diagnostics`' business; :func:`state` puts the two together.

Why the white-box survivors and not the images still robust: an image only a black-box or
transfer attack broke is exactly where a stronger white-box attack must be tried before the
diagnostics call it gradient masking (``blackbox_beats_whitebox``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from common.checks import flag, known_keys, optional_positive_int, positive_int, real
from common.errors import ConfigError

# Prefix of an escalation level's stage name: ``escalate@1``, ``escalate@2``, ...
STAGE = "escalate@"
STATES = ("converged", "bound", "failed", "not run")


@dataclass(frozen=True)
class EscalationConfig:
    """``escalation:`` of ``conf/eval.yaml``.

    Attributes:
        enabled: escalate at all (off: the suite's number, its verdict from the checks alone).
        max_levels: escalation levels after the suite.
        calls_cap: purifications per image of the subset the whole row may spend (clean
            judging, suite, levels); ``None``: no cap.
        tolerance: the accuracy change (a fraction) two successive levels may differ by and
            count as converged; ``None``: the larger of one image and one standard error.
        steps_factor: steps multiply by this per level.
        eot_factor: EOT samples multiply by this per level (stochastic defenses only).
        losses: losses the added restarts cycle through after the lead attack's own.
        probe: survivors a level attacks first (a seeded random sample); ``None``: all.
    """

    enabled: bool = True
    max_levels: int = 3
    calls_cap: int | None = None
    tolerance: float | None = None
    steps_factor: int = 2
    eot_factor: int = 2
    losses: tuple[str, ...] = ("ce", "margin", "dlr")
    probe: int | None = None

    @classmethod
    def from_cfg(cls, node: DictConfig | Mapping[str, Any] | None) -> EscalationConfig:
        """Build from the config node, naming any bad key or value."""
        if node is None:
            return cls()
        data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        known_keys("escalation options", data, cls.__dataclass_fields__)
        out = cls(**{**data, "losses": tuple(data.get("losses", cls.losses))})
        flag("escalation.enabled", out.enabled)
        positive_int("escalation.max_levels", out.max_levels)
        optional_positive_int("escalation.calls_cap", out.calls_cap)
        optional_positive_int("escalation.probe", out.probe)
        for key in ("steps_factor", "eot_factor"):
            positive_int(f"escalation.{key}", getattr(out, key))
        if out.tolerance is not None:
            real("escalation.tolerance", out.tolerance, "in [0, 1)", lambda v: 0 <= v < 1)
        allowed_losses = ("ce", "margin", "dlr")
        if not out.losses or any(loss not in allowed_losses for loss in out.losses):
            raise ConfigError(
                f"escalation.losses={list(out.losses)} must be a non-empty list of {allowed_losses}"
            )
        return out


@dataclass(frozen=True)
class Budget:
    """One level's budget of the lead attack.

    Attributes:
        steps: PGD steps per restart.
        eot_samples: purifications per forward of its view.
        restarts: runs; restart ``r`` uses ``losses[r % len(losses)]``.
        losses: the loss cycle.
    """

    steps: int
    eot_samples: int
    restarts: int
    losses: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the record."""
        return {
            "steps": self.steps,
            "eot_samples": self.eot_samples,
            "restarts": self.restarts,
            "loss": list(self.losses),
        }


def base_budget(keywords: Mapping[str, Any], eot_samples: int) -> Budget:
    """The lead attack's budget as the suite configured it (level 0)."""
    loss = keywords.get("loss", "ce")
    losses = (loss,) if isinstance(loss, str) else tuple(loss)
    return Budget(
        steps=int(keywords.get("steps", 50)),
        eot_samples=eot_samples,
        restarts=int(keywords.get("restarts", 1)),
        losses=losses,
    )


def level_budget(
    base: Budget, level: int, cfg: EscalationConfig, *, stochastic: bool, num_classes: int
) -> Budget:
    """The budget of escalation level ``level`` (``0`` is the suite's own)."""
    extra = [loss for loss in cfg.losses if loss not in base.losses]
    if num_classes < 3:  # DLR's denominator needs a third logit
        extra = [loss for loss in extra if loss != "dlr"]
    restarts = base.restarts + level
    # The suite's losses for its own restarts, then each added restart takes another loss.
    cycle = list(base.losses) * math.ceil(base.restarts / len(base.losses))
    losses = (cycle[: base.restarts] + (extra or list(base.losses)) * level)[:restarts]
    return Budget(
        steps=base.steps * cfg.steps_factor**level,
        eot_samples=base.eot_samples * (cfg.eot_factor**level if stochastic else 1),
        restarts=restarts,
        losses=tuple(losses),
    )


def escalated_partial(make: functools.partial, budget: Budget) -> functools.partial:
    """The lead attack's partial at ``budget``; its step size re-derived from the steps."""
    keywords = {
        **make.keywords,
        "steps": budget.steps,
        "restarts": budget.restarts,
        "loss": list(budget.losses),
        "step_size": None,
        "rel_stepsize": None,
        "random_start": True,
    }
    return functools.partial(make.func, *make.args, **keywords)


def tolerance(cfg: EscalationConfig, accuracy: float, n: int) -> float:
    """The change two levels may differ by and count as converged."""
    if cfg.tolerance is not None:
        return cfg.tolerance
    p = min(max(accuracy, 0.0), 1.0)
    return max(1 / max(n, 1), math.sqrt(p * (1 - p) / max(n, 1)))


@dataclass
class Level:
    """What one level did: its budget, what it attacked and cost, the accuracies it left.

    Attributes:
        level: ``0`` (the suite) or the escalation level.
        budget: the lead attack's budget at this level.
        attacked: images this level attacked.
        purifications: purifications this level spent (its judging included).
        wall_s: seconds it took.
        rules: accuracy (a fraction) under every decision rule after this level.
        probe: when the level stopped at its probe: survivors, probed, broken among the probed
            and the images projected to fall among the rest; ``None`` otherwise.
    """

    level: int
    budget: dict[str, Any]
    attacked: int
    purifications: int
    wall_s: float
    rules: dict[str, float]
    probe: dict[str, float] | None = None

    def to_dict(self, n: int) -> dict[str, Any]:
        """Plain data for the record (``purifier_calls_per_image`` over the subset)."""
        return {
            "level": self.level,
            "budget": self.budget,
            "attacked": self.attacked,
            "purifications_per_image": self.purifications / max(n, 1),
            "wall_s": self.wall_s,
            "rules": self.rules,
            "probe": self.probe,
        }


@dataclass
class Escalation:
    """The escalation so far and the decision it reached.

    Attributes:
        lead: the suite attack that escalates (``None``: the harness's default PGD).
        headline: the decision rule the convergence is judged on.
        n: images of the subset.
        levels: every level run, in order.
        state: ``converged``, ``bound`` or ``not run`` (a failed check is decided elsewhere).
        reason: one sentence on why the escalation stopped.
        tolerances: the tolerance each comparison used.
    """

    lead: str | None
    headline: str
    n: int
    levels: list[Level] = field(default_factory=list)
    state: str = "not run"
    reason: str = "the suite was not escalated"
    tolerances: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Headline accuracy after the last level."""
        return self.levels[-1].rules[self.headline]

    def converged(self, cfg: EscalationConfig, projected: float = 0.0) -> bool:
        """Whether the last two levels differ by at most the tolerance (sets the state).

        ``projected`` adds the images a probe projects the unattacked survivors would lose.
        """
        if len(self.levels) < 2:
            return False
        before, after = self.levels[-2].rules[self.headline], self.accuracy
        change = before - after + projected / max(self.n, 1)
        tol = tolerance(cfg, before, self.n)
        self.tolerances.append(tol)
        if change <= tol:
            self.state = "converged"
            self.reason = (
                f"level {self.levels[-1].level} changed the {self.headline} accuracy by "
                f"{100 * change:.2f} points (tolerance {100 * tol:.2f})"
            )
            if projected:
                self.reason += f", {projected:.1f} images of it projected from a probe"
            return True
        return False

    def bound(self, why: str) -> None:
        """Stop without convergence: the number is an upper bound."""
        self.state = "bound"
        level = self.levels[-1].level
        done = "not escalated past the suite" if level == 0 else f"still falling at level {level}"
        self.reason = f"{done} ({100 * self.accuracy:.2f}% {self.headline}): {why}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the record."""
        return {
            "state": self.state,
            "level": self.levels[-1].level if self.levels else None,
            "reason": self.reason,
            "lead": self.lead,
            "headline": self.headline,
            "tolerances": self.tolerances,
            "levels": [lv.to_dict(self.n) for lv in self.levels],
        }


def projection(probed: int, broken: int, rest: int) -> float:
    """Images a full level is expected to break among ``rest`` unattacked survivors.

    The probe is a random sample of the survivors, so its break rate estimates theirs.
    """
    return broken / max(probed, 1) * rest


def probe_sample(mask: Tensor, size: int, seed: int) -> Tensor:
    """A seeded random ``size`` of the images ``mask`` marks, as a mask of the same shape."""
    where = mask.nonzero().squeeze(1)
    order = torch.randperm(len(where), generator=torch.Generator().manual_seed(seed))
    return torch.zeros_like(mask).index_fill_(0, where[order[:size]], True)


def estimate(budget: Budget, targets: int, draws: int) -> int:
    """Purifications a level at ``budget`` spends on ``targets`` images, at most.

    Every restart runs every step on every image (early stops and restarts on the unbroken
    points only make it cheaper), plus the judging draws.
    """
    return targets * ((budget.steps + 1) * budget.eot_samples * budget.restarts + draws)


def state(path: Mapping[str, Any] | None, failed: Sequence[str], soft: Sequence[str]) -> str:
    """The row's state from its escalation and its failed checks.

    ``failed`` are checks that mean the evaluation is broken; ``soft`` are failed checks that
    only say the number is loose (``unstable_predictions``): they make a row ``bound``, as an
    escalation that was not run or ran out of budget does.
    """
    if failed:
        return "failed"
    # Without escalation (escalation.enabled=false) nobody asked whether the number had
    # stopped moving: it is an upper bound.
    escalation = (path or {}).get("state", "bound")
    if soft or escalation != "converged":
        return "bound"
    return "converged"

"""The runner: a planned evaluation, stage by stage, into an :class:`Outcome`.

1. **setup**: the evaluation subset, the classifier and the defense's parts are loaded, or
   trained and cached (the only heavy work a bad config never reaches);
2. **clean**: every image judged with ``draws`` fresh purifications;
3. **attacks**: each attack of the suite on the images still robust (a cascade) or on every
   clean-correct one, batch by batch, each batch checked against the threat and judged;
4. **escalation**: the lead white-box attack again on the white-box survivors, with a larger
   budget per level, until the headline accuracy stops moving (:mod:`bench.engine.escalation`);
5. **summary**: robust counts under every rule, cost, the per-image table;
6. **diagnostics**: the checks that say whether the evaluation can be trusted, and the row's
   state (``converged``, ``bound`` or ``failed``).

The outcome is filled as the stages go, so a run that fails midway still reports what it did.
The runner counts; turning counts into accuracies and records is :mod:`bench.reporting`'s job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.devices import peak_memory_mb, reset_peak_memory
from bench.engine.attack_view import AttackView, ViewOptions
from bench.engine.attacking import GRID_IMAGES, AttackRun, AttackSeeds, AttackTotals
from bench.engine.decision import Judge, Ledger
from bench.engine.diagnostics import SOFT_CHECKS, DiagnosisInput, diagnose, failed_checks
from bench.engine.escalation import (
    STAGE,
    Budget,
    Escalation,
    Level,
    escalated_partial,
    estimate,
    level_budget,
    probe_sample,
    projection,
    tolerance,
)
from bench.engine.escalation import state as row_state
from bench.engine.plan import AttackPlan, Plan
from bench.engine.resume import ResumeState
from bench.engine.stats import AttackStats, Tally
from bench.models.parts import prepare_parts
from common import seeds

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a run measured so far (filled stage by stage).

    Attributes:
        classifier_info: the classifier source's facts (cache key, digest, training metrics).
        defense_parts: the facts of every trained or loaded part of the defense.
        clean: the clean count under every rule.
        attacks: per attack, what it did and the counts under every rule over the clean stage
            and the attacks up to it.
        robust: the count under every rule over every stage (``None`` for a clean-only suite).
        diagnostics: the checks and the probe's description.
        escalation: the escalation path (:meth:`Escalation.to_dict`), empty when not run.
        verdict: ``converged``, ``bound``, the failed checks (``failed``), or ``not run``.
        cost: ``setup_s``, purifier calls per image, peak memory.
        per_sample: one column per fact, one row per image.
        examples: a few images per stage for the dashboard.
    """

    classifier_info: dict[str, Any] = field(default_factory=dict)
    defense_parts: list[dict[str, Any]] = field(default_factory=list)
    clean: dict[str, Tally] | None = None
    attacks: dict[str, tuple[AttackStats, dict[str, Tally]]] = field(default_factory=dict)
    robust: dict[str, Tally] | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    escalation: dict[str, Any] = field(default_factory=dict)
    verdict: str | list[str] = "not run"
    cost: dict[str, Any] = field(default_factory=dict)
    per_sample: dict[str, list] | None = None
    examples: dict[str, Tensor] = field(default_factory=dict)


class Runner:
    """Runs a :class:`~bench.engine.plan.Plan`; :meth:`run` fills and returns its outcome.

    Args:
        plan: the validated plan.
        resume: the file of this configuration's per-batch checkpoint.
        keep_examples: keep a few clean, adversarial and purified images (for a dashboard).
        start: ``time.perf_counter()`` at the run's start (setup time counts from there).
    """

    def __init__(self, plan: Plan, resume: Path, *, keep_examples: bool, start: float) -> None:
        self.plan, self.keep_examples, self.start = plan, keep_examples, start
        self.outcome = Outcome()
        self.state = ResumeState(resume, plan.fingerprint, (plan.decision.draws, len(plan.indices)))
        self.phase_peaks: list[float] = []
        self.total_purify = 0
        self.path: Escalation | None = None
        self.views: dict[str, ViewOptions] = {}  # every stage's view, escalation levels too

    def run(self) -> Outcome:
        """Every stage in order; the outcome is complete when this returns."""
        self.setup()
        self.judge_clean()
        clock = time.perf_counter()
        for k, (name, spec) in enumerate(self.plan.attacks.items()):
            self.attack(k, name, spec)
        self.outcome.cost["attacks_s"] = time.perf_counter() - clock
        if self.plan.lead is not None:
            clock = time.perf_counter()
            self.escalate()
            self.outcome.cost["escalation_s"] = time.perf_counter() - clock
        self.summarize()
        if self.plan.diagnostics.enabled and self.plan.attacks:
            clock = time.perf_counter()
            self.diagnose()
            self.outcome.cost["diagnostics_s"] = time.perf_counter() - clock
        elif self.path is not None:
            self.outcome.verdict = self.path.state
        return self.outcome

    def clear(self) -> None:
        """Delete the resume checkpoint (call only once the run's record is written)."""
        self.state.clear()

    # -- stages ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the subset, the classifier and the defense's parts (training what is missing)."""
        p = self.plan
        cpu = time.process_time()
        # Only the evaluated images are read: ImageNet's test split does not fit in memory.
        self.x, self.y = p.dataset.subset(p.indices)
        self.classifier: nn.Module = p.classifier.load(p.dataset, p.device)
        self.outcome.classifier_info = p.classifier.describe()
        # The defense's generative parts are trained or loaded now, after every check passed.
        self.outcome.defense_parts = prepare_parts(
            p.defense,
            p.dataset,
            p.device,
            classifier=self.classifier,
            classifier_info=self.outcome.classifier_info,
        )
        self.outcome.cost["setup_s"] = time.perf_counter() - self.start
        # This process's CPU time for the same work (make perf's CPU clock subtracts it).
        self.outcome.cost["setup_cpu_s"] = time.process_time() - cpu
        self.defense = p.defense.to(p.device).eval()
        eval_view = self._view(
            ViewOptions(eot_samples=1, allow_masked=True), seeds.evaluation(p.seed)
        )
        self.judge = Judge(eval_view, draws=p.decision.draws, batch_size=p.batch_size)
        self.ledger = Ledger(self.y, p.decision.draws, p.decision.vote)
        reset_peak_memory(p.device)

    def judge_clean(self) -> None:
        """Judge every clean image ``draws`` times (or take the judgement from the checkpoint)."""
        p, state = self.plan, self.state
        clock = time.perf_counter()
        self.judge.view.stage = "clean judging"
        if state.clean is None:
            self.judge.view.reseed(seeds.evaluation(p.seed))
            state.save_clean(self.judge.predictions(self.x, p.device))
        self.outcome.cost["clean_s"] = time.perf_counter() - clock
        attacked = torch.ones(len(self.y), dtype=torch.bool)
        self.clean_stage = self.ledger.add("clean", state.clean, attacked)
        self.outcome.clean = self.ledger.tallies(["clean"])
        self.clean_only = self.ledger.alive()
        headline = self.outcome.clean[p.decision.headline]
        log.info(
            "clean accuracy %.2f%% (%s) on %d images",
            100 * headline.correct / headline.n,
            p.decision.headline,
            len(self.y),
        )
        # Clean judging purifies every image `draws` times (counted even when resumed).
        self.total_purify = len(self.y) * p.decision.draws
        self.outcome.examples["clean"] = self.x[:GRID_IMAGES].clone()

    def attack(
        self, k: int, name: str, spec: AttackPlan, mask: Tensor | None = None
    ) -> AttackStats:
        """Run attack ``k`` on the images it must see, judge them, and record its outcome.

        ``mask`` overrides which images it attacks (the escalation's white-box survivors).
        """
        p = self.plan
        attack_seeds = AttackSeeds.of(p.seed, k)
        view = self._view(spec.view, attack_seeds.view).eval()
        view.stage = f"attack {name!r}"
        self.judge.view.stage = f"judging attack {name!r}"
        if mask is None:
            mask = self.ledger.alive() if p.cascade else self.clean_only
        if spec.max_images is not None and int(mask.sum()) > spec.max_images:
            keep = mask.nonzero().squeeze(1)[: spec.max_images]
            mask = torch.zeros_like(mask).index_fill_(0, keep, True)
        targets = mask.nonzero().squeeze(1)
        run = AttackRun(
            name=name,
            attack=spec.make(model=view),
            view=view,
            judge=self.judge,
            seeds=attack_seeds,
            norm=p.norm,
            eps=p.eps,
            draws=p.decision.draws,
            batch_size=p.batch_size,
            track_path=p.decision.success_at == "any",
        )
        self.phase_peaks.append(peak_memory_mb(p.device))
        reset_peak_memory(p.device)
        batches = run.run(self.x[targets], self.y[targets], p.device, self.state)
        totals = AttackTotals.of(batches, p.decision.draws)
        self._keep_examples(name, totals)
        self.ledger.add(name, totals.preds, mask, totals.on_path)
        # After this attack: cumulative over every stage so far in a cascade and in the
        # escalation (which attack survivors), this attack alone on the clean-correct otherwise.
        cumulative = p.cascade or name.startswith(STAGE)
        tallies = self.ledger.tallies(None if cumulative else ["clean", name])
        stats = self._stats(spec, view, targets, totals)
        self.total_purify += totals.passes["purify"] + totals.judge_purify
        self.outcome.attacks[name] = (stats, tallies)
        self.views[name] = view.options
        head = tallies[p.decision.headline]
        log.info(
            "%s: robust accuracy %.2f%% (%s, %.0f s)",
            name,
            100 * head.correct / head.n,
            p.decision.headline,
            totals.wall_s,
        )
        for w in totals.warnings:
            log.warning("%s: %s", name, w)
        return stats

    def escalate(self) -> None:
        """Strengthen the lead attack on the white-box survivors until the number stops moving."""
        p, cfg, lead = self.plan, self.plan.escalation, self.plan.lead
        assert lead is not None
        n = len(self.y)
        path = self.path = Escalation(lead.name, p.decision.headline, n)
        suite_s = sum(stats.wall_s for stats, _ in self.outcome.attacks.values())
        path.levels.append(
            Level(0, lead.base.to_dict(), n, self.total_purify, suite_s, self._rules())
        )
        stochastic = type(self.defense).info.stochastic
        for level in range(1, cfg.max_levels + 1):
            mask = self._white_survivors()
            budget = level_budget(
                lead.base, level, cfg, stochastic=stochastic, num_classes=p.dataset.num_classes
            )
            if not mask.any():
                path.state, path.reason = "converged", "no image survived the white-box attacks"
                break
            # A probing level is sure to attack only its probe; the rest is checked before it.
            first = min(int(mask.sum()), cfg.probe or n)
            over = self._over_cap(level, estimate(budget, first, p.decision.draws))
            if over:
                path.bound(over)
                break
            spec = replace(
                lead.spec,
                make=escalated_partial(lead.spec.make, budget),
                view=replace(lead.spec.view, eot_samples=budget.eot_samples),
                max_images=None,
            )
            log.info("escalation level %d: %s on %d images", level, budget.to_dict(), mask.sum())
            projected = self._escalate_level(level, budget, spec, mask)
            if projected is None or path.converged(cfg, projected):
                break
        else:
            path.bound(f"escalation.max_levels={cfg.max_levels} reached")
        self.outcome.escalation = path.to_dict()
        log.info("escalation %s: %s", path.state, path.reason)

    def _over_cap(self, level: int, cost: int) -> str | None:
        """Why spending ``cost`` more purifications passes the cap; ``None`` if it does not."""
        cap, n = self.plan.escalation.calls_cap, len(self.y)
        if cap is None or (self.total_purify + cost) / n <= cap:
            return None
        return (
            f"level {level} would bring the row to about {(self.total_purify + cost) / n:.0f} "
            f"purifications per image, over the cap of {cap} (escalation.calls_cap)"
        )

    def _escalate_level(
        self, level: int, budget: Budget, spec: AttackPlan, mask: Tensor
    ) -> float | None:
        """One level on ``mask``: its probe first, then the rest unless the probe settles it.

        Returns the images the probe projects the unattacked survivors would lose (0 when the
        level attacked every survivor), or ``None`` when the rest would pass the cap (bound).
        """
        p, cfg, path = self.plan, self.plan.escalation, self.path
        assert path is not None
        before, clock, n = self.total_purify, time.perf_counter(), len(self.y)
        k = len(p.attacks) + 2 * (level - 1)
        count = int(mask.sum())
        first = mask
        if cfg.probe is not None and count > cfg.probe:
            first = probe_sample(mask, cfg.probe, seeds.escalation_probe(p.seed, level))
        acc = path.accuracy
        attacked = self.attack(k, f"{STAGE}{level}", spec, mask=first).n_attacked
        probe, projected, over = None, 0.0, None
        if first is not mask:
            rest = mask & ~first
            lost = (acc - self._rules()[p.decision.headline]) * n
            projected = projection(cfg.probe, lost, int(rest.sum()))
            change = (lost + projected) / n
            if change <= tolerance(cfg, acc, n):
                probe = {
                    "survivors": count,
                    "probed": cfg.probe,
                    "broken": lost,
                    "projected": projected,
                }
                log.info("escalation level %d: the probe settles it (%s)", level, probe)
            else:
                projected = 0.0
                over = self._over_cap(level, estimate(budget, int(rest.sum()), p.decision.draws))
            if over is None and probe is None:
                more = self.attack(k + 1, f"{STAGE}{level}+", spec, mask=rest)
                attacked += more.n_attacked
        path.levels.append(
            Level(
                level,
                budget.to_dict(),
                attacked,
                self.total_purify - before,
                time.perf_counter() - clock,
                self._rules(),
                probe,
            )
        )
        if over:
            path.bound(over)
            return None
        return projected

    def summarize(self) -> None:
        """Robust counts over the whole suite, the run's cost and the per-image table."""
        p = self.plan
        # A clean-only run (suite=clean) measures what purification costs; it claims no robustness.
        self.outcome.robust = self.ledger.tallies() if p.attacks else None
        self.outcome.cost.update(
            purifications_per_image=self.total_purify / len(self.y),
            purifier_calls_per_image=self.total_purify
            * self.defense.calls_per_purify
            / len(self.y),
            peak_memory_mb=max([*self.phase_peaks, peak_memory_mb(p.device)]),
            memory="cuda allocator peak" if p.device.type == "cuda" else "process RSS high-water",
        )
        self.outcome.per_sample = self.ledger.per_sample(p.indices, p.decision.headline)
        robust = self.outcome.robust
        if robust is not None:
            head = robust[p.decision.headline]
            log.info(
                "robust accuracy (worst case over %s, %s): %.2f%%",
                ", ".join(p.attacks),
                p.decision.headline,
                100 * head.correct / head.n,
            )

    def diagnose(self) -> None:
        """The diagnostics on the clean-correct images, and the run's verdict."""
        p = self.plan
        ok = self.clean_only.nonzero().squeeze(1)
        self.outcome.diagnostics = diagnose(
            DiagnosisInput(
                classifier=self.classifier,
                defense=self.defense,
                name=p.name,
                x=self.x[ok],
                y=self.y[ok],
                norm=p.norm,
                eps=p.eps,
                device=p.device,
                views=self.views,
                kinds={n: s.kind for n, (s, _) in self.outcome.attacks.items()},
                results={n: stats for n, (stats, _) in self.outcome.attacks.items()},
                returns_best={n: a.traits.returns_best for n, a in self._specs().items()},
                escalated=self.views.get(f"{STAGE}{self.path.levels[-1].level}")
                if self.path is not None and len(self.path.levels) > 1
                else None,
                ledger=self.ledger,
                num_classes=p.dataset.num_classes,
                seed=p.seed,
                batch_size=p.batch_size,
            ),
            p.diagnostics,
        )
        failed = failed_checks(self.outcome.diagnostics)
        hard = [c for c in failed if c not in SOFT_CHECKS]
        escalation = self.outcome.escalation or None
        state = row_state(escalation, hard, [c for c in failed if c in SOFT_CHECKS])
        self.outcome.verdict = hard if state == "failed" else state
        log.info("verdict: %s (failed checks: %s)", self.outcome.verdict, failed or "none")

    def _specs(self) -> dict[str, AttackPlan]:
        """Every stage's attack plan: the suite's, then the escalation levels' (the lead's)."""
        specs = dict(self.plan.attacks)
        lead = self.plan.lead
        for name in self.outcome.attacks:
            if name.startswith(STAGE) and lead is not None:
                specs[name] = lead.spec
        return specs

    def _rules(self) -> dict[str, float]:
        return {r: t.correct / t.n for r, t in self.ledger.tallies().items()}

    def _white_survivors(self) -> Tensor:
        """Images robust under some rule over the clean stage and every white-box stage."""
        white = [n for n, (s, _) in self.outcome.attacks.items() if s.kind == "white-box"]
        return self.ledger.alive(["clean", *white])

    # -- helpers ---------------------------------------------------------------------------

    def _view(self, options: ViewOptions, seed: int) -> AttackView:
        return AttackView(
            self.classifier,
            self.defense,
            options,
            seed=seed,
            name=self.plan.name,
            classifier_name=self.plan.classifier_name,
        )

    def _stats(
        self, spec: AttackPlan, view: AttackView, targets: Tensor, totals: AttackTotals
    ) -> AttackStats:
        believed = transfer_failure = None
        if totals.believed is not None:
            fooled = totals.believed != self.y[targets]
            believed = int(fooled.sum())
            still_right = (totals.preds[0] == self.y[targets]) & fooled
            transfer_failure = float(still_right.sum()) / believed if believed else 0.0
        purify_images = totals.passes["purify"] + totals.judge_purify
        return AttackStats(
            target=spec.target,
            n_attacked=len(targets),
            wall_s=totals.wall_s,
            max_perturbation=totals.worst,
            warnings=totals.warnings,
            kind=spec.kind,
            view=view.options.to_dict(),
            passes=totals.passes,
            purifier_calls_per_image=purify_images
            * self.defense.calls_per_purify
            / max(len(targets), 1),
            peak_memory_mb=peak_memory_mb(self.plan.device),
            believed_fooled=believed,
            transfer_failure=transfer_failure,
            broken_on_path=None if totals.on_path is None else int(totals.on_path.sum()),
            gradient_failures=totals.gradient_failures,
        )

    def _keep_examples(self, name: str, totals: AttackTotals) -> None:
        if totals.examples is None or not self.keep_examples:
            return
        self.outcome.examples[f"adversarial/{name}"] = totals.examples
        generator = torch.Generator(self.plan.device).manual_seed(seeds.evaluation(self.plan.seed))
        with torch.inference_mode():  # what the classifier saw
            purified = self.defense.purify(
                totals.examples.to(self.plan.device), generator=generator
            )
        self.outcome.examples[f"purified/{name}"] = purified.cpu()

"""Diagnostics that say when an evaluation is not to be trusted.

Every run ends with these checks on a small slice of its clean-correct images; each gives a
``passed`` flag, the measured value and a sentence. A failed check (other than the soft
:data:`SOFT_CHECKS`) makes the row ``failed``; the runner puts the checks and the escalation
together into the row's state (:func:`bench.engine.escalation.state`).

Checks (thresholds are documented here and nowhere else):

* ``aa_randomized``, ``aa_zero_gradients``, ``aa_square``, ``aa_dynamic``: AutoAttack's own
  flags (Croce & Hein 2020, ``flags_doc.md``), read from the warnings its checks logged.
  ``aa_zero_gradients`` (AutoAttack's loss had gradients of zero) passes when the margin-loss
  gradient reaches every image in every gradient mode (``unavailable_gradients``): the loss
  saturated, not the defense's gradients, and the suite's margin-loss attacks cover them.
* ``gradient_failures``: an attack's view saw missing (graph cut) or non-finite input gradients
  and replaced them by zeros so that the attack went on (no gradient failure ends a run); any
  such image-gradient fails: the attack measured nothing on those images.
* ``randomness``: five forward passes on the same images; outputs that differ on a defense that
  declares itself deterministic, or agree on one that declares itself stochastic, fail.
* ``unavailable_gradients[<mode>]``: per gradient mode of the suite, the fraction of images
  whose margin-loss gradient through the attack view is zero or missing (graph cut); any fails
  (Pintor et al. 2022's "unavailable gradients"; AutoAttack's ``check_zero_gradients``). The
  margin loss is used because cross-entropy saturates on confident images.
* The probe attack is the harness's PGD with cross-entropy, then a second run with the margin
  loss on the points CE left unbroken (CE saturates on confident outputs).
* ``unbounded``: PGD from the clean image (no random start) with eps covering the whole input
  space must bring accuracy to at most ``1 / num_classes`` (Athalye et al. 2018; Pintor et al.'s
  "unconstrained attack failure"). An Lp check: under a flow threat it is skipped, and the
  reason recorded (``skipped``), because no flow reaches every image (a warp only moves the
  values an image has, and pixels amid constant ones get no flow gradient), so no accuracy is
  "expected" of an unbounded flow attack.
* ``eps_monotone``: accuracy under the probe attack at eps x ``eps_factors`` and unbounded must
  not rise with eps by more than the tolerance (one image, plus two standard errors of the
  repeated judging for stochastic defenses). Under a flow threat the probe is StAdv on the
  flow bound (:func:`bench.engine.threat.harness_attack`) and the curve ends at the largest
  factor.
* ``silent_success``: the probe saw a fooled iterate that its last iterate lost, while the suite
  holds an attack that returns its last iterate; fails when any image is affected.
* ``unstable_predictions``: the prediction of the view the escalation ended with (its last
  level's EOT; the probe's without escalation) changes across ``repeats`` evaluations of the
  same image on more than 10% of the images: its gradients are noise (more EOT is needed). The
  relative standard deviation of its loss is reported beside it. It is the one *soft* check
  (:data:`SOFT_CHECKS`): it says the number is loose, not that the evaluation is broken, and
  makes a row ``bound`` rather than ``failed``.

* ``transfer_failure``: an approximate-gradient or transfer attack's fooled images did not
  fool the real defense (more than 10% of them) while the suite has no exact-gradient attack.
* ``blackbox_beats_whitebox``: a black-box or transfer attack broke images (most of their
  judging draws wrong) that survived every white-box attack (most draws right), more than 0.2%
  of the subset and, for stochastic defenses, more than chance alone explains (the expected
  count from the survivors' own per-draw accuracies, plus two standard deviations): gradient
  masking.

Whether the attacks had converged (more steps, more EOT, more restarts on the images still
robust) is not a check here: the escalation (:mod:`bench.engine.escalation`) answers it by
attacking harder until the number stops moving, and records the path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from attacks.base import LP_NORMS
from attacks.pgd_eot import PGDEOT, margin_loss
from attacks.stadv import StAdv
from bench.engine.attack_view import AttackView, ViewOptions, view_rank
from bench.engine.decision import Judge, Ledger
from bench.engine.escalation import STAGE
from bench.engine.stats import AttackStats
from bench.engine.threat import diameter, harness_attack
from common import seeds
from common.checks import flag, positive_int
from common.errors import ConfigError
from defenses.base import Defense

# Failed checks that only say the number is loose (an upper bound), not that it is wrong.
SOFT_CHECKS = ("unstable_predictions",)

_AA_FLAGS = {
    "aa_randomized": "randomized defense",
    "aa_zero_gradients": "zero gradient",
    "aa_square": "Square Attack has decreased",
    "aa_dynamic": "dynamic defense",
}


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Budget of the diagnostics (``diagnostics:`` in ``conf/eval.yaml``).

    Attributes:
        enabled: run them at all.
        n_samples: clean-correct images of the subset they use (the first ones).
        steps: PGD steps of the probe attack.
        eps_factors: multiples of the threat's eps for the eps sweep.
        unbounded_steps: PGD steps of the unbounded attack.
        repeats: evaluations per image for the randomness and stability checks, and judging
            draws of the probe's accuracies on stochastic defenses.
    """

    enabled: bool = True
    n_samples: int = 64
    steps: int = 20
    eps_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    unbounded_steps: int = 50
    repeats: int = 8

    @classmethod
    def from_cfg(cls, node: DictConfig | Mapping[str, Any] | None) -> DiagnosticsConfig:
        """Build from the config node, naming any bad key or value."""
        if node is None:
            return cls()
        data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(
                f"diagnostics options {unknown} are not allowed; allowed: {sorted(allowed)}"
            )
        out = cls(**{**data, "eps_factors": tuple(data.get("eps_factors", cls.eps_factors))})
        for key in ("n_samples", "steps", "unbounded_steps", "repeats"):
            positive_int(f"diagnostics.{key}", getattr(out, key))
        flag("diagnostics.enabled", out.enabled)
        if not out.eps_factors or any(not f > 0 for f in out.eps_factors):
            raise ConfigError(
                f"diagnostics.eps_factors={list(out.eps_factors)} must be positive numbers"
            )
        return out


@dataclass
class DiagnosisInput:
    """What the diagnostics look at: the run's parts and its results."""

    classifier: nn.Module
    defense: Defense
    name: str
    x: Tensor  # clean-correct images of the subset (CPU)
    y: Tensor
    norm: str
    eps: float
    device: torch.device
    views: Mapping[str, ViewOptions]
    kinds: Mapping[str, str]
    results: Mapping[str, AttackStats]
    returns_best: Mapping[str, bool]  # whether each attack returns its best iterate
    ledger: Ledger
    num_classes: int
    seed: int
    batch_size: int
    escalated: ViewOptions | None = None  # the last escalation level's view
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)


def _check(passed: bool | None, value: Any, detail: str) -> dict[str, Any]:
    return {"passed": passed, "value": value, "detail": detail}


def failed_checks(diagnostics: Mapping[str, Any]) -> list[str]:
    """The sorted names of the checks that failed."""
    return sorted(k for k, c in diagnostics.get("checks", {}).items() if c["passed"] is False)


def margin_gradient_norms(view: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-image L2 norm of the margin-loss gradient through ``view`` (NaN: graph cut)."""
    x = x.clone().requires_grad_(True)
    # The harness's view bridges a cut graph with a zero gradient (so that no attack library
    # raises) and counts it: a count that rose here is a cut, not a zero.
    counter = getattr(view, "counter", None)
    before = counter.grad_missing if counter is not None else 0
    with torch.enable_grad():
        loss = margin_loss(view(x), y).sum()
        if not loss.requires_grad:
            return torch.full((len(x),), math.nan)
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None or (counter is not None and counter.grad_missing > before):
        return torch.full((len(x),), math.nan)
    return grad.flatten(1).norm(dim=1).detach().cpu()


class _Diagnosis:
    def __init__(self, inp: DiagnosisInput, cfg: DiagnosticsConfig) -> None:
        self.inp, self.cfg = inp, cfg
        self.x, self.y = inp.x[: cfg.n_samples], inp.y[: cfg.n_samples]
        self.info = type(inp.defense).info
        self.stochastic = self.info.stochastic
        self.checks: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}  # checks that do not apply to the run, with the reason
        self._seed = seeds.diagnostics(inp.seed)
        self._views: list[AttackView] = []
        # The probe attacks as the strongest white-box attack of the suite saw the defense:
        # exact gradients and fresh randomness first, then the most EOT samples (a
        # single-sample view of a stochastic defense would make every check measure noise).
        # The escalation's levels are the lead attack at larger budgets: the probe stays at the
        # suite's own budget (the eps sweep runs it five times).
        white = [n for n in inp.views if inp.kinds[n] == "white-box" and not n.startswith(STAGE)]
        white.sort(key=lambda n: view_rank(inp.views[n]))
        chosen = (white or [None])[0]
        if chosen is not None:
            self.probe_options = inp.views[chosen]
        else:
            grad = "exact" if self.info.differentiable else "bpda"
            self.probe_options = ViewOptions(grad=grad, eot_samples=8 if self.stochastic else 1)
        self.probe_from = chosen or "default"
        n = max(len(self.x), 1)
        draws = cfg.repeats if self.stochastic else 1
        self.tolerance = 1 / n + (2 * math.sqrt(0.25 / (n * draws)) if self.stochastic else 0.0)

    def _view(self, options: ViewOptions) -> AttackView:
        self._seed += 1
        view = AttackView(
            self.inp.classifier, self.inp.defense, options, seed=self._seed, name=self.inp.name
        )
        view.stage = "diagnostics"
        self._views.append(view)
        return view.eval()

    def _judge(self) -> Judge:
        view = self._view(ViewOptions(eot_samples=1, allow_masked=True))
        draws = self.cfg.repeats if self.stochastic else 1
        return Judge(view, draws=draws, batch_size=self.inp.batch_size)

    def _probe_accuracy(
        self,
        *,
        eps: float,
        steps: int,
        options: ViewOptions | None = None,
        start: bool = True,
        step_size: float | None = None,
    ) -> tuple[float, PGDEOT | StAdv]:
        """Accuracy (mean over judging draws) after the probe PGD at ``eps``.

        The probe is the threat's harness attack: PGDEOT, or StAdv under a flow threat (with the
        same arguments, the flow bound as ``eps``).
        """
        view = self._view(options or self.probe_options)
        # CE, then the margin loss on the points CE left unbroken: CE alone saturates on
        # confident outputs (CARSO's aggregate), and a probe that cannot move them would flag
        # "unbounded" for the probe's weakness rather than the evaluation's.
        attack = harness_attack(self.inp.norm)(
            view,
            norm=self.inp.norm,
            eps=eps,
            steps=steps,
            random_start=start,
            seed=self._seed,
            step_size=step_size,
            loss=["ce", "margin"],
            restarts=2,
        )
        correct, bs, dev = 0.0, self.inp.batch_size, self.inp.device
        judge = self._judge()
        for i in range(0, len(self.x), bs):
            xb, yb = self.x[i : i + bs].to(dev), self.y[i : i + bs].to(dev)
            x_adv = attack(xb, yb).detach()
            preds = judge.predictions(x_adv, dev)
            correct += (preds == yb.cpu()).float().mean(0).sum().item()
        return correct / max(len(self.x), 1), attack

    # -- the checks --------------------------------------------------------------------------

    def autoattack_flags(self) -> None:
        # AutoAttack's own warnings only: the harness's PGD words its own gradient warnings
        # with the same phrases ("zero gradient").
        aa = [r for r in self.inp.results.values() if "autoattack" in r.target]
        if not aa:
            return
        warnings = [w for r in aa for w in r.warnings]
        has_adaptive = any("autoattack" not in r.target for r in self.inp.results.values())
        for name, needle in _AA_FLAGS.items():
            hits = [w for w in warnings if needle in w]
            passed = not hits
            if name == "aa_dynamic" and hits and has_adaptive:
                passed = True  # AutoAttack's advice (add adaptive attacks) is already followed
            if name == "aa_randomized" and hits and self.stochastic:
                passed = True  # a declared stochastic defense: the suite must handle it anyway
            self.checks[name] = _check(passed, len(hits), hits[0] if hits else "no flag raised")

    @torch.inference_mode()
    def randomness(self) -> None:
        view = self._view(ViewOptions(eot_samples=1, allow_masked=True))
        xb = self.x[:16].to(self.inp.device)
        outs = torch.stack([view(xb).float() for _ in range(5)])
        spread = (outs - outs[0]).abs().amax().item()
        observed = spread > 1e-4
        passed = observed == self.stochastic
        declared = "stochastic" if self.stochastic else "deterministic"
        seen = "differ" if observed else "agree"
        self.checks["randomness"] = _check(
            passed,
            spread,
            f"declared {declared}; five passes on the same images {seen} (max logit spread "
            f"{spread:.3g})",
        )

    def gradients(self) -> None:
        modes = {}
        for name, options in self.inp.views.items():
            if self.inp.kinds[name] == "white-box":
                modes.setdefault(options.grad, options)
        modes.setdefault(self.probe_options.grad, self.probe_options)
        for mode, options in modes.items():
            view = self._view(replace(options, eot_samples=1))
            xb, yb = self.x.to(self.inp.device), self.y.to(self.inp.device)
            try:
                norms = margin_gradient_norms(view, xb, yb)
                cut = torch.isnan(norms)
            except RuntimeError as err:  # autograd itself refused: the graph is cut
                norms, cut = torch.full((len(xb),), math.nan), torch.ones(len(xb), dtype=torch.bool)
                detail_err = f" ({err})"
            else:
                detail_err = ""
            zero = (norms == 0) | cut
            frac = zero.float().mean().item() if len(zero) else 0.0
            if cut.all():
                detail = f"the {mode} gradient graph is cut: no gradient reaches the input"
            else:
                detail = f"{zero.sum().item()} of {len(zero)} images have a zero {mode} gradient"
            self.checks[f"unavailable_gradients[{mode}]"] = _check(
                frac == 0.0, frac, detail + detail_err
            )

    def gradient_failures(self) -> None:
        """Missing or non-finite input gradients seen by any white-box attack of the run.

        The view replaced them by zeros so that the attack could go on; the number it reached
        on those images measures nothing.
        """
        counts = {
            n: r.gradient_failures
            for n, r in self.inp.results.items()
            if getattr(r, "gradient_failures", None)
        }
        if not counts:
            return
        bad = {
            n: {k: c.get(k, 0) for k in ("missing", "nonfinite") if c.get(k, 0)}
            for n, c in counts.items()
        }
        bad = {n: v for n, v in bad.items() if v}
        self.checks["gradient_failures"] = _check(
            not bad,
            counts,
            "every attack's input gradients were present and finite"
            if not bad
            else "image-gradients missing (graph cut) or non-finite, replaced by zeros: "
            + ", ".join(f"{n} {v}" for n, v in bad.items()),
        )

    def saturation(self) -> None:
        """AutoAttack's zero-gradient flag, read beside the margin-loss gradients.

        AutoAttack's check reads its loss's gradient, which is zero wherever the output saturated
        (CARSO's aggregate); when the margin loss's gradient reaches every image in every mode,
        the defense's gradients are available and the suite's margin attacks use them.
        """
        aa = self.checks.get("aa_zero_gradients")
        grads = [c for k, c in self.checks.items() if k.startswith("unavailable_gradients[")]
        if aa is None or aa["passed"] or not grads or not all(c["passed"] for c in grads):
            return
        aa["passed"] = True
        aa["detail"] += (
            "; the margin-loss gradient reaches every image (unavailable_gradients passed): the "
            "cross-entropy saturated, the gradients are not masked"
        )

    def sweep(self) -> None:
        """Eps sweep, unbounded attack and the silent-success path indicator."""
        eps, steps = self.inp.eps, self.cfg.steps
        cap = diameter(self.inp.norm, tuple(self.x[0].shape))
        accs: dict[float, float] = {}
        probe_at_eps = None
        for f in sorted(set(self.cfg.eps_factors) | {1.0}):
            e = min(eps * f, cap)
            accs[e], attack = self._probe_accuracy(eps=e, steps=steps)
            if f == 1.0:
                probe_at_eps = attack
        curve = sorted(accs.items())
        if self.inp.norm in LP_NORMS:
            unbounded = self._unbounded(cap)
            curve.append((math.inf, unbounded))
        else:
            self.skipped["unbounded"] = (
                f"an Lp check, not run under the {self.inp.norm} threat: no flow field reaches "
                "every image (a warp only moves the values an image has, and pixels amid "
                "constant ones get no flow gradient), so no accuracy is expected of an "
                "unbounded flow attack; eps_monotone still sweeps the flow bound"
            )
        rises = [
            (a_eps, b_eps)
            for (a_eps, a), (b_eps, b) in zip(curve, curve[1:], strict=False)
            if b > a + self.tolerance
        ]
        self.checks["eps_monotone"] = _check(
            not rises,
            {str(round(k, 6)): v for k, v in curve},
            "accuracy falls with eps"
            if not rises
            else f"accuracy rises with eps between {rises[0][0]:.4g} and {rises[0][1]:.4g}",
        )
        if probe_at_eps is not None:
            self._path_indicators(probe_at_eps)

    def _unbounded(self, cap: float) -> float:
        """The ``unbounded`` check (Lp threats): its accuracy, for the eps curve."""
        unbounded, _ = self._probe_accuracy(eps=cap, steps=self.cfg.unbounded_steps, start=False)
        limit = 1 / self.inp.num_classes
        self.checks["unbounded"] = _check(
            unbounded <= limit,
            unbounded,
            f"accuracy {unbounded:.1%} under an unbounded PGD-{self.cfg.unbounded_steps} "
            f"(at most {limit:.0%} expected)",
        )
        return unbounded

    def _path_indicators(self, attack: PGDEOT | StAdv) -> None:
        # The probe is the harness's PGDEOT (or StAdv): its histories cover its last batch.
        fooled, losses = attack.fooled_history, attack.loss_history
        if fooled is None or losses is None or fooled.numel() == 0:
            return
        lost = fooled.any(0) & ~fooled[-1]
        returns_last = sorted(n for n, best in self.inp.returns_best.items() if not best)
        frac = lost.float().mean().item()
        self.checks["silent_success"] = _check(
            not (returns_last and frac > 0),
            frac,
            f"{lost.sum().item()} images fooled along the probe's path but not at its last "
            f"iterate; attacks returning their last iterate: {returns_last or 'none'}",
        )

    @torch.inference_mode()
    def stability(self) -> None:
        options = self.inp.escalated or self.probe_options
        view = self._view(options)
        xb, yb = self.x[:32].to(self.inp.device), self.y[:32].to(self.inp.device)
        logits = torch.stack([view(xb) for _ in range(self.cfg.repeats)])
        flips = (logits.argmax(2) != logits[0].argmax(1)).any(0).float().mean().item()
        losses = F.cross_entropy(logits.flatten(0, 1), yb.repeat(len(logits)), reduction="none")
        losses = losses.view(len(logits), -1)
        rel = (losses.std(0) / losses.abs().mean(0).clamp_min(1e-6)).mean().item()
        self.checks["unstable_predictions"] = _check(
            flips <= 0.1,
            {"flipping": flips, "loss_relative_std": rel},
            f"the attack view's prediction changed across {self.cfg.repeats} evaluations of the "
            f"same image on {flips:.0%} of the images (EOT {options.eot_samples}; "
            f"relative std of its loss {rel:.3f})",
        )

    def transfer(self) -> None:
        exact = any(
            o.grad == "exact" and self.inp.kinds[n] == "white-box"
            for n, o in self.inp.views.items()
        )
        values = {
            n: r.transfer_failure
            for n, r in self.inp.results.items()
            if r.transfer_failure is not None and r.believed_fooled
        }
        if not values:
            return
        worst = max(values.values())
        failed = worst > 0.1 and not exact
        self.checks["transfer_failure"] = _check(
            not failed,
            values,
            "share of images fooled on the attack's own view that the real defense still "
            f"classified correctly: {', '.join(f'{n} {v:.0%}' for n, v in values.items())}"
            + ("; the suite has an exact-gradient attack" if exact else ""),
        )

    def blackbox(self) -> None:
        ledger = self.inp.ledger
        white = [n for n in self.inp.views if self.inp.kinds[n] == "white-box"]
        other = [n for n in self.inp.views if self.inp.kinds[n] != "white-box"]
        if not white or not other:
            return
        # Per image, the worst share of correct draws over the white-box stages that judged
        # it; a survivor is correct in most draws of every one of them.
        stages = {s.name: s for s in ledger.stages}
        p_white = torch.ones(ledger.n)
        for n in white:
            share = stages[n].correct.float().mean(0)
            p_white = torch.where(stages[n].attacked, torch.minimum(p_white, share), p_white)
        survived = ledger.flags(["clean"])["vote"] & (p_white > 0.5)
        # A survivor's fresh draws are mostly wrong now and then by chance alone (stochastic
        # defenses): under "no better than white-box" that happens with probability
        # q = P(Binomial(draws, 1 - p) > draws / 2). Broken counts beyond that expectation (plus
        # two standard deviations) and beyond 0.2% of the subset are gradient masking.
        q = _majority_wrong(p_white, ledger.draws)
        broken, expected, failed = {}, {}, False
        for n in other:
            stage = stages[n]
            at = survived & stage.attacked
            wrong = 1 - stage.correct.float().mean(0) > 0.5
            broken[n] = int((at & wrong).sum())
            mean, var = q[at].sum().item(), (q[at] * (1 - q[at])).sum().item()
            expected[n] = round(mean, 2)
            failed |= broken[n] > max(mean + 2 * math.sqrt(var), 0.002 * ledger.n)
        chance = f" (by chance alone: {expected})" if ledger.draws > 1 else ""
        self.checks["blackbox_beats_whitebox"] = _check(
            not failed,
            {"broken": broken, "expected_by_chance": expected},
            "images broken by black-box or transfer attacks (most draws wrong) that survived "
            f"every white-box attack: {broken}{chance}",
        )


def _majority_wrong(p_correct: Tensor, draws: int) -> Tensor:
    """Per image, the probability that more than half of ``draws`` fresh draws are wrong."""
    k_min = draws // 2 + 1
    p_wrong = (1 - p_correct).double()
    out = torch.zeros_like(p_wrong)
    for k in range(k_min, draws + 1):
        out += math.comb(draws, k) * p_wrong**k * (1 - p_wrong) ** (draws - k)
    return out.float()


def diagnose(inp: DiagnosisInput, cfg: DiagnosticsConfig) -> dict[str, Any]:
    """Run every diagnostic; return ``{"checks": {...}, "probe": ..., "n_samples": ...}``."""
    d = _Diagnosis(inp, cfg)
    d.autoattack_flags()
    d.gradient_failures()
    d.transfer()
    d.blackbox()
    if len(d.x):
        d.randomness()
        d.gradients()
        d.saturation()
        d.sweep()
        d.stability()
    return {
        "checks": d.checks,
        "skipped": d.skipped,
        "probe": {"from_attack": d.probe_from, "view": d.probe_options.to_dict()},
        "n_samples": len(d.x),
        "tolerance": d.tolerance,
        "purifications": sum(v.counter.purify for v in d._views),
    }

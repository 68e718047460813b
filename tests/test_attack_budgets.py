"""Every attack of every suite, under every profile, reaches eps and is no weaker than plain PGD.

Why: ``bpda_eot`` once pinned Hill et al.'s absolute step of 2/255, and profile ``quick`` runs it
for 10 steps: 10 x 2/255 = 0.078 < eps 0.1 on Fashion-MNIST, so every record said
``max_perturbation`` 0.078 and the attack never used its budget. An absolute step that a suite
or profile does not re-derive when it changes the steps is that trap; ``PGDEOT`` now refuses it
(``attacks.pgd_eot.check_reach``), and this file measures that what the suites run works.

What runs. Each suite of ``conf/suite/`` with Lp attacks (tests/test_stadv.py measures the flow
threat's), under no profile, ``profile=quick`` and ``profile=paper``: a profile changes budgets
through its scalars (``eot_default``, draws), the command line's ``suite=`` wins over the
profile's default suite, and that default suite is one of the suites. The attack files that no
suite lists (``apgd_dlr``, ``fgsm_rs``, ``pgd_torchattacks``) run alone, at their own budget.
The attacks are built as the runner builds them: ``make_plan`` on the composed config, then
``plan.attacks[name].make(model=AttackView(classifier, defense, plan.attacks[name].view))``, so
the suites' and profiles' overrides are what is measured. Identical resolved configs (the same
arguments and view) run once; ``batch_size`` is left out of that comparison, because it only
batches AutoAttack's work and one batch here holds every image. Everything runs on
``defense=none``, the digits classifier, and the clean-correct images among the first 32 of the
evaluation subset.

The checks:

(a) reach: on every image the attack leaves correctly classified, the perturbation in the
    threat's norm is at least ``REACH`` of eps. Linf: 0.99 (the max-abs pixel). L2: 0.97,
    because the clamp to [0, 1] after the last projection removes the part of the step that
    left the box, and that part grows with the step: the default PGD-10 step (0.25 eps) ends at
    0.987 eps on digits, PGD-200 at 0.9995 (measured). A schedule that cannot travel eps stays
    below ``steps * step``, so either threshold catches it.
(b) strength: its robust count is at most ``TOLERANCE`` (one) image above the harness's
    ``PGDEOT`` with Madry's step (2.5 eps / steps), a random start and one restart at the same
    number of steps, on the attack's own leading loss. The same loss, because the loss is the
    suite's choice (the margin for transfer, against CARSO's saturating aggregate) and not part
    of the budget: on this classifier margin-PGD leaves one or two of 31 images more robust than
    CE-PGD at 10, 20 and 100 steps alike (measured), which says nothing about step sizes.

How each kind of attack is held:

- The harness's PGD family (``PGDEOT``, torchattacks' ``PGD``): (a) and (b).
- FGSM-RS (in no suite: the adversary of FGSM-RS adversarial training): (a) only. Its random
  start is there for training (Wong et al.), and one step from a random point is weaker than
  PGD-1, which is FGSM from the clean image: 24 of 31 robust against 22 (measured), a property
  of the method rather than of a budget.
- Transfer attacks: on the bare classifier the transfer view is the classifier, the very model
  that judges, so a transfer attack is white-box PGD here. Not exempt: (a) and (b).
- AutoAttack (APGD, FAB, Square through pyautoattack): it returns the clean image for every
  image it does not break, so (a) cannot be read off its output. The test asserts that
  contract instead (a perturbation of exactly zero on the unbroken images): should the library
  ever return partial perturbations there, this fails and (a) has to be measured. Its step
  sizes are internal and relative to eps (APGD starts at 2 eps), its budget keys are iterations
  and queries, so (b) against PGD of ``n_iter`` steps (100 in the presets) is the budget check.
- Square alone (black-box): queries are not gradient steps, so there is no PGD of "the same
  budget", and Square-100 is deliberately a small masking check (27 of 31 robust, PGD-20 18).
  It is held to what its construction guarantees: every image it breaks carries a perturbation
  of eps (Square samples vertices of the Linf ball), and it breaks at least one image of an
  undefended classifier. A Square whose eps does not follow the threat, or whose queries do
  nothing, fails.
- L2: the harness's PGD family only (``PGDEOT``, torchattacks' ``PGD``); AutoAttack has no step
  size to configure.

That the checks can fail is tested too: with the constructor's refusal switched off, the old
``bpda_eot`` under profile ``quick`` fails both (Linf: 0.78 eps, 25 of 31 robust against
PGD-10's 18; L2: 0.14 eps, 31 against 19).

Cost: about a minute on two shared cores (64 s measured, 110 s under contention), nothing
marked slow; AutoAttack standard at full strength (``suite=autoattack``, ``paper_full``) is the
largest item, about 13 s on 31 images, and Square-5000 about 6 s.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from attacks.base import norms_of
from attacks.pgd_eot import PGDEOT
from bench.engine.attack_view import AttackView, ViewOptions
from bench.engine.plan import AttackPlan, Plan, make_plan
from bench.engine.threat import check_threat
from bench.run import evaluate
from common.errors import ConfigError
from tests.conftest import CONF_DIR

log = logging.getLogger(__name__)

N_IMAGES = 32
REACH = {"Linf": 0.99, "L2": 0.97}
TOLERANCE = 1  # images
PROFILES = ("none", "quick", "paper")
AUTOATTACK = "attacks.autoattack.AutoAttack"
FGSM_RS = "attacks.fgsm_rs.FGSMRS"
L2_FAMILY = ("attacks.pgd_eot.PGDEOT", "attacks.pgd.PGD")
# APGD's and FAB's iterations in AutoAttack's standard and rand presets.
AUTOATTACK_ITERATIONS = 100
HILL_STEP = 2 / 255  # Hill et al.'s absolute BPDA+EOT step, at eps 8/255


def _suites() -> list[str]:
    """The suites that run attacks (``suite=clean`` runs none)."""
    paths = sorted((CONF_DIR / "suite").glob("*.yaml"))
    return [p.stem for p in paths if not OmegaConf.load(p).get("clean_only", False)]


def _attack_files_outside_suites() -> list[str]:
    """Attack files no suite lists (``/attack@attacks.<key>: <file>``): tested alone."""
    used: set[str] = set()
    for path in (CONF_DIR / "suite").glob("*.yaml"):
        for entry in OmegaConf.load(path).get("defaults", []):
            if OmegaConf.is_dict(entry):
                used.update(str(v) for k, v in entry.items() if str(k).startswith("/attack@"))
    return sorted(p.stem for p in (CONF_DIR / "attack").glob("*.yaml") if p.stem not in used)


CASES = [(suite, profile) for suite in _suites() for profile in PROFILES] + [
    (f"attack={name}", "none") for name in _attack_files_outside_suites()
]


def _base(cache_dir: Path) -> list[str]:
    """The bare digits classifier on the CPU, without a suite, profile or threat."""
    return [
        "dataset=digits",
        "defense=none",
        "device=cpu",
        f"n_samples={N_IMAGES}",
        # conftest.fast_overrides' classifier: trained once per session, shared with other tests.
        "classifier.recipe.epochs=10",
        "classifier.recipe.lr=0.1",
        "classifier.recipe.batch_size=64",
        f"paths.cache_dir={cache_dir}",
        f"paths.results_dir={cache_dir.parent / 'results'}",
    ]


def _overrides(case: str, profile: str, threat: str, cache_dir: Path) -> list[str]:
    """The command line of one case: a suite (or one attack file) under a profile."""
    if case.startswith("attack="):
        chosen = ["suite=pgd", f"attack@suite.attacks.pgd={case.removeprefix('attack=')}"]
    else:
        chosen = [f"suite={case}"]
    if profile != "none":
        chosen.append(f"profile={profile}")
    return [*_base(cache_dir), f"threat={threat}", *chosen]


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=overrides)


@dataclass(frozen=True)
class Bare:
    """The undefended digits classifier and the images it classifies correctly."""

    classifier: nn.Module
    x: Tensor
    y: Tensor


@pytest.fixture(scope="module")
def bare(cache_dir: Path) -> Bare:
    """The classifier every case's plan names (the same config), loaded or trained once."""
    plan = make_plan(_compose(_overrides("pgd", "none", "linf", cache_dir)), "none", "small_cnn")
    classifier = plan.classifier.load(plan.dataset, plan.device).eval()
    x, y = plan.dataset.test()
    x, y = x[plan.indices], y[plan.indices]
    with torch.inference_mode():
        correct = classifier(x).argmax(1) == y
    return Bare(classifier, x[correct], y[correct])


@pytest.fixture(scope="module")
def seen() -> dict[str, str]:
    """Resolved attack configs already measured in this session, and the case that did."""
    return {}


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, int, str], int]:
    """Robust counts of the reference PGD, by (norm, steps, loss)."""
    return {}


def _distance(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)


def _correct(bare: Bare, plan: Plan, x_adv: Tensor) -> Tensor:
    """Per image, whether the defended classifier (here: the bare one) still gets it right."""
    judge = AttackView(bare.classifier, plan.defense, ViewOptions(eot_samples=1))
    with torch.inference_mode():
        return judge(x_adv).argmax(1) == bare.y


def _steps(node: dict[str, Any]) -> int:
    """The gradient steps an attack's budget allows (AutoAttack: APGD's iterations)."""
    if "steps" in node:
        return int(node["steps"])
    if node["_target_"] == AUTOATTACK:
        return int(node.get("n_iter") or AUTOATTACK_ITERATIONS)
    raise AssertionError(f"no gradient steps known for {node['_target_']}")


def _loss(node: dict[str, Any]) -> str:
    """The attack's leading loss, in PGDEOT's names."""
    if node["_target_"] == AUTOATTACK:
        return "dlr" if (node.get("attacks") or ["apgd-ce"])[0] == "apgd-dlr" else "ce"
    loss = node.get("loss", "ce")
    return str(loss if isinstance(loss, str) else loss[0])


def _reference(
    bare: Bare, plan: Plan, node: dict[str, Any], references: dict[tuple[str, int, str], int]
) -> tuple[int, str]:
    """Robust count of plain PGD at the attack's steps and loss, and its name."""
    steps, loss = _steps(node), _loss(node)
    key = (plan.norm, steps, loss)
    if key not in references:
        view = AttackView(bare.classifier, plan.defense, ViewOptions(eot_samples=1))
        pgd = PGDEOT(view, norm=plan.norm, eps=plan.eps, steps=steps, loss=loss, seed=plan.seed)
        references[key] = int(_correct(bare, plan, pgd(bare.x, bare.y)).sum())
    return references[key], f"PGD-{steps} ({loss})"


def _reach_problems(
    label: str, spec: AttackPlan, norm: str, reach: Tensor, robust: Tensor
) -> list[str]:
    """Check (a), in the form each kind of attack allows (see the module docstring)."""
    problems = []
    if spec.target == AUTOATTACK:
        if robust.any() and reach[robust].max() > 0:
            problems.append(
                f"{label}: AutoAttack returned a perturbation of up to "
                f"{reach[robust].max():.4f} eps on images it did not break, not the clean image"
            )
        if spec.kind == "black-box":
            if robust.all():
                problems.append(f"{label}: broke none of {len(robust)} undefended images")
            elif reach[~robust].min() < REACH[norm]:
                problems.append(
                    f"{label}: broken images at {reach[~robust].min():.4f} eps, not eps"
                )
        return problems
    if robust.any() and reach[robust].min() < REACH[norm]:
        problems.append(
            f"{label}: perturbation {reach[robust].min():.4f} eps < {REACH[norm]} eps on an "
            "image it did not break: it never reached the threat's boundary"
        )
    return problems


def _measure(
    label: str,
    bare: Bare,
    plan: Plan,
    spec: AttackPlan,
    node: dict[str, Any],
    references: dict[tuple[str, int, str], int],
) -> list[str]:
    """Run one attack as the runner does and return what it got wrong."""
    attack = spec.make(model=AttackView(bare.classifier, plan.defense, spec.view))
    x_adv = attack(bare.x, bare.y).detach()
    check_threat(bare.x, x_adv, plan.norm, plan.eps, label)
    robust = _correct(bare, plan, x_adv)
    reach = _distance(x_adv, bare.x, plan.norm) / plan.eps
    problems = _reach_problems(label, spec, plan.norm, reach, robust)
    n_robust, n = int(robust.sum()), len(robust)
    reached = ", ".join(
        f"{what} {reach[mask].min():.4f}-{reach[mask].max():.4f} eps"
        for what, mask in (("unbroken", robust), ("broken", ~robust))
        if mask.any()
    )
    if spec.kind == "black-box" or spec.target == FGSM_RS:
        log.info("%s: robust %d/%d; %s", label, n_robust, n, reached)
        return problems
    count, name = _reference(bare, plan, node, references)
    log.info("%s: robust %d/%d (%s: %d); %s", label, n_robust, n, name, count, reached)
    if n_robust > count + TOLERANCE:
        problems.append(
            f"{label}: {n_robust} of {n} images robust, {name} leaves {count}: weaker than "
            "plain PGD at its own budget"
        )
    return problems


@pytest.mark.parametrize("threat", ["linf", "l2"])
@pytest.mark.parametrize(("case", "profile"), CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_attacks_reach_eps_and_are_no_weaker_than_pgd(
    case: str,
    profile: str,
    threat: str,
    bare: Bare,
    cache_dir: Path,
    seen: dict[str, str],
    references: dict[tuple[str, int, str], int],
) -> None:
    """Checks (a) and (b) of the module docstring on every attack of one suite and profile."""
    cfg = _compose(_overrides(case, profile, threat, cache_dir))
    nodes = {k: OmegaConf.to_container(v, resolve=True) for k, v in cfg.suite.attacks.items()}
    if any(cfg.threat.norm not in norms_of(get_class(n["_target_"])) for n in nodes.values()):
        pytest.skip("a flow-threat suite: tests/test_stadv.py measures its reach and strength")
    if threat == "l2" and not any(n["_target_"] in L2_FAMILY for n in nodes.values()):
        pytest.skip("L2 covers the harness's PGD family only")
    plan = make_plan(cfg, "none", "small_cnn")
    problems = []
    for name, spec in plan.attacks.items():
        if threat == "l2" and spec.target not in L2_FAMILY:
            continue
        args = {k: v for k, v in nodes[name].items() if k != "batch_size"}
        key = json.dumps([threat, args, spec.view.to_dict()], sort_keys=True)
        label = f"{threat} {case}[{profile}]/{name}"
        if key in seen:
            continue  # the same attack as seen[key]: measured once
        seen[key] = label
        problems += _measure(label, bare, plan, spec, nodes[name], references)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("threat", ["linf", "l2"])
def test_the_measurement_catches_the_old_absolute_step(
    threat: str,
    bare: Bare,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the constructor's refusal switched off, the old bpda_eot (2/255 absolute) under
    # profile quick's 10 steps must fail both checks: this file's checks can fail.
    monkeypatch.setattr("attacks.pgd_eot.check_reach", lambda *args, **kwargs: None)
    overrides = _overrides("quick", "quick", threat, cache_dir)
    cfg = _compose([*overrides, f"suite.attacks.bpda_eot.step_size={HILL_STEP}"])
    plan = make_plan(cfg, "none", "small_cnn")
    node = OmegaConf.to_container(cfg.suite.attacks.bpda_eot, resolve=True)
    problems = _measure("old bpda_eot", bare, plan, plan.attacks["bpda_eot"], node, {})
    assert len(problems) == 2
    assert "never reached the threat's boundary" in problems[0]
    assert "weaker than plain PGD" in problems[1]


# -- refused at plan time -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "shown"),
    [
        # The trap itself: the old absolute bpda_eot step under profile quick's 10 steps.
        (
            ["threat=linf", "profile=quick", f"suite.attacks.bpda_eot.step_size={HILL_STEP}"],
            "PGDEOT: 10 steps of step_size=0.007843 travel at most 0.07843 < eps=0.1",
        ),
        (
            ["threat=linf", "suite=quick", "suite.attacks.pgd.rel_stepsize=0.05"],
            "PGDEOT: 10 steps of rel_stepsize=0.05 travel at most 0.5 eps < eps",
        ),
        (
            ["threat=l2", "suite=smoke", "suite.attacks.pgd.steps=3"]
            + ["suite.attacks.pgd.rel_stepsize=0.25"],
            "PGDEOT: 3 steps of rel_stepsize=0.25 travel at most 0.75 eps < eps",
        ),
        (
            ["threat=l2", "suite=pgd", "attack@suite.attacks.pgd=pgd_torchattacks"]
            + ["suite.attacks.pgd.steps=4", "suite.attacks.pgd.rel_stepsize=0.2"],
            "PGD: 4 steps of rel_stepsize=0.2",
        ),
    ],
)
def test_a_step_that_cannot_reach_eps_is_refused_before_any_work(
    compose_cfg, tmp_path: Path, overrides: list[str], shown: str
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    cfg = compose_cfg([*_base(cache), *overrides])
    with pytest.raises(ConfigError, match=re.escape(shown)):
        evaluate(cfg, output_dir=out, choices=cfg.hydra.runtime.choices)
    assert not (out / "record.json").exists()
    assert not cache.exists(), "the refusal must come before any network is trained"


def test_an_absolute_step_with_enough_steps_is_allowed(compose_cfg, tmp_path: Path) -> None:
    # 13 steps of 2/255 travel 0.102 >= 0.1: the pinned step may stay where it reaches eps.
    steps = math.ceil(0.1 / HILL_STEP)
    cfg = compose_cfg(
        [
            *_overrides("quick", "quick", "linf", tmp_path / "cache"),
            f"suite.attacks.bpda_eot.step_size={HILL_STEP}",
            f"suite.attacks.bpda_eot.steps={steps}",
        ]
    )
    plan = make_plan(cfg, "none", "small_cnn")
    attack = plan.attacks["bpda_eot"].make(model=nn.Flatten())
    assert steps == 13 and attack.alpha == pytest.approx(HILL_STEP)

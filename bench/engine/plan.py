"""The plan of a run: every value validated and every cheap part built before any heavy work.

Order of work, so bad input fails before anything heavy and leaves no record: refuse unknown
config keys, validate every scalar, instantiate the defense and the attack partials (their
constructors validate their arguments), the dataset (checks its files), the classifier source
(reads and fits a checkpoint, which is cheap), check the threat's budget against the images,
select the evaluation subset, and fingerprint what determines the result. Only then may the
runner train or load networks and attack.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import Tensor

from attacks.base import NORMS, Attack, Traits, norms_of, traits
from bench.config import CONF_DIR
from bench.data import ImageDataset, eval_subset
from bench.devices import resolve_device, resolve_threads, set_threads
from bench.engine.attack_view import AttackView, ViewOptions, view_rank
from bench.engine.decision import RULES, SUCCESS_AT
from bench.engine.diagnostics import DiagnosticsConfig
from bench.engine.escalation import Budget, EscalationConfig, base_budget
from bench.engine.fingerprint import fingerprint
from bench.engine.threat import HARNESS_ATTACKS, check_budget, harness_attack
from bench.models.classifiers import ClassifierSource
from bench.models.parts import part_fingerprints
from common.checks import (
    choice,
    flag,
    integer,
    known_keys,
    optional_positive_int,
    positive_int,
    real,
)
from common.errors import ConfigError, PureBenchError
from defenses.base import Defense

log = logging.getLogger(__name__)

# Keys of the fixed-shape config nodes the runner reads (the rest are components' arguments,
# which their constructors check).
SUITE_KEYS = ("attacks", "views", "cascade", "clean_only")
DECISION_KEYS = ("draws", "vote", "headline", "success_at")
THREAT_KEYS = ("norm", "eps")
# The key of an attack's config that says how it sees the defense (not a constructor argument).
VIEW_KEY = "view"
# The key that caps the images an attack runs on (the first ones of those it must see): a
# black-box check sized to what it is for (gradient masking), not to the subset.
IMAGES_KEY = "max_images"
# The harness's own attacks, one of which the escalation strengthens: PGDEOT, or StAdv under a
# flow threat.
LEAD_TARGETS = tuple(f"{cls.__module__}.{cls.__qualname__}" for cls in HARNESS_ATTACKS)


@dataclass(frozen=True)
class Decision:
    """How judged images are counted (see :mod:`bench.engine.decision`).

    Attributes:
        draws: fresh purifications per judged image (1 for a deterministic defense).
        vote: ``K`` of the majority-vote rule.
        headline: the rule behind ``clean_acc`` / ``robust_acc``.
        success_at: ``final`` (judge the returned point) or ``any`` (an iterate an attack saw
            fooled counts too).
    """

    draws: int
    vote: int
    headline: str
    success_at: str


@dataclass(frozen=True)
class AttackPlan:
    """One attack of the suite, ready to bind to its view.

    Attributes:
        make: the attack's partial; ``make(model=view)`` builds it.
        view: how it sees the defense (its own ``view``, the suite's, EOT resolved).
        traits: what it declares about itself (:func:`attacks.base.traits`).
        target: its ``_target_``.
        max_images: attack at most this many of the images it must see (the first ones);
            ``None``: all.
    """

    make: Callable[..., Attack]
    view: ViewOptions
    traits: Traits
    target: str
    max_images: int | None = None

    @property
    def kind(self) -> str:
        """``white-box``, ``black-box`` or ``transfer`` (a transfer view makes any attack one)."""
        return "transfer" if self.view.grad == "transfer" else self.traits.kind


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a run needs, validated and instantiated before any heavy compute."""

    dataset: ImageDataset
    classifier: ClassifierSource
    defense: Defense
    name: str
    classifier_name: str
    attacks: dict[str, AttackPlan]
    indices: Tensor
    device: torch.device
    norm: str
    eps: float
    seed: int
    subset_seed: int
    batch_size: int
    decision: Decision
    cascade: bool
    diagnostics: DiagnosticsConfig
    escalation: EscalationConfig
    lead: Lead | None
    fingerprint: str
    shard: dict[str, int] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Lead:
    """The attack the escalation strengthens (:mod:`bench.engine.escalation`).

    Attributes:
        name: its name in the suite, or ``None`` for the harness's default PGD (a suite
            without a harness PGD, such as AutoAttack alone).
        spec: its plan at the suite's budget.
        base: that budget (level 0).
    """

    name: str | None
    spec: AttackPlan
    base: Budget


class _Probe(torch.nn.Module):
    """Stand-in model for checking attack constructors before the real classifier exists."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :2] * self.weight


@functools.cache
def top_level_keys(conf_dir: str = CONF_DIR) -> tuple[str, ...]:
    """The keys a run config may have: ``eval.yaml``'s own, its config groups, Hydra's."""
    primary = OmegaConf.load(Path(conf_dir) / "eval.yaml")
    groups = set()
    for entry in primary.get("defaults", []):
        key = next(iter(entry)) if isinstance(entry, Mapping) else str(entry)
        groups.add(key.removeprefix("optional ").split("@")[0].strip("/"))
    return tuple(sorted({*primary.keys(), *groups, "hydra"} - {"defaults", "_self_"}))


def defense_name(cfg: DictConfig, choice: str | None, conf_dir: str = CONF_DIR) -> str:
    """The defense's name on the leaderboard and in the record.

    ``name=`` when given, else the config option's when the run builds what that option
    declares, else the name of the class that is built. A defense swapped in by
    ``defense._target_=my.Defense`` (or built in a notebook) under the default option ``none``
    must not be recorded as ``none``: it would replace the baseline.
    """
    if cfg.get("name"):
        return str(cfg.name)
    target = str(cfg.defense.get("_target_", ""))
    option = Path(conf_dir) / "defense" / f"{choice}.yaml"
    # An option from another config dir (a user's searchpath) is taken at its word.
    if choice and (not option.is_file() or declared_target(option) == target):
        return str(choice)
    return target.rsplit(".", 1)[-1] or str(choice)


def declared_target(option: Path) -> str | None:
    """The ``_target_`` a defense option declares, itself or through the options it extends.

    ``atop_pretrained.yaml`` names no target: it extends ``atop`` (``defaults: [atop]``), whose
    target it builds. The last target on the defaults list wins, as in Hydra's merge.
    """
    node = OmegaConf.load(option)
    if node.get("_target_"):
        return str(node._target_)
    found = None
    for entry in node.get("defaults") or []:
        parent = option.with_name(f"{entry}.yaml") if isinstance(entry, str) else None
        if parent is not None and parent.is_file():
            found = declared_target(parent) or found
    return found


def check_keys(cfg: DictConfig) -> None:
    """Refuse keys nobody reads (``+foo=1``, a typo in a fixed-shape node)."""
    known_keys("config keys", cfg.keys(), top_level_keys())
    known_keys("suite keys", (cfg.get("suite") or {}).keys(), SUITE_KEYS)
    known_keys("decision keys", (cfg.get("decision") or {}).keys(), DECISION_KEYS)
    known_keys("threat keys", (cfg.get("threat") or {}).keys(), THREAT_KEYS)
    known_keys(
        "view options", (cfg.get("view") or {}).keys(), [f.name for f in fields(ViewOptions)]
    )


def check_scalars(cfg: DictConfig) -> None:
    """Every run scalar, before any work (a float seed or a string batch size is refused)."""
    positive_int("n_samples", cfg.n_samples)
    integer("seed", cfg.seed, minimum=0)
    integer("subset_seed", cfg.subset_seed, minimum=0)
    positive_int("batch_size", cfg.batch_size)
    positive_int("eot_default", cfg.eot_default)
    resolve_threads(cfg.get("threads"))
    paper = cfg.get("paper")
    if paper is not None and not OmegaConf.is_dict(paper):
        raise ConfigError(f"paper={paper!r} is not allowed; it must be null or a mapping")
    suite = cfg.suite
    flag("suite.cascade", suite.get("cascade", True))
    flag("suite.clean_only", suite.get("clean_only", False))


def instantiate_checked(node: Any, what: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose failures name the component; ours pass through."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        # Hydra wraps the constructor's own error; surface ours (they name the bad value).
        cause = err.__cause__
        if isinstance(cause, PureBenchError):
            raise cause from None
        raise ConfigError(f"cannot build the {what} from its config: {err}") from err


def threat_of(cfg: DictConfig) -> tuple[Any, Any]:
    """The threat's norm and eps as configured (checked against the images later)."""
    try:
        return cfg.threat.norm, cfg.threat.eps
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"threat.eps is not set for dataset {cfg.dataset.get('_target_', '?')} and threat "
            f"norm {cfg.threat.get('norm')}: pass threat.eps=<value> or pick a named threat "
            "(e.g. threat=linf_8)"
        ) from err


def decision_of(cfg: DictConfig, defense: Defense) -> Decision:
    """The decision rules of ``cfg.decision`` for this defense."""
    node = cfg.get("decision", {})
    info = type(defense).info
    draws = positive_int("decision.draws", node.get("draws"))
    draws = draws if info.stochastic else 1  # every draw of a deterministic defense is the same
    vote = node.get("vote")
    if vote is None:
        vote = min(info.vote, draws) if info.vote else draws
    vote = integer("decision.vote", vote, minimum=1, maximum=draws)
    headline = choice("decision.headline", node.get("headline", "auto"), ("auto", *RULES))
    if headline == "auto":
        headline = "single" if not info.stochastic else ("vote" if info.vote else "avg")
    success_at = choice("decision.success_at", node.get("success_at", "final"), SUCCESS_AT)
    return Decision(draws=draws, vote=vote, headline=headline, success_at=success_at)


def shard_of(value: Any) -> dict[str, int] | None:
    """Parse ``shard=i/n`` (0-based slice ``i`` of ``n``)."""
    if value is None:
        return None
    text = str(value)
    parts = text.split("/")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        index, count = int(parts[0]), int(parts[1])
        if count >= 1 and 0 <= index < count:
            return {"index": index, "count": count}
    raise ConfigError(
        f"shard={text!r} must be 'i/n' with integers 0 <= i < n (slice i of n of the subset), "
        "or null"
    )


def declared_view(cfg: DictConfig, name: str) -> dict[str, Any]:
    """The view options attack ``name`` of the suite is given, before EOT is resolved.

    The run's ``view`` defaults, then the attack's own ``view`` (a transfer attack is a
    transfer attack in every suite), then the suite's ``views.<name>`` (a suite's budget).
    """
    merged = dict(OmegaConf.to_container(cfg.get("view", {}), resolve=True))
    own = cfg.suite.attacks[name].get(VIEW_KEY)
    if own is not None and not OmegaConf.is_dict(own):
        raise ConfigError(f"attack {name!r} view={own!r} must be a mapping of view options")
    merged.update(OmegaConf.to_container(own, resolve=True) if own else {})
    suite_view = cfg.suite.get("views", {}).get(name, {})
    merged.update(OmegaConf.to_container(suite_view, resolve=True) if suite_view else {})
    return merged


def attack_partial(node: DictConfig, name: str) -> Callable[..., Attack]:
    """The attack's partial: its config without ``view`` and ``max_images`` (the harness's)."""
    args = OmegaConf.to_container(node, resolve=True)
    args.pop(VIEW_KEY, None)
    args.pop(IMAGES_KEY, None)
    return instantiate_checked(args, f"attack {name!r}")


def view_of(
    cfg: DictConfig, name: str, internal_eot: int, defense: Defense, warnings: list[str]
) -> ViewOptions:
    """How attack ``name`` sees the defense (:func:`declared_view`), EOT resolved.

    ``internal_eot`` is the gradient samples the attack averages itself (its traits).
    """
    merged = declared_view(cfg, name)
    known_keys(f"view options of attack {name!r}", merged, [f.name for f in fields(ViewOptions)])
    options = ViewOptions(**merged)
    options.validate()
    if options.eot_samples is None:
        stochastic = type(defense).info.stochastic and options.grad != "transfer"
        # An attack that averages gradients itself (AutoAttack rand's eot_iter) gets a plain view.
        auto = int(cfg.eot_default) if stochastic and internal_eot == 1 else 1
        return replace(options, eot_samples=auto)
    if options.eot_samples > 1 and internal_eot > 1:
        msg = (
            f"attack {name!r} averages {internal_eot} gradients itself and its view averages "
            f"{options.eot_samples} purifications: {internal_eot * options.eot_samples} "
            "purifications per step, two different EOT estimators stacked"
        )
        log.warning(msg)
        warnings.append(msg)
    return options


def attack_of(
    cfg: DictConfig, name: str, node: DictConfig, defense: Defense, warnings: list[str]
) -> AttackPlan:
    """Build attack ``name``'s partial, run its constructor on a stand-in, resolve its view."""
    norm = cfg.threat.norm
    if node.get("norm", norm) != norm:
        raise ConfigError(
            f"attack {name!r} has norm={node.norm!r} but the threat is {norm}; attacks take "
            "their norm from the threat (norm: ${threat.norm})"
        )
    make = attack_partial(node, name)
    allowed = norms_of(make)  # declared by the class: refused before it is even built
    if norm not in allowed:
        raise ConfigError(
            f"attack {name!r} ({node._target_}) does not support threat norm {norm!r}; "
            f"allowed threats: {', '.join(allowed)}"
        )
    try:  # constructors validate their arguments: bind to a stand-in model to run them now
        probe = make(model=_Probe())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"attack {name!r}: {err}") from err
    declared = traits(probe, name)
    view = view_of(cfg, name, declared.internal_eot, defense, warnings)
    AttackView(_Probe(), defense, view)  # refuses grad=exact on a masked defense
    limit = optional_positive_int(f"attack {name!r} {IMAGES_KEY}", node.get(IMAGES_KEY))
    return AttackPlan(
        make=make, view=view, traits=declared, target=str(node._target_), max_images=limit
    )


def attacks_of(cfg: DictConfig, defense: Defense, warnings: list[str]) -> dict[str, AttackPlan]:
    """Every attack of the suite, in suite order."""
    suite = cfg.suite
    attacks = suite.get("attacks") or {}
    if not attacks and not suite.get("clean_only", False):
        raise ConfigError(
            "the suite has no attacks; pick one with suite=<name> (suite=clean measures clean "
            "accuracy only)"
        )
    unknown = sorted(set(suite.get("views", {}) or {}) - set(attacks))
    if unknown:
        raise ConfigError(
            f"suite.views names {unknown}, which are not attacks of the suite; attacks: "
            f"{', '.join(attacks) or 'none'}"
        )
    return {name: attack_of(cfg, name, node, defense, warnings) for name, node in attacks.items()}


def _lead_rank(spec: AttackPlan) -> tuple[bool, bool, bool, int]:
    # The view's rank (exact gradients, fresh noise, EOT), a plain loss before a defense-aware
    # one ahead of the EOT samples.
    grad, randomness, eot = view_rank(spec.view)
    return grad, randomness, bool(spec.make.keywords.get("defense_loss_weight")), eot


def lead_of(cfg: DictConfig, attacks: Mapping[str, AttackPlan], defense: Defense) -> Lead | None:
    """The suite's lead white-box attack: the harness's own attack that sees the defense best.

    The harness's attacks are PGDEOT and, under a flow threat, StAdv. A suite without one
    escalates the threat's (:func:`bench.engine.threat.harness_attack`, CE then margin) on the
    default view.
    """
    if not attacks:
        return None
    candidates = [
        n
        for n, a in attacks.items()
        if a.target in LEAD_TARGETS and a.kind == "white-box" and a.view.grad != "transfer"
    ]
    if candidates:
        name = min(candidates, key=lambda n: _lead_rank(attacks[n]))
        spec = attacks[name]
    else:
        name = None
        info = type(defense).info
        grad = "exact" if info.differentiable else "bpda"
        eot = int(cfg.eot_default) if info.stochastic else 1
        cls = harness_attack(cfg.threat.norm)
        make = functools.partial(
            cls,
            norm=cfg.threat.norm,
            eps=cfg.threat.eps,
            steps=20,
            restarts=2,
            loss=["ce", "margin"],
            seed=int(cfg.seed),
        )
        spec = AttackPlan(
            make=make,
            view=ViewOptions(grad=grad, eot_samples=eot),
            traits=traits(cls, "pgd"),
            target=f"{cls.__module__}.{cls.__qualname__}",
        )
    return Lead(name, spec, base_budget(spec.make.keywords, int(spec.view.eot_samples or 1)))


def subset_of(cfg: DictConfig, dataset: ImageDataset, shard: dict[str, int] | None) -> Tensor:
    """The indices this run evaluates: the fixed subset, or this shard's slice of it."""
    indices = eval_subset(dataset.n_test, int(cfg.n_samples), int(cfg.subset_seed))
    if shard is None:
        return indices
    if shard["count"] > len(indices):
        raise ConfigError(
            f"shard={cfg.shard} splits {len(indices)} images into more shards than images; "
            f"use at most {len(indices)} shards"
        )
    # A contiguous slice of the fixed subset: shards of one configuration partition it.
    return torch.tensor_split(indices, shard["count"])[shard["index"]]


def _built(cfg: DictConfig, given: Mapping[str, Any], key: str) -> Any:
    """The run's ``key`` part: the one given (the Python API's), else built from its config."""
    return given[key] if key in given else instantiate_checked(cfg[key], key)


def make_plan(
    cfg: DictConfig, name: str, classifier_name: str, parts: Mapping[str, Any] | None = None
) -> Plan:
    """Validate ``cfg`` and instantiate every cheap part of the run (no training, no attack).

    Args:
        cfg: the composed run config (``conf/eval.yaml``).
        name: the defense's name in messages and records.
        classifier_name: the classifier's name in messages.
        parts: ``defense``, ``classifier`` (a source) or ``dataset`` built already (the Python
            API's in-memory objects, :mod:`bench.api`); each replaces its config node's build.

    Raises:
        ConfigError, DataNotFoundError, CheckpointError: bad input, naming the value.
    """
    check_keys(cfg)
    check_scalars(cfg)
    given = dict(parts or {})
    set_threads(cfg.get("threads"))
    norm, eps = threat_of(cfg)
    choice("threat.norm", norm, NORMS)
    real("threat.eps", eps, "> 0", lambda v: v > 0)  # its cap needs the images: checked below
    device = resolve_device(str(cfg.device))
    defense = _built(cfg, given, "defense")
    if not isinstance(defense, Defense):
        raise ConfigError(f"defense config builds {type(defense).__name__}, not a defenses.Defense")
    warnings: list[str] = []
    attacks = attacks_of(cfg, defense, warnings)
    decision = decision_of(cfg, defense)
    diagnostics = DiagnosticsConfig.from_cfg(cfg.get("diagnostics"))
    escalation = EscalationConfig.from_cfg(cfg.get("escalation"))
    dataset = _built(cfg, given, "dataset")
    norm, eps = check_budget(norm, eps, tuple(dataset.shape))
    classifier = _built(cfg, given, "classifier")
    classifier.check(dataset)  # a checkpoint that does not fit fails here, before any work
    shard = shard_of(cfg.get("shard"))
    indices = subset_of(cfg, dataset, shard)
    weights = [classifier.fingerprint(), *part_fingerprints(defense)]
    return Plan(
        dataset=dataset,
        classifier=classifier,
        defense=defense,
        name=name,
        classifier_name=classifier_name,
        attacks=attacks,
        indices=indices,
        device=device,
        norm=norm,
        eps=eps,
        seed=int(cfg.seed),
        subset_seed=int(cfg.subset_seed),
        batch_size=int(cfg.batch_size),
        decision=decision,
        cascade=bool(cfg.suite.get("cascade", True)),
        diagnostics=diagnostics,
        escalation=escalation,
        lead=lead_of(cfg, attacks, defense) if escalation.enabled else None,
        fingerprint=fingerprint(cfg, weights),
        shard=shard,
        warnings=warnings,
    )

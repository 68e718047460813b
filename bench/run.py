"""The evaluation runner: ``evaluate(cfg) -> RunRecord`` and its thin Hydra entry point.

Order of work, so bad input fails before anything heavy and leaves no record: validate the
scalars, instantiate the dataset (checks its files), the defense, the classifier source and the
attack partials, select the evaluation subset; only then load or train the classifier and run
the attacks. From that point on any failure still writes a complete record with
``status: failed`` and the error.
"""

from __future__ import annotations

import logging
import math
import resource
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import Tensor
from tqdm.auto import tqdm

from attacks.base import NORMS, Attack
from bench.config import CONF_DIR
from bench.data import ImageDataset, eval_subset
from bench.devices import proc_status_mb, reset_peak_rss, resolve_device
from bench.engine.attack_view import AttackView, ViewOptions
from bench.engine.decision import RULES, SUCCESS_AT, Judge, Ledger, Stage, locked_predictions
from bench.engine.diagnostics import DiagnosisInput, DiagnosticsConfig, diagnose, verdict
from bench.engine.resume import ResumeState, fingerprint
from bench.models.parts import prepare_parts
from bench.provenance import git_state, package_versions
from bench.reporting.leaderboard import build_leaderboard, collect_records
from bench.reporting.loggers import NoLogger
from bench.reporting.records import PER_SAMPLE_NAME, AttackResult, RunRecord, write_record
from common.errors import ConfigError, PureBenchError, ThreatModelViolation
from defenses.base import Defense

log = logging.getLogger(__name__)

# Adversarial images kept per attack for the dashboard's image grid.
GRID_IMAGES = 8

# Slack on the eps check, as AutoAttack's own sanity line: float rounding of x + delta.
EPS_TOLERANCE = 1e-6


@dataclass
class _Plan:
    """What a run needs, instantiated and validated before any heavy compute."""

    dataset: ImageDataset
    classifier: Any  # a bench.classifiers.ClassifierSource
    defense: Defense
    attacks: dict[str, Callable[..., Attack]]
    views: dict[str, ViewOptions]
    kinds: dict[str, str]
    returns_best: dict[str, bool]
    indices: Tensor
    device: torch.device
    norm: str
    eps: float
    decision: Decision
    cascade: bool
    diagnostics: DiagnosticsConfig
    warnings: list[str]
    shard: dict[str, int] | None = None
    logger: Any = None  # a bench.loggers logger (logger=none|wandb)


@dataclass(frozen=True)
class Decision:
    """How judged images are counted (see :mod:`bench.robust_eval`).

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


class _Probe(torch.nn.Module):
    """Stand-in model for checking attack constructors before the real classifier exists."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :2] * self.weight


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} is not allowed; it must be a positive integer")
    return value


def _threat(cfg: DictConfig) -> tuple[str, float]:
    try:
        norm, eps = cfg.threat.norm, cfg.threat.eps
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"threat.eps is not set for dataset {cfg.dataset.get('_target_', '?')} and threat "
            f"norm {cfg.threat.get('norm')}: pass threat.eps=<value> or pick a named threat "
            "(e.g. threat=linf_8)"
        ) from err
    if norm not in NORMS:
        raise ConfigError(f"threat.norm={norm!r} is not allowed; allowed: {', '.join(NORMS)}")
    is_number = isinstance(eps, int | float) and not isinstance(eps, bool)
    if not is_number or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"threat.eps={eps!r} is not allowed; it must be a finite number > 0")
    if norm == "Linf" and eps > 1:
        raise ConfigError(f"threat.eps={eps} exceeds 1, the whole [0, 1] pixel range, for Linf")
    return norm, float(eps)


def _instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        # Hydra wraps the constructor's own error; surface ours (they name the bad value).
        cause = err.__cause__
        if isinstance(cause, PureBenchError):
            raise cause from None
        raise ConfigError(f"cannot build the {what} from its config: {err}") from err


def _view_options(
    cfg: DictConfig, name: str, attack: Any, defense: Defense, warnings: list[str]
) -> ViewOptions:
    """The run's ``view`` defaults, overridden by ``suite.views.<name>``, with EOT resolved."""
    merged = OmegaConf.to_container(cfg.get("view", {}), resolve=True)
    own = cfg.suite.get("views", {}).get(name, {})
    merged.update(OmegaConf.to_container(own, resolve=True) if own else {})
    allowed = {f.name for f in fields(ViewOptions)}
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise ConfigError(
            f"view options {unknown} for attack {name!r} are not allowed; allowed: "
            f"{', '.join(sorted(allowed))}"
        )
    options = ViewOptions(**merged)
    options.validate()
    internal_eot = int(getattr(attack, "internal_eot", 1) or 1)
    if options.eot_samples is None:
        stochastic = type(defense).info.stochastic and options.grad != "transfer"
        # An attack that averages gradients itself (AutoAttack rand's eot_iter) gets a plain view.
        auto = _positive_int(cfg, "eot_default") if stochastic and internal_eot == 1 else 1
        options = replace(options, eot_samples=auto)
    elif options.eot_samples > 1 and internal_eot > 1:
        msg = (
            f"attack {name!r} averages {internal_eot} gradients itself and its view averages "
            f"{options.eot_samples} purifications: {internal_eot * options.eot_samples} "
            "purifications per step, two different EOT estimators stacked"
        )
        log.warning(msg)
        warnings.append(msg)
    return options


def _decision(cfg: DictConfig, defense: Defense) -> Decision:
    node = cfg.get("decision", {})
    info = type(defense).info
    draws = _positive_int(cfg, "decision.draws")
    draws = draws if info.stochastic else 1  # every draw of a deterministic defense is the same
    vote = node.get("vote")
    if vote is None:
        vote = min(info.vote, draws) if info.vote else draws
    if isinstance(vote, bool) or not isinstance(vote, int) or not 1 <= vote <= draws:
        raise ConfigError(
            f"decision.vote={vote!r} is not allowed; it must be an integer in [1, draws={draws}]"
        )
    headline = node.get("headline", "auto")
    if headline not in ("auto", *RULES):
        raise ConfigError(
            f"decision.headline={headline!r} is not allowed; allowed: auto, {', '.join(RULES)}"
        )
    if headline == "auto":
        headline = "single" if not info.stochastic else ("vote" if info.vote else "avg")
    success_at = node.get("success_at", "final")
    if success_at not in SUCCESS_AT:
        raise ConfigError(
            f"decision.success_at={success_at!r} is not allowed; allowed: {', '.join(SUCCESS_AT)}"
        )
    return Decision(draws=draws, vote=vote, headline=headline, success_at=success_at)


def _shard(value: Any) -> dict[str, int] | None:
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


def _kind(attack: Any, options: ViewOptions) -> str:
    if options.grad == "transfer":
        return "transfer"
    return str(getattr(attack, "kind", "white-box"))


def plan(cfg: DictConfig) -> _Plan:
    """Validate ``cfg`` and instantiate every cheap part of the run (no training, no attack)."""
    norm, eps = _threat(cfg)
    n_samples = _positive_int(cfg, "n_samples")
    if cfg.get("threads") is not None:
        torch.set_num_threads(_positive_int(cfg, "threads"))
    _positive_int(cfg, "batch_size")
    device = resolve_device(str(cfg.device))
    if not cfg.suite.get("attacks") and not cfg.suite.get("clean_only", False):
        raise ConfigError(
            "the suite has no attacks; pick one with suite=<name> (suite=clean measures clean "
            "accuracy only)"
        )
    unknown_views = sorted(
        set(cfg.suite.get("views", {}) or {}) - set(cfg.suite.get("attacks") or {})
    )
    if unknown_views:
        raise ConfigError(
            f"suite.views names {unknown_views}, which are not attacks of the suite; attacks: "
            f"{', '.join(cfg.suite.get('attacks') or {}) or 'none'}"
        )
    defense = _instantiate(cfg.defense, "defense")
    if not isinstance(defense, Defense):
        raise ConfigError(f"defense config builds {type(defense).__name__}, not a defenses.Defense")
    attacks, views, kinds, returns_best, warnings = {}, {}, {}, {}, []
    for name, node in (cfg.suite.get("attacks") or {}).items():
        if node.get("norm", norm) != norm:
            raise ConfigError(
                f"attack {name!r} has norm={node.norm!r} but the threat is {norm}; attacks take "
                "their norm from the threat (norm: ${threat.norm})"
            )
        attacks[name] = _instantiate(node, f"attack {name!r}")
        try:  # constructors validate their arguments: bind to a stand-in model to run them now
            probe = attacks[name](model=_Probe())
        except (TypeError, ValueError) as err:
            raise ConfigError(f"attack {name!r}: {err}") from err
        views[name] = _view_options(cfg, name, probe, defense, warnings)
        kinds[name] = _kind(probe, views[name])
        returns_best[name] = bool(getattr(probe, "returns_best", True))
        AttackView(_Probe(), defense, views[name])  # refuses grad=exact on a masked defense
    decision = _decision(cfg, defense)
    diagnostics = DiagnosticsConfig.from_cfg(cfg.get("diagnostics"))
    dataset = _instantiate(cfg.dataset, "dataset")
    classifier = _instantiate(cfg.classifier, "classifier")
    shard = _shard(cfg.get("shard"))
    logger = _instantiate(cfg.logger, "logger") if cfg.get("logger") is not None else NoLogger()
    indices = eval_subset(dataset.n_test, n_samples, cfg.subset_seed)
    if shard is not None:
        if shard["count"] > len(indices):
            raise ConfigError(
                f"shard={cfg.shard} splits {len(indices)} images into more shards than images; "
                f"use at most {len(indices)} shards"
            )
        # A contiguous slice of the fixed subset: shards of one configuration partition it.
        indices = torch.tensor_split(indices, shard["count"])[shard["index"]]
    cascade = bool(cfg.suite.get("cascade", True))
    return _Plan(
        dataset,
        classifier,
        defense,
        attacks,
        views,
        kinds,
        returns_best,
        indices,
        device,
        norm,
        eps,
        decision,
        cascade,
        diagnostics,
        warnings,
        shard,
        logger,
    )


def check_threat(x: Tensor, x_adv: Tensor, norm: str, eps: float, attack: str) -> float:
    """Assert the threat model on one adversarial batch and return its largest perturbation.

    Raises:
        ThreatModelViolation: NaN or inf, a pixel outside [0, 1], or a perturbation beyond eps.
    """
    if x_adv.shape != x.shape:
        raise ThreatModelViolation(
            f"{attack} returned shape {tuple(x_adv.shape)} for inputs of shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x_adv).all():
        raise ThreatModelViolation(f"{attack} returned NaN or inf pixels")
    low, high = x_adv.min().item(), x_adv.max().item()
    if low < 0 or high > 1:
        raise ThreatModelViolation(f"{attack} left [0, 1]: pixel range [{low:.6g}, {high:.6g}]")
    delta = (x_adv - x).flatten(1)
    dist = delta.abs().amax(1) if norm == "Linf" else delta.norm(p=2, dim=1)
    worst = dist.max().item() if len(dist) else 0.0
    if worst > eps + EPS_TOLERANCE:
        raise ThreatModelViolation(
            f"{attack} exceeded the threat model: {norm} perturbation {worst:.8g} > eps {eps:.8g} "
            f"(+{EPS_TOLERANCE:g}) on {(dist > eps + EPS_TOLERANCE).sum().item()} image(s)"
        )
    return worst


def evaluation_seed(seed: int) -> int:
    """The evaluator's seed stream, separate from every attacker's."""
    return seed * 1_000_003 + 999_983


def attack_seeds(seed: int, k: int) -> dict[str, int]:
    """Seeds of the ``k``-th attack: its own (random starts) and its view's purifications."""
    return {"attack": seed * 1000 + k, "view": seed * 1_000_003 + k + 1}


def batch_seed(base: int, batch: int) -> int:
    """The seed of batch ``batch`` of a stream seeded ``base``.

    Every batch reseeds from its position alone, so a resumed run that skips finished batches
    draws exactly what an uninterrupted run draws for the rest.
    """
    return (base * 2_654_435_761 + batch * 40_503 + 1) % (2**62)


@dataclass
class _AttackOutput:
    preds: Tensor  # (draws, n_attacked) judged classes
    worst: float
    warnings: list[str]
    believed: Tensor | None  # attack view's own prediction (approximate-gradient attacks)
    on_path: Tensor | None  # fooled at some iterate, as the attack saw it


def _run_attack(
    name: str,
    attack: Attack,
    view: AttackView,
    judge: Judge,
    x: Tensor,
    y: Tensor,
    *,
    plan_: _Plan,
    batch_size: int,
    seeds: dict[str, int],
    state: ResumeState,
) -> tuple[_AttackOutput, dict[str, Any]]:
    """Run one attack over ``x`` in batches and judge every adversarial batch.

    Batches finished by an earlier, interrupted run of the same configuration are taken from
    ``state``; every other batch is saved there when done. Returns the output and the totals
    (pass counts, wall time, the first adversarial images).
    """
    known = view.options.randomness == "known"
    # What the attack's own view believes, to measure transfer failure (approximate gradients)
    # and to confirm that locked noise judges exactly as the attacker saw.
    want_belief = view.options.grad != "exact" or known
    track_path = plan_.decision.success_at == "any"
    done = state.done(name)
    batches = []
    for b, i in enumerate(tqdm(range(0, len(x), batch_size), desc=name, leave=False, disable=None)):
        if b in done:
            batches.append(done[b])
            continue
        start = time.perf_counter()
        xb = x[i : i + batch_size].to(plan_.device)
        yb = y[i : i + batch_size].to(plan_.device)
        # torchattacks draws random starts from torch's global generator: seeded per batch, so
        # a run is reproducible, independent of attack order, and resumable batch by batch.
        torch.manual_seed(batch_seed(seeds["attack"], b))
        view.reseed(batch_seed(seeds["view"], b))
        judge.view.reseed(batch_seed(seeds["judge"], b))
        view.counter.reset()
        judge.view.counter.reset()
        x_adv = attack(xb, yb).detach()
        out: dict[str, Any] = {
            "worst": check_threat(xb, x_adv, plan_.norm, plan_.eps, name),
            "believed": None,
            "on_path": None,
        }
        # Known randomness: the batch the attack saw is judged with the noise it was given.
        if known:
            out["preds"] = locked_predictions(view, x_adv, plan_.decision.draws)
        else:
            out["preds"] = judge.predictions(x_adv, plan_.device)
        if want_belief:
            with torch.inference_mode():
                out["believed"] = view(x_adv).argmax(1).cpu()
        path = getattr(attack, "fooled_any", None)
        if track_path and isinstance(path, Tensor) and len(path) == len(xb):
            out["on_path"] = path.cpu().bool()
        out["warnings"] = list(getattr(attack, "warnings", []))
        out["passes"] = view.counter.snapshot()
        out["judge_purify"] = judge.view.counter.purify
        out["wall_s"] = time.perf_counter() - start
        out["examples"] = x_adv[:GRID_IMAGES].cpu() if b == 0 else None
        state.save_batch(name, b, out)
        batches.append(out)
    draws = plan_.decision.draws
    warnings: list[str] = []
    for out in batches:
        warnings += [w for w in out["warnings"] if w not in warnings]
    paths = [o["on_path"] for o in batches]
    totals = {
        "passes": {
            k: sum(o["passes"][k] for o in batches) for k in ("forward", "backward", "purify")
        },
        "judge_purify": sum(o["judge_purify"] for o in batches),
        "wall_s": sum(o["wall_s"] for o in batches),
        "examples": batches[0]["examples"] if batches else None,
    }
    output = _AttackOutput(
        preds=torch.cat([o["preds"] for o in batches], 1)
        if batches
        else torch.empty(draws, 0, dtype=torch.long),
        worst=max((o["worst"] for o in batches), default=0.0),
        warnings=warnings,
        believed=torch.cat([o["believed"] for o in batches])
        if batches and all(o["believed"] is not None for o in batches)
        else None,
        on_path=torch.cat(paths) if paths and all(p is not None for p in paths) else None,
    )
    return output, totals


def _reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark (a sweep's worker process runs many jobs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def _peak_memory_mb(device: torch.device) -> float:
    """The high-water mark since :func:`_reset_peak_memory` (CUDA allocator, or resident set)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return proc_status_mb("VmHWM")
    except OSError:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS), the process's lifetime
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(
    cfg: DictConfig, *, output_dir: Path, choices: Mapping[str, str | None] | None = None
) -> RunRecord:
    """Run one evaluation and write ``record.json`` and ``per_sample.csv`` into ``output_dir``.

    Args:
        cfg: the composed config (``conf/eval.yaml``).
        output_dir: where the record goes (the Hydra run dir under ``python -m bench``).
        choices: the config-group choices (``hydra.runtime.choices``); taken from the Hydra
            config when not given.

    Returns:
        The record, ``status="completed"``.

    Raises:
        ConfigError, DataNotFoundError, CheckpointError: bad input, before any heavy compute;
            no record is written.
        Exception: anything failing later; a record with ``status="failed"`` is written first.
    """
    started, t0 = datetime.now(UTC), time.perf_counter()
    choices = dict(choices if choices is not None else _hydra_choices(cfg))
    p = plan(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = {  # the run's own config; the `hydra` node (present under compose) is Hydra's
        key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        for key, node in cfg.items()
        if key != "hydra"
    }
    seed = int(cfg.seed)
    record = RunRecord(
        status="failed",
        choices={k: v for k, v in choices.items() if not k.startswith("hydra/")},
        config=resolved,
        dataset=p.dataset.name,
        classifier=str(choices.get("classifier")),
        defense=str(choices.get("defense")),
        threat={"norm": p.norm, "eps": p.eps, "name": choices.get("threat")},
        n_samples=len(p.indices),
        indices=p.indices.tolist(),
        seeds={
            "seed": seed,
            "subset_seed": int(cfg.subset_seed),
            "evaluation": evaluation_seed(seed),
            "attacks": {name: attack_seeds(seed, k) for k, name in enumerate(p.attacks)},
        },
        device=str(p.device),
        started=started.isoformat(timespec="seconds"),
        finished="",
        wall_s=0.0,
        versions=package_versions(),
        git=git_state(),
        defense_info=asdict(type(p.defense).info),
        headline_rule=p.decision.headline,
        decision={
            **asdict(p.decision),
            "evaluate": "after" if p.decision.success_at == "final" else "while",
            "warnings": p.warnings,
        },
        cascade=p.cascade,
        shard=p.shard,
        fingerprint=fingerprint(resolved),
    )
    state = ResumeState(_resume_path(cfg, record), record.fingerprint)
    examples: dict[str, Tensor] = {}
    try:
        examples = _execute(cfg, p, record, output_dir, state, t0)
        record.status = "completed"
    except Exception as err:
        record.error = "".join(traceback.format_exception_only(err)).strip()
        log.error("run failed: %s", record.error)
        raise
    finally:
        record.finished = datetime.now(UTC).isoformat(timespec="seconds")
        record.defense_info["calls_per_purify"] = p.defense.calls_per_purify
        record.wall_s = time.perf_counter() - t0
        record.cost["wall_s"] = record.wall_s
        # The evaluation's own time: a cold run's wall time is mostly training (or waiting for
        # another job of the sweep to finish training a shared network), not the defense's cost.
        record.cost["eval_s"] = record.wall_s - record.cost.get("setup_s", 0.0)
        write_record(record, output_dir)
        _log_dashboard(cfg, p, record, examples)
    state.clear()  # only reached when the run completed and its record is written
    return record


def _log_dashboard(
    cfg: DictConfig, p: _Plan, record: RunRecord, examples: dict[str, Tensor]
) -> None:
    """Mirror the written record to the dashboard; its failure never costs the record."""
    if isinstance(p.logger, NoLogger):
        return
    try:
        root = Path(str(cfg.paths.results_dir))
        board = build_leaderboard(collect_records(root)) if root.is_dir() else None
        p.logger.log_run(record, examples, board)
    except Exception as err:  # the record is written; a dashboard outage must not hide it
        log.warning("dashboard logging failed (the record is written): %s", err)


def _resume_path(cfg: DictConfig, record: RunRecord) -> Path:
    """Where this configuration's per-batch checkpoint lives (one per shard and device)."""
    root = cfg.paths.get("resume_dir") or Path(str(cfg.paths.results_dir)) / "resume"
    shard = f"-shard{record.shard['index']}of{record.shard['count']}" if record.shard else ""
    return Path(str(root)) / f"{record.fingerprint}{shard}-{record.device}.pt"


def _execute(
    cfg: DictConfig, p: _Plan, record: RunRecord, output_dir: Path, state: ResumeState, t0: float
) -> dict[str, Tensor]:
    """Run the evaluation into ``record``; return a few images per stage for the dashboard.

    ``record.cost["setup_s"]`` gets the seconds from ``t0`` (the run's start) until the data,
    classifier and defense parts are ready: loading, or training and caching them.
    """
    x_test, y_test = p.dataset.test()
    x, y = x_test[p.indices], y_test[p.indices]
    classifier = p.classifier.load(p.dataset, p.device)
    record.classifier_info = p.classifier.describe()
    # The defense's generative parts (score networks, autoencoders) are trained or loaded now,
    # after every check of the config has passed.
    record.defense_parts = prepare_parts(
        p.defense,
        p.dataset,
        p.device,
        classifier=classifier,
        classifier_info=record.classifier_info,
    )
    record.cost["setup_s"] = time.perf_counter() - t0
    defense = p.defense.to(p.device).eval()
    name = str(record.defense)
    batch_size, seed, d = int(cfg.batch_size), int(cfg.seed), p.decision
    _reset_peak_memory(p.device)
    phase_peaks: list[float] = []  # the clean phase's and each attack's high-water mark

    eval_view = AttackView(
        classifier,
        defense,
        ViewOptions(eot_samples=1, allow_masked=True),
        seed=evaluation_seed(seed),
        name=name,
    )
    judge = Judge(eval_view, draws=d.draws, batch_size=batch_size)
    ledger = Ledger(y, d.draws, d.vote)
    if state.clean is None or state.clean.shape != (d.draws, len(y)):
        eval_view.reseed(evaluation_seed(seed))
        state.save_clean(judge.predictions(x, p.device))
    clean = ledger.add("clean", state.clean, torch.ones(len(y), dtype=torch.bool))
    clean_accs = ledger.accuracies(["clean"])
    record.clean_acc = clean_accs[d.headline]
    log.info(
        "clean accuracy %.2f%% (%s) on %d images", 100 * record.clean_acc.value, d.headline, len(y)
    )
    clean_only = ledger.alive()
    # Clean judging purifies every image `draws` times (counted even when resumed from disk).
    total_purify = len(y) * d.draws
    examples = {"clean": x[:GRID_IMAGES].clone()}

    views: dict[str, AttackView] = {}
    for k, (attack_name, make) in enumerate(p.attacks.items()):
        seeds = attack_seeds(seed, k)
        view = AttackView(
            classifier, defense, p.views[attack_name], seed=seeds["view"], name=name
        ).eval()
        view.stage = f"attack {attack_name!r}"
        views[attack_name] = view
        eval_view.stage = f"judging attack {attack_name!r}"
        mask = ledger.alive() if p.cascade else clean_only
        targets = mask.nonzero().squeeze(1)
        attack = make(model=view)
        phase_peaks.append(_peak_memory_mb(p.device))
        _reset_peak_memory(p.device)
        out, totals = _run_attack(
            attack_name,
            attack,
            view,
            judge,
            x[targets],
            y[targets],
            plan_=p,
            batch_size=batch_size,
            seeds={**seeds, "judge": evaluation_seed(seed) + k + 1},
            state=state,
        )
        wall = totals["wall_s"]
        if totals["examples"] is not None and p.logger.wants_examples:
            examples[f"adversarial/{attack_name}"] = totals["examples"]
            with torch.inference_mode():  # what the classifier saw
                examples[f"purified/{attack_name}"] = defense.purify(
                    totals["examples"].to(p.device),
                    generator=torch.Generator(p.device).manual_seed(evaluation_seed(seed)),
                ).cpu()
        ledger.add(attack_name, out.preds, mask, out.on_path)
        rules = ledger.accuracies(["clean", attack_name])
        believed = transfer_failure = None
        if out.believed is not None:
            fooled = out.believed != y[targets]
            believed = int(fooled.sum())
            still_right = (out.preds[0] == y[targets]) & fooled
            transfer_failure = float(still_right.sum()) / believed if believed else 0.0
        n_att = max(len(targets), 1)
        purify_images = totals["passes"]["purify"] + totals["judge_purify"]
        total_purify += purify_images
        record.attacks[attack_name] = AttackResult(
            target=str(cfg.suite.attacks[attack_name]._target_),
            robust_acc=rules[d.headline],
            n_attacked=len(targets),
            wall_s=wall,
            max_perturbation=out.worst,
            warnings=out.warnings,
            kind=p.kinds[attack_name],
            view=view.options.to_dict(),
            rules=rules,
            passes=totals["passes"],
            purifier_calls_per_image=purify_images * defense.calls_per_purify / n_att,
            peak_memory_mb=_peak_memory_mb(p.device),
            believed_fooled=believed,
            transfer_failure=transfer_failure,
            broken_on_path=None if out.on_path is None else int(out.on_path.sum()),
        )
        log.info(
            "%s: robust accuracy %.2f%% (%s, %.0f s)",
            attack_name,
            100 * rules[d.headline].value,
            d.headline,
            wall,
        )
        for w in out.warnings:
            log.warning("%s: %s", attack_name, w)

    robust = ledger.accuracies()
    # A clean-only run (suite=clean) measures what purification costs; it claims no robustness.
    record.robust_acc = robust[d.headline] if p.attacks else None
    record.rules = {
        rule: {"clean": clean_accs[rule], **({"robust": robust[rule]} if p.attacks else {})}
        for rule in RULES
    }
    record.cost.update(
        purifier_calls_per_image=total_purify * defense.calls_per_purify / len(y),
        peak_memory_mb=max([*phase_peaks, _peak_memory_mb(p.device)]),
        memory=("cuda allocator peak" if p.device.type == "cuda" else "process RSS high-water"),
    )
    _write_per_sample(ledger, p.indices, y, clean, d.headline, output_dir)
    record.per_sample_file = PER_SAMPLE_NAME
    if record.robust_acc is not None:
        log.info(
            "robust accuracy (worst case over %s, %s): %.2f%%",
            ", ".join(p.attacks),
            d.headline,
            100 * record.robust_acc.value,
        )

    if p.diagnostics.enabled and p.attacks:
        ok = clean_only.nonzero().squeeze(1)
        record.diagnostics = diagnose(
            DiagnosisInput(
                classifier=classifier,
                defense=defense,
                name=name,
                x=x[ok],
                y=y[ok],
                norm=p.norm,
                eps=p.eps,
                device=p.device,
                views=p.views,
                kinds=p.kinds,
                attacks=p.attacks,
                results=record.attacks,
                returns_best=p.returns_best,
                ledger=ledger,
                num_classes=p.dataset.num_classes,
                seed=seed,
                batch_size=batch_size,
            ),
            p.diagnostics,
        )
        record.verdict = verdict(record.diagnostics)
        log.info("diagnostics verdict: %s", record.verdict)
    return examples


def _write_per_sample(
    ledger: Ledger, indices: Tensor, y: Tensor, clean: Stage, headline: str, output_dir: Path
) -> None:
    """One row per image: label, clean prediction, and per stage and rule its outcome."""
    table = pd.DataFrame(
        {"index": indices.numpy(), "label": y.numpy(), "clean_pred": clean.predictions.numpy()}
    )
    for stage in ledger.stages:
        table[f"{stage.name}_correct"] = stage.correct[0].numpy()
        if ledger.draws > 1:
            table[f"{stage.name}_draws_correct"] = stage.correct.sum(0).numpy()
            table[f"{stage.name}_vote_correct"] = stage.vote_correct.numpy()
    flags = ledger.flags()
    for rule in RULES:
        if ledger.draws > 1 or rule == "single":
            table[f"robust_{rule}"] = flags[rule].numpy()
    table["robust"] = flags[headline].numpy()
    table.to_csv(output_dir / PER_SAMPLE_NAME, index=False)


def _hydra_choices(cfg: DictConfig) -> dict[str, str | None]:
    if HydraConfig.initialized():
        return dict(HydraConfig.get().runtime.choices)
    if "hydra" in cfg:
        return dict(cfg.hydra.runtime.choices)
    raise ConfigError("evaluate() needs `choices` when called outside a Hydra app")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> str:
    """Hydra entry point of ``python -m bench`` and ``purebench run``; returns the run's status.

    In a sweep a failing job must not take the others down: its failed record (or, for a bad
    config, its error) is logged and the sweep goes on; the end-of-sweep callback rebuilds the
    leaderboard, where the job's row shows ``failed`` with the reason. A single run re-raises.
    """
    hydra_cfg = HydraConfig.get()
    try:
        record = evaluate(cfg, output_dir=Path(hydra_cfg.runtime.output_dir))
    except Exception as err:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        log.error("job %s failed: %s", hydra_cfg.job.num, err)
        return "failed"
    return record.status

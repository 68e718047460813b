"""``evaluate(cfg) -> RunRecord``: one evaluation, its record, and the Hydra entry point.

The engine plans and runs the evaluation (:mod:`bench.engine`); this module turns what it
measured into the run's record (:mod:`bench.reporting`) and writes it. Bad input fails in the
plan, before any heavy compute, and leaves no record. From then on any failure, SIGTERM (what
SLURM and ``timeout`` send) and Ctrl-C included, writes a complete record with
``status: failed`` and the reason, and keeps the resume checkpoint so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench.config import CONF_DIR
from bench.engine.attacking import GRID_IMAGES
from bench.engine.decision import RULES
from bench.engine.plan import Plan, defense_name, instantiate_checked, make_plan
from bench.engine.runner import Outcome, Runner
from bench.provenance import code_version, package_versions
from bench.reporting.leaderboard import build_leaderboard, collect_records
from bench.reporting.loggers import NoLogger, image_grid
from bench.reporting.metrics import Accuracy
from bench.reporting.records import (
    EXAMPLES_NAME,
    PER_SAMPLE_NAME,
    AttackResult,
    RunRecord,
    write_record,
)
from common import seeds
from common.errors import ConfigError, Interrupted

log = logging.getLogger(__name__)


def evaluate(
    cfg: DictConfig,
    *,
    output_dir: Path,
    choices: Mapping[str, str | None] | None = None,
    parts: Mapping[str, Any] | None = None,
) -> RunRecord:
    """Run one evaluation and write ``record.json`` and ``per_sample.csv`` into ``output_dir``.

    Args:
        cfg: the composed config (``conf/eval.yaml``).
        output_dir: where the record goes (the Hydra run dir under ``python -m bench``).
        choices: the config-group choices (``hydra.runtime.choices``); taken from the Hydra
            config when not given.
        parts: the defense, classifier source or dataset already built (in-memory objects
            of :func:`bench.api.evaluate`), in place of their config nodes' builds.

    Returns:
        The record, ``status="completed"``.

    Raises:
        ConfigError, DataNotFoundError, CheckpointError: bad input, before any heavy compute;
            no record is written.
        BaseException: anything failing later (SIGTERM as :class:`common.errors.Interrupted`,
            Ctrl-C as ``KeyboardInterrupt``); a record with ``status="failed"`` is written first.
    """
    started, t0 = datetime.now(UTC), time.perf_counter()
    choices = dict(choices if choices is not None else _hydra_choices(cfg))
    name = defense_name(cfg, choices.get("defense"))
    plan = make_plan(cfg, name, str(choices.get("classifier")), parts)
    logger = instantiate_checked(cfg.logger, "logger") if cfg.get("logger") else NoLogger()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = _new_record(cfg, plan, choices, started)
    # A few images per stage always: the detail page shows them, a dashboard logs them.
    runner = Runner(plan, _resume_path(cfg, plan), keep_examples=True, start=t0)
    try:
        with _sigterm_raises():
            runner.run()
        record.status = "completed"
    except BaseException as err:
        record.error = _reason(err)
        log.error("run failed: %s", record.error)
        raise
    finally:
        _fill(record, plan, runner.outcome, time.perf_counter() - t0)
        write_record(record, output_dir)
        _write_per_sample(runner.outcome, output_dir)
        _write_examples(runner.outcome, output_dir)
        _log_dashboard(cfg, logger, record, runner.outcome)
    runner.clear()  # only reached when the run completed and its record is written
    return record


def _new_record(
    cfg: DictConfig, plan: Plan, choices: Mapping[str, Any], started: datetime
) -> RunRecord:
    """The record as it stands before any work: what runs, on what, with which seeds."""
    resolved = {  # the run's own config; the `hydra` node (present under compose) is Hydra's
        key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        for key, node in cfg.items()
        if key != "hydra"
    }
    d = plan.decision
    attack_seeds = {
        name: {
            "attack": seeds.attack(plan.seed, k),
            "view": seeds.attack_view(plan.seed, k),
            "judge": seeds.judge(plan.seed, k),
        }
        for k, name in enumerate(plan.attacks)
    }
    return RunRecord(
        status="failed",
        choices={k: v for k, v in choices.items() if not k.startswith("hydra/")},
        config=resolved,
        dataset=plan.dataset.name,
        classifier=str(choices.get("classifier")),
        defense=plan.name,
        threat={"norm": plan.norm, "eps": plan.eps, "name": choices.get("threat")},
        n_samples=len(plan.indices),
        indices=plan.indices.tolist(),
        seeds={
            "seed": plan.seed,
            "subset_seed": plan.subset_seed,
            "evaluation": seeds.evaluation(plan.seed),
            "attacks": attack_seeds,
        },
        device=str(plan.device),
        started=started.isoformat(timespec="seconds"),
        finished="",
        wall_s=0.0,
        versions=package_versions(),
        git=code_version(),
        defense_info=asdict(type(plan.defense).info),
        headline_rule=d.headline,
        decision={
            **asdict(d),
            "evaluate": "after" if d.success_at == "final" else "while",
            "warnings": plan.warnings,
        },
        cascade=plan.cascade,
        shard=plan.shard,
        fingerprint=plan.fingerprint,
    )


def _fill(record: RunRecord, plan: Plan, outcome: Outcome, wall_s: float) -> None:
    """Put what the engine measured into the record (accuracies with their intervals)."""
    headline = plan.decision.headline
    record.classifier_info, record.defense_parts = outcome.classifier_info, outcome.defense_parts
    for name, (stats, tallies) in outcome.attacks.items():
        rules = {rule: Accuracy.from_tally(t) for rule, t in tallies.items()}
        record.attacks[name] = AttackResult(
            **asdict(stats), robust_acc=rules[headline], rules=rules
        )
    if outcome.clean is not None:
        clean = {rule: Accuracy.from_tally(t) for rule, t in outcome.clean.items()}
        robust = {r: Accuracy.from_tally(t) for r, t in (outcome.robust or {}).items()}
        record.clean_acc, record.robust_acc = clean[headline], robust.get(headline)
        record.rules = {
            rule: {"clean": clean[rule], **({"robust": robust[rule]} if robust else {})}
            for rule in RULES
        }
    if outcome.per_sample is not None:
        record.per_sample_file = PER_SAMPLE_NAME
    record.diagnostics, record.verdict = outcome.diagnostics, outcome.verdict
    record.escalation = outcome.escalation
    record.finished = datetime.now(UTC).isoformat(timespec="seconds")
    record.defense_info["calls_per_purify"] = plan.defense.calls_per_purify
    record.wall_s = wall_s
    # The evaluation's own time: a cold run's wall time is mostly training (or waiting for
    # another job of the sweep to finish training a shared network), not the defense's cost.
    record.cost = {
        **outcome.cost,
        "wall_s": wall_s,
        "eval_s": wall_s - outcome.cost.get("setup_s", 0.0),
    }


def _write_per_sample(outcome: Outcome, output_dir: Path) -> None:
    if outcome.per_sample is not None:
        pd.DataFrame(outcome.per_sample).to_csv(output_dir / PER_SAMPLE_NAME, index=False)


def _write_examples(outcome: Outcome, output_dir: Path) -> None:
    """``examples.png``: rows of clean, then each stage's adversarial and purified images."""
    from PIL import Image, PngImagePlugin

    grid = image_grid(outcome.examples, GRID_IMAGES)
    if grid is not None:
        info = PngImagePlugin.PngInfo()  # which row is which, for the detail page's caption
        info.add_text("rows", ", ".join(k for k, v in outcome.examples.items() if v is not None))
        Image.fromarray(grid.numpy()).save(output_dir / EXAMPLES_NAME, pnginfo=info)


def _reason(err: BaseException) -> str:
    """The error a failed record names: the signal for interruptions, else the exception."""
    if isinstance(err, Interrupted):
        return f"interrupted by {err.signal_name}; the resume checkpoint is kept"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted by SIGINT (Ctrl-C); the resume checkpoint is kept"
    return "".join(traceback.format_exception_only(err)).strip()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` while a run is under way (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log_dashboard(cfg: DictConfig, logger: Any, record: RunRecord, outcome: Outcome) -> None:
    """Mirror the written record to the dashboard; its failure never costs the record."""
    if isinstance(logger, NoLogger):
        return
    try:
        root = Path(str(cfg.paths.results_dir))
        board = build_leaderboard(collect_records(root)) if root.is_dir() else None
        logger.log_run(record, outcome.examples, board)
    except Exception as err:  # the record is written; a dashboard outage must not hide it
        log.warning("dashboard logging failed (the record is written): %s", err)


def _resume_path(cfg: DictConfig, plan: Plan) -> Path:
    """Where this configuration's per-batch checkpoint lives (one per shard and device)."""
    root = cfg.paths.get("resume_dir") or Path(str(cfg.paths.results_dir)) / "resume"
    shard = f"-shard{plan.shard['index']}of{plan.shard['count']}" if plan.shard else ""
    return Path(str(root)) / f"{plan.fingerprint}{shard}-{plan.device}.pt"


def _hydra_choices(cfg: DictConfig) -> dict[str, str | None]:
    if HydraConfig.initialized():
        return dict(HydraConfig.get().runtime.choices)
    if "hydra" in cfg:
        return dict(cfg.hydra.runtime.choices)
    raise ConfigError("evaluate() needs `choices` when called outside a Hydra app")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def hydra_main(cfg: DictConfig) -> str:
    """The Hydra task of ``python -m bench`` and ``purebench run``; returns the run's status.

    In a sweep a failing job must not take the others down: its failed record (or, for a bad
    config, its error) is logged and the sweep goes on; the end-of-sweep callback rebuilds the
    leaderboard, where the job's row shows ``failed`` with the reason. A single run re-raises,
    a user's error (a bad value) as :class:`bench.cli.ReportedError` for :func:`main` to print
    in one line. SIGTERM ends the process with status 143 (128 + 15) after the failed record is
    written.
    """
    from bench.cli import reported

    hydra_cfg = HydraConfig.get()
    try:
        record = evaluate(cfg, output_dir=Path(hydra_cfg.runtime.output_dir))
    except Interrupted as err:
        raise SystemExit(128 + signal.Signals[err.signal_name].value) from None
    except Exception as err:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            # Raised as is, Hydra would print a line of its own before main's one-line error.
            report = reported(err)
            if report is not None:
                raise report from err
            raise
        log.error("job %s failed: %s", hydra_cfg.job.num, err)
        return "failed"
    return record.status


def main() -> None:
    """Entry point of ``python -m bench`` and ``purebench run``: :func:`hydra_main` on sys.argv.

    ``--help`` shows PureBench's page (:mod:`bench.help`); a bad value ends in one line
    ``error: ...`` and exit status 2, with the traceback under ``--debug``
    (:func:`bench.cli.run_app`).
    """
    from bench.cli import run_app
    from bench.help import help_text

    run_app(hydra_main, help_page=lambda: help_text(CONF_DIR))

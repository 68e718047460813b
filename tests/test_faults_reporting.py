"""Faults as the reporting sees them: a sweep's summary counts every job that failed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from bench.reporting.callbacks import LeaderboardCallback, failed_jobs
from bench.reporting.records import write_record
from tests.test_leaderboard import make_record

LOG_PREFIX = "[2026-01-01 00:00:00,000][bench.run]"


def _job(sweep: Path, name: str, log: tuple[str, ...] = ()) -> Path:
    """A job directory as Hydra leaves it: ``.hydra/`` and the job's log."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (job / "eval.log").write_text("".join(f"{LOG_PREFIX}{line}\n" for line in log))
    return job


def _sweep_config(sweep: Path) -> DictConfig:
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "job": {"name": "eval"}}})


def test_sweep_summary_counts_jobs_that_wrote_no_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    done = _job(sweep, "classifier=a", ("[INFO] - robust accuracy 10.00%",))
    write_record(make_record(classifier="a"), done)
    bad = _job(
        sweep,
        "classifier=b",
        (
            "[INFO] - job 1 failed: an info line quoting the runner is no error",
            "[ERROR] - job 1 failed: ConfigError: an earlier error",
            "[ERROR] - job 1 failed: ConfigError: threat.eps=-1 must be positive",
        ),
    )
    crashed = _job(sweep, "classifier=c", ("[ERROR] - run failed: RuntimeError: boom",))
    write_record(make_record(classifier="c", status="failed", robust=None), crashed)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")

    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="bench.reporting.callbacks")
    LeaderboardCallback(records=str(sweep), out=str(out)).on_multirun_end(_sweep_config(sweep))

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"sweep job {bad} failed: ConfigError: threat.eps=-1 must be positive",
        f"sweep job {crashed} failed: RuntimeError: boom",
    ]
    (summary,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert summary.endswith("(2 rows, 2 failed jobs in this sweep)")
    # The leaderboard is still rebuilt from the records: the crashed job's row says why.
    board = (out / "leaderboard.md").read_text()
    assert "failed: RuntimeError: boom" in board
    assert len([line for line in board.splitlines() if line.startswith("| fashion_mnist")]) == 2
    assert (out / "leaderboard.csv").is_file() and (out / "leaderboard.html").is_file()


def test_a_job_without_a_record_or_a_logged_error_points_at_its_log(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    silent = _job(sweep, "0", ("[INFO] - started",))
    (silent / "eval.log").unlink()
    unreadable = _job(sweep, "1", ("[ERROR] - job 1 failed: OSError: disk full",))
    (unreadable / "record.json").write_text("{not json")
    nested = _job(sweep, "group/2", ("[ERROR] - job 2 failed: KeyError: 'defense'",))
    assert failed_jobs(sweep, "eval") == [
        (silent, "no record (see its log)"),
        (unreadable, "unreadable record.json; its log says: OSError: disk full"),
        (nested, "KeyError: 'defense'"),
    ]
    # Without the task's name every log of the job directory is read.
    assert failed_jobs(sweep)[2] == (nested, "KeyError: 'defense'")

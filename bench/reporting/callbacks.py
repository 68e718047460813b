"""Hydra callbacks: a sweep ends by rebuilding the leaderboard from every record it can see."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bench.reporting.leaderboard import collect_records, write_leaderboard
from bench.reporting.records import RECORD_NAME, RunRecord

log = logging.getLogger(__name__)

# What the runner logs at ERROR level when a job fails before it can write a record (bench/run.py).
_JOB_FAILED = re.compile(r"\bERROR\b.*?\bjob \S+ failed: (?P<error>.*)$")


def failed_jobs(
    sweep_dir: Path,
    task_name: str | None = None,
    records: list[tuple[Path, RunRecord]] | None = None,
) -> list[tuple[Path, str]]:
    """The sweep's failed jobs with their reasons, in the order of their directories.

    A job failed when its record says so, or when its directory (one holding Hydra's
    ``.hydra/``) has no readable record: a job that failed on a bad config writes none. The
    reason of the latter is the last ``job <num> failed: <error>`` line of its log.

    Args:
        sweep_dir: the sweep's ``hydra.sweep.dir``.
        task_name: ``hydra.job.name``; the job's log is ``<task_name>.log`` (every ``*.log`` of
            the job directory when ``None``).
        records: the sweep's records, when the caller read them already.
    """
    records = collect_records(sweep_dir) if records is None else records
    failed = [(path.parent, str(r.error)) for path, r in records if r.status != "completed"]
    recorded = {path.parent for path, _ in records}
    # Resolved as collect_records resolves: a relative sweep dir (make bench's) must match.
    jobs = {p.parent.resolve() for p in Path(sweep_dir).rglob(".hydra") if p.is_dir()}
    failed += [(job, _log_reason(job, task_name)) for job in jobs - recorded]
    return sorted(failed, key=lambda item: item[0])


def _log_reason(job: Path, task_name: str | None) -> str:
    """The error the runner logged for a job without a record, or where to look for it."""
    logs = [job / f"{task_name}.log"] if task_name else sorted(job.glob("*.log"))
    reason = None
    for path in logs:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            match = _JOB_FAILED.search(line)
            if match:
                reason = match["error"]
    if (job / RECORD_NAME).exists():
        return f"unreadable {RECORD_NAME}" + (f"; its log says: {reason}" if reason else "")
    return reason or "no record (see its log)"


class LeaderboardCallback(Callback):
    """Rebuild the leaderboard when a multirun ends (any launcher), and say what failed.

    The sweep's own records (``hydra.sweep.dir``, wherever it points) are read together with
    those under ``records``, so a sweep written outside the results dir still shows.

    Args:
        records: the folder searched for ``record.json`` files (the results dir).
        out: where the leaderboard is written.
    """

    def __init__(self, records: str, out: str) -> None:
        self.records, self.out = Path(records), Path(out)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the leaderboard; log the sweep's failed jobs with their reasons."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        records = collect_records(sweep_dir)
        failed = failed_jobs(sweep_dir, OmegaConf.select(config, "hydra.job.name"), records)
        for where, error in failed:
            log.error("sweep job %s failed: %s", where, error)
        written = write_leaderboard(self.records, self.out, also=[sweep_dir])
        log.info(
            "leaderboard rebuilt from %s and %s: %s (%d rows; this sweep: %d records, %d failed "
            "jobs)",
            self.records,
            sweep_dir,
            written.md,
            len(written.table),
            len(records),
            len(failed),
        )

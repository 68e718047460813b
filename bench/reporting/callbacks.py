"""Hydra callbacks: a sweep ends by rebuilding the leaderboard from every record it can see."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bench.reporting.leaderboard import collect_records, write_leaderboard

log = logging.getLogger(__name__)


class LeaderboardCallback(Callback):
    """Rebuild ``leaderboard.{md,csv}`` when a multirun ends (any launcher), and say what failed.

    Args:
        records: the folder searched for ``record.json`` files (the results dir).
        out: where the leaderboard is written.
    """

    def __init__(self, records: str, out: str) -> None:
        self.records, self.out = Path(records), Path(out)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the leaderboard; log the sweep's failed jobs with their reasons."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = [
            (path.parent, record.error)
            for path, record in collect_records(sweep_dir)
            if record.status != "completed"
        ]
        for where, error in failed:
            log.error("sweep job %s failed: %s", where, error)
        written = write_leaderboard(self.records, self.out)
        log.info(
            "leaderboard rebuilt from %s: %s (%d rows, %d failed jobs in this sweep)",
            self.records,
            written.md,
            len(written.table),
            len(failed),
        )

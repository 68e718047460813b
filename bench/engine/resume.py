"""Per-batch checkpoints of a running evaluation, so a killed run resumes where it stopped.

A run's progress (the clean judgement and every finished attack batch, with its judged
predictions, its pass counts and the few adversarial images kept for the dashboard) is saved
after each batch to ``<resume_dir>/<key>.pt`` by write-then-rename, so a kill at any instant
leaves either the previous or the next checkpoint, never a torn one. The key is the run's config
fingerprint plus its shard and device: starting the same configuration again finds the file,
skips the finished batches and ends with the record an uninterrupted run writes, because every
batch draws its randomness from seeds that depend only on the batch's position (see
``bench.eval.batch_seed``), never on how much ran before it in this process. A completed run
deletes its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Keys of the run config that do not change a result: where things live, which device runs
# it with how many CPU threads, how it is logged, which shard this job is.
NON_RESULT_KEYS = ("paths", "device", "threads", "shard", "logger", "hydra")
FORMAT = 1


def fingerprint(config: dict[str, Any]) -> str:
    """Hash of a resolved run config without the keys that do not change the result."""
    kept = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ResumeState:
    """The saved progress of one run configuration (a shard of it, on one device).

    Args:
        path: the checkpoint file.
        fingerprint: the config fingerprint; a file written for another one is ignored.
    """

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = Path(path), fingerprint
        self.clean: torch.Tensor | None = None
        self.batches: dict[str, dict[int, dict[str, Any]]] = {}
        self.resumed = False
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as err:
            log.warning("ignoring unreadable resume checkpoint %s: %s", self.path, err)
            return
        if data.get("format") != FORMAT or data.get("fingerprint") != self.fingerprint:
            log.warning("ignoring resume checkpoint %s of another configuration", self.path)
            return
        self.clean = data.get("clean")
        self.batches = {k: dict(v) for k, v in data.get("batches", {}).items()}
        self.resumed = self.clean is not None
        done = sum(len(v) for v in self.batches.values())
        if self.resumed:
            log.info(
                "resuming from %s: clean judgement and %d attack batches done", self.path, done
            )

    def done(self, stage: str) -> dict[int, dict[str, Any]]:
        """The finished batches of ``stage`` (attack name), by batch index."""
        return self.batches.setdefault(stage, {})

    def save_clean(self, preds: torch.Tensor) -> None:
        """Record the clean judgement and save."""
        self.clean = preds
        self._save()

    def save_batch(self, stage: str, index: int, out: dict[str, Any]) -> None:
        """Record one finished attack batch and save."""
        self.done(stage)[index] = out
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        torch.save(
            {
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "clean": self.clean,
                "batches": self.batches,
            },
            tmp,
        )
        os.replace(tmp, self.path)

    def clear(self) -> None:
        """Delete the checkpoint (the run completed)."""
        self.path.unlink(missing_ok=True)

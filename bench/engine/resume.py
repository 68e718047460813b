"""Per-batch checkpoints of a running evaluation, so a killed run resumes where it stopped.

A run's progress (the clean judgement and every finished attack batch, :class:`BatchResult`) is
saved after each batch to ``<resume_dir>/<key>.pt`` by write-then-rename, so a kill at any
instant leaves either the previous or the next checkpoint, never a torn one. The key is the
run's fingerprint (config without machine paths, code version, checkpoint digests) plus its
shard and device: starting the same configuration again finds the file, skips the finished
batches and ends with the record an uninterrupted run writes, because every batch draws its
randomness from seeds that depend only on the batch's position (:func:`common.seeds.batch`).
A completed run deletes its checkpoint.

A file that cannot be read, has another structure or belongs to another configuration never
blocks a run: it is set aside (renamed ``*.stale-<time>``) with a warning naming it, and the
run starts fresh.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# 2: batches are BatchResult dicts; the key is the content fingerprint (issue 14).
FORMAT = 2


@dataclass
class BatchResult:
    """One finished attack batch: its judged predictions and what it cost.

    Attributes:
        preds: judged classes ``(draws, n)`` of the batch's adversarial images.
        worst: the largest perturbation in the batch.
        passes: the attack view's pass counts (``forward``, ``backward``, ``purify``).
        judge_purify: purifications spent judging the batch.
        wall_s: seconds the batch took.
        warnings: the attack's warnings on this batch.
        believed: the attack view's own predictions (approximate-gradient attacks), or ``None``.
        on_path: images the attack saw fooled at some iterate (``success_at: any``), or ``None``.
        examples: the first adversarial images of batch 0, for the dashboard, or ``None``.
    """

    preds: Tensor
    worst: float
    passes: dict[str, int]
    judge_purify: int
    wall_s: float
    warnings: list[str] = field(default_factory=list)
    believed: Tensor | None = None
    on_path: Tensor | None = None
    examples: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain containers and tensors (what ``torch.load(weights_only=True)`` reads back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> BatchResult:
        """Rebuild a batch from :meth:`to_dict`; raises ``ValueError`` on any other structure."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not set(data) <= names or "preds" not in data:
            raise ValueError(f"not a batch result: {type(data).__name__}")
        out = cls(**data)
        tensors_ok = isinstance(out.preds, Tensor) and out.preds.dim() == 2
        optional = (out.believed, out.on_path, out.examples)
        if not tensors_ok or not all(t is None or isinstance(t, Tensor) for t in optional):
            raise ValueError("a batch result's predictions are not tensors of the right rank")
        if not isinstance(out.passes, dict) or not isinstance(out.warnings, list):
            raise ValueError("a batch result's passes or warnings have the wrong type")
        return out


class ResumeState:
    """The saved progress of one run configuration (a shard of it, on one device).

    Args:
        path: the checkpoint file.
        fingerprint: the run's fingerprint; a file written for another one is set aside.
        clean_shape: the shape ``(draws, n)`` of the clean judgement this run makes; a file
            holding another shape is set aside.
    """

    def __init__(self, path: Path, fingerprint: str, clean_shape: tuple[int, int]) -> None:
        self.path, self.fingerprint = Path(path), fingerprint
        self.clean_shape = tuple(clean_shape)
        self.clean: Tensor | None = None
        self.batches: dict[str, dict[int, BatchResult]] = {}
        self.resumed = False
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
            clean, batches = self._parse(data)
        except Exception as err:  # any unreadable or foreign file: set aside, never block
            self._set_aside(err)
            return
        self.clean, self.batches, self.resumed = clean, batches, True
        done = sum(len(v) for v in batches.values())
        log.info("resuming from %s: clean judgement and %d attack batches done", self.path, done)

    def _parse(self, data: Any) -> tuple[Tensor, dict[str, dict[int, BatchResult]]]:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a resume checkpoint of format {FORMAT}")
        if data.get("fingerprint") != self.fingerprint:
            raise ValueError(f"written for fingerprint {data.get('fingerprint')!r}")
        clean = data.get("clean")
        if not isinstance(clean, Tensor) or tuple(clean.shape) != self.clean_shape:
            raise ValueError(f"its clean judgement is not a tensor of shape {self.clean_shape}")
        stages = data.get("batches")
        if not isinstance(stages, dict):
            raise ValueError("its batches are not a dict")
        batches = {}
        for stage, done in stages.items():
            if not isinstance(stage, str) or not isinstance(done, dict):
                raise ValueError("its batches are not keyed by attack name")
            batches[stage] = {int(b): BatchResult.from_dict(out) for b, out in done.items()}
        return clean, batches

    def _set_aside(self, why: BaseException) -> None:
        target = self.path.with_name(f"{self.path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(self.path, target)
        except OSError as err:
            log.warning(
                "resume checkpoint %s is unusable (%s) and cannot be moved (%s); starting fresh",
                self.path,
                why,
                err,
            )
            return
        log.warning(
            "resume checkpoint %s is unusable (%s): set aside as %s; starting fresh",
            self.path,
            why,
            target,
        )

    def done(self, stage: str) -> dict[int, BatchResult]:
        """The finished batches of ``stage`` (attack name), by batch index."""
        return self.batches.setdefault(stage, {})

    def save_clean(self, preds: Tensor) -> None:
        """Record the clean judgement and save."""
        self.clean = preds
        self._save()

    def save_batch(self, stage: str, index: int, out: BatchResult) -> None:
        """Record one finished attack batch and save."""
        self.done(stage)[index] = out
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        batches = {k: {b: o.to_dict() for b, o in v.items()} for k, v in self.batches.items()}
        data = {"format": FORMAT, "fingerprint": self.fingerprint, "clean": self.clean}
        try:
            torch.save({**data, "batches": batches}, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not leave a file behind
            raise

    def clear(self) -> None:
        """Delete the checkpoint (the run completed)."""
        self.path.unlink(missing_ok=True)

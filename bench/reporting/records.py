"""Run records: the JSON every evaluation writes, and the only input of the leaderboard."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from bench.engine.stats import AttackStats
from bench.reporting.metrics import Accuracy

SCHEMA_VERSION = 2
RECORD_NAME = "record.json"
PER_SAMPLE_NAME = "per_sample.csv"
EXAMPLES_NAME = "examples.png"  # rows: clean, then each stage's adversarial and purified images


@dataclass(kw_only=True)
class AttackResult(AttackStats):
    """One attack of the suite: what it did and the accuracies it left.

    What it did is :class:`~bench.engine.stats.AttackStats`; the accuracies are added here.

    Attributes:
        robust_acc: accuracy on the subset after this attack, under the run's headline rule.
        rules: accuracy under every decision rule over the clean stage and this attack
            (cumulative over the earlier attacks in a cascade: points they broke are not
            attacked again).
    """

    robust_acc: Accuracy
    rules: dict[str, Accuracy] = field(default_factory=dict)


@dataclass
class RunRecord:
    """Everything one evaluation produced, written as ``record.json`` in its output dir.

    ``robust_acc`` is the per-sample worst case over the suite: an image counts as robust only
    if it is classified correctly clean and after every attack. ``clean_acc`` and ``robust_acc``
    follow ``headline_rule``; ``rules`` holds both under every decision rule (``single``,
    ``avg``, ``worst``, ``vote``; see :mod:`bench.engine.decision`). ``verdict`` is the row's
    state: ``"converged"`` (the escalation stopped moving the number), ``"bound"`` (still
    falling when the budget ran out, or the attack's view too noisy: an upper bound), the list
    of diagnostics that failed (the evaluation is broken; :mod:`bench.engine.diagnostics`), or
    ``"not run"``; records before the escalation say ``"ok"``. ``escalation`` is the path: every
    level's budget, cost and accuracies (:mod:`bench.engine.escalation`).
    """

    status: str  # "completed" or "failed"
    choices: dict[str, str]
    config: dict[str, Any]
    dataset: str
    classifier: str
    defense: str
    threat: dict[str, Any]
    n_samples: int
    indices: list[int]
    seeds: dict[str, Any]
    device: str
    started: str
    finished: str
    wall_s: float
    versions: dict[str, str]
    git: dict[str, Any]
    classifier_info: dict[str, Any] = field(default_factory=dict)
    defense_info: dict[str, Any] = field(default_factory=dict)
    defense_parts: list[dict[str, Any]] = field(default_factory=list)
    clean_acc: Accuracy | None = None
    robust_acc: Accuracy | None = None
    attacks: dict[str, AttackResult] = field(default_factory=dict)
    per_sample_file: str | None = None
    error: str | None = None
    headline_rule: str = "single"
    decision: dict[str, Any] = field(default_factory=dict)
    rules: dict[str, dict[str, Accuracy]] = field(default_factory=dict)
    cascade: bool = True
    diagnostics: dict[str, Any] = field(default_factory=dict)
    verdict: str | list[str] = "not run"
    escalation: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    # ``{"index": i, "count": n}`` when the run evaluated only slice i of n of the subset.
    shard: dict[str, int] | None = None
    # Hash of the resolved config without shard, paths, device and logger: shards of one
    # configuration share it, and only records with equal fingerprints may be merged.
    fingerprint: str = ""
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Return the record as plain JSON-able data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Rebuild a record from :meth:`to_dict` output (or a parsed ``record.json``)."""
        data = dict(data)
        for key in ("clean_acc", "robust_acc"):
            if data.get(key) is not None:
                data[key] = Accuracy(**data[key])
        data["attacks"] = {
            name: AttackResult(
                **{
                    **res,
                    "robust_acc": Accuracy(**res["robust_acc"]),
                    "rules": {k: Accuracy(**v) for k, v in res.get("rules", {}).items()},
                }
            )
            for name, res in data.get("attacks", {}).items()
        }
        data["rules"] = {
            rule: {k: Accuracy(**v) for k, v in accs.items()}
            for rule, accs in data.get("rules", {}).items()
        }
        return cls(**data)


class RecordError(ValueError):
    """A parseable record whose field has the wrong type or value (the message names it)."""


def _bad(field: str, value: Any, allowed: str) -> RecordError:
    return RecordError(f"field {field}={value!r} is not allowed; it must be {allowed}")


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_record(record: RunRecord) -> RunRecord:
    """``record`` if every field the leaderboard reads has a usable type; else :class:`RecordError`.

    A record is JSON anyone may edit or another version may have written: one bad field must
    cost that record, never the whole leaderboard.
    """
    for name in ("status", "dataset", "classifier", "defense", "finished", "fingerprint"):
        if not isinstance(getattr(record, name), str):
            raise _bad(name, getattr(record, name), "a string")
    if not isinstance(record.threat, dict):
        raise _bad("threat", record.threat, "a mapping with norm and eps")
    if not isinstance(record.threat.get("norm"), str):
        raise _bad("threat.norm", record.threat.get("norm"), "a string such as 'Linf'")
    if not _number(record.threat.get("eps")) or record.threat["eps"] < 0:
        raise _bad("threat.eps", record.threat.get("eps"), "a finite number >= 0")
    if isinstance(record.n_samples, bool) or not isinstance(record.n_samples, int):
        raise _bad("n_samples", record.n_samples, "an integer")
    if not _number(record.wall_s):
        raise _bad("wall_s", record.wall_s, "a finite number")
    for name in ("choices", "config", "cost", "decision", "diagnostics", "escalation"):
        if not isinstance(getattr(record, name), dict):
            raise _bad(name, getattr(record, name), "a mapping")
    accuracies = {"clean_acc": record.clean_acc, "robust_acc": record.robust_acc}
    accuracies.update({f"attacks.{a}.robust_acc": r.robust_acc for a, r in record.attacks.items()})
    for name, acc in accuracies.items():
        for part in ("value", "low", "high"):
            if acc is not None and not _number(getattr(acc, part)):
                raise _bad(f"{name}.{part}", getattr(acc, part), "a finite number")
    return record


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        # mkstemp creates the file 0600; outputs get the mode every other file gets (0666 less
        # the umask), so a record is as readable as the per-sample table beside it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """This process's umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable read sets it, so set it back at once
    os.umask(mask)
    return mask


def write_record(record: RunRecord, output_dir: Path) -> Path:
    """Write ``record.json`` into ``output_dir`` atomically and return its path."""
    path = output_dir / RECORD_NAME
    write_json_atomic(path, record.to_dict())
    return path


def read_record(path: Path) -> RunRecord:
    """Read a ``record.json``."""
    with open(path) as fh:
        return RunRecord.from_dict(json.load(fh))

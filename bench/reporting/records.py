"""Run records: the JSON every evaluation writes, and the only input of the leaderboard."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.reporting.metrics import Accuracy

SCHEMA_VERSION = 2
RECORD_NAME = "record.json"
PER_SAMPLE_NAME = "per_sample.csv"


@dataclass
class AttackResult:
    """One attack of the suite, run on every clean-correct image of the subset.

    Attributes:
        target: the attack's ``_target_`` (its implementation).
        robust_acc: accuracy on the subset after this attack alone.
        n_attacked: images the attack ran on (still robust under some rule when it started, in
            a cascade; clean-correct otherwise).
        wall_s: seconds spent in the attack, its judging included.
        max_perturbation: largest perturbation norm it returned (threat norm).
        warnings: what the attack's own checks reported (AutoAttack's flags).
        kind: ``white-box``, ``black-box`` or ``transfer``.
        view: how the attack saw the defense (gradient mode, EOT, randomness).
        rules: accuracy under every decision rule over the clean stage and this attack
            (cumulative over the earlier attacks in a cascade: points they broke are not
            attacked again).
        passes: images pushed through the attack's view: classifier forwards, backwards
            reaching the input, purifier calls (EOT samples counted one by one).
        purifier_calls_per_image: purifier network evaluations per attacked image, the
            attack's and its judging's together (``passes.purify`` times the defense's NFE).
        peak_memory_mb: peak memory during the attack (CUDA allocator on GPU; the process's
            resident high-water mark on CPU).
        believed_fooled: images the attack's own view judged fooled (approximate-gradient
            and transfer attacks only).
        transfer_failure: fraction of those that the real defense classified correctly.
        broken_on_path: images the attack saw fooled at some iterate (attacks that track it).
    """

    target: str
    robust_acc: Accuracy  # under the run's headline decision rule
    n_attacked: int
    wall_s: float
    max_perturbation: float
    warnings: list[str] = field(default_factory=list)
    kind: str = "white-box"
    view: dict[str, Any] = field(default_factory=dict)
    rules: dict[str, Accuracy] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    purifier_calls_per_image: float = 0.0
    peak_memory_mb: float | None = None
    believed_fooled: int | None = None
    transfer_failure: float | None = None
    broken_on_path: int | None = None


@dataclass
class RunRecord:
    """Everything one evaluation produced, written as ``record.json`` in its output dir.

    ``robust_acc`` is the per-sample worst case over the suite: an image counts as robust only
    if it is classified correctly clean and after every attack. ``clean_acc`` and ``robust_acc``
    follow ``headline_rule``; ``rules`` holds both under every decision rule (``single``,
    ``avg``, ``worst``, ``vote``; see :mod:`bench.robust_eval`). ``verdict`` is ``"ok"`` or the
    list of diagnostics that failed (:mod:`bench.diagnostics`).
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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(record: RunRecord, output_dir: Path) -> Path:
    """Write ``record.json`` into ``output_dir`` atomically and return its path."""
    path = output_dir / RECORD_NAME
    write_json_atomic(path, record.to_dict())
    return path


def read_record(path: Path) -> RunRecord:
    """Read a ``record.json``."""
    with open(path) as fh:
        return RunRecord.from_dict(json.load(fh))
